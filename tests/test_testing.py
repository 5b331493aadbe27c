"""invdiff.testing: the checker fails the trivial answers, passes the exact sampler, and says why in words."""

import pytest
import torch

from invdiff.exact import ExactPosterior
from invdiff.noise import GaussianNoise
from invdiff.operators import inpainting
from invdiff.posterior import Posterior, Sampler, SampleResult, UnsupportedProblem
from invdiff.prior import GaussianPrior
from invdiff.problems import ProblemError
from invdiff.sde import VPSDE
from invdiff.testing import Check, check_sampler, discretised_model_posterior, linear_gaussian
from invdiff_plugins.exact import ExactSampler


def cpu_generator(generator: torch.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))


class PriorDraws(Sampler):
    """Exact prior draws: ignores the measurement."""

    name = "prior_draws"

    def sample(self, posterior, num_samples, *, generator, monitor):
        return SampleResult(samples=posterior.prior.sample_clean(num_samples, generator=cpu_generator(generator)))


class PointMass(Sampler):
    """Every sample at the exact posterior mean: the right place, no spread."""

    name = "point_mass"

    def sample(self, posterior, num_samples, *, generator, monitor):
        mean = ExactPosterior.from_posterior(posterior).mean
        jitter = 1e-9 * torch.rand(num_samples, *mean.shape, generator=cpu_generator(generator), dtype=mean.dtype)
        return SampleResult(samples=mean + jitter)   # the jitter only lets two seeds differ


class ExactPriorDraws(PriorDraws):
    name = "exact_prior_draws"
    asymptotically_exact = True


class GlobalRandomDraws(Sampler):
    """Exact posterior draws from torch's global random stream instead of the generator it is given."""

    name = "global_random"

    def sample(self, posterior, num_samples, *, generator, monitor):
        return SampleResult(samples=ExactPosterior.from_posterior(posterior).sample(num_samples))


class RefusesEverything(Sampler):
    """Refuses every problem."""

    name = "refuses"

    def sample(self, posterior, num_samples, *, generator, monitor):
        raise UnsupportedProblem("refuses: this sampler handles no SDE at all")


def failed_quantities(check) -> set[str]:
    return {failure.quantity for failure in check.failures}


def failed_against_the_trivial_answers(check) -> int:
    """How many test beds' non-exact standard (half the trivial answers' distance) failed."""
    return sum("better of prior draws" in failure.note for failure in check.failures)


def test_a_sampler_returning_prior_draws_fails_the_non_exact_standard():
    check = check_sampler(PriorDraws)
    assert not check.passed, f"prior draws passed the non-exact standard:\n{check}"
    assert failed_against_the_trivial_answers(check) == 2, f"expected the sliced Wasserstein check to fail on " \
                                                           f"both test beds:\n{check}"
    assert "verdict: FAIL: prior_draws: 2 of 4 judged checks failed" in str(check), str(check)


def test_prior_draws_claiming_exactness_fail_every_exactness_check():
    check = check_sampler(ExactPriorDraws)
    assert {"largest mean z-score of 4 coordinates", "largest covariance z-score of 4x4 entries",
            "sliced Wasserstein distance to 1000 exact draws"} <= failed_quantities(check), str(check)


def test_a_point_mass_at_the_exact_mean_fails_the_non_exact_standard():
    check = check_sampler(PointMass)
    assert not check.passed, f"a point mass at the exact mean passed the non-exact standard:\n{check}"
    assert failed_against_the_trivial_answers(check) == len(check.failures) == 2, \
        f"expected the sliced Wasserstein check, and only it, to fail on both test beds:\n{check}"


