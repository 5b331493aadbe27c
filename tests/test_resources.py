"""The resource guard: memory estimates that scale with the run, refusals before sampling, long-run warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from invdiff.plugins import load_registry
from invdiff.posterior import sample_posterior
from invdiff.problems import build_sampler, load_problem
from invdiff.resources import LONG_RUN_SECONDS, ResourceError, available_memory, check_run, estimate_run
from invdiff.smc import restart_steps

PROBLEMS = Path(__file__).resolve().parents[1] / "problems"


def natural_problem(tmp_path: Path, size: int):
    """The natural-box inpainting problem on a random ``size`` x ``size`` truth image."""
    truth = np.random.default_rng(0).uniform(0.2, 0.8, (size, size)).astype(np.float32)
    np.save(tmp_path / f"truth{size}.npy", truth)
    document = {"name": f"natural{size}", "prior": "natural", "noise": {"type": "gaussian", "sigma_y": 0.02},
                "operator": {"type": "inpainting", "mask": "box", "box": [10, 10, 12, 12]},
                "truth": {"source": "file", "path": f"truth{size}.npy"}}
    path = tmp_path / f"natural{size}.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_problem(path)


def sampler(name: str, **options):
    return build_sampler(load_registry().get(name).sampler_class, options)


def test_estimate_grows_linearly_with_pixels_and_samples(tmp_path):
    dps = sampler("dps", num_steps=2)
    small = estimate_run(natural_problem(tmp_path, 64).posterior, dps, 4)
    large = estimate_run(natural_problem(tmp_path, 128).posterior, dps, 4)
    doubled = estimate_run(natural_problem(tmp_path, 64).posterior, dps, 8)
    assert large.state_bytes == 4 * small.state_bytes, "four times the pixels should hold four times the state"
    assert 3.5 < large.activation_bytes / small.activation_bytes <= 4.0, \
        "four times the pixels should need about four times the activations (less a fixed part per call)"
    assert doubled.state_bytes == 2 * small.state_bytes, "twice the samples should hold twice the state"
    assert 1.8 < doubled.activation_bytes / small.activation_bytes <= 2.0, \
        "DPS backpropagates through all samples at once: twice the samples, about twice the activations"
    assert large.seconds > small.seconds, "a larger image should take longer"


def test_forward_only_samplers_need_fewer_activations(tmp_path):
    posterior = natural_problem(tmp_path, 64).posterior
    backward, forward = sampler("dps", num_steps=2), sampler("dps", num_steps=2)
    forward.needs_network_gradient = False
    assert backward.needs_network_gradient, "a sampler that says nothing is assumed to backpropagate"
    assert not load_registry().get("ve_smc").sampler_class.needs_network_gradient, "ve_smc runs forward only"
    assert sampler("twisted_smc").needs_network_gradient, "twisted_smc backpropagates for the twist's gradient"
    assert not sampler("twisted_smc", twisting="gaussian_fit").needs_network_gradient, "the Gaussian fit's gradient"
    with_gradient = estimate_run(posterior, backward, 4)
    without_gradient = estimate_run(posterior, forward, 4)
    assert without_gradient.activation_bytes < with_gradient.activation_bytes / 2, \
        "a forward pass should keep far fewer bytes alive than the tensors saved for backpropagation"


def test_a_2048_natural_run_with_16_samples_is_refused_before_sampling(tmp_path):
    problem = natural_problem(tmp_path, 2048)
    with pytest.raises(ResourceError) as error:
        check_run(problem.posterior, sampler("dps"), 16)
    message = str(error.value)
    assert "\n" not in message, "the refusal should be one line"
    assert "GB" in message and "available" in message, f"the refusal should name the estimate and the memory: {message}"
    assert "2048x2048" in message, f"the refusal should name the image size: {message}"
    assert problem.posterior.prior.evaluations == 0, "nothing should have been sampled"


def test_a_billion_samples_is_refused():
    problem = load_problem(PROBLEMS / "inpaint.yaml", "digits-box")
    with pytest.raises(ResourceError, match="--num-samples"):
        check_run(problem.posterior, sampler("dps", num_steps=2), 1_000_000_000)


def test_the_suggested_batch_size_fits(tmp_path):
    posterior = natural_problem(tmp_path, 64).posterior
    available = 1_000_000_000
    with pytest.raises(ResourceError, match=r"-o batch_size=\d+") as error:
        check_run(posterior, sampler("twisted_smc", num_steps=2, num_particles=512), 4, available=available)
    suggested = int(str(error.value).split("-o batch_size=")[1].split(")")[0])
    assert check_run(posterior, sampler("twisted_smc", num_steps=2, num_particles=512, batch_size=suggested), 4,
                     available=available) is None, f"the suggested batch_size {suggested} should fit"
    with pytest.raises(ResourceError):
        check_run(posterior, sampler("twisted_smc", num_steps=2, num_particles=512, batch_size=suggested + 1), 4,
                  available=available)


def test_the_digits_main_job_passes_without_a_warning():
    problem = load_problem(PROBLEMS / "inpaint.yaml", "digits-box")
    options = problem.config.sampler_options["twisted_smc"]
    assert check_run(problem.posterior, sampler("twisted_smc", **options), problem.config.num_samples) is None, \
        "the main job (31 s) should neither be refused nor warned about"


def test_a_long_run_gets_a_one_line_warning():
    problem = load_problem(PROBLEMS / "inpaint.yaml", "natural-box")
    long_run = sampler("twisted_smc", num_steps=100, num_particles=10_000, batch_size=64)
    estimate = estimate_run(problem.posterior, long_run, 16)
    assert estimate.seconds > LONG_RUN_SECONDS, "a million network evaluations of 32x32 images should be long"
    warning = check_run(problem.posterior, long_run, 16)
    assert warning is not None and "\n" not in warning, "a long run should get one line of warning"
    assert f"{estimate.network_images} network evaluations" in warning, f"the warning should say why: {warning}"


def test_available_memory_on_the_cpu_is_at_most_the_total():
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert 0 < available_memory("cpu") <= total, "the available memory should be positive and within the total"


def test_resample_move_steps_are_counted_as_network_evaluations():
    problem = load_problem(PROBLEMS / "inpaint.yaml", "digits-gmm-box")
    plain = estimate_run(problem.posterior, sampler("twisted_smc", num_steps=10, num_particles=8), 8)
    options = {"num_steps": 10, "num_particles": 8, "move_steps": 3, "resampling_threshold": 1.0}
    moving = estimate_run(problem.posterior, sampler("twisted_smc", **options), 8)
    assert moving.network_images == plain.network_images + 3 * 9 * 8, \
        "3 moves after each of the 9 steps that may resample (not the last) are 3 more network calls per particle"
    result = sample_posterior(sampler("twisted_smc", **options), problem.posterior, 8,
                              generator=torch.Generator().manual_seed(0))
    assert moving.network_images == result.network_evaluations, "resampling at every step, the bound is what it costs"
    split = {**options, "resampling": "multinomial", "num_runs": 2, "split_time": 0.25}
    estimate = estimate_run(problem.posterior, sampler("twisted_smc", **split), 8)
    result = sample_posterior(sampler("twisted_smc", **split), problem.posterior, 8,
                              generator=torch.Generator().manual_seed(0))
    assert estimate.network_images == result.network_evaluations == moving.network_images + 3 * 8, \
        "a multinomial split on a step that resampled: its copies are moved once more"


def test_a_one_image_run_is_probed_by_one_call_on_one_image(tmp_path):
    """Where the run itself calls the network on one image at a time at the prior's own size, the probe is that
    call, measured once (each call of a 256x256 UNet of 100M parameters costs seconds on a CPU), and the
    estimate is what the batched probe gives for one image."""
    posterior = natural_problem(tmp_path, 32).posterior
    prior = posterior.prior
    batches = []
    denoise = prior.denoise
    prior.denoise = lambda x, t: (batches.append(len(x)), denoise(x, t))[1]
    one = estimate_run(posterior, sampler("dps", num_steps=2), 1)
    assert batches == [1, 1], "one call for the bytes, one for the time"
    batches.clear()
    two = estimate_run(posterior, sampler("dps", num_steps=2), 2)
    assert batches == [1, 2, 2]
    assert one.images_per_call == 1 and one.activation_bytes == pytest.approx(two.activation_bytes / 2, rel=0.25)


def test_second_order_twisting_and_pilot_rounds_are_counted_as_network_evaluations():
    """A network prior pays one Jacobian-vector product per measured value for the second-order twist (the mixture
    has it in closed form); the pilot sampler's run counts, and each refit round is one more run."""
    network = load_problem(PROBLEMS / "inpaint.yaml", "digits-box")
    mixture = load_problem(PROBLEMS / "inpaint.yaml", "digits-gmm-box")
    options = {"num_steps": 10, "num_particles": 8}
    for problem, factor in ((network, 1 + network.posterior.measurement[0].numel()), (mixture, 1)):
        plain = estimate_run(problem.posterior, sampler("twisted_smc", **options), 8)
        second = estimate_run(problem.posterior, sampler("twisted_smc", twisting="second_order", **options), 8)
        assert second.network_images == factor * plain.network_images, f"{problem.config.name}: factor {factor}"
    piloted = estimate_run(mixture.posterior, sampler("twisted_smc", guidance="pilot", pilot_rounds=3,
                                                      pilot_samples=4, **options), 8)
    assert piloted.network_images == 4 * 10 + 3 * plain.network_images, "the DPS pilot, two refits, the run"
    default_particles = sampler("twisted_smc", num_steps=10, guidance="pilot", pilot_rounds=3, pilot_samples=4)
    estimate = estimate_run(mixture.posterior, default_particles, 8)
    assert estimate.network_images == 4 * 10 + 2 * 4 * 10 + 8 * 10, \
        "the DPS pilot, two refits of pilot_samples particles (the default: one per sample), the run of 8"
    result = sample_posterior(default_particles, mixture.posterior, 8, generator=torch.Generator().manual_seed(0))
    assert estimate.network_images == result.network_evaluations, "the estimate should count what the run makes"
    two_pilots = estimate_run(mixture.posterior, sampler("twisted_smc", guidance="pilot", pilot_count=2,
                                                         pilot_samples=4, **options), 8)
    assert two_pilots.network_images == 2 * 4 * 10 + plain.network_images, "two DPS pilots, the run"


