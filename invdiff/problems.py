"""Problem files: YAML -> a validated ``Posterior``, with one-line errors that name the field.

A problem names the prior, the operator, the noise, the ground truth (or a measurement file) and
per-sampler options; images, operators and noise levels speak ``[0, 1]``::

    name: digits-inpaint-box
    prior: {name: digits_gmm, sde: {type: vp}}
    operator: {type: inpainting, mask: box, box: [2, 1, 4, 6]}   # top, left, height, width
    noise: {type: gaussian, sigma_y: 0.05}
    truth: {source: digits, index: 7}                              # a held-out digit
    noise_seed: 0
    num_samples: 16
    sampler_options:
      dps: {num_steps: 200, scale: 0.5}

Relative file paths are read relative to the problem file. Images are grayscale (1 channel) or colour
(RGB, 3 channels), and the truth must have the prior's channels: an RGB truth for a 1-channel prior is
an error unless ``truth: {source: file, path: ..., to_gray: true}`` asks for the conversion.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator
from torch import Tensor

from invdiff import operators as operator_library
from invdiff.posterior import Posterior, Sampler, refuse_boolean_numbers
from invdiff.prior import GaussianMixturePrior, NetworkPrior, Prior, digits_gaussian_mixture
from invdiff.sde import SDE, VESDE, VPSDE, DDPMSchedule
from invdiff.yamlfile import YAMLFileError, file_problem, read_mapping

__all__ = ["ProblemError", "ProblemConfig", "Problem", "StrictModel", "load_problem", "load_problem_config",
           "problem_cases", "build_sampler", "format_validation_error", "check_truth_source"]


class ProblemError(ValueError):
    """A problem file (or a sampler option) is wrong; the message names the field and what is allowed."""


class StrictModel(BaseModel):
    """The base of every problem-file model: an unknown key, an infinite or NaN number, or true / false for a number
    is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, data: Any) -> Any:
        return refuse_boolean_numbers(cls, data)


#: seeds are below this bound everywhere (problem files and --seed): ``seed + 1`` still fits torch's generators
SEED_LIMIT = 2**63
#: a seed for ``torch.Generator.manual_seed``
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT, description="a random seed, 0 <= seed < 2**63")]
#: the steps of a discrete (DDPM) schedule; the cap keeps a typo from filling the memory with the schedule
NumTimesteps = Annotated[int, Field(ge=1, le=100_000)]


# --- SDEs -------------------------------------------------------------------------------------------

class VPConfig(StrictModel):
    type: Literal["vp"] = "vp"
    beta_min: float = Field(0.1, gt=0)
    beta_max: float = Field(20.0, gt=0)
    T: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _buildable(self) -> "VPConfig":
        self.build()   # VPSDE's own check (beta_min <= beta_max), reported under the sde, not where it is built
        return self

    def build(self) -> SDE:
        return VPSDE(self.beta_min, self.beta_max, self.T)


class VEConfig(StrictModel):
    type: Literal["ve"]
    sigma_min: float = Field(0.01, gt=0)
    sigma_max: float = Field(50.0, gt=0)

    @model_validator(mode="after")
    def _buildable(self) -> "VEConfig":
        self.build()   # VESDE's own check (sigma_min < sigma_max), reported under the sde, not where it is built
        return self

    def build(self) -> SDE:
        return VESDE(self.sigma_min, self.sigma_max)


class DDPMConfig(StrictModel):
    type: Literal["ddpm"]
    num_timesteps: NumTimesteps = 1000
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)

    def build(self) -> SDE:
        return DDPMSchedule(self.num_timesteps, self.beta_start, self.beta_end)


SDEConfig = Annotated[Union[VPConfig, VEConfig, DDPMConfig], Field(discriminator="type")]


# --- priors -----------------------------------------------------------------------------------------

class DigitsGMMConfig(StrictModel):
    """A Gaussian mixture fitted to the 8x8 training digits: an image-like prior with an exact score."""

    name: Literal["digits_gmm"]
    components: int = Field(10, ge=1, le=200)
    covariance: Literal["full", "diag"] = "full"
    regularisation: float = Field(1e-3, gt=0)
    sde: SDEConfig = VPConfig()

    def build(self, base: Path = Path(".")) -> Prior:
        return digits_gaussian_mixture(self.sde.build(), self.components, self.covariance, self.regularisation)


class NaturalGMMConfig(StrictModel):
    """The patch-GMM prior shipped in ``invdiff/priors/natural_gmm.safetensors``: 16x16 grayscale patches of the
    training photographs, an exact score (see ``invdiff.checkpoints.natural_gaussian_mixture``)."""

    name: Literal["natural_gmm"]
    sde: SDEConfig = VPConfig()

    def build(self, base: Path = Path(".")) -> Prior:
        from invdiff.checkpoints import natural_gaussian_mixture

        return natural_gaussian_mixture(self.sde.build())


