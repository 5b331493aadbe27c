"""Which part of the oracle twist a particle sampler needs: twisted_smc on the exact patch-GMM cases with the
twist's value (what the weights see) and its gradient (what the proposal and the moves follow) taken from
different families.

twisted_smc runs the problem files' natural-gmm configuration (64 runs x 4 particles, three moves after each
resampling, 200 steps, 64 samples, seed 0); only the twist changes. The families:

* ``tweedie``: TDS's ``N(y; A x0_hat + b, sigma_y^2 I + r_t^2 A A^T)`` (``twisting: tweedie``, the default);
* ``exact``: ``p(y | x_t)`` itself (``invdiff.exact.ExactTwist``, ``twisting: exact``), an oracle;
* ``row_sums``: ``N(y; A x0_hat + b, sigma_y^2 I + diag(A C A^T 1))`` with ``C = Cov[x0 | x_t]`` computed exactly for
  the mixture: the diagonal approximation of Tweedie moment projected diffusions (TMPD, Boys et al., 2023), whose
  row sums a network prior gets from one Jacobian-vector product;
* ``row_sums_fixed`` (gradient only): the same with the variance held fixed when differentiating;
* ``moment``: ``N(y; A x0_hat + b, sigma_y^2 I + A C A^T)``, the full second-order Tweedie twist (the Gaussian with
  the mixture's exact mean and covariance of ``x0`` given ``x_t``), which a network prior would get from the
  Jacobian of its denoiser, ``C = (sigma_t^2 / lambda_t) d x0_hat / d x_t``; one Cholesky factor per particle.

Each configuration is ``value/gradient``. A value family defines the targets; a gradient family only shapes the
proposal and the moves' Langevin step (the weights and the Metropolis test correct for it), so every configuration
is asymptotically exact, and what the rows compare is what 4 particles per run can correct. Reported: sliced
Wasserstein distance to exact draws over its floor, PSNR of the mean and coverage_90 next to the exact posterior's,
and which prior component explains each sample best (``path_bottleneck.py``). Run from the repository root (about 2
minutes per configuration and case on one thread):

    OMP_NUM_THREADS=1 python benchmarks/twist_families.py [--cases natural-gmm-box ...]
        [--configs exact/exact exact/tweedie ...] [--out benchmarks/results/twist_families.md]
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch
from torch import Tensor

from image_dimension_table import EXACT_CASES, MOVES, measure_sampler
from invdiff.exact import ExactTwist
from invdiff.plugins import load_registry
from invdiff.problems import build_sampler, load_problem
from invdiff_plugins.twisted_smc import TwistedSMC
from path_bottleneck import component_counts

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"num_steps": 200, "num_runs": 64, "num_particles": 256, **MOVES}
VALUES = ("tweedie", "exact", "row_sums", "moment")
GRADIENTS = ("tweedie", "exact", "row_sums", "row_sums_fixed", "moment")
CONFIGS = ["tweedie/tweedie", "exact/exact", "exact/tweedie", "row_sums/row_sums", "row_sums/row_sums_fixed",
           "moment/moment"]


class TwistFamilies:
    """The non-Tweedie twists of one problem, as functions of the particles ``x`` (differentiable)."""

    def __init__(self, posterior):
        self.exact = ExactTwist(posterior)
        self.prior = posterior.prior

    def _moments(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``P(k | x_t)`` ``(B, K)``, ``A x0_hat`` ``(B, m)``, ``A m_k - A x0_hat`` ``(B, K, m)`` and ``V_k``'s
        eigenvalues ``(K, d)``."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        log_responsibilities, means, variances = self.prior.clean_given_diffused(flat, t)
        responsibilities = log_responsibilities.exp()
        predicted = means @ self.exact.matrix.T                                   # A m_k
        mean = (responsibilities[..., None] * predicted).sum(1)
        return responsibilities, mean, predicted - mean[:, None], variances

    def row_sums(self, x: Tensor, t: Tensor, fixed_variance: bool = False) -> Tensor:
        """``log N(y; A x0_hat + b, sigma_y^2 I + diag(A C A^T 1))``, ``C`` the mixture's ``Cov[x0 | x_t]``."""
        exact = self.exact
        responsibilities, mean, deviations, variances = self._moments(x, t)
        ones = torch.ones(mean.shape[-1], dtype=torch.float64)
        projected = variances * (exact.rotated.transpose(1, 2) @ ones)
        within = (exact.rotated @ projected[..., None])[..., 0]                   # A V_k A^T 1, (K, m)
        between = (responsibilities[..., None] * deviations * deviations.sum(-1, keepdim=True)).sum(1)
        variance = exact.sigma_y**2 + (responsibilities @ within + between).clamp(min=0.0)
        if fixed_variance:
            variance = variance.detach()
        residual = exact.residual_offset - mean
        return -0.5 * (residual**2 / variance + torch.log(2 * math.pi * variance)).sum(-1)

    def moment(self, x: Tensor, t: Tensor) -> Tensor:
        """``log N(y; A x0_hat + b, sigma_y^2 I + A C A^T)``, ``C`` the mixture's ``Cov[x0 | x_t]``."""
        exact = self.exact
        responsibilities, mean, deviations, variances = self._moments(x, t)
        within = (exact.rotated * variances[:, None, :]) @ exact.rotated.transpose(1, 2)     # A V_k A^T, (K, m, m)
        covariance = torch.einsum("bk,kmn->bmn", responsibilities, within)
        covariance = covariance + (responsibilities[..., None] * deviations).transpose(1, 2) @ deviations
        covariance = covariance + exact.sigma_y**2 * torch.eye(mean.shape[-1], dtype=torch.float64)
        cholesky = torch.linalg.cholesky(covariance)
        residual = exact.residual_offset - mean
        whitened = torch.linalg.solve_triangular(cholesky, residual[..., None], upper=False)[..., 0]
        log_determinant = 2 * torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * ((whitened**2).sum(-1) + log_determinant + mean.shape[-1] * math.log(2 * math.pi))

    def _evaluate(self, family: str, x: Tensor, t: Tensor) -> Tensor:
        if family == "exact":
            return self.exact.log_likelihood(x, t)
        if family == "moment":
            return self.moment(x, t)
        return self.row_sums(x, t, fixed_variance=family == "row_sums_fixed")

    def value(self, family: str, x: Tensor, t: Tensor) -> Tensor:
        return self._evaluate(family, x, t)

    def gradient(self, family: str, x: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self._evaluate(family, x, t).sum(), x)
        return gradient


