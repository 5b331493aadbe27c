"""deepinv's samplers as peers (``ddrm``, ``diffpir``, ``deepinv_dps``): the prior as a denoiser, the physics with
the problem's noise, and the plugins run through ``invdiff solve`` and against an exact Gaussian posterior."""

import json
import math
from pathlib import Path

import deepinv
import numpy as np
import pytest
import torch

from cli_helpers import VALID, error_of, write_problem
from invdiff.cli import main
from invdiff.deepinv_bridge import deepinv_problem
from invdiff.exact import ExactPosterior
from invdiff.loaders import denoiser_prior
from invdiff.operators import GaussianNoise, inpainting
from invdiff.plugins import load_registry
from invdiff.posterior import Posterior, sample_posterior
from invdiff.prior import GaussianPrior
from invdiff.problems import load_problem
from invdiff.sde import DDPMSchedule, VESDE, VPSDE

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("ddrm", "diffpir", "deepinv_dps")
REGISTRY = load_registry()


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 50.0), DDPMSchedule()], ids=["vp", "ve", "ddpm"])
def test_as_denoiser_inverts_denoiser_prior(sde):
    """deepinv's MMSE denoiser of a finite dataset, made a prior and turned back into a denoiser, is itself."""
    generator = torch.Generator().manual_seed(0)
    data = torch.rand(20, 1, 4, 4, generator=generator, dtype=torch.float64)
    mmse = deepinv.models.MMSE(dataloader=data, device=torch.device("cpu"), dtype=torch.float64)
    denoiser = denoiser_prior(mmse, sde, (1, 4, 4)).as_denoiser()
    noisy = data[:3] + 0.1 * torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64)
    for sigma in (0.003, 0.1, 0.8, torch.tensor([0.05, 0.2, 0.5], dtype=torch.float64)):
        error = float((denoiser(noisy, sigma) - mmse(noisy, sigma)).abs().max())
        assert error < 1e-9, f"sigma {sigma}: the round trip is off by {error:.3g}"


def test_as_denoiser_of_a_gaussian_prior_is_the_closed_form_mmse_denoiser():
    """``N(mu, Sigma)`` in [-1, 1] is ``N(m, C) = N((mu + 1) / 2, Sigma / 4)`` on [0, 1] images, whose MMSE denoiser
    at noise ``sigma`` is ``m + C (C + sigma^2 I)^-1 (z - m)``; with an explicit map ``image = x`` it is the same
    formula in native units. ``sigma = 0`` gives the image back."""
    generator = torch.Generator().manual_seed(1)
    factor = torch.randn(9, 9, generator=generator, dtype=torch.float64) / 3
    mean, covariance = 0.2 * torch.randn(9, generator=generator, dtype=torch.float64), factor @ factor.T
    prior = GaussianPrior(mean, covariance, VPSDE(), event_shape=(1, 3, 3))
    noisy = torch.rand(4, 1, 3, 3, generator=generator, dtype=torch.float64)
    for image_scale, image_offset in ((0.5, 0.5), (1.0, 0.0)):
        denoiser = prior.as_denoiser() if image_scale == 0.5 else prior.as_denoiser(image_scale, image_offset)
        image_mean, image_covariance = image_scale * mean + image_offset, image_scale**2 * covariance
        for sigma in (0.02, 0.3):
            gain = image_covariance @ torch.linalg.inv(image_covariance + sigma**2 * torch.eye(9, dtype=torch.float64))
            expected = image_mean + (noisy.flatten(1) - image_mean) @ gain.T
            error = float((denoiser(noisy, sigma).flatten(1) - expected).abs().max())
            assert error < 1e-9, f"map ({image_scale}, {image_offset}), sigma {sigma}: off by {error:.3g}"
        assert torch.equal(denoiser(noisy, 0.0), noisy)
    with pytest.raises(ValueError, match="sigma must be one non-negative number or one per image"):
        prior.as_denoiser()(noisy, torch.tensor([0.1, 0.2]))


def test_the_physics_carries_the_problem_noise_and_reads_the_prior_map():
    """The handed-over physics has deepinv's GaussianNoise(sigma_y) (the operator's own keeps ZeroNoise); the same
    masking written on the prior's native space (image = x) is rewritten to the identical problem on [0, 1]."""
    posterior = load_problem(ROOT / "problems" / "inpaint.yaml", "digits-box").posterior
    problem = deepinv_problem(posterior, "test")
    assert isinstance(problem.physics.noise_model, deepinv.physics.GaussianNoise)
    assert float(problem.physics.noise_model.sigma) == pytest.approx(0.05)
    assert isinstance(posterior.operator.physics.noise_model, deepinv.physics.ZeroNoise), "the problem is untouched"
    assert torch.equal(problem.measurement, posterior.measurement)

    native_measurement = 2 * posterior.measurement - posterior.operator.physics.mask   # y = mask * x + 2 eta
    native = Posterior.from_arrays(posterior.prior, posterior.operator.physics, native_measurement, noise=0.1)
    rewritten = deepinv_problem(native, "test")
    assert float(rewritten.physics.noise_model.sigma) == pytest.approx(0.05)
    assert float((rewritten.measurement - posterior.measurement).abs().max()) < 1e-6


