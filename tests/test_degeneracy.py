"""Degeneracy is visible: the genealogy of particle samplers, the number of distinct samples, the ESS
before resampling, the cost per returned sample, the collapse warning, the exact posterior's ceiling and its mixture
components' shares of the samples."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import invdiff.posterior
from invdiff.cli import main
from invdiff.evaluation import component_masses, degeneracy_warning
from invdiff.exact import ExactPosterior
from invdiff.metrics import distinct_samples
from invdiff.operators import GaussianNoise, matrix_operator
from invdiff.posterior import Posterior, SampleResult, sample_posterior
from invdiff.prior import GaussianMixturePrior
from invdiff.problems import load_problem
from invdiff.sde import VPSDE
from invdiff.smc import ParticleWeights, distinct_ancestors, weighted_result
from invdiff.testing import Z_SCORE
from invdiff_plugins.twisted_smc import TwistedSMC
from invdiff_plugins.ve_smc import VESMC

ROOT = Path(__file__).resolve().parent.parent
INPAINT = ROOT / "problems" / "inpaint.yaml"


def test_genealogy_of_a_hand_built_resampling_sequence():
    """Four particles; step 1 keeps particles 0 and 1 (two copies each), step 3 keeps 2 and 3 of step 2's."""
    ancestry = [None, torch.tensor([0, 0, 1, 1]), None, torch.tensor([2, 2, 3, 3])]
    counts = distinct_ancestors(ancestry, torch.tensor([0, 1, 2, 3]))
    assert counts == [1, 1, 2, 2], f"distinct ancestors per step {counts}, expected [1, 1, 2, 2]: particles 2 " \
                                   "and 3 of step 2 are both copies of particle 1 of step 1"
    assert distinct_ancestors(ancestry, torch.tensor([0, 0, 1, 1])) == [1, 1, 1, 1]
    assert distinct_ancestors([None, None], torch.tensor([3, 1, 1])) == [2, 2]


def _run_collapsing_at(collapse_step: int, num_steps: int = 6) -> SampleResult:
    """Five particles moved with noise at every step; at ``collapse_step`` all weight goes to particle 2."""
    generator = torch.Generator().manual_seed(0)
    weights = ParticleWeights(5, threshold=0.5, generator=generator)
    particles = torch.randn(5, 3, generator=generator)
    for step in range(num_steps):
        particles = particles + torch.randn(5, 3, generator=generator)   # a random move
        increments = torch.tensor([-1e9, -1e9, 0.0, -1e9, -1e9]) if step == collapse_step else torch.zeros(5)
        weights.reweight(increments, where=f"step {step}")
        (particles,), _ = weights.resample_if_needed(particles)
        weights.end_step()
    return weighted_result(particles, weights, 8)


def test_every_particle_a_copy_of_one_gives_one_distinct_sample():
    """All weight on one particle at the last step: every sample is a copy of it, and every step back
    has one ancestor of the samples. At step 3 instead: the steps up to 3 have one ancestor, the
    later random moves make the samples differ again."""
    last = _run_collapsing_at(5)
    assert last.distinct_samples == 1 and distinct_samples(last.samples) == 1, \
        f"{last.distinct_samples} distinct samples by ancestry, {distinct_samples(last.samples)} by value; expected 1"
    assert last.distinct_ancestors == [1] * 6, f"genealogy {last.distinct_ancestors}, expected one ancestor per step"
    middle = _run_collapsing_at(3)
    assert middle.distinct_ancestors[:4] == [1] * 4, \
        f"genealogy {middle.distinct_ancestors}: up to step 3 every sample descends from one particle"
    assert middle.distinct_ancestors[-1] == middle.distinct_samples == distinct_samples(middle.samples) > 1


def test_ess_is_recorded_before_resampling():
    """A step that resampled reports the ESS that made it resample (below threshold * K), not K."""
    weights = ParticleWeights(4, threshold=0.5, generator=torch.Generator().manual_seed(0))
    weights.reweight(torch.tensor([0.0, -50.0, -50.0, -50.0]), where="step 1")
    (_,), resampled = weights.resample_if_needed(torch.arange(4))
    record = weights.end_step()
    assert resampled and record["resampled"] == 1.0
    assert record["ess"] == pytest.approx(1.0), f"recorded ESS {record['ess']}; before resampling it was 1"
    assert record["log_weight_spread"] == pytest.approx(50.0)

    problem = load_problem(INPAINT, "digits-gmm-box")
    for sampler in (TwistedSMC(num_steps=20, num_particles=32), VESMC(num_steps=20, num_particles=32)):
        result = sample_posterior(sampler, problem.posterior, 8, generator=torch.Generator().manual_seed(1))
        steps = result.diagnostics[:-1]   # the last step never resamples
        assert any(record["resampled"] for record in steps), f"{sampler.name}: no step resampled; the test needs one"
        for record in steps:
            resampled = record["resampled"] == 1.0
            assert resampled == (record["ess"] < 0.5 * 32), \
                f"{sampler.name} step {record['step']}: resampled {resampled} with recorded ESS {record['ess']:.2f} " \
                "(threshold 16): the ESS must be the one the decision saw"


