"""Users' real architectures at real size: the guided-diffusion ADM UNet of DPS's FFHQ-256 checkpoint (93.6M
parameters) and the diffusers UNet2DModel of the 256x256 DDPM checkpoints (113.7M), with random weights
(``invdiff.reference_architectures``), written in their native formats, named by a problem file and run by
``invdiff solve`` with every built-in sampler at 256x256x3 for two steps (DPS: one), on the CPU.

This is the path a user with a downloaded checkpoint takes, except the weights: the loaders, the colour
truth, the operator at 196608 values (no dense matrix), the memory guard, each sampler's chunking and the
outputs. The scores of these weights mean nothing, so the tests check shapes, finiteness and the records,
not image quality.

Every network call at this size costs seconds on a CPU, so the default run (CI) runs DPS, which
backpropagates through the network, on the ADM UNet (both loaders are tested at small size in
``test_loaders.py``); ``INVDIFF_REAL_SIZE=all`` runs every sampler on both architectures (README,
"Real-size images", gives the time).
"""

import json
import os

import numpy as np
import pytest

from invdiff.cli import main
from invdiff.reference_architectures import ARCHITECTURES, IMAGE_SIZE, write_problem_files

#: two steps of every sampler, one sample (two particles for the particle samplers); DPS, which the default run
#: runs, one step: the memory guard's probe has already run the network forward and backward
STEPS = 2
OPTIONS = {"dps": ["-o", "num_steps=1"], "deepinv_dps": ["-o", f"num_steps={STEPS}"],
           "ddrm": ["-o", f"num_steps={STEPS}"], "diffpir": ["-o", f"num_steps={STEPS}"],
           "twisted_smc": ["-o", f"num_steps={STEPS}", "--num-particles", "2"],
           "ve_smc": ["-o", f"num_steps={STEPS}", "--num-particles", "2"],
           "mcgdiff": ["-o", f"num_steps={STEPS}", "--num-particles", "2"],
           "rdmc": ["-o", "num_steps=1", "-o", "num_chains=1", "-o", "inner_steps=1", "-o", "pool_size=1",
                    "-o", f"pool_steps={STEPS}"],
           "exact": []}


@pytest.fixture(scope="module")
def problem_files(tmp_path_factory):
    """Both checkpoints, the 256x256 RGB truth and a problem file for each (invdiff.reference_architectures)."""
    return write_problem_files(tmp_path_factory.mktemp("real-size"))


#: what the default run covers; the rest is skipped unless INVDIFF_REAL_SIZE=all
DEFAULT_RUN = {("adm", "dps")}
EVERY_SAMPLER = os.environ.get("INVDIFF_REAL_SIZE") == "all"


@pytest.mark.parametrize("sampler", sorted(OPTIONS))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_sampler_runs_at_256x256x3_on_a_real_architecture(problem_files, architecture, sampler, tmp_path, capsys):
    if (architecture, sampler) not in DEFAULT_RUN and not EVERY_SAMPLER:
        pytest.skip("every sampler at 256x256x3 takes minutes on a CPU: INVDIFF_REAL_SIZE=all python -m pytest "
                    "tests/test_real_size.py runs them")
    out = tmp_path / "run"
    command = ["solve", str(problem_files[architecture]), "--sampler", sampler, "--num-samples", "1", "--seed", "0",
               "--out", str(out), "--quiet"] + OPTIONS[sampler]
    code = main(command)
    error = capsys.readouterr().err
    if sampler == "exact":
        assert code == 2 and "needs a Gaussian or Gaussian-mixture prior" in error
        return
    assert code == 0, error
    arrays = np.load(out / "samples.npz")
    assert arrays["samples"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and np.isfinite(arrays["samples"]).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problem"]["prior"]["name"] == ("guided_diffusion" if architecture == "adm" else "diffusers")
    assert summary["prior"]["format"] == ("guided-diffusion" if architecture == "adm" else "diffusers")
    assert np.isfinite(summary["metrics"]["psnr_posterior_mean"]) and (out / "figure.png").is_file()
