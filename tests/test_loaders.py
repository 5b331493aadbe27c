"""Loaders of users' checkpoints: small random models saved in each native format, loaded back, and
their scores checked against the score computed by hand from the original model; errors for
missing, corrupt and mismatched files. A deepinv denoiser prior is checked against an exact score."""

import json

import numpy as np
import pytest
import torch
from deepinv.models import MMSE, DiffUNet, NCSNpp
from safetensors.torch import load_file, save_file

from invdiff.checkpoints import CheckpointError
from invdiff.loaders import denoiser_prior, load_diffusers_unet, load_guided_diffusion, load_ncsnpp
from invdiff.prior import GaussianMixturePrior
from invdiff.sde import VESDE, VPSDE, DDPMSchedule


def perturb_parameters(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so that zero-initialised layers (output convolutions, the
    time-embedding projections) take part and a wrong time or channel shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module.eval()


def write_bytes(path, content: bytes = b"these bytes are not a checkpoint"):
    path.write_bytes(content)
    return path


# ---- guided-diffusion (deepinv DiffUNet) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def guided_diffusion(tmp_path_factory):
    """deepinv's smallest DiffUNet (1 channel, learned variance: 2 outputs) saved as a guided-diffusion .pt."""
    torch.manual_seed(0)
    unet = perturb_parameters(DiffUNet(in_channels=1, out_channels=2, pretrained=None), seed=1)
    state = {name: value for name, value in unet.state_dict().items() if "alphas_cumprod" not in name}
    path = tmp_path_factory.mktemp("guided") / "model.pt"
    torch.save(state, path)
    return unet, state, path


def test_guided_diffusion_score_is_the_unets_noise_at_index_t_n_minus_one(guided_diffusion):
    unet, _, path = guided_diffusion
    prior = load_guided_diffusion(path, image_size=32)
    indices = torch.tensor([49, 700])
    times = (indices + 1) / 1000.0
    alphas_cumprod = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))  # guided-diffusion's schedule
    sigma = (1 - alphas_cumprod[indices]).sqrt().float().view(-1, 1, 1, 1)
    assert torch.allclose(prior.sde.sigma_t(times), (1 - alphas_cumprod[indices]).sqrt())
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = -unet(x, indices.float(), type_t="timestep")[:, :1] / sigma
        one_step_off = -unet(x, indices.float() + 1, type_t="timestep")[:, :1] / sigma
        score = prior.score(x, times)
    assert score.shape == x.shape
    assert torch.allclose(score, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score, one_step_off, rtol=1e-3, atol=1e-3)  # the index convention matters
    assert prior.event_shape == (1, 32, 32) and prior.parametrisation == "epsilon"
    settings = prior.settings()
    assert settings["format"] == "guided-diffusion" and settings["checkpoint"] == str(path)
    assert settings["schedule"] == {"type": "ddpm", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    assert settings["architecture"]["learned_sigma"] and not settings["architecture"]["large_model"]
    json.dumps(settings)


def test_guided_diffusion_rejects_bad_files(guided_diffusion, tmp_path):
    _, state, _ = guided_diffusion
    with pytest.raises(CheckpointError, match="absent.pt' does not exist"):
        load_guided_diffusion(tmp_path / "absent.pt", image_size=32)
    with pytest.raises(CheckpointError, match="corrupt.pt' is not a readable state dict .it is corrupt"):
        load_guided_diffusion(write_bytes(tmp_path / "corrupt.pt"), image_size=32)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pt")
    with pytest.raises(CheckpointError, match="holds a pickled torch.nn.modules.linear.Linear; that is not loaded"):
        load_guided_diffusion(tmp_path / "pickled_module.pt", image_size=32)
    torch.save({"model": {"weight": torch.zeros(1)}, "step": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(CheckpointError, match="not a flat state dict"):
        load_guided_diffusion(tmp_path / "wrapped.pt", image_size=32)
    torch.save({"map_layer0.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a guided-diffusion UNet"):
        load_guided_diffusion(tmp_path / "other.pt", image_size=32)
    with pytest.raises(CheckpointError, match="UNet for 1-channel images, not 3"):
        load_guided_diffusion(guided_diffusion[2], image_size=32, in_channels=3)
    mismatched = {name: value for name, value in state.items() if name != "middle_block.1.norm.weight"}
    mismatched["middle_block.9.weight"] = torch.zeros(1)
    torch.save(mismatched, tmp_path / "mismatched.pt")
    with pytest.raises(CheckpointError, match=r"mismatched.pt' does not match the small DiffUNet.*1 missing keys "
                                              r"\(first: middle_block.1.norm.weight\); 1 unexpected keys"):
        load_guided_diffusion(tmp_path / "mismatched.pt", image_size=32)


# ---- diffusers UNet2DModel ----------------------------------------------------------------------------------

def small_unet2d(output_channels: int = 1, time_embedding_type: str = "positional"):
    from diffusers import UNet2DModel

    torch.manual_seed(3)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=output_channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       time_embedding_type=time_embedding_type)
    return perturb_parameters(unet, seed=4)


@pytest.mark.parametrize("prediction_type, scheduler_place, output_channels", [
    ("epsilon", "beside", 1), ("sample", "pipeline", 1), ("v_prediction", "beside", 2), ("epsilon", None, 1)])
def test_diffusers_score_matches_the_unet_under_its_scheduler(prediction_type, scheduler_place, output_channels,
                                                              tmp_path):
    from diffusers import DDPMScheduler

    unet = small_unet2d(output_channels)
    unet.save_pretrained(tmp_path / "unet")
    schedule = {"num_train_timesteps": 100, "beta_start": 1e-3, "beta_end": 0.1} if scheduler_place else {}
    scheduler = DDPMScheduler(**schedule, prediction_type=prediction_type, variance_type="learned_range")
    if scheduler_place:
        scheduler.save_config(tmp_path / ("unet" if scheduler_place == "beside" else "scheduler"))
    prior = load_diffusers_unet(tmp_path if scheduler_place == "pipeline" else tmp_path / "unet")

    indices = torch.tensor([5, 60])
    times = (indices + 1) / scheduler.config.num_train_timesteps
    alpha_cumprod = scheduler.alphas_cumprod[indices].double().view(-1, 1, 1, 1)
    signal, noise = alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        output = unet(x.float(), indices).sample[:, :1].double()
        score = prior.score(x, times)
    clean = {"epsilon": (x - noise * output) / signal, "sample": output,
             "v_prediction": signal * x - noise * output}[prediction_type]
    assert torch.allclose(score, (signal * clean - x) / noise**2, rtol=1e-4, atol=1e-4)
    assert prior.event_shape == (1, 8, 8) and prior.data_range == (-1.0, 1.0)
    settings = prior.settings()
    assert settings["format"] == "diffusers" and settings["prediction_type"] == prediction_type
    assert settings["schedule"] == {"type": "ddpm", "num_timesteps": scheduler.config.num_train_timesteps,
                                    "beta_start": scheduler.config.beta_start, "beta_end": scheduler.config.beta_end}
    assert settings["checkpoint"] == str(tmp_path / "unet")
    json.dumps(settings)


def test_diffusers_score_sde_ve_model_predicts_the_score(tmp_path):
    from diffusers import ScoreSdeVeScheduler

    unet = small_unet2d(time_embedding_type="fourier")
    unet.save_pretrained(tmp_path)
    ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0).save_config(tmp_path)
    prior = load_diffusers_unet(tmp_path)
    times = torch.tensor([0.3, 0.8], dtype=torch.float64)
    sigma = VESDE(0.01, 50.0).sigma_t(times)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(prior.score(x, times), unet(x, sigma.float()).sample, rtol=1e-5, atol=1e-5)
    assert prior.data_range == (0.0, 1.0) and prior.parametrisation == "score"
    assert prior.settings()["schedule"] == {"type": "ve", "sigma_min": 0.01, "sigma_max": 50.0, "T": 1.0}


def test_diffusers_rejects_bad_folders(tmp_path):
    from diffusers import DDPMScheduler

    with pytest.raises(CheckpointError, match="absent' has no config.json"):
        load_diffusers_unet(tmp_path / "absent")
    folder = tmp_path / "unet"
    small_unet2d().save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"

    DDPMScheduler(beta_schedule="scaled_linear").save_config(folder)
    with pytest.raises(CheckpointError, match="beta_schedule 'scaled_linear'; supported: beta_schedule 'linear'"):
        load_diffusers_unet(folder)
    (folder / "scheduler_config.json").unlink()

    tensors = load_file(weights)
    del tensors["conv_in.bias"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"do not match config.json: 1 missing keys \(first: conv_in.bias\)"):
        load_diffusers_unet(folder)
    write_bytes(weights)
    with pytest.raises(CheckpointError, match="unet' could not be loaded"):
        load_diffusers_unet(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        load_diffusers_unet(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="describes a UNet2DConditionModel; only UNet2DModel"):
        load_diffusers_unet(folder)
    write_bytes(folder / "config.json", b"{not json")
    with pytest.raises(CheckpointError, match="is not readable JSON"):
        load_diffusers_unet(folder)


# ---- EDM SongUNet (deepinv NCSNpp) --------------------------------------------------------------------------

SMALL_NCSNPP = {"image_size": 8, "in_channels": 1, "model_channels": 32, "channel_mult": (1, 1), "num_blocks": 1,
                "attn_resolutions": (4,)}


def small_ncsnpp(model_type: str) -> NCSNpp:
    torch.manual_seed(7)
    model = NCSNpp(model_type=model_type, img_resolution=8, in_channels=1, out_channels=1, model_channels=32,
                   channel_mult=(1, 1), num_blocks=1, attn_resolutions=(4,), pretrained=None)
    return perturb_parameters(model, seed=8)


@pytest.mark.parametrize("model_type, suffix", [("ncsn", ".pt"), ("ddpm", ".safetensors")])
def test_ncsnpp_score_is_tweedie_of_the_edm_denoiser(model_type, suffix, tmp_path):
    model = small_ncsnpp(model_type)
    path = tmp_path / f"edm{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_file({name: value.contiguous() for name, value in model.state_dict().items()}, path)
    prior = load_ncsnpp(path, model_type=model_type, **SMALL_NCSNPP)
    times = torch.tensor([0.35, 0.7], dtype=torch.float64)
    sigma = VESDE(0.002, 80.0).sigma_t(times).float()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    model.pixel_std = 0.5  # EDM's sigma_data; deepinv's default is 0.75 and is not in the state dict
    with torch.no_grad():  # EDM's denoiser of x_0 + sigma n on [-1, 1]
        clean = model(x, sigma, input_in_minus_one_one=True)
        score = prior.score(x, times)
    expected = (clean - x) / sigma.view(-1, 1, 1, 1) ** 2
    assert torch.allclose(score, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    assert prior.event_shape == (1, 8, 8) and prior.parametrisation == "x0"
    settings = prior.settings()
    assert settings["format"] == "edm-songunet" and settings["checkpoint"] == str(path)
    assert settings["architecture"]["pixel_std"] == 0.5 and settings["schedule"]["type"] == "ve"
    json.dumps(settings)


def test_ncsnpp_rejects_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pt' does not exist"):
        load_ncsnpp(tmp_path / "absent.pt", **SMALL_NCSNPP)
    with pytest.raises(CheckpointError, match="is not a readable state dict"):
        load_ncsnpp(write_bytes(tmp_path / "corrupt.safetensors"), **SMALL_NCSNPP)
    torch.save(small_ncsnpp("ncsn").state_dict(), tmp_path / "edm.pt")
    with pytest.raises(CheckpointError, match=r"edm.pt' does not match the NCSNpp \(ncsn\).*wrong shapes"):
        load_ncsnpp(tmp_path / "edm.pt", **{**SMALL_NCSNPP, "model_channels": 64})
    with pytest.raises(CheckpointError, match=r"NCSNpp \(ddpm\).*4 unexpected keys \(first: enc.4x4_aux_residual"):
        load_ncsnpp(tmp_path / "edm.pt", model_type="ddpm", **SMALL_NCSNPP)


# ---- deepinv denoisers through Tweedie's formula ------------------------------------------------------------

@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 20.0), DDPMSchedule()], ids=["vp", "ve", "ddpm"])
def test_mmse_denoiser_prior_has_the_exact_score_of_its_point_masses(sde):
    generator = torch.Generator().manual_seed(10)
    images = torch.rand(6, 1, 2, 2, generator=generator, dtype=torch.float64)  # the dataset, in [0, 1]
    prior = denoiser_prior(MMSE(dataloader=images, device=torch.device("cpu"), dtype=torch.float64), sde, (1, 2, 2))
    # the empirical prior in [-1, 1] diffuses to a mixture of N(lambda_t x_i, sigma_t^2 I)
    exact = GaussianMixturePrior(torch.ones(6), (2 * images - 1).reshape(6, 4), torch.zeros(6, 4, dtype=torch.float64),
                                 sde, event_shape=(1, 2, 2))
    direction = torch.randn(3, 1, 2, 2, generator=generator, dtype=torch.float64)
    for time in (0.1, 0.4, 0.9):
        x = sde.lambda_t(time) * (2 * images[:3] - 1) + 0.5 * torch.randn(3, 1, 2, 2, generator=generator,
                                                                            dtype=torch.float64)
        assert torch.allclose(prior.score(x, time), exact.score(x, time), rtol=1e-7, atol=1e-9)
        x.requires_grad_(True)  # guidance backpropagates through the denoiser
        (gradient,) = torch.autograd.grad((prior.score(x, time) * direction).sum(), x)
        (exact_gradient,) = torch.autograd.grad((exact.score(x, time) * direction).sum(), x)
        assert torch.allclose(gradient, exact_gradient, rtol=1e-6, atol=1e-8)
    assert prior.settings()["format"] == "denoiser" and prior.settings()["denoiser"] == "MMSE"
    assert prior.network_dtype == torch.float64 and prior.data_range == (-1.0, 1.0)


def test_problem_files_load_every_checkpoint_format_and_sample(guided_diffusion, tmp_path, capsys):
    """Scenario 2 of DESIGN.md: a problem file points at the user's checkpoint and image; `invdiff solve` runs."""
    from invdiff.cli import main

    _, _, guided_path = guided_diffusion
    small_unet2d().save_pretrained(tmp_path / "diffusers")
    torch.save(small_ncsnpp("ncsn").state_dict(), tmp_path / "edm.pt")
    np.save(tmp_path / "image.npy", np.random.default_rng(0).uniform(size=(1, 8, 8)))
    ncsnpp = ", ".join(f"{key}: {list(value) if isinstance(value, tuple) else value}"
                       for key, value in SMALL_NCSNPP.items())
    priors = {"diffusers": "{name: diffusers, path: diffusers}",
              "ncsnpp": f"{{name: ncsnpp, path: edm.pt, {ncsnpp}}}",
              "denoiser": "{name: deepinv_denoiser, model: TVDenoiser}",
              # DnCNN downloads weights unless told not to: the prior must pass pretrained=None
              "untrained-denoiser": "{name: deepinv_denoiser, model: DnCNN, arguments: {in_channels: 1, "
                                    "out_channels: 1, depth: 2, nf: 4}}"}
    for label, prior in priors.items():
        problem = tmp_path / f"{label}.yaml"
        problem.write_text(f"name: {label}\nprior: {prior}\noperator: {{type: inpainting, mask: random, "
                           "fraction_observed: 0.5}\nnoise: {type: gaussian, sigma_y: 0.1}\n"
                           "truth: {source: file, path: image.npy}\n")
        assert main(["solve", str(problem), "--sampler", "dps", "-o", "num_steps=5", "--num-samples", "2",
                     "--out", str(tmp_path / f"run-{label}"), "--quiet"]) == 0, capsys.readouterr().err
        summary = json.loads((tmp_path / f"run-{label}" / "summary.json").read_text())
        assert summary["network_evaluations_per_sample"] == 5
    problem = tmp_path / "guided.yaml"
    problem.write_text(f"name: guided\nprior: {{name: guided_diffusion, path: {guided_path}, image_size: 32}}\n"
                       "operator: {type: inpainting, mask: random, fraction_observed: 0.5}\n"
                       "noise: {type: gaussian, sigma_y: 0.1}\ntruth: {source: file, path: image.npy}\n")
    assert main(["solve", str(problem), "--sampler", "dps", "--out", str(tmp_path / "guided")]) == 2
    assert "truth: the image has shape (1, 8, 8)" in capsys.readouterr().err
    problem.write_text(problem.read_text().replace(str(guided_path), "missing.pt"))
    assert main(["solve", str(problem), "--sampler", "dps", "--out", str(tmp_path / "guided")]) == 2
    error = capsys.readouterr().err
    assert "guided.yaml: prior: checkpoint" in error and "missing.pt' does not exist" in error


def test_an_image_size_the_network_cannot_take_is_one_line(guided_diffusion, tmp_path, capsys):
    """deepinv's DiffUNet pads to a multiple of 32 and fails below 16 pixels: the run's first network call (the
    memory probe) fails, reported as the network's refusal of that shape, exit 2, before sampling."""
    from cli_helpers import error_of

    np.save(tmp_path / "image.npy", np.random.default_rng(0).uniform(size=(1, 8, 8)))
    problem = tmp_path / "guided.yaml"
    problem.write_text(f"name: guided\nprior: {{name: guided_diffusion, path: {guided_diffusion[2]}, image_size: 8}}\n"
                       "operator: {type: inpainting, mask: random, fraction_observed: 0.5}\n"
                       "noise: {type: gaussian, sigma_y: 0.1}\ntruth: {source: file, path: image.npy}\n")
    error = error_of(["solve", str(problem), "--sampler", "dps", "--out", str(tmp_path / "run")], capsys)
    assert "the prior's network fails on images of shape (1, 8, 8) (RuntimeError: " in error
    assert not (tmp_path / "run").exists()
