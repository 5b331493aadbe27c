"""Colour (RGB) end to end: problem files with RGB truths and priors, every operator type on three channels,
``invdiff solve`` writing colour samples, metrics and figures, and the errors of a gray/RGB mismatch.

The prior is an exact Gaussian over 3 x 8 x 8 images whose channels are independent (a smooth covariance
per channel, different means and spreads), stored as a file the problem names (``gaussian_mixture``).
Every operator acts on each channel alike, so the exact posterior of the RGB problem must factorise into
the exact posteriors of three 1-channel problems, one per channel, given that channel of the measurement:
whatever mixes, drops or reorders channels (reading the PNG, the masks, the blurs, the measurement)
breaks that identity. The structured SVDs on three channels are checked against dense ones in
``tests/test_spectral.py``; the conversion of an RGB truth by ``truth.to_gray`` in
``tests/test_problem_inputs.py``.
"""

import json
import math

import numpy as np
import pytest
import torch
from skimage import io

from cli_helpers import error_of, write_problem
from invdiff.checkpoints import save_gaussian_mixture
from invdiff.cli import main
from invdiff.data import NATURAL_RGB_SPLIT, NATURAL_SPLIT, heldout_crop
from invdiff.exact import ExactPosterior
from invdiff.metrics import SSIM_CONVENTION
from invdiff.problems import load_problem
from invdiff.testing import Z_SCORE

SIZE = 8
PIXELS = SIZE * SIZE
#: per channel (R, G, B): the prior's mean and standard deviation in the prior's [-1, 1] range
CHANNEL_MEANS, CHANNEL_SPREADS = (0.4, -0.1, -0.5), (0.3, 0.2, 0.4)

OPERATORS = {
    "box": "{type: inpainting, mask: box, box: [2, 1, 4, 5]}",
    "random": "{type: inpainting, mask: random, fraction_observed: 0.5}",
    "gaussian_blur": "{type: gaussian_blur, sigma: 1.0}",
    "motion_blur": "{type: motion_blur, kernel_size: 5}",
    "super_resolution": "{type: super_resolution, factor: 2}",
}

PROBLEM = """
name: colour
prior: {{name: gaussian_mixture, path: {prior}}}
operator: {operator}
noise: {{type: gaussian, sigma_y: 0.05}}
{data}
num_samples: 8
sampler_options:
  dps: {{num_steps: 10}}
  twisted_smc: {{num_steps: 10}}
"""


def channel_covariance(channel: int) -> torch.Tensor:
    """A smooth covariance over one channel's pixels: ``spread^2 exp(-distance / length)``, plus a nugget."""
    rows, columns = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    points = torch.stack([rows.flatten(), columns.flatten()], 1).to(torch.float64)
    length = 1.5 + channel
    kernel = torch.exp(-torch.cdist(points, points) / length)
    return CHANNEL_SPREADS[channel] ** 2 * kernel + 1e-3 * torch.eye(PIXELS, dtype=torch.float64)


def save_gaussian(path, means: list[float], covariances: list[torch.Tensor]):
    """A one-component mixture file whose channels are independent: block-diagonal covariance."""
    mean = torch.cat([torch.full((PIXELS,), value, dtype=torch.float64) for value in means])
    covariance = torch.block_diag(*covariances)
    return save_gaussian_mixture(path, torch.ones(1), mean[None], covariance[None],
                                 {"event_shape": [len(means), SIZE, SIZE], "fit": {"components": 1},
                                  "data_range": [-1.0, 1.0]})


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """The RGB prior, its three channels as 1-channel priors, and an RGB truth drawn from it (8-bit PNG)."""
    folder = tmp_path_factory.mktemp("colour")
    covariances = [channel_covariance(channel) for channel in range(3)]
    save_gaussian(folder / "rgb.safetensors", list(CHANNEL_MEANS), covariances)
    for channel in range(3):
        save_gaussian(folder / f"channel{channel}.safetensors", [CHANNEL_MEANS[channel]], [covariances[channel]])
    generator = torch.Generator().manual_seed(0)
    draw = torch.stack([CHANNEL_MEANS[channel] + torch.linalg.cholesky(covariances[channel])
                        @ torch.randn(PIXELS, generator=generator, dtype=torch.float64) for channel in range(3)])
    image = ((draw.reshape(3, SIZE, SIZE) + 1) / 2).clamp(0, 1)                    # [-1, 1] -> [0, 1]
    io.imsave(folder / "truth.png", np.round(255 * image.permute(1, 2, 0).numpy()).astype(np.uint8),
              check_contrast=False)
    io.imsave(folder / "gray.png", np.round(255 * image[0].numpy()).astype(np.uint8), check_contrast=False)
    return folder