@pytest.mark.parametrize("name", ["twisted_smc", "ve_smc"])
def test_restart_steps_are_counted_as_the_run_makes_them(name):
    """``restart_time`` runs the steps between the split and the restart again: the estimate counts exactly the
    network evaluations the run makes (no moves, so no upper bound is involved)."""
    problem = load_problem(PROBLEMS / "inpaint.yaml", "digits-gmm-box")
    options = {"num_steps": 10, "num_particles": 8, "num_runs": 2, "split_time": 0.25}
    split = sampler(name, **options)
    restarted = sampler(name, restart_time=0.55, **options)
    assert restart_steps(problem.posterior.prior.sde.time_grid(10), 0.25, 0.55) == 5, \
        "split after step 8 (t = 0.2), restarted at t = 0.6: its own call, then steps 5..8 (0.6 to 0.2) again"
    for each in (split, restarted):
        estimate = estimate_run(problem.posterior, each, 8)
        result = sample_posterior(each, problem.posterior, 8, generator=torch.Generator().manual_seed(0))
        assert estimate.network_images == result.network_evaluations
    assert estimate.network_images == 8 * (10 + 5), "the restarted run's estimate (the loop's last)"


def test_rdmc_s_default_pool_is_counted():
    """rdmc's pool_size defaults to None, meaning 512 draws of a network prior's reverse sampler: they were left out
    of the estimate (160 evaluations estimated, 5248 made). Counted exactly with reuse_chains false (the default
    reuses chains, one start fewer than the upper bound)."""
    problem = load_problem(PROBLEMS / "inpaint.yaml", "digits-box")
    rdmc = sampler("rdmc", num_steps=3, num_chains=2, inner_steps=2, pool_steps=5, reuse_chains=False)
    estimate = estimate_run(problem.posterior, rdmc, 2)
    assert estimate.states == 512, "the pool's draws are held"
    result = sample_posterior(rdmc, problem.posterior, 2, generator=torch.Generator().manual_seed(0))
    assert estimate.network_images == result.network_evaluations == 512 * 5 + 3 * 3 * 2 * 2
    exact_prior = load_problem(PROBLEMS / "inpaint.yaml", "digits-gmm-box")
    assert estimate_run(exact_prior.posterior, rdmc, 2).network_images == 3 * 3 * 2 * 2, "exact draws cost nothing"


def test_a_pilot_larger_than_the_run_sets_its_memory(tmp_path):
    """A pilot runs first on its own samples: a DPS pilot of 256 samples needs more than 8 particles do, and the
    estimate is the pilot's (it was the 8 particles', so a run whose pilot could not fit was let through)."""
    posterior = natural_problem(tmp_path, 64).posterior
    piloted = sampler("twisted_smc", num_steps=2, num_particles=8, guidance="pilot", pilot_samples=256,
                      pilot_options={"num_steps": 2})
    alone = sampler("twisted_smc", num_steps=2, num_particles=8)
    estimate, without = estimate_run(posterior, piloted, 8), estimate_run(posterior, alone, 8)
    assert estimate.states == 256 and estimate.total_bytes > 4 * without.total_bytes
    assert estimate.network_images == without.network_images + 256 * 2, "the pilot's evaluations are added"