class GaussianMixtureFileConfig(StrictModel):
    """An exact Gaussian-mixture prior from a file written by ``invdiff.checkpoints.save_gaussian_mixture`` (the
    format of ``natural_gmm``), of any event shape, colour included: score and linear-Gaussian posterior exact."""

    name: Literal["gaussian_mixture"]
    path: str = Field(description="a .safetensors file written by invdiff.checkpoints.save_gaussian_mixture")
    sde: SDEConfig = VPConfig()

    def build(self, base: Path = Path(".")) -> Prior:
        from invdiff.checkpoints import load_gaussian_mixture

        return load_gaussian_mixture(base / self.path, self.sde.build())


class ShippedPriorConfig(StrictModel):
    """A UNet prior trained by the project and shipped in ``invdiff/priors`` (see ``invdiff train``)."""

    name: Literal["digits", "natural", "natural_rgb"]
    batch_size: int = Field(256, ge=1, description="images per network call")
    clip_denoised: bool = Field(True, description="project Tweedie's estimate onto the data range")

    def build(self, base: Path = Path(".")) -> Prior:
        from invdiff.checkpoints import load_prior

        return load_prior(self.name, batch_size=self.batch_size, clip_denoised=self.clip_denoised)


class CheckpointPriorConfig(StrictModel):
    """A UNet prior from an invdiff checkpoint file (``invdiff train`` writes them)."""

    name: Literal["checkpoint"]
    path: str = Field(description="a .safetensors file written by invdiff train")
    batch_size: int = Field(256, ge=1)
    clip_denoised: bool = True

    def build(self, base: Path = Path(".")) -> Prior:
        from invdiff.checkpoints import load_prior

        return load_prior(base / self.path, batch_size=self.batch_size, clip_denoised=self.clip_denoised)


class GuidedDiffusionPriorConfig(StrictModel):
    """A guided-diffusion / DPS UNet ``.pt`` file (see ``invdiff.loaders.load_guided_diffusion``)."""

    name: Literal["guided_diffusion"]
    path: str
    image_size: int = Field(ge=8)
    num_timesteps: NumTimesteps = 1000
    batch_size: int = Field(16, ge=1)

    def build(self, base: Path = Path(".")) -> Prior:
        from invdiff.loaders import load_guided_diffusion

        return load_guided_diffusion(base / self.path, image_size=self.image_size, num_timesteps=self.num_timesteps,
                                     batch_size=self.batch_size)


class DiffusersPriorConfig(StrictModel):
    """A diffusers ``UNet2DModel`` folder (see ``invdiff.loaders.load_diffusers_unet``)."""

    name: Literal["diffusers"]
    path: str
    batch_size: int = Field(16, ge=1)

    def build(self, base: Path = Path(".")) -> Prior:
        from invdiff.loaders import load_diffusers_unet

        return load_diffusers_unet(base / self.path, batch_size=self.batch_size)


class NCSNppPriorConfig(StrictModel):
    """EDM ``SongUNet`` weights in deepinv's ``NCSNpp`` (see ``invdiff.loaders.load_ncsnpp``)."""

    name: Literal["ncsnpp"]
    path: str
    image_size: int = Field(ge=8)
    in_channels: int = Field(3, ge=1)
    model_type: Literal["ncsn", "ddpm"] = "ncsn"
    model_channels: int = Field(128, ge=1)
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_blocks: int = Field(4, ge=1)
    attn_resolutions: tuple[int, ...] = (16,)
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    batch_size: int = Field(16, ge=1)

    def build(self, base: Path = Path(".")) -> Prior:
        from invdiff.loaders import load_ncsnpp

        arguments = self.model_dump(exclude={"name", "path"})
        return load_ncsnpp(base / self.path, **arguments)


