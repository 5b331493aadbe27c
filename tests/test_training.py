"""``invdiff train``: denoising score matching runs, checkpoints, resumes exactly, and refuses bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from invdiff.checkpoints import load_prior
from invdiff.training import TrainingError, load_training_config, train

ROOT = Path(__file__).resolve().parent.parent

TINY_CONFIG = """
name: tiny-digits
data: {source: digits}
sde: {type: vp}
network: {channels: 8, channel_multipliers: [1, 2], blocks_per_level: 1}
steps: 6
batch_size: 8
learning_rate: 1.0e-3
warmup_steps: 2
checkpoint_every: 3
heldout_size: 16
seed: 3
"""


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


def test_training_writes_a_loadable_prior_with_its_record(tmp_path, config_path):
    record = train(load_training_config(config_path), tmp_path / "run", progress=False)
    assert record["step"] == 6 and set(record["heldout_loss"]) == {"t=0.02", "t=0.1", "t=0.3", "t=0.6", "t=0.9",
                                                                    "mean"}
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [3, 6]
    prior = load_prior(tmp_path / "run" / "tiny-digits.safetensors")
    training = prior.settings()["training"]
    assert training["steps"] == 6 and training["heldout_loss"] == record["heldout_loss"]
    assert prior.settings()["data"]["split"] == {"seed": 0, "test_size": 300} and prior.event_shape == (1, 8, 8)


def test_resuming_reproduces_an_uninterrupted_run(tmp_path, config_path):
    config = load_training_config(config_path)
    train(config, tmp_path / "straight", progress=False)
    train(config.model_copy(update={"steps": 3}), tmp_path / "interrupted", progress=False)
    train(config, tmp_path / "interrupted", resume=True, progress=False)
    straight = load_file(str(tmp_path / "straight" / "tiny-digits.safetensors"))
    resumed = load_file(str(tmp_path / "interrupted" / "tiny-digits.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(straight[name], resumed[name], rtol=0, atol=0)


def test_training_lowers_the_heldout_loss(tmp_path, config_path):
    config = load_training_config(config_path).model_copy(update={"steps": 60, "checkpoint_every": 30,
                                                                  "ema_decay": 0.9})
    train(config, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["heldout_loss"]["mean"] < 0.8 * log[0]["heldout_loss"]["mean"]


def test_a_run_is_not_overwritten_and_resume_checks_the_config(tmp_path, config_path):
    config = load_training_config(config_path).model_copy(update={"steps": 3})
    train(config, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="already holds a training run; pass --resume"):
        train(config, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="only 'steps' and 'checkpoint_every' may change"):
        train(config.model_copy(update={"learning_rate": 0.1}), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(TrainingError, match="holds no training run"):
        train(config, tmp_path / "empty", resume=True, progress=False)


@pytest.mark.parametrize("text, message", [
    ("name: x\ndata: {source: faces}\nsteps: 3\n", "data.source: unknown value 'faces'; allowed: 'digits', 'natural'"),
    ("name: x\ndata: {source: digits}\n", "steps: Field required"),
    ("name: x\ndata: {source: digits}\nsteps: 3\nlearning_rat: 0.1\n", "learning_rat: unknown key"),
    ("name: [x\n", "not valid YAML"),
])
def test_bad_training_configs_name_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TrainingError, match=message.replace("[", "\\[")):
        load_training_config(path)


def test_the_train_command(tmp_path, config_path):
    command = [sys.executable, "-m", "invdiff", "train", str(config_path), "--out", str(tmp_path / "run"),
               "--steps", "3", "--quiet"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.splitlines()[-1])["step"] == 3
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    resumed = subprocess.run([*command[:-2], "5", "--resume", "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0 and json.loads(resumed.stdout.splitlines()[-1])["step"] == 5


def test_continuing_from_a_checkpoint_carries_weights_and_step_count(tmp_path, config_path):
    config = load_training_config(config_path)
    train(config.model_copy(update={"steps": 3}), tmp_path / "first", progress=False)
    checkpoint = tmp_path / "first" / "tiny-digits.safetensors"
    record = train(config, tmp_path / "second", continue_from=checkpoint, progress=False)
    assert record["step"] == 6
    log = [json.loads(line) for line in (tmp_path / "second" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [6]
    training = load_prior(tmp_path / "second" / "tiny-digits.safetensors").settings()["training"]
    assert training["continued_from"] == [{"checkpoint": str(checkpoint), "step": 3}]
    # zero steps left: the weights are the checkpoint's, the EMA included
    train(config.model_copy(update={"steps": 3}), tmp_path / "same", continue_from=checkpoint, progress=False)
    first, same = load_file(str(checkpoint)), load_file(str(tmp_path / "same" / "tiny-digits.safetensors"))
    assert all(torch.equal(first[name], same[name]) for name in first)
    wider = config.model_copy(update={"network": config.network.model_copy(update={"channels": 16})})
    with pytest.raises(TrainingError, match="has network"):
        train(wider, tmp_path / "third", continue_from=checkpoint, progress=False)


def test_natural_patches_are_flipped_or_rotated_crops_of_the_pictures():
    import numpy as np

    from invdiff.data import random_patches

    pictures = {"wide": np.arange(12 * 20, dtype=np.float64).reshape(12, 20),
                "tall": 1000 + np.arange(30 * 9, dtype=np.float64).reshape(30, 9)}
    source = random_patches(pictures, size=5, scales=(1,))
    patches = source.sample(400, torch.Generator().manual_seed(0))[:, 0]
    assert patches.shape == (400, 5, 5)
    seen = set()
    for patch in patches:
        picture = pictures["wide"] if patch.min() < 1000 else pictures["tall"]
        matches = []
        for flip in (False, True):
            for turn in range(4):
                candidate = torch.rot90(patch, -turn, dims=(0, 1))  # undo the rotation, then the flip
                candidate = candidate.flip(-1) if flip else candidate
                top, left = np.argwhere(picture == float(candidate.min()))[0]
                crop = picture[top:top + 5, left:left + 5]
                if crop.shape == (5, 5) and np.array_equal(crop, candidate.numpy()):
                    matches.append((flip, turn))
        assert len(matches) == 1, "a patch is not a flipped/rotated crop of a picture"
        seen.add((float(patch.min()) >= 1000, *matches[0]))
    # both pictures, with every flip and rotation, occur
    assert len(seen) == 2 * 2 * 4
