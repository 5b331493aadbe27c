"""Priors from other people's checkpoints and denoisers, mapped onto ``NetworkPrior``.

Every loader reads a local path; nothing is downloaded and nothing pickled is executed (``.pt``
files go through ``torch.load(..., weights_only=True)``, the rest is safetensors and JSON). A file
that is missing, unreadable or does not match the architecture raises ``CheckpointError`` naming
the file and what is wrong. The formats:

* guided-diffusion UNets (Dhariwal & Nichol, NeurIPS 2021; the FFHQ model of DPS, Chung et al.,
  ICLR 2023): a ``.pt`` state dict with keys ``input_blocks.*``, ``middle_block.*``,
  ``output_blocks.*``, ``out.2.*``, loaded into deepinv's ``DiffUNet``. It predicts the noise on the
  linear DDPM schedule; a learned-variance model's second half of channels is dropped.
* diffusers ``UNet2DModel`` folders (von Platen et al., the diffusers library): ``config.json``
  and ``diffusion_pytorch_model.safetensors``, with the training schedule of
  ``scheduler_config.json`` (next to them or in ``../scheduler/``). Noise, clean-image and
  v-prediction (Salimans & Ho, ICLR 2022) on a linear beta schedule; score-SDE VE models (Song et
  al., ICLR 2021; ``ScoreSdeVeScheduler``) predict the score.
* EDM ``SongUNet`` weights (Karras et al., NeurIPS 2022) in deepinv's ``NCSNpp``: a denoiser
  ``D(x, sigma)`` of ``x = x_0 + sigma n`` with EDM's preconditioning (``sigma_data = 0.5``).
* any deepinv denoiser ``D(x, sigma)`` on [0, 1] images, through Tweedie's formula (Robbins 1956;
  Efron, JASA 2011): ``E[x_0 | x_t]`` is the MMSE denoiser of ``x_t / lambda_t`` at noise level
  ``sigma_t / lambda_t``.

Time conventions. A state at continuous time ``t`` of a ``DDPMSchedule`` with ``N`` steps has had
``t N`` betas applied. guided-diffusion and diffusers train index ``k`` (from 0) on
``alphas_cumprod[k] = prod_{j <= k} (1 - beta_j)``, that is ``k + 1`` betas, so the network is
called with ``k = t N - 1``. Noise-level networks (EDM, score SDE, deepinv denoisers) get ``sigma_t``
itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from invdiff.checkpoints import CheckpointError
from invdiff.prior import NetworkPrior
from invdiff.sde import SDE, VESDE, DDPMSchedule

__all__ = ["load_guided_diffusion", "load_diffusers_unet", "load_ncsnpp", "denoiser_prior",
           "TweedieDenoiserNetwork"]

#: buffers deepinv's ``DiffUNet`` computes itself and saves with its weights; not in guided-diffusion files
_DIFFUNET_OWN_BUFFERS = ("sqrt_alphas_cumprod", "sqrt_1m_alphas_cumprod")
#: deepinv's ``DiffUNet`` has two configurations, told apart by their base channels: 128 (``large_model=False``,
#: DPS's FFHQ model) and 256 (``large_model=True``, OpenAI's unconditional ImageNet model)
_DIFFUNET_LARGE_MODEL_BY_BASE_CHANNELS = {128: False, 256: True}
#: diffusers' default training schedule (``DDPMScheduler``)
_DIFFUSERS_DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
                                "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}
_DIFFUSERS_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _first_line(error: Exception, limit: int = 200) -> str:
    """The first line of an error's message, shortened to ``limit`` characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or of a ``.pt``/``.pth`` state dict (read without running pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever the bytes are, they are not a checkpoint we can read
        pickled_object = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if pickled_object:
            reason = f"it holds a pickled {pickled_object.group(1)}; that is not loaded, since unpickling can run code"
        elif str(error).startswith("Weights only load failed"):  # the rest of torch's message is about pickling
            reason = "it is corrupt or not a PyTorch file"
        else:
            reason = f"it is corrupt or not a {'safetensors' if path.suffix == '.safetensors' else 'PyTorch'} file: " \
                     f"{type(error).__name__}: {_first_line(error)}"
        raise CheckpointError(f"checkpoint '{path}' is not a readable state dict ({reason}); give a .pt state dict "
                              "of tensors or a .safetensors file") from None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        description = sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint '{path}' is not a flat state dict of tensors (it holds {description}); "
                              "save the network's state_dict() itself")
    return state