@pytest.mark.parametrize("sampler_class", [TwistedSMC, VESMC])
def test_genealogy_counts_the_distinct_samples_of_the_particle_samplers(sampler_class):
    """The distinct samples from the ancestry are the distinct rows of the samples (copies made by the
    resampling before the deterministic last step count once), and the genealogy shrinks going back."""
    problem = load_problem(INPAINT, "digits-gmm-box")
    result = sample_posterior(sampler_class(num_steps=30, num_particles=32), problem.posterior, 16,
                              generator=torch.Generator().manual_seed(2))
    assert result.distinct_samples == distinct_samples(result.samples), \
        f"ancestry says {result.distinct_samples} distinct samples, the samples have {distinct_samples(result.samples)}"
    counts = result.distinct_ancestors
    assert counts[-1] == result.distinct_samples, f"last step's distinct paths {counts[-1]} are the distinct samples"
    assert len(counts) == 30 and all(earlier <= later for earlier, later in zip(counts, counts[1:])), \
        f"the genealogy must have one count per step and never grow going back in time: {counts}"


def test_cost_per_returned_sample_and_per_particle():
    result = SampleResult(samples=torch.zeros(16, 2), particles=torch.zeros(32, 2), network_evaluations=3200)
    assert result.network_evaluations_per_sample == 200 and result.network_evaluations_per_particle == 100
    assert SampleResult(samples=torch.zeros(4, 2), network_evaluations=80).network_evaluations_per_particle is None


def test_warning_for_a_low_final_ess_and_none_for_a_healthy_result():
    samples = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    collapsed = SampleResult(samples=samples, particles=torch.zeros(100, 3), distinct_samples=16,
                             diagnostics=[{"ess": 80.0}, {"ess": 3.0}])
    warning = degeneracy_warning(collapsed)
    assert warning is not None and "the final ESS is 3.0 of 100 particles" in warning and "\n" not in warning
    assert "--num-particles" in warning and "point estimate" in warning
    assert degeneracy_warning(replace(collapsed, diagnostics=[{"ess": 6.0}])) is None, "ESS 6 of 100 is >= 5%"
    assert degeneracy_warning(SampleResult(samples=samples)) is None, "16 distinct samples of 16 is healthy"


def _solve(tmp_path, capsys, sampler, *options):
    out = tmp_path / sampler
    assert main(["solve", str(INPAINT), "--case", "digits-gmm-box", "--sampler", sampler, "--out", str(out),
                 "--quiet", *options]) == 0
    return json.loads((out / "summary.json").read_text()), capsys.readouterr()


def test_cli_warns_once_for_collapsed_samples(tmp_path, capsys, monkeypatch):
    """DPS made to return four copies of one sample: one warning line, recorded in summary.json."""
    real_sample_posterior = invdiff.posterior.sample_posterior

    def copies_of_one(*arguments, **keywords):
        result = real_sample_posterior(*arguments, **keywords)
        return replace(result, samples=result.samples[:1].repeat(len(result.samples), 1, 1, 1))

    monkeypatch.setattr(invdiff.posterior, "sample_posterior", copies_of_one)
    summary, printed = _solve(tmp_path, capsys, "dps", "-o", "num_steps=5", "--num-samples", "8")
    warnings = [line for line in printed.err.splitlines() if line.startswith("invdiff: warning: ")]
    assert len(warnings) == 1, f"expected one warning line, stderr: {printed.err}"
    assert "only 1 of the 8 samples are distinct" in warnings[0] and "point estimate" in warnings[0]
    assert summary["warnings"] == [warnings[0].removeprefix("invdiff: warning: ")]
    assert summary["metrics"]["distinct_samples"] == 1
    assert "(1 distinct)" in printed.out


