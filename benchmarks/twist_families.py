"""Which part of the oracle twist a particle sampler needs: twisted_smc on the exact patch-GMM cases with the
twist's value (what the weights see) and its gradient (what the proposal and the moves follow) taken from
different families.

twisted_smc runs the problem files' natural-gmm configuration (64 runs x 4 particles, three moves after each
resampling, 200 steps, 64 samples, seed 0 or ``--seed``); only the twist changes. The families:

* ``tweedie``: TDS's ``N(y; A x0_hat + b, sigma_y^2 I + r_t^2 A A^T)`` (``twisting: tweedie``, the default);
* ``exact``: ``p(y | x_t)`` itself (``invdiff.exact.ExactTwist``, ``twisting: exact``), an oracle;
* ``row_sums``: ``N(y; A x0_hat + b, sigma_y^2 I + diag(A C A^T 1))`` with ``C = Cov[x0 | x_t]`` computed exactly for
  the mixture: the diagonal approximation of Tweedie moment projected diffusions (TMPD, Boys et al., 2023), whose
  row sums a network prior gets from one Jacobian-vector product;
* ``row_sums_fixed`` (gradient only): the same with the variance held fixed when differentiating;
* ``moment``: ``N(y; A x0_hat + b, sigma_y^2 I + A C A^T)``, the full second-order Tweedie twist (the Gaussian with
  the mixture's exact mean and covariance of ``x0`` given ``x_t``), which a network prior would get from the
  Jacobian of its denoiser, ``C = (sigma_t^2 / lambda_t) d x0_hat / d x_t``; one Cholesky factor per particle.
* ``lowrank``: the same Gaussian with ``A C A^T`` (on the observed values) replaced by a low-rank part and an
  isotropic rest: the Nystrom approximation from ``--rank`` random probes on its range (Halko, Martinsson and
  Tropp 2011, section 5.4) and, on the rest, the mean of the remaining diagonal by Hutchinson's estimator (8 probes).
  Each probe is one Jacobian-vector product of the denoiser (``torch.func.jvp`` of ``prior.denoise``, what a network
  prior has; ``--through-denoiser`` computes them so, else they are read off the mixture's ``A C A^T``, the same
  numbers some 10 times faster). With ``--rank`` at least the number of observed values it is ``moment``.
* ``sampled`` (gradient only): ``grad log p(y | x_t) = (lambda_t / sigma_t^2) (E[x0 | x_t, y] - E[x0 | x_t])`` with
  ``E[x0 | x_t, y]`` estimated by self-normalised importance sampling: ``--draws`` draws from ``p(x0 | x_t)``
  weighted by ``p(y | x0)``. The draws are exact here (the mixture's), so this is the best a network prior can do
  with an inner sampler of ``p(x0 | x_t)`` (a short reverse diffusion from ``x_t``, at ``--draws`` times its cost).
* ``pilot`` (gradient only): the same identity with ``p(x0 | y)`` replaced by a diagonal Gaussian fitted to a pilot
  run's samples (per-value mean and variance), which makes ``E[x0 | x_t, y]`` closed form: no backpropagation
  through the network, one denoiser call. ``--pilot`` names the pilot: ``exact`` (4096 exact draws, an oracle of the
  moments only), ``gaussian_fit`` (4096 draws of the posterior under the Gaussian fit of the prior's data,
  ``ExactPosterior.from_gaussian_fit``: what twisted_smc's ``guidance: gaussian_fit`` follows, closed form for a
  network prior too), ``dps`` or ``twisted_smc`` (64 samples of that sampler with the problem file's options, seed
  ``--seed`` + 1); ``--pilot-option KEY=NUMBER`` sets the pilot sampler's options over the file's;
  ``--pilot-rounds R`` refits it ``R - 1`` times to the pilot-guided sampler's own samples (``refine_pilot``;
  ``--refine-value`` names that sampler's twist value, Tweedie's unless set).

``moment/pilot`` with ``--pilot dps --pilot-rounds 3 --refine-value moment`` is shipped as twisted_smc's options
``twisting: second_order``, ``guidance: pilot``, ``pilot_rounds: 3`` (``Prior.measured_covariance``), measured by
``image_dimension_table.py``; the families here stay as they were measured.

Each configuration is ``value/gradient``. A value family defines the targets; a gradient family only shapes the
proposal and the moves' Langevin step (the weights and the Metropolis test correct for it), so every configuration
is asymptotically exact, and what the rows compare is what 4 particles per run can correct. Reported: sliced
Wasserstein distance to exact draws over its floor, PSNR of the mean and coverage_90 next to the exact posterior's,
and which prior component explains each sample best (``path_bottleneck.py``). Run from the repository root (about 2
minutes per configuration and case on one thread):

    OMP_NUM_THREADS=1 python benchmarks/twist_families.py [--cases natural-gmm-box ...]
        [--configs exact/exact exact/tweedie ...] [--draws 32] [--rank 32] [--through-denoiser] [--pilot exact]
        [--pilot-option scale=4] [--pilot-rounds 1] [--refine-value tweedie] [--seed 0] [--alignment]
        [--out benchmarks/results/twist_families.md]

``--alignment`` runs no sampler: it compares each configuration's gradient with the exact one where the particles
should be (diffused exact posterior draws), in seconds, a first judge of a twist family.
"""

