"""The plugin system: pluggy hookspecs and the registry of samplers found through entry points.

A plugin is a module with a ``register_samplers`` hook implementation, announced in its
distribution's metadata under the entry-point group ``invdiff``::

    [project.entry-points.invdiff]
    my_sampler = "my_package.my_module"

The built-in samplers (in ``plugins/``, import package ``invdiff_plugins``) are found the same way:
they are the entry points of the ``invdiff`` distribution itself; the core never imports them.

What the registry promises, so that one bad third-party plugin never takes down the rest:

* The built-ins always load first, whatever the environment variables say.
  ``INVDIFF_DISABLE_PLUGIN_AUTOLOAD=1`` skips only third-party entry points, and
  ``INVDIFF_PLUGINS=module.a,module.b`` then loads exactly those modules on top of the built-ins.
* A plugin that fails to import, has no hook, or registers something wrong is recorded in
  ``failures`` with a one-line reason; its samplers are not registered (all or nothing) and the
  others are unaffected. Asking for it by name (``get``) gives that reason.
* Two third-party plugins registering the same sampler name: neither is used under that name
  (choosing one silently would depend on install order), the clash is recorded in ``failures`` and
  ``get`` explains how to choose. Their other samplers stay.
* A third-party plugin registering a built-in's name is refused and the built-in stays: scripts,
  problem files and published results that say ``--sampler dps`` must keep meaning the sampler that
  invdiff documents and tests, and installing some package must neither replace nor disable it.
  Only the plugin's author can fix the clash, by renaming, and the failure says so.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Callable

import pluggy

from invdiff.posterior import Sampler, SamplerOptions

__all__ = ["hookimpl", "hookspec", "SamplerRegistry", "SamplerInfo", "PluginFailure", "PluginError",
           "load_registry", "ENTRY_POINT_GROUP", "BUILT_IN_PACKAGE", "DISABLE_AUTOLOAD_VARIABLE",
           "PLUGINS_VARIABLE"]

ENTRY_POINT_GROUP = "invdiff"
#: the distribution whose entry points are the built-in samplers
BUILT_IN_PACKAGE = "invdiff"
DISABLE_AUTOLOAD_VARIABLE = "INVDIFF_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_VARIABLE = "INVDIFF_PLUGINS"

#: what a sampler's name may be: it is typed on command lines and names output folders (no '/', no '..')
SAMPLER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

hookspec = pluggy.HookspecMarker("invdiff")
hookimpl = pluggy.HookimplMarker("invdiff")


class HookSpecifications:
    """The hooks a plugin may implement."""

    @hookspec
    def register_samplers(self, register) -> None:
        """Register samplers: call ``register(SamplerClass)`` for each; its ``name`` is the CLI name."""


class PluginError(ValueError):
    """A plugin or a sampler name is wrong (unknown name, clashing name, not a Sampler, failed plugin)."""


def is_built_in(package: str) -> bool:
    """Whether ``package`` (a distribution name, in any spelling pip accepts) is invdiff itself."""
    return re.sub(r"[-_.]+", "-", package).lower() == BUILT_IN_PACKAGE


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler and where it came from (``module``: the plugin module that registered it)."""

    name: str
    sampler_class: type[Sampler]
    plugin: str
    package: str
    version: str
    module: str = ""

    @property
    def summary(self) -> str:
        doc = (self.sampler_class.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @property
    def built_in(self) -> bool:
        return is_built_in(self.package)

    @property
    def origin(self) -> str:
        return f"plugin '{self.plugin}' (package {self.package or '-'})"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, or a sampler of it that was not registered; ``error`` is one line."""

    plugin: str
    package: str
    error: str

    @property
    def built_in(self) -> bool:
        return is_built_in(self.package)


def one_line(error: BaseException) -> str:
    """The error as one line; our own ``PluginError`` speaks for itself, others are prefixed by their type."""
    text = " ".join(str(error).split())
    return text if isinstance(error, PluginError) else f"{type(error).__name__}: {text}"


class SamplerRegistry:
    """Samplers by name, filled by the ``register_samplers`` hooks of the loaded plugins.

    ``samplers`` holds the usable ones; ``failures`` the plugins (and sampler names) that are not usable,
    each with its reason; ``conflicts`` the sampler names claimed by several third-party plugins.
    """

    def __init__(self):
        self.plugin_manager = pluggy.PluginManager("invdiff")
        self.plugin_manager.add_hookspecs(HookSpecifications)
        self.samplers: dict[str, SamplerInfo] = {}
        self.failures: list[PluginFailure] = []
        self.conflicts: dict[str, list[SamplerInfo]] = {}

    def add_plugin(self, module: ModuleType, plugin: str, package: str = "", version: str = "") -> None:
        """Register one plugin module and claim the sampler names its hook registers.

        A module that is already registered is left as it is. A plugin that is wrong (no hook, registers
        something that is not a named Sampler, or a name twice, or its hook raises) raises ``PluginError``
        or the hook's error, and none of its samplers are registered. Name clashes with other plugins are
        not errors of this plugin: they are settled by ``_claim`` and recorded in ``failures``.
        """
        if self.plugin_manager.is_registered(module):
            return
        module_name = getattr(module, "__name__", plugin)
        registered = self._run_hook(module, module_name, plugin, package, version)
        for info in registered:
            self._claim(info)

    def _run_hook(self, module, module_name: str, plugin: str, package: str, version: str) -> list[SamplerInfo]:
        """The samplers the module's ``register_samplers`` hook registers, checked; unregisters it on any error."""
        pluggy_name = f"{plugin} (module {module_name})"
        if self.plugin_manager.has_plugin(pluggy_name):
            raise PluginError(f"plugin '{plugin}': another module named {module_name} is already loaded under "
                              f"that plugin name")
        registered: list[SamplerInfo] = []

        def register(sampler_class: type[Sampler]) -> None:
            if not (isinstance(sampler_class, type) and issubclass(sampler_class, Sampler)):
                raise PluginError(f"plugin '{plugin}' registered {sampler_class!r}, which is not an invdiff Sampler")
            if not sampler_class.name:
                raise PluginError(f"plugin '{plugin}' registered {sampler_class.__name__} without a name")
            if not (isinstance(sampler_class.name, str) and SAMPLER_NAME.fullmatch(sampler_class.name)):
                raise PluginError(f"plugin '{plugin}' registered {sampler_class.__name__} as {sampler_class.name!r}; "
                                  f"a sampler name is a letter, then letters, digits, '_' or '-' (it names the "
                                  f"output folders of runs)")
            if inspect.isabstract(sampler_class):
                missing = ", ".join(sorted(sampler_class.__abstractmethods__))
                raise PluginError(f"plugin '{plugin}' registered {sampler_class.__name__}, which does not implement "
                                  f"{missing}")
            if not (isinstance(sampler_class.Options, type) and issubclass(sampler_class.Options, SamplerOptions)):
                raise PluginError(f"plugin '{plugin}' registered {sampler_class.__name__}, whose Options is not a "
                                  f"subclass of invdiff.posterior.SamplerOptions")
            if any(info.name == sampler_class.name for info in registered):
                raise PluginError(f"plugin '{plugin}' registered the sampler name '{sampler_class.name}' twice")
            registered.append(SamplerInfo(sampler_class.name, sampler_class, plugin, package, version, module_name))

        try:
            self.plugin_manager.register(module, name=pluggy_name)  # checks the hook's signature
            implementations = [implementation for implementation in
                               self.plugin_manager.hook.register_samplers.get_hookimpls()
                               if implementation.plugin is module]
            if not implementations:
                raise PluginError(missing_hook_message(module, module_name))
            for implementation in implementations:
                implementation.function(register=register)
        except BaseException:
            if self.plugin_manager.has_plugin(pluggy_name):
                self.plugin_manager.unregister(name=pluggy_name)
            raise
        return registered

    def _claim(self, info: SamplerInfo) -> None:
        """Give ``info`` its name unless another plugin has it: see the module docstring for who wins."""
        name = info.name
        holder = self.samplers.get(name)
        if name in self.conflicts:
            self.conflicts[name].append(info)
            self._record_conflict(info)
        elif holder is None:
            self.samplers[name] = info
        elif holder.built_in != info.built_in:
            kept, refused = (holder, info) if holder.built_in else (info, holder)
            self.samplers[name] = kept
            self.failures.append(PluginFailure(
                refused.plugin, refused.package,
                f"its sampler '{name}' ({refused.sampler_class.__name__}) is not used: '{name}' is the name of a "
                f"built-in sampler of invdiff, which is kept; the plugin must register it under another name"))
        else:
            del self.samplers[name]
            self.conflicts[name] = [holder, info]
            self._record_conflict(info)

    def _record_conflict(self, newcomer: SamplerInfo) -> None:
        self.failures.append(PluginFailure(newcomer.plugin, newcomer.package, self.conflict_message(newcomer.name)))

    def conflict_message(self, name: str) -> str:
        """One line: which plugins claim ``name``, that none is used, and how the user chooses one."""
        claimants = self.conflicts[name]
        modules = " or ".join(dict.fromkeys(info.module for info in claimants))
        uninstall = ", or uninstall the other package" if len({info.package for info in claimants}) > 1 else ""
        return (f"sampler '{name}' is registered by {' and by '.join(info.origin for info in claimants)}, so "
                f"none of them is used under that name; to keep one, set {DISABLE_AUTOLOAD_VARIABLE}=1 and "
                f"{PLUGINS_VARIABLE} to its module ({modules}){uninstall}")

    def load_entry_points(self, third_party: bool = True) -> None:
        """Load the plugins of the ``invdiff`` entry-point group, built-ins first, recording failures.

        ``third_party=False`` loads only the built-ins (the entry points of the invdiff distribution).
        """
        entry_points = [(entry_point, entry_point.dist.name if entry_point.dist else "")
                        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP)]
        for entry_point, package in sorted(entry_points, key=lambda pair: (not is_built_in(pair[1]), pair[0].name)):
            if third_party or is_built_in(package):
                version = entry_point.dist.version if entry_point.dist else ""
                self._load(entry_point.name, entry_point.load, package, version)

    def load_modules(self, module_names: list[str]) -> None:
        """Load plugins by module name (for ``INVDIFF_PLUGINS``); the package is looked up from the module."""
        for module_name in module_names:
            package = distribution_of(module_name)
            version = metadata.version(package) if package else ""
            self._load(module_name, lambda name=module_name: import_plugin_module(name), package, version)

    def _load(self, plugin: str, load: Callable[[], ModuleType], package: str, version: str) -> None:
        try:
            self.add_plugin(load(), plugin, package, version)
        except (Exception, SystemExit) as error:  # a broken plugin must not take the others down
            self.failures.append(PluginFailure(plugin, package, one_line(error)))

    def get(self, name: str) -> SamplerInfo:
        """The sampler called ``name``; otherwise ``PluginError`` saying why it is not there.

        A clashing name explains the clash, the name of a plugin that failed gives its error, and any
        other name lists the available ones.
        """
        if name in self.samplers:
            return self.samplers[name]
        if name in self.conflicts:
            raise PluginError(self.conflict_message(name))
        failure = next((failure for failure in self.failures if failure.plugin == name), None)
        if failure is not None:
            raise PluginError(f"sampler '{name}' is not available: plugin '{failure.plugin}' "
                              f"(package {failure.package or '-'}) failed to load: {failure.error}")
        available = ", ".join(sorted(self.samplers)) or "none"
        failed = ", ".join(dict.fromkeys(f"'{failure.plugin}'" for failure in self.failures))
        raise PluginError(f"unknown sampler '{name}'; available: {available}"
                          + (f" (plugins that failed to load, whose samplers are missing: {failed}; `invdiff "
                             f"samplers` says why)" if failed else ""))


