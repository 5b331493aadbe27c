"""The patch-GMM prior ``natural_gmm`` (16x16 natural-image patches, exact score) and its problem cases."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from invdiff.checkpoints import CheckpointError, read_metadata
from invdiff.exact import ExactPosterior
from invdiff.plugins import load_registry
from invdiff.posterior import sample_posterior
from invdiff.checkpoints import NATURAL_GMM_PATH, load_gaussian_mixture, natural_gaussian_mixture, save_gaussian_mixture
from invdiff.problems import load_problem
from invdiff.sde import VESDE, VPSDE

ROOT = Path(__file__).resolve().parent.parent
CASES = [("inpaint.yaml", "natural-gmm-box"), ("inpaint.yaml", "natural-gmm-random"),
         ("deblur.yaml", "natural-gmm-gaussian"), ("superres.yaml", "natural-gmm-x2")]


@pytest.fixture(scope="module")
def prior():
    return natural_gaussian_mixture(VPSDE())


def test_the_shipped_file_records_its_data_and_the_search_that_chose_it(prior):
    document = read_metadata(NATURAL_GMM_PATH)
    fit, data = document["fit"], document["data"]
    assert document["event_shape"] == [1, 16, 16] and prior.event_shape == (1, 16, 16), "16x16 grayscale patches"
    assert not set(data["images"]) & {"camera", "coffee"}, "the held-out photographs are never fitted"
    assert data["scales"] == [1, 2, 4], "the natural prior's scales"
    assert len(prior.log_weights) == fit["components"] and not prior.diagonal, "full covariances, as recorded"
    chosen = [record for record in fit["grid"]
              if (record["components"], record["reg_covar"]) == (fit["components"], fit["reg_covar"])]
    assert len(chosen) == 1, "the chosen components and reg_covar are one of the grid's fits"
    best = max(record["validation_log_likelihood"] for record in fit["grid"] if record["reg_covar"] == fit["reg_covar"])
    assert chosen[0]["validation_log_likelihood"] == best == fit["validation_log_likelihood"], \
        "the chosen number of components has the best validation log-likelihood at the chosen reg_covar"
    assert {"scikit-learn", "numpy"} <= set(document["versions"]) and fit["seed"] == 0
    assert NATURAL_GMM_PATH.stat().st_size < 8e6, "the shipped file stays under 8 MB"


def test_covariances_are_symmetric_positive_definite_and_stored_to_float32(prior):
    assert (prior.eigenvalues.min() > 0.5 * prior.metadata["fit"]["reg_covar"]), \
        "every covariance keeps at least about reg_covar on its diagonal after the float32 round trip"
    weights = prior.log_weights.exp()
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-9)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_score_is_the_gradient_of_the_log_density(sde):
    prior = natural_gaussian_mixture(sde)
    generator = torch.Generator().manual_seed(0)
    x = prior.terminal_sample(3, generator=generator, dtype=torch.float64) * 0.3
    for t in (0.05, 0.5):
        point = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(prior.log_prob(point, t).sum(), point)
        torch.testing.assert_close(prior.score(x, t), gradient, rtol=1e-6, atol=1e-6,
                                   msg=f"the score at t={t} differs from autograd of the log-density")


def test_the_loader_refuses_a_file_that_does_not_match_its_metadata(tmp_path, prior):
    tensors = load_file(str(NATURAL_GMM_PATH))
    document = read_metadata(NATURAL_GMM_PATH)
    truncated = tmp_path / "truncated.safetensors"
    save_file({**tensors, "means": tensors["means"][:, :100].contiguous()}, str(truncated),
              metadata={"invdiff": json.dumps(document)})
    with pytest.raises(CheckpointError, match="its metadata .* needs"):
        load_gaussian_mixture(truncated, VPSDE())
    network = tmp_path / "network.safetensors"
    save_file(tensors, str(network), metadata={"invdiff": json.dumps({**document, "architecture": "UNet"})})
    with pytest.raises(CheckpointError, match="holds a UNet, not a GaussianMixture"):
        load_gaussian_mixture(network, VPSDE())


def test_saving_and_loading_round_trips_a_mixture(tmp_path):
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn((2, 4, 4), generator=generator, dtype=torch.float64)
    covariances = factors @ factors.transpose(1, 2) + 0.1 * torch.eye(4, dtype=torch.float64)
    means = torch.randn((2, 4), generator=generator, dtype=torch.float64)
    path = save_gaussian_mixture(tmp_path / "mixture.safetensors", torch.tensor([0.25, 0.75]), means, covariances,
                                 {"event_shape": [1, 2, 2], "fit": {"components": 2}})
    loaded = load_gaussian_mixture(path, VPSDE())
    torch.testing.assert_close(loaded.covariances, covariances.float().double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loaded.means, means.float().double())
    assert loaded.event_shape == (1, 2, 2) and loaded.name == "mixture"


@pytest.mark.parametrize("problem, case", CASES)
def test_each_case_has_an_exact_posterior_that_the_exact_sampler_draws_from(problem, case):
    loaded = load_problem(ROOT / "problems" / problem, case)
    assert loaded.truth.shape == (1, 1, 16, 16) and loaded.posterior.prior.event_shape == (1, 16, 16)
    exact = ExactPosterior.from_posterior(loaded.posterior)
    assert math.isfinite(exact.log_evidence)
    sampler = load_registry().get("exact").sampler_class()  # as `invdiff solve --sampler exact` runs it
    result = sample_posterior(sampler, loaded.posterior, 256, generator=torch.Generator().manual_seed(0))
    draws = result.samples.reshape(256, -1).to(torch.float64)
    standard_error = exact.covariance.diagonal().sqrt() / 256**0.5
    deviation = (draws.mean(0) - exact.mean.flatten()) / standard_error
    assert deviation.abs().max() < 5, "the exact sampler's mean is within 5 standard errors of the exact mean"
    assert math.isclose(result.log_evidence, exact.log_evidence, rel_tol=1e-9), "it reports the exact evidence"