def test_the_exact_sampler_passes_and_the_report_says_what_was_checked():
    check = check_sampler(ExactSampler, seed=3)
    report = str(check)
    assert check.passed, report
    assert all(item.judged for item in check.checks), report
    assert report.splitlines()[0] == "invdiff check: sampler exact (default options), seed 3"
    assert report.splitlines()[-1] == "verdict: PASS: exact meets the exact standard (8 checks judged)"
    linear = "linear-Gaussian d=4, d_y=2 (VP, 2000 samples): "
    assert any(line.startswith(linear + "largest mean z-score of 4 coordinates ")
               and line.endswith("(limit < 5; 2000 effective draws) ok") for line in report.splitlines()), report
    assert "|log Z_hat - log p(y)| in nats 0 (limit < 0.3;" in report, report


def test_a_sampler_that_ignores_its_generator_fails_reproducibility():
    check = check_sampler(GlobalRandomDraws)
    assert failed_quantities(check) == {"seed 0 twice, largest difference of the draws"}, str(check)


def test_a_sampler_that_refuses_every_test_bed_fails_with_the_reasons():
    check = check_sampler(RefusesEverything)
    assert not check.passed and not check.checks
    assert check.not_run == [f"{bed}: not run, the sampler refused it: VP: refuses: this sampler handles no SDE "
                             "at all; VE: refuses: this sampler handles no SDE at all"
                             for bed in ("linear-Gaussian d=4, d_y=2", "Gaussian mixture d=8, d_y=2",
                                         "Gaussian mixture d=8, d_y=1, three modes")], str(check)
    assert str(check).endswith("verdict: FAIL: refuses: 3 test bed(s) not run")


def test_bad_options_name_the_option():
    with pytest.raises(ProblemError, match="num_steps"):
        check_sampler(ExactSampler, {"num_steps": 3})


def test_check_lines_say_the_number_the_limit_and_the_outcome():
    judged = Check("bed", "largest mean z-score", 7.25, "<", 5.0, note="10 effective draws")
    shown = Check("bed", "largest mean z-score", 1234.5, "<", 5.0, judged=False)
    assert not judged.passed and shown.passed and not shown.within_limit
    assert judged.line() == "bed: largest mean z-score 7.25 (limit < 5; 10 effective draws) FAIL"
    assert shown.line() == "bed: largest mean z-score 1234 (an exact sampler's limit < 5) not judged"


class CollapsedWeights(Sampler):
    """Exact posterior draws as particles with meaningless weights (log-weights of spread 3): an ESS of a few, at
    which no z-score can fail, so the particles' variance may be anything; here it is halved."""

    name = "collapsed_weights"
    asymptotically_exact = True

    def sample(self, posterior, num_samples, *, generator, monitor):
        exact = ExactPosterior.from_posterior(posterior)
        own = cpu_generator(generator)
        mean = exact.mean.flatten()
        draws = mean + 0.5**0.5 * (exact.sample(num_samples, generator=own).reshape(num_samples, -1) - mean)
        draws = draws.reshape(num_samples, *posterior.prior.event_shape)
        log_weights = 3.0 * torch.randn(num_samples, generator=own, dtype=draws.dtype)
        return SampleResult(samples=draws, particles=draws, log_weights=log_weights - log_weights.logsumexp(0))


class WrongSamplesRightParticles(Sampler):
    """Exact particles, equal weights, and returned samples that are prior draws (a broken final resampling)."""

    name = "wrong_samples"
    asymptotically_exact = True

    def sample(self, posterior, num_samples, *, generator, monitor):
        own = cpu_generator(generator)
        particles = ExactPosterior.from_posterior(posterior).sample(num_samples, generator=own)
        particles = particles.reshape(num_samples, *posterior.prior.event_shape)
        return SampleResult(samples=posterior.prior.sample_clean(num_samples, generator=own), particles=particles,
                            log_weights=torch.full((num_samples,), -torch.log(torch.tensor(float(num_samples)))))


def test_weighted_particles_must_keep_enough_effective_draws():
    check = check_sampler(CollapsedWeights)
    assert not check.passed and "effective draws of the weighted particles" in failed_quantities(check), str(check)


def test_the_returned_samples_are_judged_beside_the_particles():
    check = check_sampler(WrongSamplesRightParticles)
    assert failed_quantities(check) == {"sliced Wasserstein distance of the returned samples to 1000 exact draws"}, \
        str(check)


