"""The plugin registry: discovery through entry points, and that one bad plugin never breaks the others.

Most tests use an in-process SamplerRegistry with synthetic plugin modules (fast); the env variables and
a pip-installed third-party package are checked through the real command.
"""

import os
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch

import invdiff
from invdiff.plugins import (BUILT_IN_PACKAGE, DISABLE_AUTOLOAD_VARIABLE, ENTRY_POINT_GROUP, PLUGINS_VARIABLE,
                             PluginError, SamplerRegistry, load_registry)
from invdiff.posterior import Sampler

ROOT = Path(__file__).resolve().parent.parent
BUILT_IN_PLUGINS = {entry_point.name for entry_point in metadata.distribution(BUILT_IN_PACKAGE).entry_points
                    if entry_point.group == ENTRY_POINT_GROUP}


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """In-process tests see neither plugin variable, whatever the shell running pytest sets."""
    monkeypatch.delenv(DISABLE_AUTOLOAD_VARIABLE, raising=False)
    monkeypatch.delenv(PLUGINS_VARIABLE, raising=False)


def plugin_module(name, *sampler_classes):
    module = types.ModuleType(name)

    @invdiff.hookimpl
    def register_samplers(register):
        for sampler_class in sampler_classes:
            register(sampler_class)

    module.register_samplers = register_samplers
    return module


def sampler_class(sampler_name):
    return type(f"Sampler_{sampler_name}", (Sampler,), {"name": sampler_name, "sample": lambda self, *a, **k: None})


def installed(monkeypatch, module):
    """Make ``module`` importable by its name, as INVDIFF_PLUGINS would find it."""
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def built_ins():
    registry = SamplerRegistry()
    registry.load_entry_points(third_party=False)
    return registry


def test_built_ins_come_through_entry_points_with_their_package():
    registry = load_registry()
    info = registry.get("dps")
    assert info.package == "invdiff" and info.version == invdiff.__version__ and info.built_in
    assert info.sampler_class.__module__ == "invdiff_plugins.dps"
    assert "Chung et al." in info.summary


def test_built_ins_alone_are_exactly_the_invdiff_entry_points():
    registry = built_ins()
    assert not registry.failures, f"a built-in plugin failed to load: {registry.failures}"
    assert {info.plugin for info in registry.samplers.values()} == BUILT_IN_PLUGINS, \
        "the built-in samplers should come from exactly the entry points of the invdiff distribution"
    assert all(info.built_in for info in registry.samplers.values()), "only built-ins were asked for"


def test_two_plugins_claiming_one_name_lose_only_that_name():
    registry = SamplerRegistry()
    registry.add_plugin(plugin_module("first_module", sampler_class("twin"), sampler_class("solo_one")),
                        "first_plugin", "package-one")
    registry.add_plugin(plugin_module("second_module", sampler_class("twin"), sampler_class("solo_two")),
                        "second_plugin", "package-two")
    assert "twin" not in registry.samplers, "a clashing name must not go to either plugin"
    assert {"solo_one", "solo_two"} <= set(registry.samplers), "the plugins' other samplers should stay usable"
    [failure] = registry.failures
    for part in ("plugin 'first_plugin' (package package-one)", "plugin 'second_plugin' (package package-two)",
                 f"{DISABLE_AUTOLOAD_VARIABLE}=1", f"{PLUGINS_VARIABLE} to its module (first_module or second_module)",
                 "uninstall the other package"):
        assert part in failure.error, f"the clash report should say {part!r}: {failure.error}"
    with pytest.raises(PluginError) as asked:
        registry.get("twin")
    assert str(asked.value) == failure.error, "asking for the clashing name should explain the clash"


def test_a_third_claimant_of_a_clashing_name_is_named_too():
    registry = SamplerRegistry()
    for index in range(3):
        registry.add_plugin(plugin_module(f"module_{index}", sampler_class("twin")), f"plugin_{index}", "same")
    with pytest.raises(PluginError, match="plugin 'plugin_0'.* and by plugin 'plugin_1'.* and by plugin 'plugin_2'"):
        registry.get("twin")
    assert "uninstall" not in registry.failures[-1].error, "one package: uninstalling would not help"