def test_healthy_run_has_no_warning_and_the_summary_has_the_new_fields(tmp_path, capsys):
    summary, printed = _solve(tmp_path, capsys, "exact", "--num-samples", "16")
    assert "warning" not in printed.err and summary["warnings"] == []
    assert summary["metrics"]["distinct_samples"] == 16 and isinstance(summary["metrics"]["distinct_samples"], int)
    assert summary["network_evaluations"] == 0 and summary["network_evaluations_per_particle"] is None
    exact = summary["exact_posterior"]
    assert 5 < exact["psnr_exact_mean"] < 60 and 0 < exact["ssim_exact_mean"] <= 1
    # the exact sampler's 16 samples are not the reference's 16 exact draws, but their means score alike, below the
    # exact mean's (the mean of 16 draws carries their spread / 4; measured: 0.1-0.6 dB below on the patch GMM cases)
    assert exact["psnr_exact_draws_mean"] < exact["psnr_exact_mean"]
    assert abs(exact["psnr_exact_draws_mean"] - summary["metrics"]["psnr_posterior_mean"]) < 1.0
    assert 0.5 < exact["coverage_90_exact"] <= 1, f"exact draws cover {exact['coverage_90_exact']} of the pixels " \
                                                  "with their 90% intervals"
    shares, weights = exact["component_weights_samples"], exact["component_weights_exact"]
    assert shares.keys() == weights.keys() and sum(weights.values()) <= 1 + 1e-9
    assert exact["component_tv_to_exact"] == pytest.approx(0.5 * sum(abs(shares[k] - weights[k]) for k in shares),
                                                           abs=0.01)
    assert "against the exact posterior: sliced Wasserstein" in printed.out
    assert "mixture components' shares of the samples (exact)" in printed.out


def test_component_masses_find_samples_in_one_component_of_a_two_component_posterior():
    """Mean responsibilities of exact draws estimate the exact posterior's component weights (unbiased: ``P(k | x,
    y) = P(k | x)``); draws of one component's posterior alone are far from them, and the total variation says so."""
    prior = GaussianMixturePrior(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
                                 torch.tensor([[0.5], [0.2]]), VPSDE())
    operator = matrix_operator(torch.tensor([[1.3]], dtype=torch.float64), GaussianNoise(0.6))
    exact = ExactPosterior.from_posterior(Posterior(prior, operator, torch.tensor([[-0.2]], dtype=torch.float64)))
    weights = exact.log_weights.exp()
    assert 0.4 < weights[0] < 0.5, f"the measurement should give two components of similar weight: {weights}"
    generator = torch.Generator().manual_seed(0)
    draws, reference = exact.sample(4000, generator=generator), exact.sample(4000, generator=generator)
    second_only = exact.means[1] + exact.choleskys[1][0] * torch.randn(4000, 1, generator=generator,
                                                                       dtype=torch.float64)
    healthy, collapsed = (component_masses(prior, exact, samples, reference) for samples in (draws, second_only))
    standard_error = math.sqrt(float(weights[0] * weights[1]) / 4000)
    assert healthy["component_weights_exact"] == {"0": float(weights[0]), "1": float(weights[1])}
    share = healthy["component_weights_samples"]["0"]
    assert abs(share - float(weights[0])) < Z_SCORE * standard_error, \
        f"exact draws give component 0 a share of {share:.4f} against its weight {float(weights[0]):.4f}"
    assert healthy["component_tv_to_exact"] < Z_SCORE * standard_error
    assert healthy["component_tv_noise_floor"] < Z_SCORE * standard_error
    assert collapsed["component_weights_samples"]["1"] > 0.95
    assert collapsed["component_tv_to_exact"] > float(weights[0]) - 0.05, \
        f"draws of component 1 alone are {collapsed['component_tv_to_exact']:.3f} from the exact weights in TV"


def test_summary_of_a_particle_sampler(tmp_path, capsys):
    summary, printed = _solve(tmp_path, capsys, "twisted_smc", "-o", "num_steps=10", "--num-particles", "8",
                              "--num-samples", "4")
    assert isinstance(summary["metrics"]["distinct_samples"], int) and 1 <= summary["metrics"]["distinct_samples"] <= 4
    counts = [record["distinct_ancestors"] for record in summary["diagnostics"]]
    assert len(counts) == 10 and counts == sorted(counts), f"distinct ancestors per step: {counts}"
    assert summary["network_evaluations"] == 80, "one network evaluation per particle per step"
    assert summary["network_evaluations_per_particle"] == 10 and summary["network_evaluations_per_sample"] == 20
    assert "20 network evaluations per returned sample" in printed.out
    assert {"psnr_exact_mean", "ssim_exact_mean", "coverage_90_exact"} <= set(summary["exact_posterior"])
    assert summary["ess_trace"] == [record["ess"] for record in summary["diagnostics"]]
