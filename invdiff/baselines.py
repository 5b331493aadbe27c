"""Classical reconstructions to compare posterior samplers with, computed by deepinv on ``[0, 1]`` images.

* ``pseudo_inverse``: ``A^+ y`` (deepinv's ``A_dagger``: exact for masks and circular blurs,
  conjugate gradients for downsampling), clipped to ``[0, 1]``.
* ``tv_reconstruction``: ``argmin_x ||A x - y||^2 / 2 + lambda TV(x)`` by proximal gradient descent
  (deepinv's ``PGD`` with its ``TVPrior``; Rudin, Osher & Fatemi 1992), for a given ``lambda``.
* ``best_tv_reconstruction``: the TV reconstruction whose ``lambda`` (over a grid) is closest to
  the truth in PSNR: an oracle choice that favours the baseline, so margins over it are
  conservative.
"""

from __future__ import annotations

import torch
from torch import Tensor

from invdiff.metrics import psnr
from invdiff.operators import ForwardOperator

__all__ = ["pseudo_inverse", "tv_reconstruction", "best_tv_reconstruction", "TV_REGULARISATION_GRID"]

#: the values of lambda tried by ``best_tv_reconstruction`` (images in [0, 1])
TV_REGULARISATION_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def pseudo_inverse(operator: ForwardOperator, measurement: Tensor) -> Tensor:
    """``A^+ y`` for the operator's physics on ``[0, 1]`` images, clipped to ``[0, 1]``."""
    with torch.no_grad():
        return operator.physics.A_dagger(measurement.to(torch.float32)).clamp(0, 1)


def tv_reconstruction(operator: ForwardOperator, measurement: Tensor, regularisation: float,
                      iterations: int = 300) -> Tensor:
    """``argmin_x ||A x - y||^2 / 2 + regularisation * TV(x)`` by deepinv's proximal gradient descent."""
    from deepinv.optim import PGD, TVPrior
    from deepinv.optim.data_fidelity import L2

    physics = operator.physics
    probe = torch.zeros_like(physics.A_adjoint(measurement.to(torch.float32)))
    with torch.random.fork_rng(devices=[]):  # deepinv's power iteration draws its start from the global generator
        torch.manual_seed(0)
        lipschitz = physics.compute_sqnorm(probe, max_iter=50, tol=1e-4, verbose=False)  # ||A^T A||
    solver = PGD(data_fidelity=L2(), prior=TVPrior(n_it_max=50), stepsize=1.0 / float(lipschitz),
                 lambda_reg=regularisation, max_iter=iterations, early_stop=False)
    with torch.no_grad():
        return solver(measurement.to(torch.float32), physics).clamp(0, 1)


def best_tv_reconstruction(operator: ForwardOperator, measurement: Tensor, truth: Tensor,
                           grid: tuple[float, ...] = TV_REGULARISATION_GRID,
                           iterations: int = 300) -> tuple[Tensor, float]:
    """The TV reconstruction with the best PSNR to ``truth`` over ``grid``, and its ``lambda``."""
    candidates = [(tv_reconstruction(operator, measurement, value, iterations), value) for value in grid]
    return max(candidates, key=lambda candidate: psnr(candidate[0], truth))