@pytest.mark.parametrize("built_in_first", [True, False])
def test_a_third_party_plugin_cannot_take_a_built_in_name(built_in_first):
    registry = SamplerRegistry()
    built_in = (plugin_module("core", sampler_class("dps")), "dps", "invdiff")
    other = (plugin_module("other", sampler_class("dps"), sampler_class("mine")), "other_plugin", "other-package")
    for arguments in ((built_in, other) if built_in_first else (other, built_in)):
        registry.add_plugin(*arguments)
    assert registry.get("dps").package == "invdiff", "the built-in keeps its name whatever the load order"
    assert "mine" in registry.samplers, "the third-party plugin's other samplers stay"
    [failure] = registry.failures
    assert failure.plugin == "other_plugin" and not failure.built_in
    assert "built-in sampler of invdiff, which is kept" in failure.error


def test_a_plugin_that_registers_something_wrong_registers_nothing(monkeypatch):
    registry = SamplerRegistry()
    registry.load_modules([installed(monkeypatch, plugin_module("odd_module", sampler_class("fine"), dict))])
    assert "fine" not in registry.samplers, "a plugin that fails registers none of its samplers"
    [failure] = registry.failures
    assert failure.plugin == "odd_module" and "not an invdiff Sampler" in failure.error


@pytest.mark.parametrize("name", ["x/../../../escaped", "..", "two words", "-dash-first", "run.v2", 3])
def test_a_sampler_name_that_cannot_name_a_folder_is_refused(monkeypatch, name):
    """The name becomes part of a run's default folder (runs/PROBLEM-NAME-seedS): a '/' or '..' in it wrote runs
    outside runs/ and outside the working directory."""
    registry = SamplerRegistry()
    registry.load_modules([installed(monkeypatch, plugin_module("naming_module", sampler_class(name)))])
    [failure] = registry.failures
    assert "a sampler name is a letter, then letters, digits, '_' or '-'" in failure.error and not registry.samplers


def test_a_sampler_without_sample_or_with_foreign_options_is_refused(monkeypatch):
    """Caught when registered, not as a traceback from the run (an abstract class, or plain pydantic options with
    none of SamplerOptions' checks)."""
    from pydantic import BaseModel

    abstract = type("Abstract", (Sampler,), {"name": "abstract"})
    foreign = type("Foreign", (Sampler,), {"name": "foreign", "sample": lambda self, *a, **k: None,
                                           "Options": type("Plain", (BaseModel,), {})})
    registry = SamplerRegistry()
    registry.load_modules([installed(monkeypatch, plugin_module("abstract_module", abstract)),
                           installed(monkeypatch, plugin_module("foreign_module", foreign))])
    assert [failure.error for failure in registry.failures] == [
        "plugin 'abstract_module' registered Abstract, which does not implement sample",
        "plugin 'foreign_module' registered Foreign, whose Options is not a subclass of "
        "invdiff.posterior.SamplerOptions"]


def test_an_unknown_name_mentions_the_plugins_that_failed(monkeypatch):
    """A plugin whose entry point is named otherwise than its sampler: asking for the sampler says a plugin failed."""
    registry = built_ins()
    registry.load_modules([installed(monkeypatch, plugin_module("entry_name", sampler_class("x/y")))])
    with pytest.raises(PluginError, match=r"unknown sampler 'my_sampler'; available: .*dps.* \(plugins that failed "
                                          r"to load, whose samplers are missing: 'entry_name'; `invdiff samplers` "
                                          r"says why\)"):
        registry.get("my_sampler")


