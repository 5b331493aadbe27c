"""``invdiff train``: denoising score matching runs, checkpoints, resumes exactly, and refuses bad input."""

import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from invdiff.checkpoints import load_prior, save_checkpoint
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


def test_colour_patches_train_a_three_channel_prior(tmp_path):
    """``source: natural_rgb``: patches of the colour photographs (the held-out ones recorded), a 3-channel UNet."""
    config = load_training_config(write_config(tmp_path, TINY_CONFIG.replace("{source: digits}",
                                                                             "{source: natural_rgb, patch_size: 8}")))
    train(config, tmp_path / "run", progress=False)
    prior = load_prior(tmp_path / "run" / "tiny-digits.safetensors")
    assert prior.event_shape == (3, 8, 8) and prior.settings()["data"]["heldout_images"] == ["astronaut", "coffee"]
    noise = prior.resized((3, 16, 16)).score(torch.zeros(2, 3, 16, 16), torch.full((2,), 0.5))  # fully convolutional
    assert noise.shape == (2, 3, 16, 16) and torch.isfinite(noise).all()


def write_config(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_resuming_reproduces_an_uninterrupted_run(tmp_path, config_path, dropout):
    """Bit for bit, dropout included: its masks come from torch's global random state, which state.pt keeps (a
    resumed run with dropout 0.3 differed by up to 0.011 in its weights before)."""
    config = load_training_config(write_config(tmp_path, TINY_CONFIG.replace(
        "blocks_per_level: 1}", f"blocks_per_level: 1, dropout: {dropout}}}")))
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
    ("name: x\ndata: {source: faces}\nsteps: 3\n", "data.source: unknown value 'faces'; allowed: 'digits', 'natural', 'natural_rgb'"),
    ("name: x\ndata: {source: digits}\n", "steps: Field required"),
    ("name: x\ndata: {source: digits}\nsteps: 3\nlearning_rat: 0.1\n", "learning_rat: unknown key"),
    ("name: [x\n", "malformed YAML at line 2"),
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
    # a chain keeps every link (it kept only the last)
    second = tmp_path / "second" / "tiny-digits.safetensors"
    train(config.model_copy(update={"steps": 9}), tmp_path / "chained", continue_from=second, progress=False)
    chained = load_prior(tmp_path / "chained" / "tiny-digits.safetensors").settings()["training"]
    assert chained["continued_from"] == [{"checkpoint": str(checkpoint), "step": 3},
                                         {"checkpoint": str(second), "step": 6}]
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


# ---- bad input and interruptions: one line, nothing left behind -------------------------------------------------

def _tiny(config_path, **changes):
    """The tiny configuration with ``changes`` (3 steps, a checkpoint at each 3 unless changed)."""
    return load_training_config(config_path).model_copy(update={"steps": 3, **changes})


def _log(folder):
    """The records of a run's log.jsonl without their wall time (which differs from run to run)."""
    records = [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key != "wall_time_s"} for record in records]


