"""Denoising diffusion models for plug-and-play image restoration (DiffPIR): Zhu, Zhang, Liang, Cao, Wen,
Timofte, Van Gool, CVPR 2023 workshops (arXiv:2305.08995).

deepinv's ``DiffPIR`` run on the posterior's prior and measurement through ``invdiff.deepinv_bridge``
(the prior as a denoiser on [0, 1] images, the physics with the problem's Gaussian noise). Each step
denoises, takes the proximal step of ``||y - A x||^2 / (2 sigma_y^2)`` with weight ``rho_t = lambda
sigma_y^2 / sigma_t^2`` and re-noises, mixing the estimated noise with fresh noise in proportion
``zeta``; one network call per step, no backpropagation. Its schedule is DDPM's linear one (1000
steps) whatever the prior's SDE: the prior is only asked for denoised estimates at noise levels. The
denoised estimate is clipped to [0, 1] images. Any linear operator (the proximal step is closed form for
masks and circular blurs, conjugate gradients otherwise). Not asymptotically exact.

The defaults are deepinv's (lambda 7, zeta 0.1, 100 steps): the paper tunes lambda and zeta per task
(lambda in 3-25). Randomness: deepinv's DiffPIR draws from torch's global generator;
``DeepinvSampler`` seeds it from the ``generator`` it is given and restores it afterwards.
"""

from __future__ import annotations

from pydantic import Field

import invdiff
from invdiff.deepinv_bridge import DeepinvSampler
from invdiff.posterior import SamplerOptions


class DiffPIROptions(SamplerOptions):
    num_steps: int = Field(100, ge=2, le=1000, description="denoising steps on DDPM's 1000-step schedule")
    lambda_: float = Field(7.0, gt=0, description="lambda of the paper: the data step's weight rho_t = lambda "
                           "sigma_y^2 / sigma_t^2 (the paper: 3-25, per task)")
    zeta: float = Field(0.1, ge=0, le=1, description="zeta of the paper: the share of fresh noise when re-noising")


class DiffPIR(DeepinvSampler):
    """DiffPIR (Zhu et al., 2023) via deepinv: denoise, proximal data step, re-noise; one forward pass per step."""

    name = "diffpir"
    Options = DiffPIROptions
    needs_network_gradient = False
    required_physics = "LinearPhysics"
    physics_requirement = "a linear operator (its data step is a proximal step of ||y - A x||^2)"

    def reconstruct(self, denoiser, physics, measurements, seed, device):
        import deepinv

        diffpir = deepinv.sampling.DiffPIR(denoiser, deepinv.optim.data_fidelity.L2(),
                                           max_iter=self.options.num_steps, zeta=self.options.zeta,
                                           lambda_=self.options.lambda_, device=device)
        return diffpir(measurements, physics)


@invdiff.hookimpl
def register_samplers(register):
    register(DiffPIR)