def missing_hook_message(module, module_name: str) -> str:
    """Why invdiff found no hook in ``module``: none at all, or a ``register_samplers`` without the marker."""
    if callable(getattr(module, "register_samplers", None)):
        return (f"module {module_name} defines register_samplers without the @invdiff.hookimpl decorator, "
                f"so invdiff does not call it")
    return f"module {module_name} has no register_samplers hook (a function decorated with @invdiff.hookimpl)"


def import_plugin_module(module_name: str) -> ModuleType:
    """Import a module named in ``INVDIFF_PLUGINS``; failing to import is one ``PluginError`` line."""
    try:
        return importlib.import_module(module_name)
    except (Exception, SystemExit) as error:
        raise PluginError(f"{PLUGINS_VARIABLE} names module '{module_name}', which could not be imported: "
                          f"{one_line(error)}") from error


def distribution_of(module_name: str) -> str:
    """The installed distribution providing ``module_name``'s top-level package, or "" if unknown or ambiguous."""
    top_level = module_name.split(".")[0]
    distributions = list(dict.fromkeys(metadata.packages_distributions().get(top_level, [])))
    return distributions[0] if len(distributions) == 1 else ""


def load_registry() -> SamplerRegistry:
    """The registry of this environment: the built-ins, third-party entry points (unless
    ``INVDIFF_DISABLE_PLUGIN_AUTOLOAD`` is set), then the modules named in ``INVDIFF_PLUGINS``."""
    registry = SamplerRegistry()
    autoload = os.environ.get(DISABLE_AUTOLOAD_VARIABLE, "").strip().lower() not in ("1", "true", "yes")
    registry.load_entry_points(third_party=autoload)
    extra = [name.strip() for name in os.environ.get(PLUGINS_VARIABLE, "").split(",") if name.strip()]
    registry.load_modules(extra)
    return registry
