"""Denoising score matching for the project's UNet priors (ALGORITHMS.md section 2), resumable.

``invdiff train CONFIG.yaml --out RUN`` minimises the epsilon-prediction loss

    E_{t ~ U(t_min, T), x_0 ~ data, z ~ N(0, I)} || eps_theta(lambda_t x_0 + sigma_t z, t) - z ||^2

(Ho et al., NeurIPS 2020; Song et al., ICLR 2021) with Adam, a linear learning-rate warm-up and an
exponential moving average (EMA) of the weights. Every ``checkpoint_every`` steps it writes

* ``RUN/state.pt``: weights, EMA, optimiser, step, random state (tensors only; loaded with
  ``weights_only=True``), from which ``--resume`` continues exactly;
* ``RUN/NAME.safetensors``: the EMA weights in half precision with their metadata, a loadable prior;
* a line of ``RUN/log.jsonl``: step, running loss, held-out loss per noise level, wall time.

``--continue-from CHECKPOINT`` starts a new run from a committed prior instead (its half-precision
EMA weights as both weights and EMA, a fresh optimiser, the step count and wall time carried on,
the random stream reseeded with ``seed + step``): training in stretches across machines that keep
only the small checkpoint, not ``state.pt``. Such a run is not bit-identical to an uninterrupted one.

The held-out loss is the same loss on a fixed held-out batch with fixed noise at fixed times, so
numbers from different checkpoints (and runs) compare.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Annotated, Literal, Union

import torch
import yaml
from pydantic import Field, ValidationError
from tqdm import tqdm

from invdiff.checkpoints import save_checkpoint
from invdiff.data import DIGITS_SPLIT, NATURAL_SPLIT, digits, natural_images, random_patches
from invdiff.networks import EpsilonNetwork, UNet
from invdiff.problems import SDEConfig, VPConfig, _Strict, format_validation_error

__all__ = ["TrainingError", "TrainingConfig", "load_training_config", "train"]

#: times at which the held-out loss is reported
HELDOUT_TIMES = (0.02, 0.1, 0.3, 0.6, 0.9)


class TrainingError(ValueError):
    """A training configuration or run folder is wrong; the message says what and what is allowed."""


class DigitsData(_Strict):
    source: Literal["digits"]

    def describe(self) -> dict:
        return {"source": "sklearn load_digits", "split": dict(DIGITS_SPLIT), "event_shape": [1, 8, 8]}

    def training_source(self):
        images = digits("train").float()
        return lambda batch_size, generator: images[torch.randint(len(images), (batch_size,), generator=generator)]

    def heldout(self, size: int, generator: torch.Generator) -> torch.Tensor:
        return digits("test")[:size].float()

    def event_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)


class NaturalData(_Strict):
    source: Literal["natural"]
    patch_size: int = Field(32, ge=8)
    scales: tuple[int, ...] = (1, 2, 4)

    def describe(self) -> dict:
        return {"source": "skimage.data photographs, grayscale", "train_images": NATURAL_SPLIT["train"],
                "heldout_images": NATURAL_SPLIT["test"], "patch_size": self.patch_size, "scales": list(self.scales),
                "augmentation": "random crop, horizontal flip, rotation by 90 degrees"}

    def training_source(self):
        patches = random_patches(natural_images("train"), self.patch_size, self.scales)
        return lambda batch_size, generator: patches.sample(batch_size, generator).float()

    def heldout(self, size: int, generator: torch.Generator) -> torch.Tensor:
        return random_patches(natural_images("test"), self.patch_size, self.scales).sample(size, generator).float()

    def event_shape(self) -> tuple[int, ...]:
        return (1, self.patch_size, self.patch_size)


class NetworkConfig(_Strict):
    channels: int = Field(32, ge=8)
    channel_multipliers: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainingConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    data: Annotated[Union[DigitsData, NaturalData], Field(discriminator="source")]
    sde: SDEConfig = VPConfig()
    network: NetworkConfig = NetworkConfig()
    steps: int = Field(ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    t_min: float = Field(1e-3, gt=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    heldout_size: int = Field(256, ge=1)
    seed: int = 0


def load_training_config(path: str | Path) -> TrainingConfig:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"training config '{path}' does not exist")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TrainingError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise TrainingError(f"{path}: expected a mapping of settings, got {type(content).__name__}")
    try:
        return TrainingConfig.model_validate(content)
    except ValidationError as error:
        raise TrainingError(format_validation_error(error, f"{path}: ", TrainingConfig)) from None


def _continue_from(path: str | Path, sde_settings: dict, unet: UNet, ema: UNet) -> tuple[int, float]:
    """Load a checkpoint's weights into ``unet`` and ``ema``; its step count and wall time."""
    from invdiff.checkpoints import CheckpointError, load_checkpoint

    try:
        loaded, document = load_checkpoint(path)
    except CheckpointError as error:
        raise TrainingError(f"--continue-from: {error}") from None
    if loaded.arguments != unet.arguments:
        raise TrainingError(f"--continue-from: '{path}' has network {loaded.arguments}; the config asks for "
                            f"{unet.arguments}")
    if document.get("sde") != sde_settings:
        raise TrainingError(f"--continue-from: '{path}' was trained on the SDE {document.get('sde')}, not "
                            f"{sde_settings}")
    unet.load_state_dict(loaded.state_dict())
    ema.load_state_dict(loaded.state_dict())
    training = document.get("training", {})
    return int(training.get("steps", 0)), float(training.get("wall_time_s", 0.0))


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