class DenoiserPriorConfig(StrictModel):
    """A deepinv denoiser ``D(x, sigma)`` as a prior through Tweedie's formula (any image size).

    ``model`` is a class of ``deepinv.models`` (e.g. ``DRUNet``, ``DnCNN``, ``TVDenoiser``);
    ``weights`` a local weights file passed as its ``pretrained`` argument; ``arguments`` any other
    constructor arguments.
    """

    name: Literal["deepinv_denoiser"]
    model: str
    weights: str | None = None
    arguments: dict[str, Any] = {}
    channels: int = Field(1, ge=1)
    sde: SDEConfig = VPConfig()
    batch_size: int = Field(16, ge=1)

    def build(self, base: Path = Path(".")) -> Prior:
        import deepinv.models

        from invdiff.loaders import denoiser_prior

        model_class = getattr(deepinv.models, self.model, None)
        if not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
            raise ValueError(f"model: deepinv.models has no denoiser '{self.model}'")
        arguments = dict(self.arguments)
        if self.weights is not None:
            arguments["pretrained"] = str(base / self.weights)
        elif "pretrained" in inspect.signature(model_class).parameters:
            arguments.setdefault("pretrained", None)  # never download
        try:
            denoiser = model_class(**arguments).eval()
        except Exception as error:  # a wrong argument or unreadable weights file, reported in one line
            raise ValueError(f"deepinv.models.{self.model}({', '.join(arguments)}): {error}") from None
        metadata = {"format": "deepinv_denoiser", "denoiser": self.model, "weights": self.weights,
                    "fully_convolutional": True}
        return denoiser_prior(denoiser, self.sde.build(), (self.channels, 32, 32), name=f"deepinv {self.model}",
                              metadata=metadata, batch_size=self.batch_size)


PriorConfig = Annotated[Union[DigitsGMMConfig, NaturalGMMConfig, GaussianMixtureFileConfig, ShippedPriorConfig,
                              CheckpointPriorConfig,
                              GuidedDiffusionPriorConfig, DiffusersPriorConfig, NCSNppPriorConfig, DenoiserPriorConfig],
                        Field(discriminator="name")]


# --- operators --------------------------------------------------------------------------------------

class InpaintingConfig(StrictModel):
    type: Literal["inpainting"]
    mask: Literal["box", "random"]
    box: tuple[int, int, int, int] | None = Field(None, description="top, left, height, width of the missing box")
    fraction_observed: float | None = Field(None, gt=0, le=1)
    mask_seed: Seed = 0

    @field_validator("box")
    @classmethod
    def _box_not_empty(cls, box):
        """A box starts inside the image and has at least one pixel; whether it fits is checked at build."""
        if box is not None:
            top, left, height, width = box
            if top < 0 or left < 0:
                raise ValueError(f"top and left must be >= 0 (got top={top}, left={left}); "
                                 f"box is [top, left, height, width]")
            if height < 1 or width < 1:
                raise ValueError(f"height and width must be at least 1 (got height={height}, width={width}); "
                                 f"box is [top, left, height, width]")
        return box

    @model_validator(mode="after")
    def _mask_parameters(self):
        if self.mask == "box" and self.box is None:
            raise ValueError("mask 'box' needs box: [top, left, height, width]")
        if self.mask == "random" and self.fraction_observed is None:
            raise ValueError("mask 'random' needs fraction_observed in (0, 1]")
        return self

    def build(self, shape, noise):
        if self.mask == "box":
            mask = operator_library.box_mask(shape, *self.box)
            return operator_library.inpainting(shape, noise, mask=mask, settings={"mask": "box", "box": list(self.box)})
        mask = operator_library.random_mask(shape, self.fraction_observed, self.mask_seed)
        return operator_library.inpainting(shape, noise, mask=mask, settings={"mask": "random",
                                                                              "mask_seed": self.mask_seed})


class GaussianBlurConfig(StrictModel):
    type: Literal["gaussian_blur"]
    sigma: float = Field(gt=0, description="kernel standard deviation in pixels")

    def build(self, shape, noise):
        return operator_library.gaussian_blur(shape, noise, sigma=self.sigma)


class MotionBlurConfig(StrictModel):
    type: Literal["motion_blur"]
    kernel_size: int = Field(ge=3)
    kernel_seed: Seed = 0
    length: float = Field(0.3, gt=0)

    def build(self, shape, noise):
        return operator_library.motion_blur(shape, noise, kernel_size=self.kernel_size, seed=self.kernel_seed,
                                            length=self.length)


class SuperResolutionConfig(StrictModel):
    type: Literal["super_resolution"]
    factor: Literal[2, 4]
    filter: Literal["bicubic", "bilinear", "gaussian"] = "bicubic"

    def build(self, shape, noise):
        if shape[1] % self.factor or shape[2] % self.factor:
            raise ValueError(f"image size {shape[1]}x{shape[2]} is not divisible by factor {self.factor}")
        return operator_library.super_resolution(shape, noise, factor=self.factor, filter=self.filter)


OperatorConfig = Annotated[Union[InpaintingConfig, GaussianBlurConfig, MotionBlurConfig, SuperResolutionConfig],
                           Field(discriminator="type")]


