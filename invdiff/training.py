"""Denoising score matching for the project's UNet priors (ALGORITHMS.md section 2), resumable.

``invdiff train CONFIG.yaml --out RUN`` minimises the epsilon-prediction loss

    E_{t ~ U(t_min, T), x_0 ~ data, z ~ N(0, I)} || eps_theta(lambda_t x_0 + sigma_t z, t) - z ||^2

(Ho et al., NeurIPS 2020; Song et al., ICLR 2021) with Adam, a linear learning-rate warm-up and an
exponential moving average (EMA) of the weights. Every ``checkpoint_every`` steps it writes

* ``RUN/state.pt``: weights, EMA, optimiser, step, random state, running loss and the checkpoint's
  log record and prior metadata (tensors and plain values only; loaded with ``weights_only=True``),
  from which ``--resume`` continues exactly: the weights and log.jsonl of an interrupted and resumed
  run equal those of an uninterrupted one (on a CPU; wall times aside);
* ``RUN/NAME.safetensors``: the EMA weights in half precision with their metadata, a loadable prior;
* a line of ``RUN/log.jsonl``: step, running loss, held-out loss per noise level, wall time.

``--continue-from CHECKPOINT`` starts a new run from a committed prior instead (its half-precision
EMA weights as both weights and EMA, a fresh optimiser, the step count and wall time carried on,
the random stream reseeded with ``seed + step``): training in stretches across machines that keep
only the small checkpoint, not ``state.pt``. Such a run is not bit-identical to an uninterrupted one.

Every check (arguments, the output folder, the state or checkpoint to start from) comes before any
data is loaded or file written, so a refused run leaves nothing behind. Files are written under a
``.partial`` name and renamed, state.pt first: an interruption at any moment leaves each file whole,
and a resume finishes a checkpoint whose other files an interruption cut short.

The held-out loss is the same loss on a fixed held-out batch with fixed noise at fixed times, so
numbers from different checkpoints (and runs) compare.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

import torch
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from tqdm import tqdm

from invdiff.checkpoints import save_checkpoint
from invdiff.data import DIGITS_SPLIT, NATURAL_RGB_SPLIT, NATURAL_SPLIT, digits, natural_images, random_patches
from invdiff.networks import EpsilonNetwork, UNet
from invdiff.problems import SEED_LIMIT, Seed, SDEConfig, StrictModel, VPConfig, format_validation_error
from invdiff.rundir import RunFolderError, check_destination, destination, make_folders, remove_empty
from invdiff.yamlfile import YAMLFileError, read_mapping

__all__ = ["TrainingError", "TrainingConfig", "load_training_config", "train"]

#: times at which the held-out loss is reported
HELDOUT_TIMES = (0.02, 0.1, 0.3, 0.6, 0.9)


class TrainingError(ValueError):
    """A training configuration or run folder is wrong; the message says what and what is allowed."""


class DigitsData(StrictModel):
    source: Literal["digits"]

    def describe(self) -> dict:
        return {"source": "sklearn load_digits", "split": dict(DIGITS_SPLIT), "event_shape": [1, 8, 8]}

    def training_source(self):
        images = digits("train").float()
        return lambda batch_size, generator: images[torch.randint(len(images), (batch_size,), generator=generator)]

    def heldout(self, size: int, generator: torch.Generator) -> torch.Tensor:
        return digits("test")[:size].float()

    def heldout_limit(self) -> int | None:
        """The most held-out images there are (None: any number of patches)."""
        return DIGITS_SPLIT["test_size"]

    def event_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)


@functools.cache
def _photograph_size(name: str) -> tuple[int, int]:
    """Height and width of the ``skimage.data`` photograph ``name`` (the same in grayscale and in colour)."""
    import skimage.data

    return tuple(getattr(skimage.data, name)().shape[:2])


def _largest_patch(names: list[str], scales: tuple[int, ...]) -> int:
    """The largest patch that ``random_patches`` can crop from one of the photographs ``names`` at ``scales``:
    the shorter side of the largest picture, downscaled by a scale as ``skimage.transform.rescale`` sizes it."""
    return max(min(max(round((1 / scale) * side), 1) for side in _photograph_size(name))
               for name in names for scale in scales)


class NaturalData(StrictModel):
    """Patches of the ``skimage.data`` photographs: grayscale (``natural``, ``NATURAL_SPLIT``) or in colour
    (``natural_rgb``, ``NATURAL_RGB_SPLIT``)."""

    source: Literal["natural", "natural_rgb"]
    patch_size: int = Field(32, ge=8)
    scales: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 2, 4), min_length=1)

    @model_validator(mode="after")
    def _patches_fit_the_photographs(self) -> NaturalData:
        split = NATURAL_RGB_SPLIT if self.colour else NATURAL_SPLIT
        largest = min(_largest_patch(split[part], self.scales) for part in ("train", "test"))
        if self.patch_size > largest:
            raise ValueError(f"patch_size {self.patch_size} is larger than the training and held-out photographs "
                             f"at scales {list(self.scales)}; allowed: at most {largest}")
        return self

    @property
    def colour(self) -> bool:
        return self.source == "natural_rgb"

    def describe(self) -> dict:
        split = NATURAL_RGB_SPLIT if self.colour else NATURAL_SPLIT
        return {"source": f"skimage.data photographs, {'RGB' if self.colour else 'grayscale'}",
                "train_images": split["train"], "heldout_images": split["test"], "patch_size": self.patch_size,
                "scales": list(self.scales), "augmentation": "random crop, horizontal flip, rotation by 90 degrees"}

    def training_source(self):
        patches = random_patches(natural_images("train", self.colour), self.patch_size, self.scales)
        return lambda batch_size, generator: patches.sample(batch_size, generator).float()

    def heldout(self, size: int, generator: torch.Generator) -> torch.Tensor:
        patches = random_patches(natural_images("test", self.colour), self.patch_size, self.scales)
        return patches.sample(size, generator).float()

    def heldout_limit(self) -> int | None:
        """The most held-out images there are (None: any number of patches)."""
        return None

    def event_shape(self) -> tuple[int, ...]:
        return (3 if self.colour else 1, self.patch_size, self.patch_size)


#: the UNet's GroupNorm has 8 groups (invdiff.networks._group_norm): every level's channels must divide into them
GROUPS = 8


class NetworkConfig(StrictModel):
    channels: int = Field(32, ge=GROUPS, multiple_of=GROUPS)
    channel_multipliers: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 2, 2), min_length=1)
    blocks_per_level: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    @property
    def downsampling_factor(self) -> int:
        """What the UNet needs the image height and width to be divisible by (``UNet.downsampling_factor``)."""
        return 2 ** (len(self.channel_multipliers) - 1)


class TrainingConfig(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    data: Annotated[Union[DigitsData, NaturalData], Field(discriminator="source")]
    sde: SDEConfig = VPConfig()
    network: NetworkConfig = Field({}, validate_default=True)  # a mapping: validated like a written one
    steps: int = Field(ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    t_min: float = Field(1e-3, gt=0, lt=1, validate_default=True)
    checkpoint_every: int = Field(500, ge=1)
    heldout_size: int = Field(256, ge=1, validate_default=True)
    seed: Seed = 0

    # field validators see the fields declared before theirs (info.data), and name their own field in the error

    @field_validator("network")
    @classmethod
    def _levels_fit_the_images(cls, network: NetworkConfig, info: ValidationInfo) -> NetworkConfig:
        if "data" not in info.data:
            return network
        height, width = info.data["data"].event_shape()[1:]
        factor = network.downsampling_factor
        if height % factor or width % factor:
            most = _most_levels(height, width)
            raise ValueError(f"{len(network.channel_multipliers)} levels (channel_multipliers) need images whose "
                             f"sides divide by {factor}; the data's are {height}x{width}: allowed at most {most} "
                             f"level{'s' if most > 1 else ''}")
        return network

    @field_validator("t_min")
    @classmethod
    def _t_min_below_the_end_time(cls, t_min: float, info: ValidationInfo) -> float:
        if "sde" in info.data and t_min >= info.data["sde"].build().T:
            raise ValueError(f"must be below the SDE's end time T = {info.data['sde'].build().T}")
        return t_min

    @field_validator("heldout_size")
    @classmethod
    def _heldout_images_exist(cls, size: int, info: ValidationInfo) -> int:
        limit = info.data["data"].heldout_limit() if "data" in info.data else None
        if limit is not None and size > limit:
            raise ValueError(f"{info.data['data'].source} has {limit} held-out images; allowed: 1 to {limit}")
        return size


def _most_levels(height: int, width: int) -> int:
    """The most UNet levels for ``height`` x ``width`` images: one more than the times both sides halve evenly."""
    levels = 1
    while height % 2 ** levels == 0 and width % 2 ** levels == 0:
        levels += 1
    return levels


def load_training_config(path: str | Path) -> TrainingConfig:
    """The validated training configuration in the YAML file ``path``."""
    try:
        content = read_mapping(path, "training configuration")
    except YAMLFileError as error:
        raise TrainingError(str(error)) from None
    try:
        return TrainingConfig.model_validate(content)
    except ValidationError as error:
        raise TrainingError(f"{Path(path).name}: {format_validation_error(error, model=TrainingConfig)}") from None


def _continue_from(path: str | Path, sde_settings: dict, unet: UNet, ema: UNet) -> tuple[int, float, list]:
    """Load a checkpoint's weights into ``unet`` and ``ema``; its step count, wall time and the checkpoints it was
    itself continued from (a chain A -> B -> C records A and B)."""
    from invdiff.checkpoints import CheckpointError, load_checkpoint

    try:
        loaded, document = load_checkpoint(path)
    except CheckpointError as error:
        raise TrainingError(f"--continue-from: {error}") from None
    steps, wall_time, earlier = _checkpoint_progress(path, document)
    if loaded.arguments != unet.arguments:
        raise TrainingError(f"--continue-from: '{path}' has network {loaded.arguments}; the config asks for "
                            f"{unet.arguments}")
    if document.get("sde") != sde_settings:
        raise TrainingError(f"--continue-from: '{path}' was trained on the SDE {document.get('sde')}, not "
                            f"{sde_settings}")
    unet.load_state_dict(loaded.state_dict())
    ema.load_state_dict(loaded.state_dict())
    return steps, wall_time, earlier


def _checkpoint_progress(path: str | Path, document: dict) -> tuple[int, float, list]:
    """The step count and wall time in a checkpoint's metadata ``training`` (0 for those it lacks), checked, and the
    checkpoints it was continued from (none where it records no list)."""
    training = document.get("training", {})
    if not isinstance(training, dict):
        raise TrainingError(f"--continue-from: '{path}' has metadata 'training' {training!r}; a mapping is needed")
    steps, wall_time = training.get("steps", 0), training.get("wall_time_s", 0.0)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < SEED_LIMIT:
        raise TrainingError(f"--continue-from: '{path}' has metadata 'training.steps' {steps!r}; allowed: an "
                            f"integer from 0 to {SEED_LIMIT - 1}")
    if isinstance(wall_time, bool) or not isinstance(wall_time, (int, float)) or not 0 <= wall_time < math.inf:
        raise TrainingError(f"--continue-from: '{path}' has metadata 'training.wall_time_s' {wall_time!r}; "
                            "allowed: a number of seconds, 0 or more")
    earlier = training.get("continued_from", [])
    return steps, float(wall_time), earlier if isinstance(earlier, list) else []


def _learning_rate(config: TrainingConfig, step: int) -> float:
    return config.learning_rate * min(1.0, (step + 1) / max(config.warmup_steps, 1))


def _heldout_losses(network: EpsilonNetwork, heldout: torch.Tensor, noise: torch.Tensor) -> dict[str, float]:
    losses = {}
    with torch.no_grad():
        for t, z in zip(HELDOUT_TIMES, noise):
            times = torch.full((len(heldout),), t, dtype=torch.float64)
            x_t = network.sde.lambda_t(t).float() * heldout + network.sde.sigma_t(t).float() * z
            losses[f"t={t}"] = float((network(x_t, times) - z).pow(2).mean())
    losses["mean"] = sum(losses.values()) / len(HELDOUT_TIMES)
    return losses


def _written_files(name: str) -> list[str]:
    """The names of the files a run writes into its folder, with those they are written under first."""
    finals = ["state.pt", f"{name}.safetensors", "log.jsonl"]
    return finals + [_partial(Path(final)).name for final in finals]


def _check_output_path(out: str | Path, name: str) -> Path:
    """``out`` as a path, refused (one line) when empty and where ``invdiff.rundir.check_destination`` refuses a run's
    folder: the working directory or one of its parents, a symbolic link, a file, a path the system cannot look up."""
    if not str(out).strip():
        raise TrainingError(f"--out is empty; name a folder for the run, e.g. --out runs/train-{name}")
    try:
        out = destination(out)
        check_destination(out, "a training run", f"runs/train-{name}")
    except RunFolderError as error:
        raise TrainingError(str(error)) from None
    return out


def _check_output_folder(out: Path, name: str, resume: bool) -> None:
    """Refuse an ``--out`` that cannot hold this run, before anything is loaded or written.

    A new run needs a folder that does not exist yet or holds none of the files a run writes (an
    existing run or another run's prior is never overwritten); ``--resume`` needs a run's folder.
    None of the files a run writes may be a symbolic link (writing would follow it out of the folder).
    """
    try:
        nearest = next(folder for folder in (out, *out.parents) if folder.exists())
        if not nearest.is_dir():
            raise TrainingError(f"--out '{out}' is a file, not a folder" if nearest == out else
                                f"--out '{out}': '{nearest}' is a file, not a folder")
        links = [file for file in _written_files(name) if (out / file).is_symlink()]
        if links:
            raise TrainingError(f"--out '{out}': {', '.join(links)} is a symbolic link; a run writes only regular "
                                "files in its folder, remove the link or choose another --out")
        state_exists = (out / "state.pt").exists()
        written = [file for file in (f"{name}.safetensors", "log.jsonl") if (out / file).exists()]
    except OSError as error:
        raise TrainingError(f"--out '{out}' cannot be inspected: {error.strerror}") from None
    if resume and not state_exists:
        raise TrainingError(f"--resume: '{out}' holds no training run (no state.pt)")
    if not resume and state_exists:
        raise TrainingError(f"'{out}' already holds a training run; pass --resume to continue it, or choose "
                            "another --out")
    if not resume and written:
        raise TrainingError(f"--out '{out}' already holds {' and '.join(written)} but no state.pt (not a run to "
                            "resume); choose another --out, a run overwrites no files")


def _prepare_output_folder(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents (with the umask's permissions) and prove it writable;
    returns the folders created, outermost first."""
    created: list[Path] = []
    try:
        created = make_folders(out)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        remove_empty(created)
        raise TrainingError(f"--out '{out}' cannot be written: {error.strerror}") from None
    return created


def _partial(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(path.name + ".partial")


def _write_then_rename(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` with ``write`` under another name, then rename it: an interruption leaves the old file whole."""
    write(_partial(path))
    _partial(path).replace(path)


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` in one unbuffered write: an interruption leaves all of it or none."""
    with open(path, "ab", buffering=0) as file:
        file.write((line + "\n").encode())


@contextlib.contextmanager
def _cleaned_up_on_failure(out: Path, name: str, created: list[Path]):
    """On any exception (Ctrl-C included) remove the partial files of ``out``, and the folders this run
    created while they are still empty."""
    try:
        yield
    except BaseException:
        for path in (out / "state.pt", out / f"{name}.safetensors", out / "log.jsonl"):
            _partial(path).unlink(missing_ok=True)
        remove_empty(created)
        raise


def _one_line(error: Exception, limit: int = 240) -> str:
    """``error``'s message on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


#: what every state.pt holds (newer ones also hold running_loss, record and metadata)
STATE_KEYS = ("unet", "ema", "optimiser", "generator", "step", "wall_time", "config")


def _read_state(path: Path, fixed_settings: str) -> dict:
    """The training state in ``path``, checked to come from a run with the settings ``fixed_settings``."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - torch raises pickle, zip, EOF and OS errors for unreadable files
        raise TrainingError(f"--resume: '{path}' is not a readable training state ({type(error).__name__}): "
                            "truncated, corrupt, or not written by invdiff train") from None
    missing = [key for key in STATE_KEYS if key not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise TrainingError(f"--resume: '{path}' is not a training state of invdiff: it lacks "
                            f"{', '.join(missing)}")
    if state["config"] != fixed_settings:
        raise TrainingError(f"--resume: '{path}' was trained with another configuration (differing: "
                            f"{', '.join(_differing_settings(state['config'], fixed_settings))}); only 'steps' "
                            "and 'checkpoint_every' may change on --resume")
    return state


def _differing_settings(saved: object, current: str) -> list[str]:
    """The top-level keys in which the JSON settings ``saved`` and ``current`` differ."""
    try:
        saved_settings = json.loads(saved)
    except (TypeError, ValueError):
        saved_settings = {}
    saved_settings = saved_settings if isinstance(saved_settings, dict) else {}
    current_settings = json.loads(current)
    return sorted(key for key in saved_settings.keys() | current_settings.keys()
                  if saved_settings.get(key) != current_settings.get(key))


def _restore_state(state: dict, path: Path, unet: UNet, ema: UNet, optimiser: torch.optim.Optimizer,
                   generator: torch.Generator, device: str) -> tuple[int, float, list, torch.Tensor | None]:
    """Load ``state`` into the networks, optimiser and generator; its step, wall time, history and running loss."""
    try:
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        _set_global_random_state(state.get("global_random"), device)
        running_loss = state.get("running_loss")
        running_loss = None if running_loss is None else running_loss.to(device)
        return int(state["step"]), float(state["wall_time"]), list(state.get("continued_from", [])), running_loss
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise TrainingError(f"--resume: '{path}' does not fit the configuration's network: "
                            f"{_one_line(error)}") from None


def _global_random_state(device: str) -> dict:
    """torch's global random state, which dropout draws from (the data and noise draw from the run's generator)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _set_global_random_state(state: dict | None, device: str) -> None:
    """Restore ``_global_random_state``'s record (a state.pt written before it was kept has none: its dropout
    masks then differ from an uninterrupted run's)."""
    if state is None:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def _unfinished_checkpoint(state: dict, log_path: Path) -> dict | None:
    """The record and prior metadata of ``state``'s checkpoint if an interruption came after state.pt was
    written and before its log line was (which is written last), else None (also for older states,
    which do not hold them)."""
    record, metadata = state.get("record"), state.get("metadata")
    if record is None or metadata is None:
        return None
    logged = log_path.read_bytes() if log_path.exists() else b""
    return None if logged.endswith((json.dumps(record) + "\n").encode()) else {"record": record, "metadata": metadata}


def _finish_checkpoint(out: Path, name: str, ema: UNet, unfinished: dict) -> dict:
    """Write the prior and the log line of a checkpoint that an interruption cut short; its record.

    Log lines of later steps (from a state.pt that was replaced by an older copy) are dropped.
    """
    record = unfinished["record"]
    save_checkpoint(out / f"{name}.safetensors", ema, unfinished["metadata"])
    log_path = out / "log.jsonl"
    kept = [line for line in (log_path.read_text(errors="replace").splitlines() if log_path.exists() else [])
            if _logged_step(line) < record["step"]]
    text = "".join(line + "\n" for line in (*kept, json.dumps(record)))
    _write_then_rename(log_path, lambda partial: partial.write_text(text))
    return record


def _logged_step(line: str) -> float:
    """The step of a log line; infinity for a line that is not a record (a torn line), which is dropped."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


#: what a parameter costs in training, in float32 values: the weights, their gradient, Adam's two moments, the EMA copy
TRAINING_COPIES = 5


def _check_memory(config: TrainingConfig, device: str) -> None:
    """Refuse a network or batch that cannot fit (``TrainingError``, one line) before anything is allocated: the
    UNet is built on torch's ``meta`` device (shapes, no memory) and run on one batch there, and its parameters
    (``TRAINING_COPIES`` times) and the outputs of its layers, which backpropagation keeps, are counted in float32
    against ``invdiff.resources.available_memory``. A lower bound (temporaries are not counted): it stops a
    ``batch_size`` of 1e8 or ``channels`` of 80000 at once instead of at the allocator's error or the system's
    out-of-memory killer."""
    from invdiff.resources import available_memory

    available = available_memory(device)
    if available is None:
        return
    event_shape = config.data.event_shape()
    kept: list[int] = []
    with torch.device("meta"):
        unet = UNet(image_channels=event_shape[0], **config.network.model_dump())
        leaves = [module for module in unet.modules() if not list(module.children())]
        hooks = [module.register_forward_hook(lambda module, inputs, output: kept.append(output.numel()))
                 for module in leaves]
        unet(torch.zeros((config.batch_size, *event_shape)), torch.zeros(config.batch_size))
        for hook in hooks:
            hook.remove()
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    needed = 4 * (TRAINING_COPIES * parameters + sum(kept))
    if needed > available:
        raise TrainingError(f"this training needs at least {needed / 1e9:.1f} GB ({parameters:,} parameters, "
                            f"batch_size {config.batch_size}) but {available / 1e9:.1f} GB are available; lower "
                            f"batch_size or network.channels")


def train(config: TrainingConfig, out: str | Path, *, resume: bool = False, max_minutes: float | None = None,
          device: str = "cpu", progress: bool = True, continue_from: str | Path | None = None) -> dict:
    """Train (or continue training) the prior described by ``config`` in the folder ``out``.

    Returns the last log record. Stops after ``config.steps`` steps, or at the first checkpoint
    after ``max_minutes`` of wall time (then ``--resume`` continues). Every check comes before any
    data is loaded or file written; a run that fails or is interrupted leaves no partial file and,
    when it created ``out`` and wrote nothing yet, no folder.
    """
    out = _check_output_path(out, config.name)
    state_path = out / "state.pt"
    if max_minutes is not None and not max_minutes > 0:
        raise TrainingError(f"--max-minutes must be a positive number of minutes, got {max_minutes}")
    if resume and continue_from is not None:
        raise TrainingError("--resume and --continue-from exclude each other: a run resumes from its own state")
    _check_output_folder(out, config.name, resume)
    _check_memory(config, device)

    sde = config.sde.build()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    image_channels = config.data.event_shape()[0]
    unet = UNet(image_channels=image_channels, **config.network.model_dump())
    ema = UNet(image_channels=image_channels, **config.network.model_dump())
    ema.load_state_dict(unet.state_dict())
    unet.to(device)  # before the optimiser exists, so that its state lives on the device too
    ema.to(device)
    optimiser = torch.optim.Adam(unet.parameters(), lr=config.learning_rate)
    step, wall_time, history = 0, 0.0, []
    running_loss = None  # a tensor on the device: reading it every step would wait for the device
    loss_note = None  # said in the first log record after resuming a state.pt without the running loss
    unfinished = None
    #: what a resumed run must share with the run it resumes
    fixed_settings = config.model_dump_json(exclude={"steps", "checkpoint_every"})
    if resume:
        state = _read_state(state_path, fixed_settings)
        step, wall_time, history, running_loss = _restore_state(state, state_path, unet, ema, optimiser, generator,
                                                                device)
        unfinished = _unfinished_checkpoint(state, out / "log.jsonl")
        if step >= config.steps and unfinished is None:
            raise TrainingError(f"--resume: '{out}' is already at step {step}; pass --steps above {step} to train on")
        if "running_loss" not in state:
            loss_note = (f"running loss restarted at step {step}: the state.pt resumed there was written by an "
                         "older invdiff that did not store it")
    if continue_from is not None:
        step, wall_time, earlier = _continue_from(continue_from, sde.settings(), unet, ema)
        if step >= config.steps:
            raise TrainingError(f"--continue-from: '{continue_from}' is already at step {step} (steps is "
                                f"{config.steps}); pass --steps above {step} to train on")
        generator.manual_seed(config.seed + step)
        history = [*earlier, {"checkpoint": str(continue_from), "step": step}]

    created = _prepare_output_folder(out)
    with _cleaned_up_on_failure(out, config.name, created):
        record: dict = {} if unfinished is None else _finish_checkpoint(out, config.name, ema, unfinished)
        training_source = config.data.training_source()
        heldout_generator = torch.Generator().manual_seed(config.seed + 1)
        heldout = config.data.heldout(config.heldout_size, heldout_generator)
        heldout_noise = torch.randn((len(HELDOUT_TIMES), *heldout.shape), generator=heldout_generator)
        heldout = heldout * 2 - 1
        data_std = 0.5
        network = EpsilonNetwork(unet, sde, data_std)
        ema_network = EpsilonNetwork(ema, sde, data_std)
        parameter_count = sum(parameter.numel() for parameter in unet.parameters())

        def checkpoint(loss_value: float) -> dict:
            """Write state.pt (first: a resume starts from it), the prior and the log line; the log record."""
            nonlocal loss_note
            record = {"step": step, "loss": loss_value, "wall_time_s": round(wall_time, 1),
                      "heldout_loss": _heldout_losses(ema_network, heldout.to(device), heldout_noise.to(device))}
            if loss_note is not None:
                record["note"], loss_note = loss_note, None
            metadata = {"name": config.name, "parametrisation": "epsilon", "data_std": data_std,
                        "sde": sde.settings(), "event_shape": list(config.data.event_shape()),
                        "data_range": [-1.0, 1.0], "fully_convolutional": True, "data": config.data.describe(),
                        "training": {"config": config.model_dump(mode="json"), "steps": step,
                                     "parameters": parameter_count, "wall_time_s": round(wall_time, 1),
                                     "heldout_loss": record["heldout_loss"], "device": device,
                                     "continued_from": history,
                                     "threads": torch.get_num_threads()},
                        "versions": {"torch": str(torch.__version__), "python": platform.python_version()}}
            state = {"unet": unet.state_dict(), "ema": ema.state_dict(), "optimiser": optimiser.state_dict(),
                     "generator": generator.get_state(), "global_random": _global_random_state(device),
                     "step": step, "wall_time": wall_time,
                     "continued_from": history, "config": fixed_settings,
                     "running_loss": None if running_loss is None else running_loss.cpu(),
                     "record": record, "metadata": metadata}
            _write_then_rename(state_path, lambda partial: torch.save(state, partial))
            save_checkpoint(out / f"{config.name}.safetensors", ema, metadata)
            _append_line(out / "log.jsonl", json.dumps(record))
            return record

        started = time.perf_counter()
        bar = tqdm(total=config.steps, initial=step, desc=f"train {config.name}", disable=not progress)
        while step < config.steps:
            tick = time.perf_counter()
            clean = training_source(config.batch_size, generator).to(device) * 2 - 1
            times = config.t_min + (sde.T - config.t_min) * torch.rand(config.batch_size, generator=generator,
                                                                       dtype=torch.float64)
            noise = torch.randn(clean.shape, generator=generator).to(device)
            shape = (-1, 1, 1, 1)
            noisy = sde.lambda_t(times).float().view(shape).to(device) * clean + \
                sde.sigma_t(times).float().view(shape).to(device) * noise
            loss = (network(noisy, times.to(device)) - noise).pow(2).mean()
            for group in optimiser.param_groups:
                group["lr"] = _learning_rate(config, step)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():  # one fused update of all EMA weights, as torch.optim.swa_utils does
                torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - config.ema_decay)
                running_loss = loss.detach() if running_loss is None else \
                    0.98 * running_loss + 0.02 * loss.detach()
            step += 1
            wall_time += time.perf_counter() - tick
            bar.update(1)
            at_checkpoint = step % config.checkpoint_every == 0 or step == config.steps
            if at_checkpoint or step % 100 == 0:
                loss_value = running_loss.item()
                if not math.isfinite(loss_value):
                    restart = ("--resume from the last checkpoint" if state_path.exists() else
                               "train again (no checkpoint was written)")
                    raise TrainingError(f"loss became {loss_value} by step {step}; lower learning_rate "
                                        f"({config.learning_rate}) and {restart}")
                bar.set_postfix(loss=f"{loss_value:.4f}")
            if at_checkpoint:
                record = checkpoint(loss_value)
                bar.write(f"step {step}: held-out loss {record['heldout_loss']['mean']:.4f}")
                if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
                    break
        bar.close()
        return record  # every run ends at a checkpoint: at config.steps, the time limit or a finished one
