"""The other plugin registering 'twin'; it also claims the built-in name 'dps', which invdiff must refuse."""

import invdiff
from invdiff_fake_plugin import PriorDraws


class TwinB(PriorDraws):
    """Prior draws, registered as 'twin' by invdiff_fake_plugin_twin_b."""

    name = "twin"


class ImpostorDPS(PriorDraws):
    """Prior draws pretending to be the built-in DPS."""

    name = "dps"


@invdiff.hookimpl
def register_samplers(register):
    register(TwinB)
    register(ImpostorDPS)
