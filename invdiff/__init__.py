"""invdiff: Bayesian inverse problems with diffusion priors.

The core: SDEs (``invdiff.sde``), priors (``invdiff.prior``), forward operators with their noise
(``invdiff.operators``), the posterior and the sampler interface (``invdiff.posterior``), exact
test-bed posteriors (``invdiff.exact``) and the plugin system (``invdiff.plugins``). Samplers are
plugins; see ``plugins/`` for the built-ins.
"""

from importlib import import_module, metadata

try:
    __version__ = metadata.version("invdiff")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

#: the names exported here and the modules that define them, imported on first use (PEP 562), so that
#: ``import invdiff`` (and ``invdiff --help``) does not load torch
_EXPORTS = {"hookimpl": "invdiff.plugins", "Posterior": "invdiff.posterior", "Sampler": "invdiff.posterior",
            "SampleResult": "invdiff.posterior", "SamplerOptions": "invdiff.posterior",
            "StepMonitor": "invdiff.posterior", "sample_posterior": "invdiff.posterior"}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'invdiff' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