def problem_text(operator: str, prior: str = "rgb.safetensors", data: str = "truth: {source: file, path: truth.png}"):
    return PROBLEM.format(prior=prior, operator=OPERATORS[operator], data=data)


@pytest.mark.parametrize("operator", OPERATORS)
def test_the_rgb_posterior_is_the_posterior_of_each_channel(colour_folder, operator):
    """Exact posterior of the RGB problem (PNG truth, simulated measurement) = per channel, the exact posterior
    of the 1-channel problem given that channel of the measurement; no covariance across channels."""
    problem = load_problem(write_problem(colour_folder, problem_text(operator)))
    png = io.imread(colour_folder / "truth.png")
    assert problem.truth.shape == (1, 3, SIZE, SIZE) and problem.posterior.prior.event_shape == (3, SIZE, SIZE)
    assert torch.equal(problem.truth[0], torch.from_numpy(png).permute(2, 0, 1).float() / 255), "R, G, B in order"
    exact = ExactPosterior.from_posterior(problem.posterior)
    mean, covariance = exact.means[0], exact.covariances[0]
    for channel in range(3):
        np.save(colour_folder / "y.npy", problem.posterior.measurement[:, channel:channel + 1].numpy())
        text = problem_text(operator, f"channel{channel}.safetensors", "measurement: y.npy")
        gray = ExactPosterior.from_posterior(load_problem(write_problem(colour_folder, text)).posterior)
        block = slice(channel * PIXELS, (channel + 1) * PIXELS)
        assert torch.allclose(mean[block], gray.means[0], atol=1e-6, rtol=0), f"channel {channel}: mean"
        assert torch.allclose(covariance[block, block], gray.covariances[0], atol=1e-6, rtol=0), \
            f"channel {channel}: covariance"
        others = [index for index in range(3 * PIXELS) if not block.start <= index < block.stop]
        assert float(covariance[block][:, others].abs().max()) < 1e-9, "channels must stay independent"


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("sampler", ["dps", "twisted_smc"])
def test_solve_writes_colour_samples_and_metrics(colour_folder, tmp_path, operator, sampler):
    """``invdiff solve`` on the RGB problem: samples, moments and truth in ``(N, 3, H, W)`` / ``(3, H, W)``,
    finite metrics under the colour SSIM convention, and the exact block."""
    problem = write_problem(colour_folder, problem_text(operator))
    out = tmp_path / "run"
    assert main(["solve", str(problem), "--sampler", sampler, "--out", str(out), "--quiet"]) == 0
    arrays = np.load(out / "samples.npz")
    assert arrays["samples"].shape == (8, 3, SIZE, SIZE)
    assert arrays["posterior_mean"].shape == arrays["posterior_std"].shape == (3, SIZE, SIZE)
    assert arrays["truth"].shape == (1, 3, SIZE, SIZE)
    low = SIZE // 2 if operator == "super_resolution" else SIZE
    assert arrays["measurement"].shape == (1, 3, low, low)
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert all(math.isfinite(metrics[key]) for key in ("psnr_posterior_mean", "ssim_posterior_mean", "coverage_90"))
    assert metrics["ssim_convention"] == SSIM_CONVENTION and "colour images" in SSIM_CONVENTION
    assert summary["exact_posterior"]["sliced_wasserstein_to_exact"] > 0


def test_exact_samples_in_colour_match_the_per_channel_posteriors(colour_folder, tmp_path):
    """``invdiff solve --sampler exact``'s samples.npz, channel by channel, against the 1-channel exact
    posteriors: mean z-scores below ``Z_SCORE`` from 400 draws; the figure is in colour."""
    problem = write_problem(colour_folder, problem_text("box"))
    out = tmp_path / "run"
    assert main(["solve", str(problem), "--sampler", "exact", "--num-samples", "400", "--out", str(out),
                 "--quiet"]) == 0
    samples = torch.from_numpy(np.load(out / "samples.npz")["samples"]).to(torch.float64)   # [0, 1] images
    measurement = load_problem(problem).posterior.measurement
    for channel in range(3):
        np.save(colour_folder / "y.npy", measurement[:, channel:channel + 1].numpy())
        text = problem_text("box", f"channel{channel}.safetensors", "measurement: y.npy")
        gray = ExactPosterior.from_posterior(load_problem(write_problem(colour_folder, text)).posterior)
        mean = (gray.means[0] + 1) / 2                                       # [-1, 1] -> [0, 1]
        standard_error = gray.covariances[0].diagonal().sqrt() / 2 / math.sqrt(len(samples))
        z_scores = (samples[:, channel].flatten(1).mean(0) - mean) / standard_error
        assert float(z_scores.abs().max()) < Z_SCORE, f"channel {channel}: z-score {float(z_scores.abs().max()):.2f}"
    figure = io.imread(out / "figure.png")[..., :3].astype(int)
    assert int(np.abs(figure[..., 0] - figure[..., 2]).max()) > 50, "the figure shows no colour"