class MisweighedModes(Sampler):
    """Exact posterior draws with half of the largest mode's thrown away: the right modes, the wrong weights."""

    name = "misweighed_modes"
    asymptotically_exact = True

    def sample(self, posterior, num_samples, *, generator, monitor):
        exact = ExactPosterior.from_posterior(posterior)
        draws = exact.sample(3 * num_samples, generator=cpu_generator(generator)).reshape(3 * num_samples, -1)
        prior = posterior.prior
        if hasattr(prior, "responsibilities"):
            mode = prior.responsibilities(draws.to(prior.means)).argmax(1)
            top = exact.log_weights.argmax()
            keep = (mode != top) | (torch.arange(len(draws)) % 2 == 0)
            draws = draws[keep]
        return SampleResult(samples=draws[:num_samples].reshape(num_samples, *posterior.prior.event_shape))


def test_a_sampler_that_misweighs_the_modes_fails_the_modes_check():
    """The d_y = 2 mixture bed's posterior has one mode, so no check saw how a sampler weighs modes."""
    check = check_sampler(MisweighedModes)
    quantities = failed_quantities(check)
    assert any("modes' shares" in quantity for quantity in quantities), str(check)


def test_the_discretised_model_with_the_exact_reverse_step_is_the_exact_posterior():
    """``kernel_variance='exact'`` adds ``c^2 Cov[x_0 | x_t]`` to the samplers' step: the Gaussian prior's exact
    transition, so the model's posterior is the exact one at any step count; Analytic-DPM's isotropic term comes
    closer to it than the samplers' step (``ddpm``), whose variance is short by 7-15% at 100 steps on this bed."""
    posterior, exact = linear_gaussian()
    model = discretised_model_posterior(posterior, 20, kernel_variance="exact")
    assert torch.allclose(model.covariance, exact.covariance, atol=1e-9)
    assert torch.allclose(model.mean, exact.mean, atol=1e-9)
    assert model.log_evidence == pytest.approx(exact.log_evidence, abs=1e-9)
    errors = {kernel: float((torch.diagonal(discretised_model_posterior(posterior, 100, kernel).covariance)
                             / torch.diagonal(exact.covariance) - 1).abs().max()) for kernel in ("ddpm", "analytic")}
    assert errors["ddpm"] > 0.05 and errors["analytic"] < 0.05, errors
    with pytest.raises(ValueError, match="kernel_variance"):
        discretised_model_posterior(posterior, 20, kernel_variance="learned")
    # an image-shaped prior (events (1, 2, 2)) under a mask, as benchmarks/discretisation_bias.py builds at d = 256
    prior = GaussianPrior(posterior.prior.means[0], posterior.prior.covariances[0], VPSDE(), (1, 2, 2))
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    operator = inpainting((1, 2, 2), GaussianNoise(0.3), mask=mask, dtype=torch.float64)
    image_posterior = Posterior(prior, operator, operator.measure(prior.sample_clean(1, generator=torch.Generator()
                                                                                    .manual_seed(0))))
    image_model = discretised_model_posterior(image_posterior, 20, kernel_variance="exact")
    image_exact = ExactPosterior.from_posterior(image_posterior)
    assert image_model.mean.shape == (1, 2, 2)
    assert torch.allclose(image_model.covariance, image_exact.covariance, atol=1e-9)


def test_a_check_whose_options_cannot_fit_is_refused_before_it_runs(capsys):
    """``invdiff check twisted_smc -o num_particles=1000000000`` grew to 8.6 GB before torch's allocation error: the
    run estimate that ``solve`` applies refuses it, one line, exit 2."""
    from cli_helpers import error_of
    from invdiff.resources import available_memory

    if available_memory("cpu") is None:
        pytest.skip("this machine does not say how much memory it has: the estimate cannot refuse")
    error = error_of(["check", "twisted_smc", "-o", "num_particles=1000000000"], capsys)
    assert "this run needs about" in error and "are available" in error, error