def mixed_twisted_smc(families: TwistFamilies, value: str, gradient: str) -> type[TwistedSMC]:
    """twisted_smc whose twist value and gradient come from the named families (``tweedie``: its own)."""

    class MixedTwistSMC(TwistedSMC):
        @staticmethod
        def _twist(posterior, log_twist_of, x, t):
            denoised, log_twist, tweedie_gradient = TwistedSMC._twist(posterior, log_twist_of, x, t)
            if value != "tweedie":
                log_twist = families.value(value, x, t).detach()
            if gradient != "tweedie":
                tweedie_gradient = families.gradient(gradient, x, t).to(x.dtype)
            return denoised, log_twist, tweedie_gradient

    return MixedTwistSMC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["natural-gmm-box"], choices=list(EXACT_CASES))
    parser.add_argument("--configs", nargs="+", default=CONFIGS,
                        help=f"value/gradient pairs; values {', '.join(VALUES)}, gradients {', '.join(GRADIENTS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "twist_families.md")
    args = parser.parse_args()
    for config in args.configs:
        value, _, gradient = config.partition("/")
        if value not in VALUES or gradient not in GRADIENTS:
            parser.error(f"configuration '{config}': value one of {', '.join(VALUES)}, gradient one of "
                         f"{', '.join(GRADIENTS)}, as value/gradient")
    info = load_registry().get("twisted_smc")
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/twist_families.py", *map(shlex.quote, sys.argv[1:])])
    lines = ["### Twist families on the exact patch-GMM cases", "", f"Made by `{command}` (module docstring).",
             f"twisted_smc {OPTIONS}, 64 samples, seed 0; SW / floor, PSNR of the mean and coverage_90 (the exact "
             "posterior's in brackets); components: the prior component that explains each sample best (count).", "",
             "| case | value / gradient | SW / floor | PSNR mean | coverage_90 | distinct | log Z_hat (exact) | "
             "components | CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for case in args.cases:
        problem = load_problem(ROOT / "problems" / EXACT_CASES[case], case)
        families = TwistFamilies(problem.posterior)
        for config in args.configs:
            value, _, gradient = config.partition("/")
            sampler = build_sampler(mixed_twisted_smc(families, value, gradient), OPTIONS)
            row, result = measure_sampler(problem, case, config, sampler, info, OPTIONS, seed=0)
            counts = component_counts(problem.posterior.prior, result.samples)
            found = ", ".join(f"{k} ({n})" for k, n in enumerate(counts) if n)
            lines.append(f"| {case} | {value} / {gradient} | {row['sliced_wasserstein'] / row['floor']:.2f} | "
                         f"{row['psnr_mean']:.2f} ({row['psnr_exact_mean']:.2f}) | {row['coverage_90']:.2f} "
                         f"({row['coverage_90_exact']:.2f}) | {row['distinct_samples']} | {row['log_evidence']:.1f} "
                         f"({row['log_evidence_exact']:.1f}) | {found} | {row['cpu_seconds']:.0f} |")
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