from __future__ import annotations

import argparse
import math
import shlex
from functools import partial
import sys
from pathlib import Path

import torch
from torch import Tensor

from image_dimension_table import EXACT_CASES, MOVES, measure_sampler
from invdiff.exact import ExactPosterior, ExactTwist, _gaussian_log_density
from invdiff.plugins import load_registry
from invdiff.posterior import sample_posterior
from invdiff.problems import build_sampler, load_problem
from invdiff.smc import MeasurementTwist
from invdiff_plugins.twisted_smc import PilotGuidance, TwistedSMC, TwistedSMCOptions, _tweedie_twist
from path_bottleneck import component_counts, landing

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"num_steps": 200, "num_runs": 64, "num_particles": 256, **MOVES}
VALUES = ("tweedie", "exact", "row_sums", "moment", "lowrank")
GRADIENTS = ("tweedie", "exact", "row_sums", "row_sums_fixed", "moment", "sampled", "pilot")
CONFIGS = ["tweedie/tweedie", "exact/exact", "exact/tweedie", "row_sums/row_sums", "row_sums/row_sums_fixed",
           "moment/moment"]


class TwistFamilies:
    """The non-Tweedie twists of one problem, as functions of the particles ``x`` (differentiable)."""

    def __init__(self, posterior, draws: int = 32, pilot: Tensor | None = None, rank: int = 32,
                 through_denoiser: bool = False):
        self.exact = ExactTwist(posterior)
        self.posterior = posterior
        self.prior = posterior.prior
        self.draws = draws
        self.rank, self.through_denoiser = rank, through_denoiser
        self.generator = torch.Generator().manual_seed(0)   # the inner draws of ``sampled``, the probes of ``lowrank``
        if pilot is None:   # ``pilot``'s samples: exact draws unless given
            pilot = ExactPosterior.from_posterior(posterior).sample(4096, generator=torch.Generator().manual_seed(1))
        self.set_pilot(pilot)

    def set_pilot(self, samples: Tensor) -> None:
        """The per-value means and variances of ``samples`` become the ``pilot`` gradient's ``N(m, diag(v))``."""
        self.pilot = PilotGuidance.from_samples(self.posterior, [samples])

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

    def _measured_covariance(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``A x0_hat`` ``(B, m)`` and ``A C A^T`` ``(B, m, m)``, ``C`` the mixture's ``Cov[x0 | x_t]``."""
        responsibilities, mean, deviations, variances = self._moments(x, t)
        within = self.exact.measured_covariances(variances)                               # A V_k A^T, (K, m, m)
        covariance = torch.einsum("bk,kmn->bmn", responsibilities, within)
        return mean, covariance + (responsibilities[..., None] * deviations).transpose(1, 2) @ deviations

    def moment(self, x: Tensor, t: Tensor) -> Tensor:
        """``log N(y; A x0_hat + b, sigma_y^2 I + A C A^T)``, ``C`` the mixture's ``Cov[x0 | x_t]``."""
        exact = self.exact
        mean, covariance = self._measured_covariance(x, t)
        covariance = covariance + exact.sigma_y**2 * torch.eye(mean.shape[-1], dtype=torch.float64)
        return _gaussian_log_density(exact.residual_offset, mean, torch.linalg.cholesky(covariance))

    def _measured_jacobian_products(self, x: Tensor, t: Tensor, observed: Tensor, directions: Tensor) -> Tensor:
        """``A_o C A_o^T`` applied to each of ``directions`` ``(n, m_o)``, ``A_o`` the observed rows of ``A`` and
        ``C = (sigma_t^2 / lambda_t) d x0_hat / d x_t``: one Jacobian-vector product of the denoiser per direction.
        Returns ``(B, m_o, n)``."""
        prior, batch = self.prior, x.shape[0]
        scale = prior.sde.sigma_t(t) ** 2 / prior.sde.lambda_t(t)
        columns = []
        for direction in directions @ observed:                                              # A_o^T v, (d,)
            tangent = direction.expand(batch, -1).reshape(x.shape).to(x.dtype)
            _, derivative = torch.func.jvp(lambda z: prior.denoise(z, t), (x.detach(),), (tangent,))
            columns.append(scale * derivative.reshape(batch, -1).to(torch.float64) @ observed.T)
        return torch.stack(columns, -1)

    def lowrank(self, x: Tensor, t: Tensor) -> Tensor:
        """``log N(y; A x0_hat + b, sigma_y^2 I + Q B Q^T + c (I - Q Q^T))`` on the observed values: ``Q`` the range of
        ``A C A^T Omega`` (``rank`` probes), ``B`` its Nystrom core, ``c`` the mean of what is left on the diagonal by
        Hutchinson's estimator (8 more probes), so ``rank + 8`` Jacobian-vector products of the denoiser (module
        docstring). With ``rank`` at least the number of observed values it is ``moment``. A value family only."""
        exact = self.exact
        rows = exact.matrix.abs().sum(1) > 0
        observed, offset = exact.matrix[rows], exact.residual_offset[rows]
        count = observed.shape[0]
        if self.rank >= count:   # Omega = I: the whole of A C A^T
            probes = torch.eye(count, dtype=torch.float64)
        else:
            probes = torch.randn(self.rank, count, generator=self.generator, dtype=torch.float64)   # Omega^T
        if self.through_denoiser:
            products = partial(self._measured_jacobian_products, x, t, observed)
            denoised = self.prior.denoise(x, t).reshape(x.shape[0], -1).to(torch.float64) @ observed.T
        else:   # the same products from the mixture's A C A^T: equal up to rounding, and much faster here
            denoised, covariance = self._measured_covariance(x, t)
            denoised, covariance = denoised[:, rows], covariance[:, rows][:, :, rows]
            def products(directions):
                return covariance @ directions.T
        sketch = products(probes)                                                              # Y, (B, m_o, r)
        core = probes @ sketch                                                                 # Omega^T Y
        core = 0.5 * (core + core.transpose(1, 2))
        basis, triangular = torch.linalg.qr(sketch)                                            # Y = Q R
        # Q^T (Y (Omega^T Y)^-1 Y^T) Q = R (Omega^T Y)^-1 R^T
        compressed = triangular @ torch.linalg.solve(core, triangular.transpose(1, 2))
        compressed = 0.5 * (compressed + compressed.transpose(1, 2))
        remainder = torch.zeros(x.shape[0], dtype=torch.float64)
        if len(probes) < count:
            trace_probes = torch.randn(8, count, generator=self.generator, dtype=torch.float64)
            applied = products(trace_probes)                                                   # M z, (B, m_o, 8)
            complement = trace_probes.T - basis @ (basis.transpose(1, 2) @ trace_probes.T)    # (I - QQ^T) z
            images = applied - basis @ (basis.transpose(1, 2) @ applied)                       # (I - QQ^T) M z
            remainder = ((complement * images).sum(1).mean(-1) / (count - len(probes))).clamp(min=0.0)
        noise_variance = exact.sigma_y**2
        residual = offset - denoised
        inside = (basis.transpose(1, 2) @ residual[..., None])[..., 0]
        outside = (residual**2).sum(-1) - (inside**2).sum(-1)
        block = compressed + noise_variance * torch.eye(len(probes), dtype=torch.float64)
        log_density = _gaussian_log_density(inside, torch.zeros_like(inside), torch.linalg.cholesky(block))
        isotropic = remainder + noise_variance
        rest = count - len(probes)
        log_density = log_density - 0.5 * (outside / isotropic + rest * torch.log(2 * math.pi * isotropic))
        unobserved = exact.residual_offset[~rows]   # the rows of A that are zero: N(y_i - b_i; 0, sigma_y^2) each
        return log_density - 0.5 * ((unobserved**2).sum() / noise_variance
                                    + len(unobserved) * math.log(2 * math.pi * noise_variance))

    def pilot_gradient(self, x: Tensor, t: Tensor) -> Tensor:
        """``(lambda_t / sigma_t^2) (E[x0 | x_t, y] - x0_hat)`` with ``p(x0 | y)`` replaced by the Gaussian of the
        pilot's per-value means and variances (twisted_smc's ``PilotGuidance``, ``guidance: pilot``)."""
        return self.pilot(x, self.prior.denoise(x, t), t)

    def sampled_gradient(self, x: Tensor, t: Tensor) -> Tensor:
        """``(lambda_t / sigma_t^2) (E[x0 | x_t, y] - x0_hat)``, the first term by self-normalised importance
        sampling from exact draws of ``p(x0 | x_t)`` (module docstring)."""
        prior, exact = self.prior, self.exact
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        log_responsibilities, means, variances = prior.clean_given_diffused(flat, t)
        components = torch.multinomial(log_responsibilities.exp(), self.draws, replacement=True,
                                       generator=self.generator)                                   # (B, M)
        noise = torch.randn((*components.shape, flat.shape[1]), generator=self.generator, dtype=torch.float64)
        noise = noise * variances[components].sqrt()
        if prior.eigenvectors is not None:
            for component in components.unique():
                chosen = components == component
                noise[chosen] = noise[chosen] @ prior.eigenvectors[component].T
        draws = torch.gather(means, 1, components[..., None].expand_as(noise)) + noise               # (B, M, d)
        residuals = exact.residual_offset - draws @ exact.matrix.T
        weights = torch.softmax(-0.5 * (residuals**2).sum(-1) / exact.sigma_y**2, dim=1)
        conditional_mean = (weights[..., None] * draws).sum(1)
        mean = (log_responsibilities.exp()[..., None] * means).sum(1)
        scale = prior.sde.lambda_t(t) / prior.sde.sigma_t(t) ** 2
        return (scale * (conditional_mean - mean)).reshape(x.shape)

    def _evaluate(self, family: str, x: Tensor, t: Tensor) -> Tensor:
        if family == "exact":
            return self.exact.log_likelihood(x, t)
        if family == "moment":
            return self.moment(x, t)
        if family == "lowrank":
            return self.lowrank(x, t)
        return self.row_sums(x, t, fixed_variance=family == "row_sums_fixed")

    def value(self, family: str, x: Tensor, t: Tensor) -> Tensor:
        return self._evaluate(family, x, t)

    def gradient(self, family: str, x: Tensor, t: Tensor) -> Tensor:
        if family == "sampled":
            return self.sampled_gradient(x, t)
        if family == "pilot":
            return self.pilot_gradient(x, t)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self._evaluate(family, x, t).sum(), x)
        return gradient


