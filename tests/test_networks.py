"""The UNet, network priors (parametrisations mapped onto the score), checkpoints and the shipped priors."""

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from invdiff.checkpoints import (CheckpointError, load_checkpoint, load_prior, read_metadata, save_checkpoint,
                                 shipped_priors)
from invdiff.networks import EpsilonNetwork, UNet
from invdiff.prior import GaussianPrior, NetworkPrior
from invdiff.sde import VESDE, VPSDE, DDPMSchedule

TINY = {"image_channels": 1, "channels": 8, "channel_multipliers": (1, 2), "blocks_per_level": 1}


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNet(**TINY)
    for parameter in unet.parameters():  # the output layer starts at zero; make the network non-trivial
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    return unet


def test_unet_is_fully_convolutional_and_checks_sizes():
    unet = tiny_unet()
    for size in (8, 12, 32):
        assert unet(torch.randn(3, 1, size, size), torch.zeros(3)).shape == (3, 1, size, size)
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(torch.randn(1, 1, 9, 9), torch.zeros(1))


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), DDPMSchedule()], ids=["vp", "ve", "ddpm"])
def test_each_parametrisation_gives_the_exact_score(sde):
    """A 'network' that returns the exact epsilon, x0 or score of a Gaussian prior gives the exact score."""
    exact = GaussianPrior(torch.zeros(16), torch.diag(torch.linspace(0.1, 1.0, 16, dtype=torch.float64)), sde,
                          event_shape=(1, 4, 4))

    class Exact(torch.nn.Module):
        def __init__(self, parametrisation):
            super().__init__()
            self.parametrisation = parametrisation
            self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x, t):
            score = exact.score(x, t[0]) + self.anchor
            lambda_t, sigma_t = sde.lambda_t(t[0]), sde.sigma_t(t[0])
            if self.parametrisation == "epsilon":
                return -sigma_t * score
            if self.parametrisation == "x0":
                return (x + sigma_t**2 * score) / lambda_t
            return score

    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    for parametrisation in ("epsilon", "x0", "score"):
        prior = NetworkPrior(Exact(parametrisation), sde, (1, 4, 4), parametrisation, batch_size=2)
        for t in (0.05, 0.5, 0.9):
            torch.testing.assert_close(prior.score(x, t), exact.score(x, t))
        assert prior.evaluations == 15


def test_network_prior_rejects_unknown_parametrisation():
    with pytest.raises(ValueError, match="epsilon, x0, score"):
        NetworkPrior(tiny_unet(), VPSDE(), (1, 8, 8), "velocity")


def test_scores_are_differentiable_in_the_input_but_weights_are_frozen():
    prior = NetworkPrior(EpsilonNetwork(tiny_unet(), VPSDE()), VPSDE(), (1, 8, 8), "epsilon")
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    prior.score(x, 0.3).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not parameter.requires_grad for parameter in prior.network.parameters())


def metadata(sde):
    return {"name": "tiny", "parametrisation": "epsilon", "data_std": 0.5, "sde": sde.settings(),
            "event_shape": [1, 8, 8], "data_range": [-1.0, 1.0], "fully_convolutional": True,
            "data": {"source": "test"}, "training": {"steps": 0}}


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=20.0)], ids=["vp", "ve"])
def test_checkpoint_round_trip_gives_the_same_scores(tmp_path, sde):
    unet = tiny_unet()
    path = save_checkpoint(tmp_path / "tiny.safetensors", unet, metadata(sde), dtype=torch.float32)
    prior = load_prior(path, clip_denoised=False)
    reference = NetworkPrior(EpsilonNetwork(unet.eval(), sde), sde, (1, 8, 8), "epsilon")
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(prior.score(x, 0.4), reference.score(x, 0.4))
    assert prior.sde.settings() == sde.settings() and prior.settings()["data"] == {"source": "test"}
    assert prior.resized((1, 16, 8)).score(torch.randn(2, 1, 16, 8), 0.4).shape == (2, 1, 16, 8)
    with pytest.raises(ValueError, match="divisible by 2"):
        prior.resized((1, 9, 8))


def test_a_checkpoint_file_gets_the_umasks_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "tiny.safetensors", tiny_unet(), metadata(VPSDE()))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, "a written prior should be readable by others (umask 022)"


