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
(``NAME.yaml``), and are named by ``NAME`` in problem files. An exact Gaussian-mixture prior is
stored the same way (architecture ``GaussianMixture``: weights, means and the upper triangles of the
covariances); the shipped one is the patch-GMM ``natural_gmm``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import Tensor

from invdiff.networks import EpsilonNetwork, UNet
from invdiff.prior import GaussianMixturePrior, NetworkPrior
from invdiff.sde import SDE, sde_from_settings

__all__ = ["CheckpointError", "SHIPPED_PRIORS_DIRECTORY", "shipped_priors", "save_checkpoint", "read_metadata",
           "load_checkpoint", "load_prior", "save_gaussian_mixture", "load_gaussian_mixture", "natural_gaussian_mixture",
           "NATURAL_GMM_PATH"]

FORMAT = "invdiff-prior"
FORMAT_VERSION = 1
SHIPPED_PRIORS_DIRECTORY = Path(__file__).parent / "priors"
_ARCHITECTURES = {"UNet": UNet}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what it is loaded into."""


def shipped_priors() -> list[str]:
    """Names of the network priors that ship with the package (``natural_gmm``, a mixture, is built by
    ``natural_gaussian_mixture``)."""
    return sorted(path.stem for path in SHIPPED_PRIORS_DIRECTORY.glob("*.safetensors") if path != NATURAL_GMM_PATH)


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
        raise CheckpointError(f"checkpoint '{path}' " + ("is not a file" if path.exists() else "does not exist"))
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
    if not isinstance(document, dict):
        raise CheckpointError(f"checkpoint '{path}' has corrupt metadata: a JSON object is needed, got "
                              f"{type(document).__name__}")
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
    except (KeyError, TypeError, ValueError, ZeroDivisionError, RuntimeError) as error:
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
    not_float = sorted(name for name, value in tensors.items() if not value.is_floating_point())
    if not_float:
        raise CheckpointError(f"checkpoint '{path}' holds weights that are not floating point ({not_float[:3]}, "
                              f"{tensors[not_float[0]].dtype})")
    unet.load_state_dict({name: value.float() for name, value in tensors.items()})
    return unet.eval(), document


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex: what a summary records of the checkpoint it ran on (the same path can
    hold other weights, e.g. a shipped prior retrained in place)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    try:
        sde = sde_from_settings(document["sde"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"checkpoint '{path}' has no valid 'sde' in its metadata ({error!r})") from None
    event_shape, data_range = document.get("event_shape"), document.get("data_range", (-1.0, 1.0))
    if not (isinstance(event_shape, list) and len(event_shape) == 3
            and all(isinstance(size, int) and size > 0 for size in event_shape)):
        raise CheckpointError(f"checkpoint '{path}': metadata 'event_shape' must be [channels, height, width] of "
                              f"positive integers, got {event_shape!r}")
    if not (isinstance(data_range, (list, tuple)) and len(data_range) == 2
            and all(isinstance(value, (int, float)) for value in data_range) and data_range[0] < data_range[1]):
        raise CheckpointError(f"checkpoint '{path}': metadata 'data_range' must be [low, high] with low < high, got "
                              f"{data_range!r}")
    network = EpsilonNetwork(unet, sde, data_std=document.get("data_std", 0.5))
    described = {key: document[key] for key in ("fully_convolutional", "data", "training") if key in document}
    return NetworkPrior(network, sde, tuple(event_shape), document.get("parametrisation", "epsilon"),
                        tuple(data_range), name=document.get("name", path.stem),
                        metadata={"checkpoint": str(path), "checkpoint_sha256": file_sha256(path), **described},
                        batch_size=batch_size,
                        clip_denoised=clip_denoised)


# --- exact Gaussian-mixture priors in the same format ---------------------------------------------

#: the file of the patch-GMM prior ``natural_gmm``, written by ``benchmarks/fit_natural_gmm.py``
NATURAL_GMM_PATH = SHIPPED_PRIORS_DIRECTORY / "natural_gmm.safetensors"

#: the ``architecture`` that a checkpoint holding a Gaussian mixture records in its metadata
GAUSSIAN_MIXTURE_ARCHITECTURE = "GaussianMixture"


def save_gaussian_mixture(path: str | Path, weights: Tensor, means: Tensor, covariances: Tensor,
                          metadata: dict) -> Path:
    """Write a full-covariance mixture to ``path`` (safetensors, float32; JSON metadata as in ``invdiff.checkpoints``).

    Each covariance is symmetric, so only its upper triangle is stored (``triu_indices`` order):
    ``d (d + 1) / 2`` numbers instead of ``d^2``, which halves the file without rounding anything
    beyond float32.
    """
    path = Path(path)
    dimension = means.shape[1]
    upper = torch.triu_indices(dimension, dimension)
    tensors = {"weights": torch.as_tensor(weights), "means": torch.as_tensor(means),
               "covariances_upper": torch.as_tensor(covariances)[:, upper[0], upper[1]]}
    tensors = {name: value.to(torch.float32).contiguous() for name, value in tensors.items()}
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": GAUSSIAN_MIXTURE_ARCHITECTURE,
                **metadata}
    temporary = path.with_name(path.name + ".partial")
    temporary.write_bytes(save(tensors, metadata={"invdiff": json.dumps(document)}))
    temporary.replace(path)
    return path


def load_gaussian_mixture(path: str | Path, sde: SDE) -> GaussianMixturePrior:
    """The ``GaussianMixturePrior`` (under ``sde``) stored in ``path`` by ``save_gaussian_mixture``.

    The file and its metadata are checked (format, architecture, tensor names and shapes against
    the recorded components and event shape); anything wrong raises ``CheckpointError`` in one line.
    """
    document = read_metadata(path)
    if document.get("architecture") != GAUSSIAN_MIXTURE_ARCHITECTURE:
        raise CheckpointError(f"checkpoint '{path}' holds a {document.get('architecture')}, not a "
                              f"{GAUSSIAN_MIXTURE_ARCHITECTURE}")
    try:
        tensors = load_file(str(path))
        event_shape = tuple(int(size) for size in document["event_shape"])
        num_components = int(document["fit"]["components"])
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint '{path}' is corrupt: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint '{path}' lacks its event_shape or fit.components: {error!r}") from None
    dimension = math.prod(event_shape)
    expected = {"weights": (num_components,), "means": (num_components, dimension),
                "covariances_upper": (num_components, dimension * (dimension + 1) // 2)}
    found = {name: tuple(value.shape) for name, value in tensors.items()}
    if found != expected:
        raise CheckpointError(f"checkpoint '{path}' has tensors {found}; its metadata ({num_components} components, "
                              f"event shape {event_shape}) needs {expected}")
    upper = torch.triu_indices(dimension, dimension)
    covariances = torch.zeros((num_components, dimension, dimension), dtype=torch.float64)
    covariances[:, upper[0], upper[1]] = tensors["covariances_upper"].to(torch.float64)
    covariances[:, upper[1], upper[0]] = tensors["covariances_upper"].to(torch.float64)
    described = {key: document[key] for key in ("data", "fit") if key in document}
    return GaussianMixturePrior(tensors["weights"], tensors["means"], covariances, sde, event_shape,
                                tuple(document.get("data_range", (-1.0, 1.0))), document.get("name", Path(path).stem),
                                {"checkpoint": str(path), "checkpoint_sha256": file_sha256(path), **described})


def natural_gaussian_mixture(sde: SDE) -> GaussianMixturePrior:
    """The patch-GMM prior ``natural_gmm``: 16x16 grayscale patches of the training photographs, exact score.

    The classical image prior of EPLL (Zoran and Weiss, ICCV 2011): a full-covariance Gaussian
    mixture fitted by EM to patches at the natural prior's scales (the full patch, mean included,
    since problems observe absolute intensities). Its metadata records the data, the fit and the
    held-out log-likelihood that chose the number of components; refit with
    ``python benchmarks/fit_natural_gmm.py``.
    """
    return load_gaussian_mixture(NATURAL_GMM_PATH, sde)