def mixed_twisted_smc(families: TwistFamilies, value: str, gradient: str) -> type[TwistedSMC]:
    """twisted_smc whose twist value and gradient come from the named families (``tweedie``: its own)."""

    class MixedTwistSMC(TwistedSMC):
        @staticmethod
        def _twist(posterior, log_twist_of, x, t, guidance=None):   # the families replace the pilot guidance
            denoised, log_twist, tweedie_gradient = TwistedSMC._twist(posterior, log_twist_of, x, t)
            if value != "tweedie":
                log_twist = families.value(value, x, t).detach()
            if gradient != "tweedie":
                tweedie_gradient = families.gradient(gradient, x, t).to(x.dtype)
            return denoised, log_twist, tweedie_gradient

    return MixedTwistSMC


ALIGNMENT_TIMES = (0.9, 0.6, 0.3, 0.1, 0.03)


def alignment(posterior, families: TwistFamilies, gradient: str, t: float, states: int = 8) -> tuple[float, float]:
    """Mean cosine and relative error of a gradient family against ``grad log p(y | x_t)`` at ``states`` points
    ``x_t = lambda_t x0 + sigma_t noise`` with ``x0`` exact posterior draws (seed 0): where the particles should be."""
    prior = posterior.prior
    time = torch.tensor(t, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    clean = ExactPosterior.from_posterior(posterior).sample(states, generator=generator)
    clean = clean.reshape(states, *prior.event_shape)
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    x = (prior.sde.lambda_t(time) * clean + prior.sde.sigma_t(time) * noise).to(posterior.dtype)
    exact = families.gradient("exact", x, time).flatten(1).to(torch.float64)
    if gradient == "tweedie":
        twist = partial(_tweedie_twist, MeasurementTwist(posterior, TwistedSMCOptions()))
        estimate = TwistedSMC._twist(posterior, twist, x, time)[2]
    else:
        estimate = families.gradient(gradient, x, time)
    estimate = estimate.flatten(1).to(torch.float64)
    cosine = torch.nn.functional.cosine_similarity(estimate, exact).mean()
    error = ((estimate - exact).norm(dim=1) / exact.norm(dim=1)).mean()
    return float(cosine), float(error)


def alignment_table(cases: list[str], gradients: list[str], draws: int, pilot: str,
                    pilot_options: dict[str, float]) -> list[str]:
    times = " | ".join(f"t = {t}" for t in ALIGNMENT_TIMES)
    lines = ["| case | gradient | " + times + " |", "|---|---|" + "---|" * len(ALIGNMENT_TIMES)]
    for case in cases:
        problem = load_problem(ROOT / "problems" / EXACT_CASES[case], case)
        families = TwistFamilies(problem.posterior, draws, pilot_samples(problem, pilot, pilot_options))
        for gradient in gradients:
            cells = [alignment(problem.posterior, families, gradient, t) for t in ALIGNMENT_TIMES]
            lines.append(f"| {case} | {gradient} | " + " | ".join(f"{c:.2f} / {e:.2f}" for c, e in cells) + " |")
            print(lines[-1], flush=True)
    return lines


def pilot_samples(problem, source: str, overrides: dict[str, float] | None = None, seed: int = 1) -> Tensor | None:
    """The samples whose per-value moments the ``pilot`` gradient uses: None (4096 exact draws) for ``exact``, 4096
    draws of the Gaussian fit's posterior for ``gaussian_fit``, else the named sampler's 64 samples with the problem
    file's options and ``overrides``, seed ``seed`` (``twisted_smc``: Tweedie's twist)."""
    if source == "exact":
        return None
    if source == "gaussian_fit":
        fit = ExactPosterior.from_gaussian_fit(problem.posterior)
        return fit.sample(4096, generator=torch.Generator().manual_seed(seed))
    registry = load_registry()
    options = {**problem.config.sampler_options.get(source, {}), **(overrides or {})}
    sampler = build_sampler(registry.get(source).sampler_class, options)
    return sample_posterior(sampler, problem.posterior, 64, generator=torch.Generator().manual_seed(seed)).samples


def refine_pilot(problem, families: TwistFamilies, rounds: int, value: str = "tweedie", seed: int = 0) -> list[str]:
    """Iterate the pilot (iterated auxiliary particle filters, Guarniero, Johansen and Lee 2017, in the small):
    ``rounds - 1`` times, run twisted_smc with the ``value`` family's twist and the current pilot's gradient (64
    samples, seeds ``seed`` + 2, 3, ...) and refit the pilot to its samples. Returns where each round's samples land
    (prior components)."""
    notes = []
    for round_index in range(1, rounds):
        sampler = build_sampler(mixed_twisted_smc(families, value, "pilot"), OPTIONS)
        generator = torch.Generator().manual_seed(seed + 1 + round_index)
        samples = sample_posterior(sampler, problem.posterior, 64, generator=generator).samples
        families.set_pilot(samples)
        notes.append(f"round {round_index + 1}'s pilot: " + landing(component_counts(problem.posterior.prior, samples)))
        print(notes[-1], flush=True)
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["natural-gmm-box"], choices=list(EXACT_CASES))
    parser.add_argument("--configs", nargs="+", default=CONFIGS,
                        help=f"value/gradient pairs; values {', '.join(VALUES)}, gradients {', '.join(GRADIENTS)}")
    parser.add_argument("--draws", type=int, default=32, help="draws of p(x0 | x_t) per particle for 'sampled'")
    parser.add_argument("--rank", type=int, default=32, help="random probes (Jacobian-vector products) of 'lowrank'")
    parser.add_argument("--through-denoiser", action="store_true",
                        help="'lowrank' by Jacobian-vector products of the denoiser, not from the mixture's moments")
    parser.add_argument("--pilot", default="exact", choices=["exact", "gaussian_fit", "dps", "twisted_smc"],
                        help="where the 'pilot' gradient's moments of p(x0 | y) come from (pilot_samples)")
    parser.add_argument("--pilot-option", nargs="+", default=[], metavar="KEY=NUMBER",
                        help="options of the pilot sampler over the problem file's (e.g. scale=4 for dps)")
    parser.add_argument("--pilot-rounds", type=int, default=1,
                        help="refit the pilot to VALUE/pilot's own samples this many times minus one (refine_pilot)")
    parser.add_argument("--refine-value", default="tweedie", choices=VALUES, metavar="VALUE",
                        help="the twist value of the refitting runs (default tweedie)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the measured run's seed; the pilot's is seed + 1, the refitting runs' seed + 2, ...")
    parser.add_argument("--alignment", action="store_true",
                        help="no sampling: each configuration's gradient against the exact one (cosine / relative "
                             "error) at diffused exact posterior draws, at a few times")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "twist_families.md")
    args = parser.parse_args()
    for config in args.configs:
        value, _, gradient = config.partition("/")
        if value not in VALUES or gradient not in GRADIENTS:
            parser.error(f"configuration '{config}': value one of {', '.join(VALUES)}, gradient one of "
                         f"{', '.join(GRADIENTS)}, as value/gradient")
    pilot_options = {key: float(value) for key, _, value in (option.partition("=") for option in args.pilot_option)}
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/twist_families.py", *map(shlex.quote, sys.argv[1:])])
    if args.alignment:
        gradients = list(dict.fromkeys(config.partition("/")[2] for config in args.configs))
        table = alignment_table(args.cases, gradients, args.draws, args.pilot, pilot_options)
        lines = ["### Twist gradients against the exact one", "", f"Made by `{command}` (module docstring). Mean "
                 "cosine / relative error of each gradient against grad log p(y | x_t), at 8 points x_t diffused "
                 "from exact posterior draws (seed 0).", "", *table]
        args.out.write_text("\n".join(lines) + "\n")
        return
    info = load_registry().get("twisted_smc")
    lines = ["### Twist families on the exact patch-GMM cases", "", f"Made by `{command}` (module docstring).",
             f"twisted_smc {OPTIONS}, 64 samples, seed {args.seed}; SW / floor, PSNR of the mean and coverage_90 (the "
             "exact posterior's in brackets); components: the prior component that explains each sample best "
             "(count).", "",
             "| case | value / gradient | SW / floor | PSNR mean | coverage_90 | distinct | log Z_hat (exact) | "
             "components | CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for case in args.cases:
        problem = load_problem(ROOT / "problems" / EXACT_CASES[case], case)
        pilot = pilot_samples(problem, args.pilot, pilot_options, args.seed + 1)
        families = TwistFamilies(problem.posterior, args.draws, pilot, args.rank, args.through_denoiser)
        if pilot is not None:
            notes.append(f"{case}: the pilot's samples: " + landing(component_counts(problem.posterior.prior, pilot)))
        rounds = refine_pilot(problem, families, args.pilot_rounds, args.refine_value, args.seed)
        notes += [f"{case}: {note}" for note in rounds]
        for config in args.configs:
            value, _, gradient = config.partition("/")
            sampler = build_sampler(mixed_twisted_smc(families, value, gradient), OPTIONS)
            row, result = measure_sampler(problem, case, config, sampler, info, OPTIONS, seed=args.seed)
            found = landing(component_counts(problem.posterior.prior, result.samples))
            lines.append(f"| {case} | {value} / {gradient} | {row['sliced_wasserstein'] / row['floor']:.2f} | "
                         f"{row['psnr_mean']:.2f} ({row['psnr_exact_mean']:.2f}) | {row['coverage_90']:.2f} "
                         f"({row['coverage_90_exact']:.2f}) | {row['distinct_samples']} | {row['log_evidence']:.1f} "
                         f"({row['log_evidence_exact']:.1f}) | {found} | {row['cpu_seconds']:.0f} |")
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines + ([""] + notes if notes else [])) + "\n")


if __name__ == "__main__":
    main()