def _assert_one_line(error_info, *fragments):
    message = str(error_info.value)
    assert "\n" not in message, f"the error is one line, got: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"the error names {fragment!r}: {message!r}"


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fails a test whose run loads training data (every refusal must come before)."""
    from invdiff import training

    def refuse(*arguments):
        raise AssertionError("training data was loaded before the run was refused")

    monkeypatch.setattr(training, "digits", refuse)


@pytest.mark.parametrize("make, fragment", [
    (lambda folder: folder.joinpath("c.yaml").write_text("name: x\nsteps: 3\nsteps: 4\n"),
     "key 'steps' is given twice"),
    (lambda folder: folder.joinpath("c.yaml").mkdir(), "is a directory"),
    (lambda folder: folder.joinpath("c.yaml").symlink_to(folder / "c.yaml"), "symbolic link loop"),
    (lambda folder: folder.joinpath("c.yaml").write_bytes(b"name: \xff\n"), "not UTF-8"),
    (lambda folder: None, "does not exist"),
    (lambda folder: folder.joinpath("c.yaml").write_text("- name\n"), "must be a mapping"),
])
def test_unreadable_training_configs_are_one_line(tmp_path, make, fragment):
    make(tmp_path)
    with pytest.raises(TrainingError) as error:
        load_training_config(tmp_path / "c.yaml")
    _assert_one_line(error, fragment)


def test_malformed_yaml_is_one_line_from_the_command(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: {source: digits\nsteps: 3\n")
    completed = subprocess.run([sys.executable, "-m", "invdiff", "train", str(path), "--out", str(tmp_path / "run")],
                               capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.count("\n") == 1 and "malformed YAML at line" in completed.stderr, completed.stderr
    assert not (tmp_path / "run").exists(), "a refused run creates no folder"


def test_an_output_folder_that_cannot_be_written_is_refused_first(tmp_path, config_path, no_data_loading):
    config = _tiny(config_path)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TrainingError) as error:
        train(config, tmp_path / "file", progress=False)
    _assert_one_line(error, "is a file, not a folder")
    with pytest.raises(TrainingError) as error:
        train(config, tmp_path / "file" / "run", progress=False)
    _assert_one_line(error, f"'{tmp_path / 'file'}' is a file, not a folder")
    with pytest.raises(TrainingError) as error:
        train(config, "/proc/invdiff-test/run", progress=False)
    _assert_one_line(error, "'/proc/invdiff-test/run' cannot be written")
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(tmp_path, config_path, no_data_loading):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    with pytest.raises(TrainingError) as error:
        train(_tiny(config_path), folder, progress=False)
    _assert_one_line(error, "cannot be written")


def test_a_folder_with_a_runs_files_but_no_state_is_not_overwritten(tmp_path, config_path, no_data_loading):
    folder = tmp_path / "priors"
    folder.mkdir()
    (folder / "tiny-digits.safetensors").write_text("someone's prior")
    with pytest.raises(TrainingError) as error:
        train(_tiny(config_path), folder, progress=False)
    _assert_one_line(error, "already holds tiny-digits.safetensors but no state.pt")
    assert [path.name for path in folder.iterdir()] == ["tiny-digits.safetensors"]
    assert (folder / "tiny-digits.safetensors").read_text() == "someone's prior", "the file was left alone"


def test_a_new_run_folder_has_the_umasks_permissions_and_other_files_are_kept(tmp_path, config_path):
    umask = os.umask(0)
    os.umask(umask)
    train(_tiny(config_path), tmp_path / "new", progress=False)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o777 & ~umask, "the run folder follows the umask"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    train(_tiny(config_path), existing, progress=False)
    assert (existing / "notes.txt").read_text() == "mine" and (existing / "state.pt").is_file()


def _state_of_a_wider_network(tmp_path, config_path):
    config = _tiny(config_path, steps=1)
    wider = config.model_copy(update={"network": config.network.model_copy(update={"channels": 16})})
    train(wider, tmp_path / "wider", progress=False)
    return tmp_path / "wider" / "state.pt"


@pytest.mark.parametrize("damage, fragments", [
    ("random bytes", ["is not a readable training state", "truncated, corrupt"]),
    ("truncated", ["is not a readable training state"]),
    ("foreign", ["is not a training state of invdiff: it lacks unet, ema"]),
    ("wider network", ["was trained with another configuration (differing: network)"]),
    ("wider tensors", ["does not fit the configuration's network", "size mismatch"]),
])
def test_resuming_a_bad_state_is_one_line_naming_the_file(tmp_path, config_path, damage, fragments):
    config = _tiny(config_path)
    train(config, tmp_path / "run", progress=False)
    state_path = tmp_path / "run" / "state.pt"
    if damage == "random bytes":
        state_path.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        state_path.write_bytes(state_path.read_bytes()[:50_000])
    elif damage == "foreign":
        torch.save({"x": 1}, state_path)
    elif damage == "wider network":
        shutil.copy(_state_of_a_wider_network(tmp_path, config_path), state_path)
    else:  # the right configuration, another network's tensors
        state = torch.load(state_path, weights_only=True)
        state["unet"] = torch.load(_state_of_a_wider_network(tmp_path, config_path), weights_only=True)["unet"]
        torch.save(state, state_path)
    with pytest.raises(TrainingError) as error:
        train(config.model_copy(update={"steps": 6}), tmp_path / "run", resume=True, progress=False)
    _assert_one_line(error, str(state_path), *fragments)


def test_an_interrupted_and_resumed_run_logs_what_an_uninterrupted_one_does(tmp_path, config_path):
    config = load_training_config(config_path).model_copy(update={"steps": 9})
    train(config, tmp_path / "straight", progress=False)
    train(config.model_copy(update={"steps": 3}), tmp_path / "interrupted", progress=False)
    train(config.model_copy(update={"steps": 6}), tmp_path / "interrupted", resume=True, progress=False)
    train(config, tmp_path / "interrupted", resume=True, progress=False)
    assert [record["step"] for record in _log(tmp_path / "straight")] == [3, 6, 9]
    assert _log(tmp_path / "interrupted") == _log(tmp_path / "straight"), \
        "the resumed run's log (running loss included) equals the uninterrupted run's"


def test_ctrl_c_leaves_whole_files_and_resume_finishes_the_cut_checkpoint(tmp_path, config_path, monkeypatch):
    from invdiff import training

    config = load_training_config(config_path)
    train(config, tmp_path / "straight", progress=False)
    writes = []

    def interrupted_after_state(path, unet, metadata):  # Ctrl-C between state.pt and the prior of step 6
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return save_checkpoint(path, unet, metadata)

    monkeypatch.setattr(training, "save_checkpoint", interrupted_after_state)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["log.jsonl", "state.pt",
                                                                          "tiny-digits.safetensors"]
    assert [record["step"] for record in _log(tmp_path / "run")] == [3]
    record = train(config, tmp_path / "run", resume=True, progress=False)  # already at step 6: finishes its files
    assert record["step"] == 6 and _log(tmp_path / "run") == _log(tmp_path / "straight")
    straight = load_file(str(tmp_path / "straight" / "tiny-digits.safetensors"))
    finished = load_file(str(tmp_path / "run" / "tiny-digits.safetensors"))
    assert all(torch.equal(straight[name], finished[name]) for name in straight), "the prior is step 6's"
    with pytest.raises(TrainingError, match="already at step 6"):
        train(config, tmp_path / "run", resume=True, progress=False)


def test_ctrl_c_in_the_first_checkpoint_leaves_no_folder(tmp_path, config_path, monkeypatch):
    def half_written(state, path):
        Path(path).write_bytes(b"half a state")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny(config_path), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists(), "nothing was written, so the new folder is gone"
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        train(_tiny(config_path), tmp_path / "kept", progress=False)
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir()), \
        "an existing folder stays, without the partial state"


def test_a_state_without_the_running_loss_still_resumes_and_says_so(tmp_path, config_path):
    train(_tiny(config_path), tmp_path / "run", progress=False)
    state_path = tmp_path / "run" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    for key in ("running_loss", "record", "metadata"):  # what states of older versions lack
        del state[key]
    torch.save(state, state_path)
    record = train(_tiny(config_path, steps=6), tmp_path / "run", resume=True, progress=False)
    assert record["step"] == 6 and "running loss restarted at step 3" in record["note"]
    assert [("note" in entry) for entry in _log(tmp_path / "run")] == [False, True]


@pytest.mark.parametrize("minutes", [-1, 0, math.nan])
def test_max_minutes_must_be_positive(tmp_path, config_path, minutes, no_data_loading):
    with pytest.raises(TrainingError) as error:
        train(_tiny(config_path), tmp_path / "run", max_minutes=minutes, progress=False)
    _assert_one_line(error, "--max-minutes must be a positive number", str(minutes))
    assert not (tmp_path / "run").exists()


def test_resume_to_a_step_already_reached_is_refused(tmp_path, config_path):
    train(_tiny(config_path), tmp_path / "run", progress=False)
    for steps in (2, 3):
        with pytest.raises(TrainingError) as error:
            train(_tiny(config_path, steps=steps), tmp_path / "run", resume=True, progress=False)
        _assert_one_line(error, "is already at step 3; pass --steps above 3")


def test_continuing_from_a_bad_checkpoint_leaves_no_folder(tmp_path, config_path, no_data_loading):
    config = _tiny(config_path)
    (tmp_path / "corrupt.safetensors").write_bytes(os.urandom(256))
    for checkpoint, fragment in [(tmp_path / "missing.safetensors", "does not exist"),
                                 (tmp_path / "corrupt.safetensors", "is not a readable safetensors file"),
                                 (ROOT / "invdiff" / "priors" / "digits.safetensors", "has network")]:
        with pytest.raises(TrainingError) as error:
            train(config, tmp_path / "run", continue_from=checkpoint, progress=False)
        _assert_one_line(error, "--continue-from", fragment)
        assert not (tmp_path / "run").exists(), f"a refused --continue-from ({fragment}) creates no folder"


@pytest.mark.parametrize("steps", [2, 3])
def test_continuing_from_a_checkpoint_at_or_beyond_the_steps_is_refused(tmp_path, config_path, steps):
    """A checkpoint already at ``steps`` leaves nothing to train (it used to log a NaN loss)."""
    train(_tiny(config_path), tmp_path / "first", progress=False)
    with pytest.raises(TrainingError) as error:
        train(_tiny(config_path, steps=steps), tmp_path / "second",
              continue_from=tmp_path / "first" / "tiny-digits.safetensors", progress=False)
    _assert_one_line(error, f"is already at step 3 (steps is {steps}); pass --steps above 3")
    assert not (tmp_path / "second").exists()


def test_ctrl_c_in_the_command_is_one_line_and_exit_code_130(tmp_path, config_path, monkeypatch, capsys):
    from invdiff.cli import main

    def interrupted(state, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    assert main(["train", str(config_path), "--out", str(tmp_path / "run"), "--quiet"]) == 130
    error = capsys.readouterr().err.strip()
    assert error.startswith("invdiff: interrupted;") and "\n" not in error, f"not one line: {error!r}"
    assert not (tmp_path / "run").exists(), "the interrupted run left a folder"


def test_an_interrupted_first_run_also_removes_the_parent_folders_it_created(tmp_path, config_path, monkeypatch):
    def interrupted(state, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny(config_path), tmp_path / "new" / "deeper" / "run", progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.yaml"], "folders were left behind"


# ---- settings that do not fit together, unsafe output paths, bad checkpoints: refused before any work ---------

NETWORK_LINE = "network: {channels: 8, channel_multipliers: [1, 2], blocks_per_level: 1}"


@pytest.mark.parametrize("old, new, fragment", [
    ("channels: 8", "channels: 9", "network.channels: Input should be a multiple of 8 (got 9)"),
    ("[1, 2]", "[0, 2]", "network.channel_multipliers.0: Input should be greater than or equal to 1 (got 0)"),
    ("[1, 2]", "[-1]", "network.channel_multipliers.0: Input should be greater than or equal to 1 (got -1)"),
    ("[1, 2]", "[]", "network.channel_multipliers: Tuple should have at least 1 item"),
    ("[1, 2]", "[1, 1, 1, 1, 1, 1]", "network: 6 levels (channel_multipliers) need images whose sides divide by 32; "
                                     "the data's are 8x8: allowed at most 4 levels"),
    ("{source: digits}", "{source: natural, patch_size: 9}", "the data's are 9x9: allowed at most 1 level"),
    ("{source: digits}", "{source: natural, patch_size: 5000}",
     "data: patch_size 5000 is larger than the training and held-out photographs at scales [1, 2, 4]; allowed: at "
     "most 512"),
    ("{source: digits}", "{source: natural, scales: [1000]}",
     "patch_size 32 is larger than the training and held-out photographs at scales [1000]; allowed: at most 1"),
    ("{source: digits}", "{source: natural, scales: []}", "data.scales: Tuple should have at least 1 item"),
    ("{source: digits}", "{source: natural, scales: [-2]}", "data.scales.0: Input should be greater than or equal"),
    ("{source: digits}", "{source: natural, scales: [0]}", "data.scales.0: Input should be greater than or equal to 1"),
    ("seed: 3", "seed: 18446744073709551616", "seed: Input should be less than 9223372036854775808"),
    ("seed: 3", "seed: 18446744073709551615", "seed: Input should be less than 9223372036854775808"),
    ("seed: 3", "seed: -1", "seed: Input should be greater than or equal to 0"),
    ("heldout_size: 16", "heldout_size: 100000", "heldout_size: digits has 300 held-out images; allowed: 1 to 300 "
                                                 "(got 100000)"),
    ("sde: {type: vp}", "sde: {type: vp, T: 0.001}", "t_min: must be below the SDE's end time T = 0.001 (got 0.001)"),
    ("sde: {type: vp}", "sde: {type: vp, T: 0.5}\nt_min: 0.7", "t_min: must be below the SDE's end time T = 0.5"),
    # under the sde, not under t_min where the SDE is built
    ("sde: {type: vp}", "sde: {type: ve, sigma_min: 10, sigma_max: 1}", ": sde: VE SDE needs 0 < sigma_min < sigma_max"),
    ("sde: {type: vp}", "sde: {type: vp, beta_min: 5, beta_max: 1}", ": sde: VP SDE needs 0 < beta_min <= beta_max"),
])
def test_settings_that_cannot_train_are_refused_when_the_config_is_read(tmp_path, old, new, fragment):
    assert old in TINY_CONFIG
    with pytest.raises(TrainingError) as error:
        load_training_config(write_config(tmp_path, TINY_CONFIG.replace(old, new)))
    _assert_one_line(error, fragment)


def test_settings_at_the_limits_are_accepted(tmp_path):
    text = TINY_CONFIG.replace("[1, 2]", "[1, 1, 1, 1]").replace("seed: 3", f"seed: {2**63 - 1}")
    config = load_training_config(write_config(tmp_path, text.replace("heldout_size: 16", "heldout_size: 300")))
    assert config.seed == 2**63 - 1 and config.heldout_size == 300
    natural = TINY_CONFIG.replace("{source: digits}", "{source: natural, patch_size: 512, scales: [1]}")
    assert load_training_config(write_config(tmp_path, natural)).data.patch_size == 512


def test_a_refused_setting_is_one_line_from_the_command_and_creates_no_folder(tmp_path, capsys):
    from invdiff.cli import main

    path = write_config(tmp_path, TINY_CONFIG.replace("[1, 2]", "[1, 1, 1, 1, 1, 1]"))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("invdiff: error: ") and "\n" not in error and "allowed at most 4 levels" in error, error
    # the file's name and the field, as solve names them (it printed the whole path and ".network")
    assert error.startswith(f"invdiff: error: {path.name}: network: 6 levels"), error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["log.jsonl", "tiny-digits.safetensors", "state.pt", "state.pt.partial",
                                  "log.jsonl.partial"])
@pytest.mark.parametrize("resume", [False, True])
def test_a_symbolic_link_among_the_files_a_run_writes_is_refused(tmp_path, config_path, name, resume):
    run = tmp_path / "run"
    if resume:
        train(_tiny(config_path), run, progress=False)
        (run / name).unlink(missing_ok=True)
    else:
        run.mkdir()
    (run / name).symlink_to(tmp_path / "outside")  # dangling: writing through it would create a file outside
    with pytest.raises(TrainingError) as error:
        train(_tiny(config_path, steps=6), run, resume=resume, progress=False)
    _assert_one_line(error, f"{name} is a symbolic link")
    assert not (tmp_path / "outside").exists(), "a file outside --out was written"


def test_an_output_folder_that_is_a_symbolic_link_is_refused(tmp_path, config_path, no_data_loading):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(TrainingError) as error:
        train(_tiny(config_path), tmp_path / "link", progress=False)
    _assert_one_line(error, "is a symbolic link; name a folder")
    assert not any((tmp_path / "real").iterdir())


@pytest.mark.parametrize("out, fragment", [("", "--out is empty"), (" ", "--out is empty"),
                                           (".", "is the working directory")])
def test_an_empty_output_path_or_the_working_directory_is_refused(tmp_path, config_path, monkeypatch, out, fragment,
                                                                  no_data_loading):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingError) as error:
        train(_tiny(config_path), out, progress=False)
    _assert_one_line(error, fragment)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.yaml"]


def test_the_train_command_refuses_an_empty_out(tmp_path, config_path, monkeypatch, capsys):
    from invdiff.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", str(config_path), "--out", "", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("invdiff: error: --out") and "\n" not in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.yaml"], "files were written into the cwd"


def _with_training_metadata(checkpoint: Path, target: Path, **changes) -> Path:
    """A copy of ``checkpoint`` at ``target`` whose metadata ``training`` has ``changes`` (``training=`` replaces
    it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(checkpoint), framework="pt") as handle:
        document = json.loads(handle.metadata()["invdiff"])
    document["training"] = changes.pop("training") if "training" in changes else {**document["training"], **changes}
    save_file(load_file(str(checkpoint)), str(target), metadata={"invdiff": json.dumps(document)})
    return target