def test_a_hook_with_a_wrong_signature_is_one_failure_line(monkeypatch):
    module = types.ModuleType("wrong_signature")
    module.register_samplers = invdiff.hookimpl(lambda add: None)
    registry = SamplerRegistry()
    registry.load_modules([installed(monkeypatch, module)])
    [failure] = registry.failures
    assert "\n" not in failure.error and "'add'" in failure.error, f"one line naming the argument: {failure.error}"
    registry.load_modules(["wrong_signature"])  # a second try must not trip over a half-registered plugin
    assert len(registry.failures) == 2


def test_asking_for_a_plugin_that_failed_to_load_says_why(monkeypatch, tmp_path):
    (tmp_path / "broken_plugin_module.py").write_text("raise ImportError('needs the frobnicator package')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = SamplerRegistry()
    registry.load_modules(["broken_plugin_module"])
    with pytest.raises(PluginError, match=r"sampler 'broken_plugin_module' is not available: plugin "
                                          r"'broken_plugin_module' \(package -\) failed to load: .*ImportError: "
                                          r"needs the frobnicator package"):
        registry.get("broken_plugin_module")


def test_a_missing_module_in_the_plugins_variable_is_one_clear_failure():
    registry = SamplerRegistry()
    registry.load_modules(["no_such_plugin_module"])
    [failure] = registry.failures
    assert failure.error == (f"{PLUGINS_VARIABLE} names module 'no_such_plugin_module', which could not be "
                             f"imported: ModuleNotFoundError: No module named 'no_such_plugin_module'")


def test_a_module_without_the_hook_is_a_failure(monkeypatch):
    undecorated = types.ModuleType("undecorated")
    undecorated.register_samplers = lambda register: register(sampler_class("never"))
    registry = SamplerRegistry()
    registry.load_modules([installed(monkeypatch, types.ModuleType("hookless")), installed(monkeypatch, undecorated)])
    assert [failure.error for failure in registry.failures] == [
        "module hookless has no register_samplers hook (a function decorated with @invdiff.hookimpl)",
        "module undecorated defines register_samplers without the @invdiff.hookimpl decorator, "
        "so invdiff does not call it"]
    assert not registry.samplers


def test_naming_an_already_loaded_module_changes_nothing():
    registry = built_ins()
    before = dict(registry.samplers)
    registry.load_modules(["invdiff_plugins.dps"])
    assert registry.samplers == before and not registry.failures, "an already loaded plugin is neither an error " \
                                                                  "nor loaded twice"


def test_unknown_sampler_lists_the_available_ones():
    with pytest.raises(PluginError, match=r"unknown sampler 'nope'; available: .*dps.*exact"):
        load_registry().get("nope")


def run_invdiff(*arguments, **environment):
    environment = {**os.environ, **environment}
    for variable in (DISABLE_AUTOLOAD_VARIABLE, PLUGINS_VARIABLE):
        environment.setdefault(variable, "")
    return subprocess.run([sys.executable, "-m", "invdiff", *arguments], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=300)


def listed_names(stdout):
    return [line.split()[0] for line in stdout.splitlines()[1:] if line.split() and not line.startswith("plugin ")]


def test_autoload_off_keeps_the_built_ins_and_loads_the_named_modules():
    listing = run_invdiff("samplers", **{DISABLE_AUTOLOAD_VARIABLE: "1",
                                         PLUGINS_VARIABLE: "invdiff_plugins.dps, no_such_plugin_module"})
    assert listing.returncode == 0, listing.stderr
    assert set(listed_names(listing.stdout)) == {info.name for info in built_ins().samplers.values()}, \
        f"switching autoload off keeps exactly the built-ins: {listing.stdout}"
    failures = [line for line in listing.stdout.splitlines() if line.startswith("plugin ")]
    assert failures == ["plugin 'no_such_plugin_module' (package -): INVDIFF_PLUGINS names module "
                        "'no_such_plugin_module', which could not be imported: ModuleNotFoundError: No module "
                        "named 'no_such_plugin_module'"], f"one line for the missing module only: {listing.stdout}"


def test_a_third_party_package_installed_with_pip_is_discovered(tmp_path, monkeypatch):
    """pip-installs tests/fake_plugin into a separate folder put on the path: this environment stays as it is.

    The package has a working plugin, a broken one, and two that register the same name 'twin' (one of
    them also claims the built-in name 'dps').
    """
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--no-index", "--quiet", "--target", str(site), str(ROOT / "tests" / "fake_plugin")],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))

    listing = run_invdiff("samplers", PYTHONPATH=path)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:] if line.split()}
    assert rows["prior_draws"][1:3] == ["invdiff-fake-plugin", "0.3.1"]
    assert rows["dps"][1] == "invdiff" and "exact" in rows, "the built-ins stay, 'dps' included"
    assert "twin" not in rows, "a name two plugins claim is not listed as usable"
    for expected in ("plugin 'broken' (package invdiff-fake-plugin): ImportError: this plugin needs "
                     "a package that is not installed",
                     "sampler 'twin' is registered by plugin 'twin_a' (package invdiff-fake-plugin) and by plugin "
                     "'twin_b' (package invdiff-fake-plugin)",
                     "plugin 'twin_b' (package invdiff-fake-plugin): its sampler 'dps' (ImpostorDPS) "
                     "is not used"):
        assert expected in listing.stdout, f"`invdiff samplers` should report: {expected}"

    monkeypatch.syspath_prepend(str(site))  # the same environment, in process: what `solve --sampler` would say
    registry = load_registry()
    with pytest.raises(PluginError, match="plugin 'broken' .* failed to load: ImportError"):
        registry.get("broken")
    with pytest.raises(PluginError, match="INVDIFF_PLUGINS to its module "
                                          r"\(invdiff_fake_plugin_twin_a or invdiff_fake_plugin_twin_b\)"):
        registry.get("twin")

    out = tmp_path / "run"
    solve = run_invdiff("solve", "problems/inpaint.yaml", "--sampler", "twin", "--num-samples", "4", "--out", str(out),
                        "--quiet", PYTHONPATH=path,
                        **{DISABLE_AUTOLOAD_VARIABLE: "1", PLUGINS_VARIABLE: "invdiff_fake_plugin_twin_a"})
    assert solve.returncode == 0, f"following the clash message's advice should work: {solve.stderr}"
    assert (out / "summary.json").exists()