def test_poisson_noise_and_operators_without_an_svd_are_refused_in_one_line(tmp_path, capsys):
    poisson = write_problem(tmp_path, VALID.replace("{type: gaussian, sigma_y: 0.05}", "{type: poisson, gain: 0.05}"))
    error = error_of(["solve", str(poisson), "--sampler", "diffpir", "--out", str(tmp_path / "a"), "--quiet"], capsys)
    assert "diffpir (deepinv) takes Gaussian measurement noise only; this problem has poisson noise" in error
    error = error_of(["solve", str(ROOT / "problems" / "superres.yaml"), "--case", "digits-x2", "--sampler", "ddrm",
                      "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert "ddrm needs an operator with a singular value decomposition in deepinv" in error and "Downsampling" in error


@pytest.mark.parametrize("name", PEERS)
def test_peer_is_registered_and_runs_through_solve_reproducibly(tmp_path, name):
    info = REGISTRY.get(name)
    assert info.built_in and not info.sampler_class.asymptotically_exact
    assert info.sampler_class.needs_network_gradient == (name == "deepinv_dps")

    def solve(seed, out):
        command = ["solve", str(ROOT / "problems" / "inpaint.yaml"), "--case", "digits-box", "--sampler", name,
                   "-o", "num_steps=10", "--num-samples", "3", "--seed", str(seed), "--out", str(tmp_path / out),
                   "--quiet"]
        assert main(command) == 0
        summary = json.loads((tmp_path / out / "summary.json").read_text())
        return np.load(tmp_path / out / "samples.npz")["samples"], summary

    samples, summary = solve(1, "first")
    assert samples.shape == (3, 1, 8, 8) and np.isfinite(samples).all()
    network_calls_per_sample = 10 if name == "diffpir" else 9   # ddrm's last level is 0; deepinv_dps: 9 solver steps
    assert summary["network_evaluations"] == 3 * network_calls_per_sample
    assert np.array_equal(solve(1, "again")[0], samples), "the same seed gives the same draws"
    assert not np.array_equal(solve(2, "other")[0], samples), "another seed gives other draws"


#: options for the Gaussian check: deepinv DPS's default weight 1 barely moves towards y (DEEPINV_NOTES.md)
GAUSSIAN_OPTIONS = {"ddrm": {}, "diffpir": {}, "deepinv_dps": {"num_steps": 100, "weight": 10.0}}


@pytest.mark.parametrize("name", PEERS)
def test_peer_posterior_mean_beats_the_trivial_estimates_on_an_exact_gaussian_posterior(name):
    """A Gaussian prior on 6x6 images (smooth covariance, pixels within [-1, 1] at 3 sd), every other column
    observed with noise 0.05. The sample mean of 64 draws must be closer to the exact posterior mean than half the
    distance of the better trivial estimate: the prior mean, or the pseudo-inverse around it
    ``mu + A^+ (y - G(mu))`` (measured pixels taken from y). The Monte Carlo error of the mean,
    ``sqrt(trace(posterior covariance) / 64) = 0.08``, is far below that margin (0.65); a sampler that ignored y
    (1.86) or copied it (1.29) fails."""
    side = 6
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pixels = torch.stack([rows.flatten(), columns.flatten()], 1).double()
    covariance = 0.3**2 * torch.exp(-torch.cdist(pixels, pixels)**2 / (2 * 1.5**2)) + 1e-4 * torch.eye(side**2)
    prior = GaussianPrior(torch.zeros(side**2), covariance, VPSDE(), event_shape=(1, side, side))
    mask = torch.zeros(1, side, side)
    mask[:, :, ::2] = 1
    operator = inpainting((1, side, side), GaussianNoise(0.05), mask=mask, dtype=torch.float64)
    operator = operator.with_input_map(0.5, 0.5)
    truth = prior.sample_clean(1, generator=torch.Generator().manual_seed(0))
    posterior = Posterior(prior, operator, operator.measure(truth, torch.Generator().manual_seed(1)))
    exact_mean = ExactPosterior.from_posterior(posterior).mean.reshape(1, side, side)

    prior_mean = torch.zeros(1, side, side, dtype=torch.float64)
    pseudo_inverse = prior_mean + mask * (posterior.measurement[0] - operator.forward(prior_mean[None])[0]) / 0.5
    trivial = min(float((estimate - exact_mean).norm()) for estimate in (prior_mean, pseudo_inverse))
    sampler = REGISTRY.get(name).sampler_class(**GAUSSIAN_OPTIONS[name])
    result = sample_posterior(sampler, posterior, 64, generator=torch.Generator().manual_seed(0))
    distance = float((result.samples.mean(0) - exact_mean).norm())
    assert distance < 0.5 * trivial, f"{name}: mean {distance:.3f} from the exact mean; limit 0.5 x {trivial:.3f}"
    assert math.isfinite(distance)