@pytest.mark.parametrize("changes, fragment", [
    ({"training": "oops"}, "has metadata 'training' 'oops'; a mapping is needed"),
    ({"steps": "many"}, "has metadata 'training.steps' 'many'; allowed: an integer from 0 to"),
    ({"steps": -5}, "has metadata 'training.steps' -5; allowed: an integer from 0 to"),
    ({"steps": 1.5}, "has metadata 'training.steps' 1.5"),
    ({"steps": True}, "has metadata 'training.steps' True"),
    ({"steps": 2**63}, f"has metadata 'training.steps' {2**63}"),
    ({"wall_time_s": "long"}, "has metadata 'training.wall_time_s' 'long'; allowed: a number of seconds"),
    ({"wall_time_s": -1.0}, "has metadata 'training.wall_time_s' -1.0"),
])
def test_continuing_from_a_checkpoint_with_bad_training_metadata_is_refused(tmp_path, config_path, changes, fragment):
    train(_tiny(config_path), tmp_path / "first", progress=False)
    checkpoint = _with_training_metadata(tmp_path / "first" / "tiny-digits.safetensors", tmp_path / "bad.safetensors",
                                         **changes)
    with pytest.raises(TrainingError) as error:
        train(_tiny(config_path, steps=6), tmp_path / "second", continue_from=checkpoint, progress=False)
    _assert_one_line(error, "--continue-from", str(checkpoint), fragment)
    assert not (tmp_path / "second").exists()