def _load_matching(module: nn.Module, state: dict[str, Tensor], path: str | Path, architecture: str,
                   computed_buffers: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` after checking names and shapes; ``computed_buffers`` may be absent."""
    expected = {name: value for name, value in module.state_dict().items() if name not in computed_buffers}
    provided = {name: value for name, value in state.items() if name not in computed_buffers}
    missing, unexpected = sorted(set(expected) - set(provided)), sorted(set(provided) - set(expected))
    wrong_shape = [f"{name} {tuple(provided[name].shape)} (model: {tuple(expected[name].shape)})"
                   for name in sorted(set(expected) & set(provided)) if provided[name].shape != expected[name].shape]
    if missing or unexpected or wrong_shape:
        problems = [f"{len(found)} {kind} (first: {', '.join(found[:3])})"
                    for kind, found in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("wrong shapes", wrong_shape)) if found]
        raise CheckpointError(f"checkpoint '{path}' does not match the {architecture}: {'; '.join(problems)}")
    module.load_state_dict(provided, strict=False)


def _training_timestep(schedule: DDPMSchedule, times: Tensor) -> Tensor:
    """The 0-based training index ``t N - 1`` of guided-diffusion and diffusers (see the module docstring)."""
    return schedule.timestep(times) - 1


def _as_image_batch(values: Tensor, like: Tensor) -> Tensor:
    """Per-element coefficients ``(B,)`` shaped to broadcast against the batch ``like``."""
    return values.to(like).view(-1, *[1] * (like.dim() - 1))


class GuidedDiffusionNetwork(nn.Module):
    """``eps_hat(x_t, t)`` of a guided-diffusion UNet: the first ``channels`` outputs at index ``t N - 1``."""

    def __init__(self, unet: nn.Module, schedule: DDPMSchedule, channels: int):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.channels = channels

    def forward(self, x: Tensor, times: Tensor) -> Tensor:
        output = self.unet(x, _training_timestep(self.schedule, times), type_t="timestep")
        return output[:, :self.channels]


class DiffusersNetwork(nn.Module):
    """A diffusers ``UNet2DModel`` as ``network(x_t, t)``.

    On a DDPM schedule it is called at index ``t N - 1``; a v-prediction ``v = lambda_t eps -
    sigma_t x_0`` is returned as the noise ``eps = sigma_t x_t + lambda_t v`` (``lambda^2 + sigma^2
    = 1``). On a VE schedule it is called at the noise level ``sigma_t`` and returns the score.
    """

    def __init__(self, unet: nn.Module, sde: SDE, channels: int, prediction_type: str):
        super().__init__()
        self.unet = unet
        self.sde = sde
        self.channels = channels
        self.prediction_type = prediction_type

    def forward(self, x: Tensor, times: Tensor) -> Tensor:
        if isinstance(self.sde, DDPMSchedule):
            conditioning = _training_timestep(self.sde, times)
        else:
            conditioning = self.sde.sigma_t(times)
        output = self.unet(x, conditioning.to(device=x.device, dtype=x.dtype)).sample[:, :self.channels]
        if self.prediction_type == "v_prediction":
            lambda_t = _as_image_batch(self.sde.lambda_t(times), x)
            sigma_t = _as_image_batch(self.sde.sigma_t(times), x)
            return sigma_t * x + lambda_t * output
        return output


class TweedieDenoiserNetwork(nn.Module):
    """``x0_hat(x_t, t) = 2 D((x_t / lambda_t + 1) / 2, sigma_t / (2 lambda_t)) - 1`` for a denoiser on [0, 1].

    ``x_t / lambda_t = x_0 + (sigma_t / lambda_t) z`` in [-1, 1], which is ``(x_0 + 1) / 2`` plus
    noise of standard deviation ``sigma_t / (2 lambda_t)`` in [0, 1]; the MMSE denoiser of that is
    Tweedie's ``E[x_0 | x_t]``. ``NetworkPrior`` casts its inputs to the dtype of the network's first
    parameter, so this module holds an empty parameter of ``dtype`` (denoisers such as deepinv's
    ``MMSE`` or classical filters have none of their own).
    """

    def __init__(self, denoiser: nn.Module, sde: SDE, dtype: torch.dtype):
        super().__init__()
        self.dtype_anchor = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        self.denoiser = denoiser
        self.sde = sde

    def forward(self, x: Tensor, times: Tensor) -> Tensor:
        lambda_t, sigma_t = self.sde.lambda_t(times), self.sde.sigma_t(times)
        unit_range = (x / _as_image_batch(lambda_t, x) + 1) / 2
        return 2 * self.denoiser(unit_range, (sigma_t / (2 * lambda_t)).to(x)) - 1


def load_guided_diffusion(path: str | Path, *, image_size: int, in_channels: int | None = None,
                          num_timesteps: int = 1000, beta_start: float | None = None, beta_end: float | None = None,
                          batch_size: int | None = None) -> NetworkPrior:
    """A prior from a guided-diffusion / DPS UNet state dict (``.pt``), on images ``(C, image_size, image_size)``.

    The architecture is read from the weights: the channels (``in_channels``, if given, is checked),
    deepinv's small (128 base channels, DPS's ``ffhq_10m.pt``) or large (256, OpenAI's
    ``256x256_diffusion_uncond.pt``) ``DiffUNet``, and whether it learned its variance (``2 C``
    outputs, of which the first ``C`` are the noise). The schedule is guided-diffusion's linear one:
    ``beta_start = 0.1 / num_timesteps`` and ``beta_end = 20 / num_timesteps`` unless given.
    Class-conditional models are not supported.
    """
    from deepinv.models import DiffUNet

    state = _read_state_dict(path)
    first_convolution, output_convolution = state.get("input_blocks.0.0.weight"), state.get("out.2.weight")
    if first_convolution is None or output_convolution is None:
        first_keys = ", ".join(sorted(state)[:3])
        raise CheckpointError(f"checkpoint '{path}' is not a guided-diffusion UNet: it has no "
                              f"'input_blocks.0.0.weight' or 'out.2.weight' (first keys: {first_keys})")
    base_channels, channels = first_convolution.shape[:2]
    output_channels = output_convolution.shape[0]
    if in_channels is not None and in_channels != channels:
        raise CheckpointError(f"checkpoint '{path}' is a UNet for {channels}-channel images, not {in_channels}")
    if base_channels not in _DIFFUNET_LARGE_MODEL_BY_BASE_CHANNELS:
        supported = " or ".join(map(str, _DIFFUNET_LARGE_MODEL_BY_BASE_CHANNELS))
        raise CheckpointError(f"checkpoint '{path}' has {base_channels} base channels; deepinv's DiffUNet (the "
                              f"architecture used here) has {supported}")
    if output_channels not in (channels, 2 * channels):
        raise CheckpointError(f"checkpoint '{path}' outputs {output_channels} channels for {channels}-channel images; "
                              f"expected {channels} (noise) or {2 * channels} (noise and learned variance)")
    if "label_emb.weight" in state:
        raise CheckpointError(f"checkpoint '{path}' is class-conditional (it has 'label_emb.weight'); "
                              "only unconditional guided-diffusion models are supported")
    large_model = _DIFFUNET_LARGE_MODEL_BY_BASE_CHANNELS[base_channels]
    unet = DiffUNet(in_channels=channels, out_channels=output_channels, large_model=large_model, pretrained=None)
    _load_matching(unet, state, path, f"{'large' if large_model else 'small'} DiffUNet (guided-diffusion UNet)",
                   computed_buffers=_DIFFUNET_OWN_BUFFERS)
    schedule = DDPMSchedule(num_timesteps, 0.1 / num_timesteps if beta_start is None else beta_start,
                            20.0 / num_timesteps if beta_end is None else beta_end)
    metadata = {"format": "guided-diffusion", "checkpoint": str(path), "schedule": schedule.settings(),
                "architecture": {"network": "deepinv.models.DiffUNet", "large_model": large_model,
                                 "in_channels": channels, "learned_sigma": output_channels == 2 * channels},
                "network_timestep": "t * num_timesteps - 1"}
    network = GuidedDiffusionNetwork(unet, schedule, channels)
    return NetworkPrior(network, schedule, (channels, image_size, image_size), "epsilon", (-1.0, 1.0),
                        name="guided_diffusion", metadata=metadata, batch_size=batch_size)


def _read_json(path: Path, what: str) -> dict:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{what} '{path}' is not readable JSON: {_first_line(error)}") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{what} '{path}' is not a JSON object")
    return document


def _diffusers_schedule(scheduler: dict, source: str) -> tuple[SDE, str, tuple[float, float]]:
    """The SDE, the network's parametrisation and the data range of a diffusers scheduler configuration."""
    if scheduler.get("_class_name") == "ScoreSdeVeScheduler":
        try:
            sde = VESDE(scheduler.get("sigma_min", 0.01), scheduler.get("sigma_max", 1348.0))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"scheduler of '{source}': {error}") from None
        return sde, "score", (0.0, 1.0)  # score_sde's VE models work on [0, 1] images
    settings = {**_DIFFUSERS_DEFAULT_SCHEDULER, **scheduler}
    unsupported = []
    if settings["beta_schedule"] != "linear":
        unsupported.append(f"beta_schedule '{settings['beta_schedule']}'")
    if settings.get("trained_betas") is not None:
        unsupported.append("trained_betas")
    if settings.get("rescale_betas_zero_snr"):
        unsupported.append("rescale_betas_zero_snr")
    if unsupported:
        raise CheckpointError(f"scheduler of '{source}' has {', '.join(unsupported)}; supported: beta_schedule "
                              "'linear' (a DDPM schedule) or a ScoreSdeVeScheduler")
    if settings["prediction_type"] not in _DIFFUSERS_PREDICTION_TYPES:
        raise CheckpointError(f"scheduler of '{source}' has prediction_type '{settings['prediction_type']}'; "
                              f"supported: {', '.join(_DIFFUSERS_PREDICTION_TYPES)}")
    try:
        sde = DDPMSchedule(settings["num_train_timesteps"], settings["beta_start"], settings["beta_end"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"scheduler of '{source}': {error}") from None
    parametrisation = "x0" if settings["prediction_type"] == "sample" else "epsilon"
    return sde, parametrisation, (-1.0, 1.0)


def load_diffusers_unet(folder: str | Path, *, batch_size: int | None = None) -> NetworkPrior:
    """A prior from a diffusers ``UNet2DModel`` folder (or a pipeline folder with ``unet/`` and ``scheduler/``).

    Needs the optional ``diffusers`` package (``pip install "invdiff[diffusers]"``). Only safetensors
    weights are read. The schedule comes from ``scheduler_config.json`` next to the model or in
    ``../scheduler/``, else diffusers' defaults (1000 linear steps, 1e-4 to 0.02, epsilon). The
    model must be unconditional with a positional (DDPM family) or Fourier (score SDE) time embedding.
    """
    folder = Path(folder)
    if (folder / "unet" / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "unet"
    config_path, weights_path = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    if not config_path.is_file():
        raise CheckpointError(f"diffusers folder '{folder}' has no config.json")
    config = _read_json(config_path, "model config")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"'{config_path}' describes a {config['_class_name']}; only UNet2DModel "
                              "(unconditional pixel-space models) is supported")
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise CheckpointError(f"'{config_path}' describes a class-conditional model; only unconditional ones are "
                              "supported")
    if config.get("time_embedding_type", "positional") not in ("positional", "fourier"):
        raise CheckpointError(f"'{config_path}' has time_embedding_type '{config['time_embedding_type']}'; "
                              "supported: positional, fourier")
    if not weights_path.is_file():
        raise CheckpointError(f"diffusers folder '{folder}' has no diffusion_pytorch_model.safetensors (pickled .bin "
                              "weights are not read, since unpickling can run code)")
    scheduler_path = next((path for path in (folder / "scheduler_config.json",
                                             folder.parent / "scheduler" / "scheduler_config.json") if path.is_file()),
                          None)
    scheduler = _read_json(scheduler_path, "scheduler config") if scheduler_path else {}
    sde, parametrisation, data_range = _diffusers_schedule(scheduler, str(scheduler_path or folder))
    if (config.get("time_embedding_type", "positional") == "fourier") != isinstance(sde, VESDE):
        raise CheckpointError(f"'{config_path}': a Fourier time embedding goes with a ScoreSdeVeScheduler and a "
                              f"positional one with a DDPM scheduler; the scheduler here is "
                              f"{scheduler.get('_class_name', 'the DDPM default')}")
    unet = _diffusers_from_pretrained(folder)
    channels, output_channels = unet.config.in_channels, unet.config.out_channels
    if output_channels not in (channels, 2 * channels):
        raise CheckpointError(f"'{config_path}': {output_channels} output channels for {channels}-channel images; "
                              f"expected {channels} or {2 * channels} (with a learned variance)")
    sample_size = unet.config.sample_size
    if sample_size is None:
        raise CheckpointError(f"'{config_path}' has no sample_size, so the image size is unknown")
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    prediction_type = "score" if isinstance(sde, VESDE) else scheduler.get("prediction_type", "epsilon")
    metadata = {"format": "diffusers", "checkpoint": str(folder), "schedule": sde.settings(),
                "scheduler_config": str(scheduler_path) if scheduler_path else "none (diffusers' DDPM defaults)",
                "prediction_type": prediction_type}
    network = DiffusersNetwork(unet, sde, channels, prediction_type)
    return NetworkPrior(network, sde, (channels, height, width), parametrisation, data_range, name="diffusers",
                        metadata=metadata, batch_size=batch_size)


def _diffusers_from_pretrained(folder: Path) -> nn.Module:
    """``UNet2DModel.from_pretrained`` on a local folder, with every mismatch turned into a ``CheckpointError``."""
    try:
        from diffusers import UNet2DModel
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        raise CheckpointError(f"loading the diffusers folder '{folder}' needs the diffusers package: "
                              'pip install "invdiff[diffusers]"') from None
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warnings about missing keys become the error below
    try:
        unet, loading_info = UNet2DModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                         low_cpu_mem_usage=False, torch_dtype=torch.float32,
                                                         output_loading_info=True)
    except Exception as error:  # diffusers raises OSError, ValueError, RuntimeError, SafetensorError ...
        raise CheckpointError(f"diffusers folder '{folder}' could not be loaded ({type(error).__name__}: "
                              f"{_first_line(error)})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    problems = [f"{len(found)} {kind.replace('_', ' ')} (first: {', '.join(map(str, found[:3]))})"
                for kind, found in loading_info.items() if found]
    if problems:
        raise CheckpointError(f"diffusers folder '{folder}': the weights do not match config.json: "
                              f"{'; '.join(problems)}")
    return unet


def load_ncsnpp(path: str | Path, *, image_size: int, in_channels: int = 3, model_type: str = "ncsn",
                model_channels: int = 128, channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_blocks: int = 4,
                attn_resolutions: tuple[int, ...] = (16,), augment_dim: int = 9, sigma_min: float = 0.002,
                sigma_max: float = 80.0, batch_size: int | None = None) -> NetworkPrior:
    """A VE prior from EDM ``SongUNet`` weights (``.pt`` state dict or ``.safetensors``) in deepinv's ``NCSNpp``.

    ``model_type`` is ``ncsn`` (NCSN++, EDM's "ve" models) or ``ddpm`` (DDPM++, EDM's "vp" models);
    both are EDM-preconditioned denoisers of ``x_0 + sigma n`` on [-1, 1] images with
    ``sigma_data = 0.5``, so either serves the VE SDE ``[sigma_min, sigma_max]`` (EDM's defaults).
    The defaults of the architecture are EDM's 64x64 FFHQ/AFHQ models; CIFAR-10 has
    ``channel_mult=(2, 2, 2)``. The denoiser's output is the clean image (Tweedie, ``x0``).
    """
    from deepinv.models import NCSNpp

    state = _read_state_dict(path)
    architecture = {"model_type": model_type, "img_resolution": image_size, "in_channels": in_channels,
                    "out_channels": in_channels, "model_channels": model_channels,
                    "channel_mult": tuple(channel_mult), "num_blocks": num_blocks,
                    "attn_resolutions": tuple(attn_resolutions), "augment_dim": augment_dim}
    try:
        model = NCSNpp(**architecture, precondition_type="edm", pixel_std=0.5, _was_trained_on_minus_one_one=True,
                       pretrained=None)
    except (ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot build NCSNpp with {architecture} for '{path}': {_first_line(error)}") from None
    _load_matching(model, state, path, f"NCSNpp ({model_type}) with the given architecture arguments")
    sde = VESDE(sigma_min, sigma_max)
    metadata = {"format": "edm-songunet", "checkpoint": str(path), "schedule": sde.settings(),
                "architecture": {"network": "deepinv.models.NCSNpp", **architecture, "pixel_std": 0.5}}
    return denoiser_prior(model, sde, (in_channels, image_size, image_size), name="edm_ncsnpp", metadata=metadata,
                          batch_size=batch_size)


def _denoiser_dtype(denoiser: nn.Module) -> torch.dtype:
    """The dtype a denoiser computes in: its parameters', else its ``dtype`` (deepinv's MMSE has one), else float32."""
    parameter = next(denoiser.parameters(), None)
    if parameter is not None:
        return parameter.dtype
    declared = getattr(denoiser, "dtype", None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def denoiser_prior(denoiser: nn.Module, sde: SDE, event_shape: tuple[int, ...], *, name: str = "denoiser",
                   dtype: torch.dtype | None = None, metadata: dict | None = None,
                   batch_size: int | None = None) -> NetworkPrior:
    """A prior on [-1, 1] images from a denoiser ``D(x, sigma)`` on [0, 1] images (deepinv's ``Denoiser``).

    Tweedie's formula makes the MMSE denoiser the ``x0`` parametrisation of the score (see
    ``TweedieDenoiserNetwork``); the prior is exact when ``D`` is the exact posterior mean, as
    deepinv's ``MMSE`` is for a finite dataset, and otherwise as good as the denoiser. ``dtype`` is
    what the inputs are cast to (default: the denoiser's own, see ``_denoiser_dtype``).
    """
    dtype = dtype or _denoiser_dtype(denoiser)
    network = TweedieDenoiserNetwork(denoiser, sde, dtype)
    metadata = metadata or {"format": "denoiser", "denoiser": type(denoiser).__name__}
    return NetworkPrior(network, sde, tuple(event_shape), "x0", (-1.0, 1.0), name=name, metadata=metadata,
                        batch_size=batch_size)
