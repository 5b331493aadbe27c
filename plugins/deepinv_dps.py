"""deepinv's implementation of diffusion posterior sampling (DPS): Chung, Kim, McCann, Klasky, Ye, ICLR 2023
(arXiv:2209.14687), as a peer of invdiff's own ``dps``.

deepinv's ``DPS`` run on the posterior's prior and measurement through ``invdiff.deepinv_bridge`` (the
prior as a denoiser on [0, 1] images, the physics with the problem's Gaussian noise): its own VP SDE
and DDPM solver on ``num_steps`` times, with the guidance ``weight * grad ||y - A D(x_t)||``
(backpropagation through the network at every step); the denoised estimate is clipped to [0, 1]
images. deepinv's guidance is scaled by its solver's step, so ``weight`` is not the paper's ``zeta'``:
on an invdiff prior it needed 10-300 to land on the measurement (DEEPINV_NOTES.md). Any operator
deepinv can differentiate. Not asymptotically exact.

Defaults: 1000 steps (the paper's) and deepinv's weight 1. Randomness: deepinv's DPS takes a
``torch.Generator``, seeded (as torch's global generator, restored afterwards) from the ``generator``
this sampler is given.
"""

from __future__ import annotations

import torch
from pydantic import Field

import invdiff
from invdiff.deepinv_bridge import DeepinvSampler
from invdiff.posterior import MAX_STEPS, SamplerOptions


class DeepinvDPSOptions(SamplerOptions):
    num_steps: int = Field(1000, ge=2, le=MAX_STEPS,
                           description="times of deepinv's DDPM solver, from 1 to 0 (1000, the paper's)")
    weight: float = Field(1.0, gt=0, description="deepinv's guidance weight (scaled by its solver's step; "
                          "10-300 worked on invdiff priors, DEEPINV_NOTES.md)")


class DeepinvDPS(DeepinvSampler):
    """deepinv's DPS (Chung et al., ICLR 2023): its VP SDE and solver with a residual-norm gradient through the network."""

    name = "deepinv_dps"
    Options = DeepinvDPSOptions
    needs_network_gradient = True

    @property
    def num_steps(self) -> int:
        """Denoiser calls: one per solver step, ``num_steps - 1`` between its ``num_steps`` times."""
        return self.options.num_steps - 1

    def reconstruct(self, denoiser, physics, measurements, seed, device):
        import deepinv

        generator = torch.Generator(device=device).manual_seed(seed)
        dps = deepinv.sampling.DPS(denoiser, num_steps=self.options.num_steps, weight=self.options.weight,
                                   device=device, rng=generator)
        return dps(measurements, physics)


@invdiff.hookimpl
def register_samplers(register):
    register(DeepinvDPS)