# --- gray against RGB: errors that say what is allowed ----------------------------------------------------

def solve_error(problem, tmp_path, capsys):
    out = tmp_path / "run"
    error = error_of(["solve", str(problem), "--sampler", "dps", "--out", str(out), "--quiet"], capsys)
    assert not out.exists(), "a refused problem must not create the output folder"
    return error


GRAY_PRIOR = "prior: {name: digits_gmm, components: 2}"   # 1 x 8 x 8


@pytest.mark.parametrize("prior, truth, expected", [
    (GRAY_PRIOR, "{source: file, path: truth.png}",
     "problem.yaml: truth.path: truth.png is RGB (3 channels) but the prior 'digits_gmm' takes 1-channel images; "
     "give a 1-channel image or set truth.to_gray: true"),
    (None, "{source: file, path: gray.png}",
     "problem.yaml: truth.path: gray.png is grayscale (1 channel) but the prior 'rgb' takes 3-channel images; "
     "give a 3-channel image"),
    (None, "{source: file, path: truth.png, to_gray: true}",
     "problem.yaml: truth.to_gray: the prior 'rgb' takes 3-channel images, not gray ones; remove to_gray"),
    (GRAY_PRIOR, "{source: natural_rgb, image: astronaut, top: 0, left: 0, size: 8}",
     "problem.yaml: truth: the crop of 'astronaut' is RGB (3 channels) but the prior 'digits_gmm' takes 1-channel "
     "images; use source: natural (grayscale crops of camera or coffee), or an RGB prior"),
    (None, "{source: natural, image: camera, top: 0, left: 0, size: 8}",
     "problem.yaml: truth: the crop of 'camera' is grayscale (1 channel) but the prior 'rgb' takes 3-channel "
     "images; use source: natural_rgb (colour crops of astronaut or coffee), or a 1-channel prior"),
    (None, "{source: natural_rgb, image: camera, top: 0, left: 0, size: 8}",
     "truth.image: Input should be 'astronaut' or 'coffee' (got 'camera')"),
], ids=["rgb-file-gray-prior", "gray-file-rgb-prior", "to-gray-rgb-prior", "rgb-crop-gray-prior",
        "gray-crop-rgb-prior", "unknown-colour-image"])
def test_a_gray_and_rgb_mismatch_is_one_line_naming_the_way_out(colour_folder, tmp_path, capsys, prior, truth,
                                                                 expected):
    text = problem_text("box", data=f"truth: {truth}")
    if prior is not None:
        text = text.replace("prior: {name: gaussian_mixture, path: rgb.safetensors}", prior)
    problem = write_problem(colour_folder, text)
    assert expected in solve_error(problem, tmp_path, capsys)


def test_colour_crops_come_from_held_out_colour_photographs(colour_folder):
    """``source: natural_rgb`` crops the colour photograph itself (R, G, B in order), held out of the colour
    training split; the grayscale split is unchanged (astronaut stays a grayscale training image)."""
    import skimage.data

    assert not set(NATURAL_RGB_SPLIT["test"]) & set(NATURAL_RGB_SPLIT["train"])
    assert NATURAL_SPLIT["test"] == ["camera", "coffee"] and "astronaut" in NATURAL_SPLIT["train"]
    text = problem_text("box", data="truth: {source: natural_rgb, image: astronaut, top: 100, left: 200, size: 8}")
    problem = load_problem(write_problem(colour_folder, text))
    photograph = skimage.data.astronaut()[100:108, 200:208] / 255
    assert torch.allclose(problem.truth[0], torch.from_numpy(photograph).permute(2, 0, 1).float())
    assert heldout_crop("coffee", 0, 0, 16, scale=4, colour=True).shape == (1, 3, 16, 16)


def test_metrics_take_an_image_or_a_batch_of_one_and_refuse_other_shapes():
    """A ``(1, C, H, W)`` batch is the image it holds (once it silently got SSIM with a one-pixel window)."""
    from invdiff.metrics import psnr, ssim

    generator = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        truth = torch.rand(channels, 32, 32, generator=generator)
        estimate = (truth + 0.1 * torch.randn(truth.shape, generator=generator)).clamp(0, 1)
        assert ssim(estimate[None], truth[None]) == ssim(estimate, truth)
        assert psnr(estimate[None], truth[None]) == psnr(estimate, truth)
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 32, 32\)"):
        ssim(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
