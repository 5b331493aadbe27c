"""The plugin system: pluggy hookspecs and the registry of samplers found through entry points.

A plugin is a module with a ``register_samplers`` hook implementation, announced in its
distribution's metadata under the entry-point group ``invdiff``::

    [project.entry-points.invdiff]
    my_sampler = "my_package.my_module"

The built-in samplers (in ``plugins/``, import package ``invdiff_plugins``) are found the same way;
the core never imports them. Setting ``INVDIFF_DISABLE_PLUGIN_AUTOLOAD=1`` skips the entry points;
``INVDIFF_PLUGINS=module.a,module.b`` then loads exactly those modules. A plugin that fails to
import or to register is recorded with its error and does not stop the others.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType

import pluggy

from invdiff.posterior import Sampler

__all__ = ["hookimpl", "hookspec", "SamplerRegistry", "SamplerInfo", "PluginFailure", "PluginError",
           "load_registry", "ENTRY_POINT_GROUP", "DISABLE_AUTOLOAD_VARIABLE", "PLUGINS_VARIABLE"]

ENTRY_POINT_GROUP = "invdiff"
DISABLE_AUTOLOAD_VARIABLE = "INVDIFF_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_VARIABLE = "INVDIFF_PLUGINS"

hookspec = pluggy.HookspecMarker("invdiff")
hookimpl = pluggy.HookimplMarker("invdiff")


class HookSpecifications:
    """The hooks a plugin may implement."""

    @hookspec
    def register_samplers(self, register) -> None:
        """Register samplers: call ``register(SamplerClass)`` for each; its ``name`` is the CLI name."""


class PluginError(ValueError):
    """A plugin or a sampler name is wrong (unknown name, duplicate name, not a Sampler)."""


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler and where it came from."""

    name: str
    sampler_class: type[Sampler]
    plugin: str
    package: str
    version: str

    @property
    def summary(self) -> str:
        doc = (self.sampler_class.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or could not register its samplers."""

    plugin: str
    package: str
    error: str


class SamplerRegistry:
    """Samplers by name, filled by the ``register_samplers`` hooks of the loaded plugins."""

    def __init__(self):
        self.plugin_manager = pluggy.PluginManager("invdiff")
        self.plugin_manager.add_hookspecs(HookSpecifications)
        self.samplers: dict[str, SamplerInfo] = {}
        self.failures: list[PluginFailure] = []

    def add_plugin(self, module: ModuleType, plugin: str, package: str = "", version: str = "") -> None:
        """Register one plugin module and collect the samplers its hook registers.

        A duplicate sampler name raises ``PluginError`` naming both plugins.
        """
        self.plugin_manager.register(module, name=plugin)
        registered: list[SamplerInfo] = []

        def register(sampler_class: type[Sampler]) -> None:
            if not (isinstance(sampler_class, type) and issubclass(sampler_class, Sampler)):
                raise PluginError(f"plugin '{plugin}' registered {sampler_class!r}, which is not an invdiff Sampler")
            if not sampler_class.name:
                raise PluginError(f"plugin '{plugin}' registered {sampler_class.__name__} without a name")
            name = sampler_class.name
            earlier = self.samplers.get(name) or next((info for info in registered if info.name == name), None)
            if earlier is not None:
                raise PluginError(f"sampler name '{name}' is registered twice: by plugin '{earlier.plugin}' "
                                  f"(package {earlier.package or '?'}) and by plugin '{plugin}' "
                                  f"(package {package or '?'})")
            registered.append(SamplerInfo(name, sampler_class, plugin, package, version))

        try:
            for implementation in self.plugin_manager.hook.register_samplers.get_hookimpls():
                if implementation.plugin_name == plugin:
                    implementation.function(register=register)
        except BaseException:
            self.plugin_manager.unregister(name=plugin)
            raise
        self.samplers.update({info.name: info for info in registered})

    def load_entry_points(self) -> None:
        """Load every plugin of the ``invdiff`` entry-point group, recording failures."""
        for entry_point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            package = entry_point.dist.name if entry_point.dist else ""
            version = entry_point.dist.version if entry_point.dist else ""
            self._load(entry_point.name, entry_point.load, package, version)

    def load_modules(self, module_names: list[str]) -> None:
        """Load plugins by module name (for ``INVDIFF_PLUGINS``)."""
        for module_name in module_names:
            self._load(module_name, lambda: importlib.import_module(module_name), "", "")

    def _load(self, plugin: str, load, package: str, version: str) -> None:
        try:
            self.add_plugin(load(), plugin, package, version)
        except PluginError:
            raise
        except Exception as error:  # a broken plugin must not take the others down
            self.failures.append(PluginFailure(plugin, package, f"{type(error).__name__}: {error}"))

    def get(self, name: str) -> SamplerInfo:
        """The sampler called ``name``; an unknown name raises ``PluginError`` listing the available ones."""
        if name not in self.samplers:
            available = ", ".join(sorted(self.samplers)) or "none"
            raise PluginError(f"unknown sampler '{name}'; available: {available}")
        return self.samplers[name]


def load_registry() -> SamplerRegistry:
    """The registry of this environment: entry points (unless disabled) plus ``INVDIFF_PLUGINS``."""
    registry = SamplerRegistry()
    if os.environ.get(DISABLE_AUTOLOAD_VARIABLE, "").strip() not in ("1", "true", "yes"):
        registry.load_entry_points()
    extra = [name.strip() for name in os.environ.get(PLUGINS_VARIABLE, "").split(",") if name.strip()]
    registry.load_modules(extra)
    return registry
