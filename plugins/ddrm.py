"""Denoising diffusion restoration models (DDRM): Kawar, Elad, Ermon, Song, NeurIPS 2022 (arXiv:2201.11793).

deepinv's ``DDRM`` run on the posterior's prior and measurement through ``invdiff.deepinv_bridge``
(the prior as a denoiser on [0, 1] images, the physics with the problem's Gaussian noise). DDRM
works in the operator's singular basis: each coordinate observed above the noise level is pulled
towards ``y`` with the noise it carries, the others follow the prior's denoiser; one network call per
step, no backpropagation. It needs the SVD as deepinv provides it, a ``DecomposablePhysics``: masks
(``inpainting``) and circular blurs (``gaussian_blur``, ``motion_blur``, deepinv's ``BlurFFT``, whose
Fourier "SVD" is not orthonormal: DDRM's noise bookkeeping is then approximate, DEEPINV_NOTES.md).
Downsampling and dense matrices are refused. Not asymptotically exact: the paper's variational
approximation, at a finite number of noise levels.

Randomness: deepinv's DDRM draws from torch's global generator; ``DeepinvSampler`` seeds it from
the ``generator`` it is given and restores it afterwards.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

import invdiff
from invdiff.deepinv_bridge import DeepinvSampler
from invdiff.posterior import MAX_STEPS, SamplerOptions


class DDRMOptions(SamplerOptions):
    num_steps: int = Field(20, ge=2, le=MAX_STEPS,
                           description="noise levels, equally spaced from 1 to 0 in [0, 1] image units "
                           "(deepinv's schedule; the last, 0, needs no network call); 20 as in the paper")
    eta: float = Field(0.85, ge=0, le=1, description="eta of the paper: the share of fresh noise on coordinates "
                       "not observed (0.85, the paper's)")
    eta_b: float = Field(1.0, ge=0, le=1, description="eta_b of the paper: how far observed coordinates move to "
                         "y (1.0, the paper's)")


class DDRM(DeepinvSampler):
    """DDRM (Kawar et al., NeurIPS 2022) via deepinv: SVD-space steps, one forward pass per step; masks and circular blurs."""

    name = "ddrm"
    Options = DDRMOptions
    needs_network_gradient = False
    required_physics = "DecomposablePhysics"
    physics_requirement = ("an operator with a singular value decomposition in deepinv (DecomposablePhysics: "
                           "inpainting, gaussian_blur, motion_blur)")

    def reconstruct(self, denoiser, physics, measurements, seed, device):
        import deepinv

        ddrm = deepinv.sampling.DDRM(denoiser, sigmas=np.linspace(1, 0, self.options.num_steps),
                                     eta=self.options.eta, etab=self.options.eta_b)
        return ddrm(measurements, physics)


@invdiff.hookimpl
def register_samplers(register):
    register(DDRM)
