"""invdiff's prior checkpoints: safetensors weights plus JSON metadata, and the priors shipped with the package.

A checkpoint is one ``.safetensors`` file. Its tensors are the UNet's weights (the EMA weights,
usually in half precision); its metadata holds one JSON document under the key ``invdiff``::

    {"format": "invdiff-prior", "format_version": 1,
     "architecture": "UNet", "arguments": {...},            # invdiff.networks.UNet(**arguments)
     "parametrisation": "epsilon", "data_std": 0.5,
     "sde": {"type": "vp", ...}, "event_shape": [1, 32, 32], "data_range": [-1, 1],
     "data": {...}, "training": {...}, "versions": {...}}

Loading reads tensors and JSON only; nothing pickled is ever executed. The shipped priors live
in ``invdiff/priors/NAME.safetensors`` next to the training configuration that made them
(``NAME.yaml``), and are named by ``NAME`` in problem files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from invdiff.networks import EpsilonNetwork, UNet
from invdiff.prior import NetworkPrior
from invdiff.sde import sde_from_settings

__all__ = ["CheckpointError", "SHIPPED_PRIORS_DIRECTORY", "shipped_priors", "save_checkpoint", "read_metadata",
           "load_checkpoint", "load_prior"]

FORMAT = "invdiff-prior"
FORMAT_VERSION = 1
SHIPPED_PRIORS_DIRECTORY = Path(__file__).parent / "priors"
_ARCHITECTURES = {"UNet": UNet}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what it is loaded into."""


def shipped_priors() -> list[str]:
    """Names of the priors that ship with the package."""
    return sorted(path.stem for path in SHIPPED_PRIORS_DIRECTORY.glob("*.safetensors"))


def save_checkpoint(path: str | Path, unet: UNet, metadata: dict, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``unet``'s weights (cast to ``dtype``) and ``metadata`` (JSON) to ``path``, atomically."""
    path = Path(path)
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": type(unet).__name__,
                "arguments": unet.arguments, **metadata}
    tensors = {name: value.detach().to("cpu", dtype).contiguous() for name, value in unet.state_dict().items()}
    temporary = path.with_name(path.name + ".partial")
    # bytes written by Python, not save_file (which creates files readable by their owner only): the umask applies
    temporary.write_bytes(save(tensors, metadata={"invdiff": json.dumps(document)}))
    temporary.replace(path)
    return path


def read_metadata(path: str | Path) -> dict:
    """The JSON metadata of a checkpoint, checked to be an invdiff prior."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("invdiff")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint '{path}' is not a readable safetensors file: {error}") from None
    if raw is None:
        raise CheckpointError(f"checkpoint '{path}' has no 'invdiff' metadata; it was not written by invdiff "
                              "(load external checkpoints with invdiff.loaders)")
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint '{path}' has corrupt metadata: {error}") from None
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format {document.get('format')} version "
                              f"{document.get('format_version')}; expected {FORMAT} version {FORMAT_VERSION}")
    return document


def load_checkpoint(path: str | Path) -> tuple[UNet, dict]:
    """The UNet (float32, eval mode) and the metadata stored in ``path``."""
    document = read_metadata(path)
    architecture = _ARCHITECTURES.get(document.get("architecture"))
    if architecture is None:
        raise CheckpointError(f"checkpoint '{path}' has architecture '{document.get('architecture')}'; "
                              f"allowed: {', '.join(_ARCHITECTURES)}")
    try:
        unet = architecture(**document["arguments"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint '{path}' has bad architecture arguments: {error}") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint '{path}' is corrupt: {error}") from None
    expected = unet.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong_shape = sorted(name for name in set(expected) & set(tensors) if expected[name].shape != tensors[name].shape)
    if missing or unexpected or wrong_shape:
        raise CheckpointError(f"checkpoint '{path}' does not match its architecture: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]}")
    unet.load_state_dict({name: value.float() for name, value in tensors.items()})
    return unet.eval(), document


def load_prior(name_or_path: str | Path, batch_size: int | None = 256, clip_denoised: bool = True) -> NetworkPrior:
    """A ``NetworkPrior`` from a shipped prior's name (``digits``, ``natural``) or a checkpoint path.

    ``clip_denoised`` (default on) projects Tweedie's estimate onto the data range (see ``NetworkPrior``).
    """
    path = Path(name_or_path)
    if path.suffix != ".safetensors":
        if str(name_or_path) not in shipped_priors():
            raise CheckpointError(f"unknown prior '{name_or_path}'; shipped priors: {', '.join(shipped_priors())} "
                                  "(or give the path of a .safetensors checkpoint)")
        path = SHIPPED_PRIORS_DIRECTORY / f"{name_or_path}.safetensors"
    unet, document = load_checkpoint(path)
    sde = sde_from_settings(document["sde"])
    network = EpsilonNetwork(unet, sde, data_std=document.get("data_std", 0.5))
    described = {key: document[key] for key in ("fully_convolutional", "data", "training") if key in document}
    return NetworkPrior(network, sde, tuple(document["event_shape"]), document.get("parametrisation", "epsilon"),
                        tuple(document.get("data_range", (-1.0, 1.0))), name=document.get("name", path.stem),
                        metadata={"checkpoint": str(path), **described}, batch_size=batch_size,
                        clip_denoised=clip_denoised)