def test_continuing_from_a_checkpoint_without_training_metadata_starts_at_step_0(tmp_path, config_path):
    train(_tiny(config_path), tmp_path / "first", progress=False)
    checkpoint = _with_training_metadata(tmp_path / "first" / "tiny-digits.safetensors", tmp_path / "bare.safetensors",
                                         training={})
    record = train(_tiny(config_path), tmp_path / "second", continue_from=checkpoint, progress=False)
    assert record["step"] == 3 and [entry["step"] for entry in _log(tmp_path / "second")] == [3]


@pytest.mark.parametrize("resume", [False, True])
def test_a_diverging_loss_names_resume_only_when_there_is_a_checkpoint(tmp_path, config_path, monkeypatch, resume):
    from invdiff import training

    if resume:
        train(_tiny(config_path), tmp_path / "run", progress=False)
    monkeypatch.setattr(training, "_learning_rate", lambda config, step: math.inf)  # the weights become NaN
    with pytest.raises(TrainingError) as error:
        train(_tiny(config_path, steps=6 if resume else 3), tmp_path / "run", resume=resume, progress=False)
    if resume:
        _assert_one_line(error, "loss became nan by step 6", "--resume from the last checkpoint")
    else:
        _assert_one_line(error, "loss became nan by step 3", "train again (no checkpoint was written)")
        assert "--resume" not in str(error.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("old, new", [("batch_size: 8", "batch_size: 100000000"),
                                      ("channels: 8", "channels: 80000")])
def test_a_network_or_batch_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path, capsys, old, new):
    """They ran into the allocator's error (a traceback, under a memory limit) or the system's out-of-memory killer:
    the UNet counted on torch's meta device refuses them in one line, with no folder made."""
    from invdiff.cli import main
    from invdiff.resources import available_memory

    if available_memory("cpu") is None:
        pytest.skip("this machine does not say how much memory it has: the estimate cannot refuse")
    path = write_config(tmp_path, TINY_CONFIG.replace(old, new))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("invdiff: error: this training needs at least") and "\n" not in error, error
    assert not (tmp_path / "run").exists()
