"""The architectures of public 256x256 RGB diffusion checkpoints, built with random weights and written in
their native formats, so that the path a user with such a checkpoint takes (``invdiff.loaders`` through a
problem file) is tested and timed here, where nothing can be downloaded. Only the weights differ.

* ``write_guided_diffusion_adm``: the guided-diffusion ADM UNet (Dhariwal and Nichol, NeurIPS 2021) of the
  FFHQ 256x256 checkpoint that DPS (Chung et al., ICLR 2023) ships as ``ffhq_10m.pt``: 128 base channels,
  multipliers (1, 1, 2, 2, 4, 4), one residual block per level, attention at 16x16, a learned variance
  (6 outputs); deepinv's small ``DiffUNet``, 93.6M parameters, a ``.pt`` state dict (375 MB).
* ``write_diffusers_ddpm``: the diffusers ``UNet2DModel`` of the 256x256 DDPM checkpoints (Ho et al.,
  NeurIPS 2020; ``google/ddpm-celebahq-256``, ``-church-256``, ``-bedroom-256``): channels (128, 128,
  256, 256, 512, 512), two blocks per level, attention at 16x16; 113.7M parameters, a model folder with
  ``config.json``, safetensors weights (455 MB) and the DDPM ``scheduler_config.json``.

``write_problem_files`` writes them with a problem file each: box inpainting of the held-out ``astronaut``
at 256x256x3. Used by ``tests/test_real_size.py`` and ``benchmarks/real_size.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["IMAGE_SIZE", "ARCHITECTURES", "write_guided_diffusion_adm", "write_diffusers_ddpm", "write_problem_files"]

#: the image side of both checkpoints
IMAGE_SIZE = 256

#: the UNet2DModel configuration of google/ddpm-celebahq-256 (and -church-256, -bedroom-256)
DDPM_256_CONFIG = {
    "sample_size": IMAGE_SIZE, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6, "downsample_padding": 0, "attention_head_dim": None,
}
#: their scheduler: 1000 linear steps from 1e-4 to 0.02, epsilon prediction
DDPM_256_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                      "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon",
                      "variance_type": "fixed_small", "clip_sample": True}


def write_guided_diffusion_adm(path: str | Path, seed: int = 0) -> Path:
    """Write the ADM UNet of DPS's FFHQ-256 checkpoint, with random weights, as a guided-diffusion state dict."""
    from deepinv.models import DiffUNet

    torch.manual_seed(seed)
    unet = DiffUNet(in_channels=3, out_channels=6, large_model=False, pretrained=None)
    # deepinv keeps the schedule in the module; guided-diffusion's files hold only the network's weights
    state = {name: value for name, value in unet.state_dict().items() if "alphas_cumprod" not in name}
    path = Path(path)
    torch.save(state, path)
    return path


def write_diffusers_ddpm(folder: str | Path, seed: int = 0) -> Path:
    """Write the UNet2DModel of the 256x256 DDPM checkpoints, with random weights, and its scheduler, in ``folder``."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    folder = Path(folder)
    UNet2DModel(**DDPM_256_CONFIG).save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps(DDPM_256_SCHEDULER, indent=2))
    return folder


#: the architectures, by the name ``write_problem_files`` takes
ARCHITECTURES = ("adm", "diffusers")


def write_problem_files(folder: str | Path, architectures: tuple[str, ...] = ARCHITECTURES,
                        batch_size: int = 16) -> dict[str, Path]:
    """In ``folder``: each architecture's checkpoint (random weights), the held-out ``astronaut`` at 256x256
    (an 8-bit PNG) and a problem file per architecture naming both (a 64x64 box missing, noise 0.05; the
    prior's ``batch_size`` images per network call). Returns the problem files by architecture."""
    import numpy as np
    from skimage import io
    from skimage.transform import resize

    from invdiff.data import natural_images

    folder = Path(folder)
    astronaut = resize(natural_images("test", colour=True)["astronaut"], (IMAGE_SIZE, IMAGE_SIZE), anti_aliasing=True)
    io.imsave(folder / "astronaut.png", (255 * astronaut).round().astype(np.uint8), check_contrast=False)
    priors = {"adm": lambda: f"{{name: guided_diffusion, path: {write_guided_diffusion_adm(folder / 'ffhq_adm.pt')}, "
                             f"image_size: {IMAGE_SIZE}, batch_size: {batch_size}}}",
              "diffusers": lambda: f"{{name: diffusers, path: {write_diffusers_ddpm(folder / 'ddpm-256')}, "
                                   f"batch_size: {batch_size}}}"}
    problems = {}
    for architecture in architectures:
        problems[architecture] = folder / f"{architecture}.yaml"
        problems[architecture].write_text(
            f"name: real-size-{architecture}\nprior: {priors[architecture]()}\n"
            "operator: {type: inpainting, mask: box, box: [96, 96, 64, 64]}\n"
            "noise: {type: gaussian, sigma_y: 0.05}\ntruth: {source: file, path: astronaut.png}\n")
    return problems