def train(config: TrainingConfig, out: str | Path, *, resume: bool = False, max_minutes: float | None = None,
          device: str = "cpu", progress: bool = True, continue_from: str | Path | None = None) -> dict:
    """Train (or continue training) the prior described by ``config`` in the folder ``out``.

    Returns the last log record. Stops after ``config.steps`` steps, or at the first checkpoint
    after ``max_minutes`` of wall time (then ``--resume`` continues).
    """
    out = Path(out)
    state_path = out / "state.pt"
    if state_path.exists() and not resume:
        raise TrainingError(f"'{out}' already holds a training run; pass --resume to continue it, or choose "
                            "another --out")
    if resume and not state_path.exists():
        raise TrainingError(f"--resume: '{out}' holds no training run (no state.pt)")
    if resume and continue_from is not None:
        raise TrainingError("--resume and --continue-from exclude each other: a run resumes from its own state")
    out.mkdir(parents=True, exist_ok=True)

    sde = config.sde.build()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    training_source = config.data.training_source()
    heldout_generator = torch.Generator().manual_seed(config.seed + 1)
    heldout = config.data.heldout(config.heldout_size, heldout_generator)
    heldout_noise = torch.randn((len(HELDOUT_TIMES), *heldout.shape), generator=heldout_generator)
    heldout = heldout * 2 - 1
    data_std = 0.5

    unet = UNet(image_channels=1, **config.network.model_dump())
    ema = UNet(image_channels=1, **config.network.model_dump())
    ema.load_state_dict(unet.state_dict())
    unet.to(device)  # before the optimiser exists, so that its state lives on the device too
    ema.to(device)
    optimiser = torch.optim.Adam(unet.parameters(), lr=config.learning_rate)
    step, wall_time = 0, 0.0
    #: what a resumed run must share with the run it resumes
    fixed_settings = config.model_dump_json(exclude={"steps", "checkpoint_every"})
    if resume:
        state = torch.load(state_path, weights_only=True, map_location="cpu")
        if state["config"] != fixed_settings:
            raise TrainingError(f"'{out}' was trained with another configuration; only 'steps' and "
                                "'checkpoint_every' may change on --resume")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        step, wall_time = int(state["step"]), float(state["wall_time"])
        history = state.get("continued_from", [])
    else:
        history = []
    if continue_from is not None:
        step, wall_time = _continue_from(continue_from, sde.settings(), unet, ema)
        generator.manual_seed(config.seed + step)
        history = [{"checkpoint": str(continue_from), "step": step}]
    network = EpsilonNetwork(unet, sde, data_std)
    ema_network = EpsilonNetwork(ema, sde, data_std)
    parameter_count = sum(parameter.numel() for parameter in unet.parameters())

    def checkpoint(running_loss: float) -> dict:
        record = {"step": step, "loss": running_loss, "wall_time_s": round(wall_time, 1),
                  "heldout_loss": _heldout_losses(ema_network, heldout.to(device), heldout_noise.to(device))}
        torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "optimiser": optimiser.state_dict(),
                    "generator": generator.get_state(), "step": step, "wall_time": wall_time,
                    "continued_from": history,
                    "config": fixed_settings},
                   out / "state.pt.partial")
        (out / "state.pt.partial").replace(state_path)
        metadata = {"name": config.name, "parametrisation": "epsilon", "data_std": data_std,
                    "sde": sde.settings(), "event_shape": list(config.data.event_shape()), "data_range": [-1.0, 1.0],
                    "fully_convolutional": True, "data": config.data.describe(),
                    "training": {"config": config.model_dump(mode="json"), "steps": step,
                                 "parameters": parameter_count, "wall_time_s": round(wall_time, 1),
                                 "heldout_loss": record["heldout_loss"], "device": device,
                                 "continued_from": history,
                                 "threads": torch.get_num_threads()},
                    "versions": {"torch": torch.__version__, "python": platform.python_version()}}
        save_checkpoint(out / f"{config.name}.safetensors", ema, metadata)
        with open(out / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        return record

    record: dict = {}
    running_loss = None  # a tensor on the device: reading it every step would wait for the device
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
            running_loss = loss.detach() if running_loss is None else 0.98 * running_loss + 0.02 * loss.detach()
        step += 1
        wall_time += time.perf_counter() - tick
        bar.update(1)
        at_checkpoint = step % config.checkpoint_every == 0 or step == config.steps
        if at_checkpoint or step % 100 == 0:
            loss_value = running_loss.item()
            if not math.isfinite(loss_value):
                raise TrainingError(f"loss became {loss_value} by step {step}; lower learning_rate "
                                    f"({config.learning_rate}) and --resume from the last checkpoint")
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if at_checkpoint:
            record = checkpoint(loss_value)
            bar.write(f"step {step}: held-out loss {record['heldout_loss']['mean']:.4f}")
            if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
                break
    bar.close()
    if record.get("step") == step:
        return record
    if resume and (out / "log.jsonl").exists():  # nothing left to do: report the run's last checkpoint
        return json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    return checkpoint(math.nan if running_loss is None else running_loss.item())
