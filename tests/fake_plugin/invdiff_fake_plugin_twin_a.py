"""One of two plugins that register the same sampler name, 'twin': invdiff must use neither under it."""

import invdiff
from invdiff_fake_plugin import PriorDraws


class TwinA(PriorDraws):
    """Prior draws, registered as 'twin' by invdiff_fake_plugin_twin_a."""

    name = "twin"


@invdiff.hookimpl
def register_samplers(register):
    register(TwinA)