def test_the_readme_plugin_runs_as_printed(tmp_path, monkeypatch):
    """README's 'Writing a sampler plugin' files, verbatim: the pyproject is a valid project with the entry point, and
    the module registers a sampler that draws what DPS draws (it is DPS's step) on a small exact problem."""
    from invdiff.posterior import sample_posterior
    from invdiff.problems import load_problem
    from invdiff_plugins.dps import DPS

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing a sampler plugin"):]
    module_text = section[section.index("    # my_sampler.py\n"):section.index("    # pyproject.toml, beside it\n")]
    project_text = section[section.index("    # pyproject.toml, beside it\n"):section.index("\nAfter `pip install .`")]
    tomllib = pytest.importorskip("tomllib")   # Python 3.11 on

    def unindent(block):   # README's indented block without its first line, the file's name
        return "\n".join(line[4:] for line in block.splitlines()[1:]) + "\n"

    project = tomllib.loads(unindent(project_text))
    assert project["project"]["name"] and project["project"]["entry-points"]["invdiff"] == {"my_sampler": "my_sampler"}
    (tmp_path / "my_sampler.py").write_text(unindent(module_text))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = built_ins()
    registry.load_modules(["my_sampler"])
    assert not registry.failures
    problem = load_problem(ROOT / "problems" / "inpaint.yaml", "digits-gmm-box")
    draws = [sample_posterior(sampler, problem.posterior, 4, generator=torch.Generator().manual_seed(0)).samples
             for sampler in (registry.get("my_sampler").sampler_class(num_steps=20), DPS(num_steps=20))]
    assert torch.equal(draws[0], draws[1])