def test_half_precision_checkpoint_is_close_to_full(tmp_path):
    unet = tiny_unet()
    full = load_prior(save_checkpoint(tmp_path / "full.safetensors", unet, metadata(VPSDE()), dtype=torch.float32),
                      clip_denoised=False)
    half = load_prior(save_checkpoint(tmp_path / "half.safetensors", unet, metadata(VPSDE())), clip_denoised=False)
    x = torch.randn(4, 1, 8, 8)
    relative = (half.score(x, 0.5) - full.score(x, 0.5)).norm() / full.score(x, 0.5).norm()
    assert relative < 1e-2


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_prior(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_prior(corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="no 'invdiff' metadata"):
        load_prior(foreign)
    path = save_checkpoint(tmp_path / "tiny.safetensors", tiny_unet(), metadata(VPSDE()))
    tensors = load_file(str(path))
    tensors.pop("conv_in.weight")
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(tensors, str(mismatched), metadata={"invdiff": json.dumps(read_metadata(path))})
    with pytest.raises(CheckpointError, match="missing \\['conv_in.weight'\\]"):
        load_checkpoint(mismatched)
    wrong_format = tmp_path / "wrong_format.safetensors"
    save_file(tensors, str(wrong_format), metadata={"invdiff": json.dumps({"format": "other"})})
    with pytest.raises(CheckpointError, match="expected invdiff-prior version 1"):
        load_prior(wrong_format)
    with pytest.raises(CheckpointError, match="unknown prior 'faces'; shipped priors: digits"):
        load_prior("faces")


def _edited_metadata(tmp_path, edit) -> Path:
    """A tiny checkpoint whose invdiff metadata is ``edit(metadata)`` (the weights unchanged)."""
    path = save_checkpoint(tmp_path / "tiny.safetensors", tiny_unet(), metadata(VPSDE()))
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(str(path)), str(edited), metadata={"invdiff": json.dumps(edit(read_metadata(path)))})
    return edited


@pytest.mark.parametrize("edit, expected", [
    (lambda document: [1, 2], "corrupt metadata: a JSON object is needed, got list"),
    (lambda document: {**document, "arguments": {**document["arguments"], "channels": 9}},
     "bad architecture arguments"),
    (lambda document: {key: value for key, value in document.items() if key != "sde"}, "no valid 'sde'"),
    (lambda document: {**document, "event_shape": "abc"}, "'event_shape' must be [channels, height, width]"),
    (lambda document: {key: value for key, value in document.items() if key != "event_shape"}, "'event_shape' must"),
    (lambda document: {**document, "data_range": [1, -1]}, "'data_range' must be [low, high] with low < high"),
])
def test_bad_checkpoint_metadata_is_a_checkpoint_error(tmp_path, edit, expected):
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_prior(_edited_metadata(tmp_path, edit))


def test_weights_that_are_not_floating_point_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "tiny.safetensors", tiny_unet(), metadata(VPSDE()))
    integers = tmp_path / "integers.safetensors"
    save_file({name: value.to(torch.int8) for name, value in load_file(str(path)).items()}, str(integers),
              metadata={"invdiff": json.dumps(read_metadata(path))})
    with pytest.raises(CheckpointError, match="not floating point"):
        load_prior(integers)
    with pytest.raises(CheckpointError, match="is not a file"):
        read_metadata(tmp_path)


@pytest.mark.parametrize("name", ["digits", "natural"])
def test_shipped_priors_load_with_their_record(name):
    assert name in shipped_priors()
    prior = load_prior(name)
    record = prior.settings()
    assert record["training"]["steps"] > 0 and record["training"]["heldout_loss"]["mean"] > 0
    assert "split" in record["data"] or "heldout_images" in record["data"]
    x = prior.sde.terminal_sample((2, *prior.event_shape), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(prior.score(x, 0.5)).all()


def test_clipping_projects_tweedies_estimate_onto_the_data_range():
    sde = VPSDE()
    network = EpsilonNetwork(tiny_unet(), sde)
    clipped = NetworkPrior(network, sde, (1, 8, 8), "epsilon", clip_denoised=True)
    plain = NetworkPrior(network, sde, (1, 8, 8), "epsilon")
    x = 3 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in (0.1, 0.9):
        raw, projected = plain.denoise(x, t), clipped.denoise(x, t)
        assert raw.abs().max() > 1 and projected.abs().max() <= 1 + 1e-5
        inside = raw.abs() < 1
        torch.testing.assert_close(projected[inside], raw[inside])
    assert clipped.settings()["clip_denoised"] and not plain.settings()["clip_denoised"]


@pytest.mark.parametrize("name", ["digits", "natural"])
def test_shipped_priors_were_trained_by_their_committed_config(name):
    from invdiff.training import load_training_config

    folder = Path(__file__).resolve().parent.parent / "invdiff" / "priors"
    config = load_training_config(folder / f"{name}.yaml")
    record = read_metadata(folder / f"{name}.safetensors")["training"]
    assert record["config"] == config.model_dump(mode="json")
    assert record["steps"] == config.steps and not record.get("continued_from")  # one uninterrupted run