class GaussianNoiseConfig(StrictModel):
    type: Literal["gaussian"]
    sigma_y: float = Field(gt=0, description="standard deviation, for images in [0, 1]")

    def build(self):
        return operator_library.GaussianNoise(self.sigma_y)


class PoissonNoiseConfig(StrictModel):
    type: Literal["poisson"]
    gain: float = Field(gt=0)

    def build(self):
        return operator_library.PoissonNoise(self.gain)


NoiseConfig = Annotated[Union[GaussianNoiseConfig, PoissonNoiseConfig], Field(discriminator="type")]


# --- ground truth -----------------------------------------------------------------------------------

class DigitsTruthConfig(StrictModel):
    source: Literal["digits"]
    index: int = Field(ge=0)
    split: Literal["test", "train"] = "test"


class FileTruthConfig(StrictModel):
    """An image file or array; an RGB one for a 1-channel prior is an error unless ``to_gray`` converts it."""

    source: Literal["file"]
    path: str = Field(description="an image file (PNG, JPEG, TIFF) or a .npy array in [0, 1]")
    to_gray: bool = Field(False, description="convert an RGB image to grayscale (skimage.color.rgb2gray) for a "
                                             "1-channel prior")

    @model_serializer(mode="wrap")
    def _to_gray_only_when_set(self, handler):
        """``to_gray`` is dumped only when true: benchmark cells are keyed by a hash of the dumped truth, and the
        keys of file truths written before the option existed stay the same."""
        dumped = handler(self)
        if not self.to_gray:
            dumped.pop("to_gray", None)
        return dumped


class NaturalTruthConfig(StrictModel):
    """A square crop of a held-out grayscale photograph (``invdiff.data.NATURAL_SPLIT``, never trained on),
    downscaled by ``scale`` first."""

    source: Literal["natural"]
    image: Literal["camera", "coffee"]
    top: int = Field(ge=0)
    left: int = Field(ge=0)
    size: int = Field(32, ge=4)
    scale: int = Field(1, ge=1)


class NaturalRGBTruthConfig(NaturalTruthConfig):
    """The same crop of a held-out colour photograph (``invdiff.data.NATURAL_RGB_SPLIT``): an RGB truth."""

    source: Literal["natural_rgb"]
    image: Literal["astronaut", "coffee"]


class PriorTruthConfig(StrictModel):
    """A draw from the problem's own prior, for simulation-based calibration (Talts, Betancourt, Simpson,
    Vehtari, Gelman, arXiv:1804.06788): such a truth is one more draw of the posterior that the samples
    target, so a calibrated sampler's 90% intervals cover it at the rate ``invdiff.metrics.calibrated_coverage``
    gives, whatever the prior's fit to photographs. A mixture prior's draws are exact; a network prior's come
    from its reverse SDE on ``num_steps`` steps. ``size`` draws a square image of that side from a fully
    convolutional network prior (default: the prior's own shape)."""

    source: Literal["prior"]
    seed: Seed
    num_steps: int = Field(200, ge=1, description="reverse-SDE steps of a network prior's draw")
    size: int | None = Field(None, ge=4)


TruthConfig = Annotated[Union[DigitsTruthConfig, NaturalTruthConfig, NaturalRGBTruthConfig, FileTruthConfig,
                              PriorTruthConfig], Field(discriminator="source")]


