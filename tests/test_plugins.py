import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import invdiff
from invdiff.plugins import DISABLE_AUTOLOAD_VARIABLE, PLUGINS_VARIABLE, PluginError, SamplerRegistry, load_registry
from invdiff.posterior import Sampler

ROOT = Path(__file__).resolve().parent.parent


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


def test_built_ins_come_through_entry_points_with_their_package():
    registry = load_registry()
    info = registry.get("dps")
    assert info.package == "invdiff" and info.version == invdiff.__version__
    assert info.sampler_class.__module__ == "invdiff_plugins.dps"
    assert "Chung et al." in info.summary


def test_duplicate_names_fail_naming_both_plugins():
    registry = SamplerRegistry()
    registry.add_plugin(plugin_module("first", sampler_class("twin")), "first_plugin", "package-one")
    with pytest.raises(PluginError, match="'twin' is registered twice: by plugin 'first_plugin' .*package-one.* "
                                          "and by plugin 'second_plugin'"):
        registry.add_plugin(plugin_module("second", sampler_class("twin")), "second_plugin", "package-two")
    assert registry.get("twin").plugin == "first_plugin"


def test_registering_something_that_is_not_a_sampler_fails():
    registry = SamplerRegistry()
    with pytest.raises(PluginError, match="not an invdiff Sampler"):
        registry.add_plugin(plugin_module("odd", dict), "odd_plugin")


def test_unknown_sampler_lists_the_available_ones():
    with pytest.raises(PluginError, match=r"unknown sampler 'nope'; available: .*dps.*exact"):
        load_registry().get("nope")


def run_invdiff(*arguments, **environment):
    return subprocess.run([sys.executable, "-m", "invdiff", *arguments], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **environment}, timeout=300)


def test_autoload_can_be_switched_off_and_plugins_named_explicitly():
    bare = run_invdiff("samplers", **{DISABLE_AUTOLOAD_VARIABLE: "1"})
    assert bare.returncode == 0 and "no samplers registered" in bare.stdout
    named = run_invdiff("samplers", **{DISABLE_AUTOLOAD_VARIABLE: "1", PLUGINS_VARIABLE: "invdiff_plugins.dps"})
    names = [line.split()[0] for line in named.stdout.splitlines()[1:]]
    assert names == ["dps"]


def test_a_third_party_plugin_installed_with_pip_is_discovered(tmp_path):
    """pip-installs tests/fake_plugin into a separate folder put on the path: this environment stays as it is."""
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
    assert "dps" in rows and "exact" in rows
    assert ("failed to load plugin 'broken' (package invdiff-fake-plugin): ImportError: this plugin needs a "
            "package that is not installed") in listing.stdout

    out = tmp_path / "run"
    solve = run_invdiff("solve", "problems/inpaint.yaml", "--sampler", "prior_draws", "--num-samples", "4",
                        "--out", str(out), "--quiet", PYTHONPATH=path)
    assert solve.returncode == 0, solve.stderr
    assert (out / "summary.json").exists()