class ProblemConfig(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    prior: PriorConfig
    operator: OperatorConfig
    noise: NoiseConfig
    truth: TruthConfig | None = None
    measurement: str | None = Field(None, description="a .npy file holding y, shaped like G(x)")
    noise_seed: Seed = 0
    num_samples: int = Field(16, ge=1)
    sampler_options: dict[str, dict[str, Any]] = {}

    @field_validator("prior", mode="before")
    @classmethod
    def _prior_by_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _truth_or_measurement(self):
        if self.truth is None and self.measurement is None:
            raise ValueError("give a truth (to simulate y) or a measurement file, or both")
        return self


# --- errors -----------------------------------------------------------------------------------------

def format_validation_error(error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """The first error of a pydantic validation as one line: ``field: what is wrong (got ...)``.

    ``model`` is the validated model; it lets an unknown key list the keys that are allowed.
    """
    first = error.errors()[0]
    parts, owner = _walk(model, first["loc"])
    if first["type"] == "union_tag_invalid":
        context = first["ctx"]
        parts.append(context["discriminator"].strip("'"))
        message = f"unknown value {context['tag']!r}; allowed: {context['expected_tags']}"
    elif first["type"] == "extra_forbidden":
        allowed = "" if owner is None else (f"; allowed: {', '.join(sorted(owner.model_fields))}"
                                            if owner.model_fields else "; no keys are allowed here")
        message = f"unknown key{allowed}"
    else:
        message = first["msg"].removeprefix("Value error, ")
        given = first.get("input")
        if first["type"] != "missing" and not isinstance(given, (dict, list)) and given is not None:
            message += f" (got {given!r})"
    field = ".".join(part for part in (prefix, *parts) if part)
    return f"{field}: {message}" if field else message


def _walk(model: type[BaseModel] | None, location: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """Follow a pydantic error location through fields and union tags.

    Returns the field path without the tags (what a user wrote) and the model owning the last key.
    """
    current: Any = [model] if model is not None else None
    owner = None
    path: list[str] = []
    for part in location:
        if isinstance(current, list):  # the models a field may hold; in a union, this part is a tag
            tagged = next((member for member in current if _tag_of(member) == part), None)
            if tagged is not None:
                current = tagged
                continue
            current = current[0] if len(current) == 1 else None
        path.append(str(part))
        owner = current if isinstance(current, type) else None
        field = owner.model_fields.get(part) if owner is not None and isinstance(part, str) else None
        current = _models_in(field.annotation) if field is not None else None
    return path, owner


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (a model, an optional one, a union of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for argument in getattr(annotation, "__args__", ()) or ():
        found.extend(_models_in(argument))
    return found


def _tag_of(model: type[BaseModel]) -> str | None:
    """The discriminator value of a union member (its ``type``, ``name`` or ``source`` literal)."""
    for field_name in ("type", "name", "source"):
        field = model.model_fields.get(field_name)
        if field is not None and getattr(field.annotation, "__args__", None):
            return str(field.annotation.__args__[0])
    return None


# --- loading ----------------------------------------------------------------------------------------

@dataclass
class Problem:
    """A loaded problem: its validated config, the posterior, and the truth when known (``[0, 1]``).

    ``notes`` are one-line remarks on what loading did to the user's inputs (e.g. transparent pixels
    composited onto white), for the user and the run's summary.
    """

    config: ProblemConfig
    path: Path
    posterior: Posterior
    truth: Tensor | None
    notes: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "Problem":
        posterior = self.posterior
        posterior.prior.to(device)
        posterior.operator.physics.to(device)
        posterior.measurement = posterior.measurement.to(device)
        if self.truth is not None:
            self.truth = self.truth.to(device)
        return self


#: the first bytes of every file ``numpy.save`` writes
NPY_MAGIC = b"\x93NUMPY"


def _check_readable(path: Path, where: str) -> None:
    """Refuse a path that is not a readable file: missing, a directory, a symlink loop, no permission."""
    problem = file_problem(path)
    if problem is None:
        try:
            path.open("rb").close()
        except OSError as error:
            problem = f"{path} cannot be read: {error.strerror}"
    if problem is not None:
        raise ProblemError(f"{where}: {problem}")


def _read_npy(path: Path, where: str) -> np.ndarray:
    """The non-empty numeric array in the .npy file ``path``; anything else raises ``ProblemError`` naming ``where``.

    Pickled data is never loaded (``allow_pickle=False``).
    """
    _check_readable(path, where)
    with path.open("rb") as file:
        if file.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise ProblemError(f"{where}: {path.name} is not a .npy file (the format numpy.save writes)")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ProblemError(f"{where}: {path.name} holds Python objects (a pickled array), which are never "
                               f"loaded; allowed: an array of numbers") from None
        raise ProblemError(f"{where}: {path.name} is not a valid .npy file: {str(error).splitlines()[0]}") from None
    if array.dtype.kind not in "biuf":
        raise ProblemError(f"{where}: {path.name} holds values of type {array.dtype}; allowed: an array of numbers "
                           f"(bool, integer or float)")
    if array.size == 0:
        raise ProblemError(f"{where}: {path.name} is empty (shape {array.shape})")
    return array


def _require_finite(array: np.ndarray, where: str, path: Path) -> None:
    if not np.isfinite(array).all():
        raise ProblemError(f"{where}: contains NaN or infinite values ({path.name}); every value must be finite "
                           f"(and within float32's range)")


def _read_picture(path: Path, where: str) -> tuple[np.ndarray, list[str]]:
    """An image file as a ``(C, H, W)`` float array (``C`` 1 or 3), with notes on the conversions made.

    Transparency is composited onto white (as ``skimage.color.rgba2rgb`` does).
    """
    from skimage import io, util

    _check_readable(path, where)
    try:
        array = util.img_as_float(io.imread(path))
    except (OSError, ValueError, SyntaxError):  # the decoders' ways of saying "not an image I can read"
        raise ProblemError(f"{where}: {path.name} cannot be read as an image; allowed: an image file (PNG, JPEG, "
                           f"TIFF) or a .npy array") from None
    notes = []
    if array.ndim == 3 and array.shape[-1] in (2, 4):  # gray or RGB with an alpha channel
        alpha = array[..., -1:]
        if (alpha < 1).any():
            notes.append(f"{where}: {path.name} has transparent pixels; composited onto a white background")
        array = array[..., :-1] * alpha + (1 - alpha)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return (array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)), notes


def _read_image(path: Path, where: str, to_gray: bool = False) -> tuple[Tensor, list[str]]:
    """An image file or .npy array as a ``(1, C, H, W)`` float32 tensor in [0, 1], with notes on conversions;
    ``to_gray`` turns a 3-channel image into one gray channel (``skimage.color.rgb2gray``, with a note).

    ``where`` (e.g. ``problem.yaml: truth.path``) starts every error message.
    """
    from skimage import color

    notes = []
    if path.suffix.lower() == ".npy":
        array = _read_npy(path, where)
        array = array.reshape(array.shape[-3:]) if array.ndim == 4 and array.shape[0] == 1 else array
        if array.ndim == 2:
            array = array[None]
    else:
        array, notes = _read_picture(path, where)
    if array.ndim != 3:
        raise ProblemError(f"{where}: image {path.name} has shape {tuple(array.shape)}; allowed: (height, width) "
                           f"or (channels, height, width)")
    _require_finite(array, where, path)
    if array.min() < 0 or array.max() > 1:
        hint = " (an 8-bit image? save it as PNG, or divide by 255)" if array.dtype.kind in "iu" else ""
        raise ProblemError(f"{where}: image values must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]"
                           f"{hint}")
    if to_gray and array.shape[0] == 3:
        notes.append(f"{where}: {path.name} is RGB; converted to grayscale as truth.to_gray asks "
                     f"(skimage.color.rgb2gray)")
        array = color.rgb2gray(np.moveaxis(array, 0, -1))[None]
    return torch.as_tensor(np.asarray(array, dtype=np.float32))[None], notes


def load_problem(path: str | Path, case: str | None = None) -> Problem:
    """Read, validate and build a problem file; every mistake raises ``ProblemError`` with one line.

    A file may hold several ``cases``: a mapping from case name to the keys that differ from the
    file's top level (``prior``, ``operator``, ``truth``, ...). ``case`` picks one (default: the
    first); the problem's name becomes ``NAME-CASE``.
    """
    path = Path(path)
    return build_problem(load_problem_config(path, case), path)


def load_problem_config(path: str | Path, case: str | None = None) -> ProblemConfig:
    """Read and validate one case of a problem file without building it (``load_problem``'s first half)."""
    path = Path(path)
    raw = _select_case(_read_problem_file(path), case, path)
    try:
        return ProblemConfig.model_validate(raw)
    except ValidationError as error:
        raise ProblemError(f"{path.name}: {format_validation_error(error, model=ProblemConfig)}") from None


def problem_cases(path: str | Path) -> list[str]:
    """The case names of a problem file (empty when it has none)."""
    cases = _read_problem_file(Path(path)).get("cases")
    return list(cases) if isinstance(cases, dict) else []


def _read_problem_file(path: Path) -> dict:
    """The YAML mapping of a problem file; any file that is not one raises ``ProblemError`` (one line)."""
    try:
        return read_mapping(path, "problem file")
    except YAMLFileError as error:
        raise ProblemError(str(error)) from None


def _select_case(raw: dict, case: str | None, path: Path) -> dict:
    """The top-level keys of ``raw`` updated by those of the chosen case."""
    raw = dict(raw)
    cases = raw.pop("cases", None)
    if cases is None:
        if case is not None:
            raise ProblemError(f"{path.name}: --case {case}: this problem file has no cases")
        return raw
    if not isinstance(cases, dict) or not cases or not all(isinstance(value, dict) for value in cases.values()):
        raise ProblemError(f"{path.name}: cases: expected a mapping from case name to the keys it changes")
    chosen = next(iter(cases)) if case is None else case
    if chosen not in cases:
        raise ProblemError(f"{path.name}: unknown case '{chosen}'; allowed: {', '.join(cases)}")
    if "cases" in cases[chosen] or "name" in cases[chosen]:
        raise ProblemError(f"{path.name}: cases.{chosen}: a case may not set 'name' or 'cases'")
    return {**raw, **cases[chosen], "name": f"{raw.get('name', path.stem)}-{chosen}"}


def build_problem(config: ProblemConfig, path: Path) -> Problem:
    """Build prior, operator, truth and measurement from a validated config."""
    try:
        prior = config.prior.build(path.parent)  # files a prior names are relative to the problem file
    except ValueError as error:  # a checkpoint that is missing, corrupt or mismatched
        raise ProblemError(f"{path.name}: prior: {error}") from None
    truth, notes = _build_truth(config, path, prior)
    if truth is not None and tuple(truth.shape[1:]) != prior.event_shape:
        prior = _fit_prior_to_image(prior, tuple(truth.shape[1:]), path)
    shape = prior.event_shape
    try:
        operator = config.operator.build(shape, config.noise.build())
    except ValueError as error:
        raise ProblemError(f"{path.name}: operator: {error}") from None
    operator = operator.with_input_map(*prior.image_map)

    if config.measurement is not None:
        measurement = _read_measurement(config, path, operator, shape)
    else:
        measurement = _simulated_measurement(config, path, operator, truth)
    return Problem(config, path, Posterior(prior, operator, measurement), truth, notes)


def _simulated_measurement(config: ProblemConfig, path: Path, operator: operator_library.ForwardOperator,
                           truth: Tensor) -> Tensor:
    """``y = G(truth) + noise`` drawn with the file's ``noise_seed``; a noise level whose draw float32 cannot hold
    (``sigma_y: 1e300``, a Poisson rate beyond torch's range) is a ``ProblemError``, not a traceback."""
    generator = torch.Generator().manual_seed(config.noise_seed)
    noise = config.noise.model_dump()
    level = ", ".join(f"{key} {value:g}" for key, value in noise.items() if key != "type")
    clean = operator.physics.A(truth)
    try:
        measurement = operator.noise.sample(clean, generator)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:   # torch.poisson: a rate beyond its range
        reason = str(error).splitlines()[0]
    else:
        if torch.isfinite(measurement).all():
            return measurement
        reason = "values beyond float32's range"
    raise ProblemError(f"{path.name}: noise: {noise['type']} noise at {level} cannot be simulated ({reason}); "
                       f"choose a level of the images' scale, [0, 1] (e.g. sigma_y 0.01-0.5, gain 1e-4-1)")


def _read_measurement(config: ProblemConfig, path: Path, operator: operator_library.ForwardOperator,
                      shape: tuple[int, ...]) -> Tensor:
    """The measurement file as a float32 tensor shaped like the operator's output ``G(x)``."""
    where = f"{path.name}: measurement"
    measurement_path = path.parent / config.measurement
    with np.errstate(over="ignore"):  # values beyond float32's range become inf, refused next
        array = _read_npy(measurement_path, where).astype(np.float32)
    _require_finite(array, where, measurement_path)
    measurement = torch.as_tensor(array)
    expected = tuple(operator.physics.A(torch.zeros((1, *shape))).shape)
    given = tuple(measurement.shape)
    leading = len(expected) - len(given)   # (C, H, W), or (H, W) for one channel, stand for (1, C, H, W)
    if 0 < leading and expected[:leading] == (1,) * leading:
        measurement = measurement.reshape((1,) * leading + given)
    if tuple(measurement.shape) != expected:
        raise ProblemError(f"{where}: shape {given} does not match the operator's output {expected}")
    if isinstance(config.noise, PoissonNoiseConfig) and (measurement < 0).any():
        raise ProblemError(f"{where}: Poisson noise gives measurements >= 0, got a minimum of "
                           f"{float(measurement.min()):.3g}")
    return measurement


def _build_truth(config: ProblemConfig, path: Path, prior: Prior) -> tuple[Tensor | None, list[str]]:
    """The ground-truth image ``(1, C, H, W)`` in [0, 1], float32, with the prior's channels, or None; and
    notes on conversions made."""
    truth, notes = _read_truth(config, path, prior)
    if truth is not None:
        _check_channels(config, path, prior, truth.shape[1])
    return truth, notes


def check_truth_source(config: ProblemConfig, path: Path) -> None:
    """Read ``config``'s truth where it needs no prior (a digit, a held-out crop, an image file; a draw of the prior
    is left to the run), raising ``ProblemError`` if it cannot be had: what ``invdiff bench`` checks of every image
    of a configuration before any cell runs."""
    _read_truth(config, path, prior=None)


def _read_truth(config: ProblemConfig, path: Path, prior: Prior | None) -> tuple[Tensor | None, list[str]]:
    """The ground-truth image ``(1, C, H, W)`` in [0, 1], float32, or None; and notes on conversions made. Without
    a ``prior``, a draw of it is None and a file's ``to_gray`` is not checked against its channels."""
    if isinstance(config.truth, DigitsTruthConfig):
        from invdiff.data import digits

        images = digits(config.truth.split)
        if config.truth.index >= len(images):
            raise ProblemError(f"{path.name}: truth.index: the {config.truth.split} split has {len(images)} "
                               f"images, so index must be < {len(images)} (got {config.truth.index})")
        return images[config.truth.index:config.truth.index + 1].to(torch.float32), []
    if isinstance(config.truth, NaturalTruthConfig):
        from invdiff.data import heldout_crop

        truth, colour = config.truth, isinstance(config.truth, NaturalRGBTruthConfig)
        try:
            crop = heldout_crop(truth.image, truth.top, truth.left, truth.size, truth.scale, colour=colour)
        except ValueError as error:
            raise ProblemError(f"{path.name}: truth: {error}") from None
        return crop.to(torch.float32), []
    if isinstance(config.truth, FileTruthConfig):
        if config.truth.to_gray and prior is not None and prior.event_shape[0] != 1:
            raise ProblemError(f"{path.name}: truth.to_gray: the prior '{prior.settings()['kind']}' takes "
                               f"{prior.event_shape[0]}-channel images, not gray ones; remove to_gray")
        return _read_image(path.parent / config.truth.path, f"{path.name}: truth.path", config.truth.to_gray)
    if isinstance(config.truth, PriorTruthConfig) and prior is not None:
        return _draw_from_prior(config.truth, prior, path), []
    return None, []


def _draw_from_prior(truth: PriorTruthConfig, prior: Prior, path: Path) -> Tensor:
    """One draw of ``prior`` (at ``truth.size`` if set) as a ``(1, C, H, W)`` float32 image, through the map the
    operator is given (``Prior.image_map``), not clipped (the measurement is simulated from exactly this draw)."""
    if truth.size is not None and tuple(prior.event_shape[1:]) != (truth.size, truth.size):
        prior = _fit_prior_to_image(prior, (prior.event_shape[0], truth.size, truth.size), path)
    generator = torch.Generator().manual_seed(truth.seed)
    if isinstance(prior, GaussianMixturePrior):
        draw = prior.sample_clean(1, generator=generator)
    else:
        draw = prior.sample(1, num_steps=truth.num_steps, generator=generator)
    scale, offset = prior.image_map
    return (scale * draw.cpu().to(torch.float64) + offset).to(torch.float32)


def _channel_count(channels: int) -> str:
    return {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}.get(channels, f"{channels} channels")


def _check_channels(config: ProblemConfig, path: Path, prior: Prior, channels: int) -> None:
    """Refuse a truth whose channels are not the prior's (an RGB photo for a gray prior, a gray one for an RGB
    prior), naming the way out; colour is never converted silently."""
    expected = prior.event_shape[0]
    if channels == expected:
        return
    truth = config.truth
    if isinstance(truth, FileTruthConfig):
        what = f"truth.path: {Path(truth.path).name}"
        way_out = ("give a 1-channel image or set truth.to_gray: true" if (channels, expected) == (3, 1)
                   else f"give a {expected}-channel image")
    elif isinstance(truth, NaturalRGBTruthConfig):
        what = f"truth: the crop of '{truth.image}'"
        way_out = "use source: natural (grayscale crops of camera or coffee), or an RGB prior"
    elif isinstance(truth, NaturalTruthConfig):
        what = f"truth: the crop of '{truth.image}'"
        way_out = "use source: natural_rgb (colour crops of astronaut or coffee), or a 1-channel prior"
    else:
        what = "truth: the digit"
        way_out = "use a 1-channel prior, or give the truth as a file"
    raise ProblemError(f"{path.name}: {what} is {_channel_count(channels)} but the prior "
                       f"'{prior.settings()['kind']}' takes {expected}-channel images; {way_out}")


def _fit_prior_to_image(prior: Prior, image_shape: tuple[int, ...], path: Path) -> Prior:
    """The prior on images of ``image_shape``: a fully convolutional network prior adapts, others refuse."""
    if isinstance(prior, NetworkPrior) and prior.metadata.get("fully_convolutional"):
        try:
            return prior.resized(image_shape)
        except ValueError as error:
            raise ProblemError(f"{path.name}: truth: {error}") from None
    raise ProblemError(f"{path.name}: truth: the image has shape {image_shape} (channels, height, width); the "
                       f"prior '{prior.settings()['kind']}' expects {prior.event_shape}")


def build_sampler(sampler_class: type[Sampler], options: dict[str, Any]) -> Sampler:
    """Instantiate a sampler, turning an option error into a ``ProblemError`` naming the option."""
    try:
        return sampler_class(**options)
    except ValidationError as error:
        prefix = f"sampler_options.{sampler_class.name}"
        raise ProblemError(format_validation_error(error, prefix, model=sampler_class.Options)) from None
