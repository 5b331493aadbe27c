"""Output folders: nothing outside the run's own folder is ever written or deleted (the data-loss cases first)."""

import json
import os
import stat
from pathlib import Path

import pytest

from cli_helpers import error_of
from invdiff.cli import main
from invdiff.rundir import MARKER, RunFolder, RunFolderError

ROOT = Path(__file__).resolve().parent.parent
INPAINT = str(ROOT / "problems" / "inpaint.yaml")
FAST = ["--case", "digits-gmm-box", "--sampler", "dps", "--num-samples", "2", "-o", "num_steps=3", "--quiet"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its content."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding a user's files, inside a parent holding more."""
    parent = tmp_path / "parent"
    work = parent / "work"
    (work / "data").mkdir(parents=True)
    (work / "notes.txt").write_text("my notes")
    (work / "data" / "image.npy").write_bytes(b"not really")
    (parent / "thesis.tex").write_text("chapter 1")
    monkeypatch.chdir(work)
    return parent


@pytest.mark.parametrize("out", [".", "..", "./", "../..", ""])
def test_overwrite_never_touches_the_working_directory_or_its_parents(workdir, capsys, out):
    before = snapshot(workdir)
    error = error_of(["solve", INPAINT, *FAST, "--out", out, "--overwrite"], capsys)
    assert "working directory" in error or "--out is empty" in error, error
    assert snapshot(workdir) == before, "files of the working directory or its parents changed"
    assert sorted(path.name for path in (workdir / "work").iterdir()) == ["data", "notes.txt"]


def test_overwrite_refuses_a_folder_invdiff_did_not_write(workdir, capsys):
    before = snapshot(workdir)
    error = error_of(["solve", INPAINT, *FAST, "--out", "data", "--overwrite"], capsys)
    assert f"was not written by invdiff solve (no {MARKER} of that kind)" in error
    assert snapshot(workdir) == before


def test_overwrite_replaces_an_invdiff_run_but_refuses_one_holding_a_users_files(workdir, capsys):
    assert main(["solve", INPAINT, *FAST, "--out", "run", "--seed", "1"]) == 0
    marker = json.loads((workdir / "work" / "run" / MARKER).read_text())
    assert marker["files"] == ["figure.png", "samples.npz", "summary.json"]
    assert main(["solve", INPAINT, *FAST, "--out", "run", "--seed", "2", "--overwrite"]) == 0
    assert json.loads((workdir / "work" / "run" / "summary.json").read_text())["seed"] == 2
    (workdir / "work" / "run" / "my-analysis.ipynb").write_text("{}")
    error = error_of(["solve", INPAINT, *FAST, "--out", "run", "--seed", "3", "--overwrite"], capsys)
    assert "holds files invdiff did not write (my-analysis.ipynb)" in error
    assert json.loads((workdir / "work" / "run" / "summary.json").read_text())["seed"] == 2
    leftovers = [path.name for path in (workdir / "work").iterdir() if path.name.startswith(".")]
    assert leftovers == [], f"staging folders left behind: {leftovers}"


def test_an_out_through_dot_dot_names_the_folder_it_reaches(workdir, capsys):
    """``--out run/../run --overwrite`` lost the run it replaced (once the old run was renamed aside,
    ``run/..`` no longer resolved, and the new run and the old one were left in hidden folders); ``new/../new2``
    left the folder ``new`` behind, and ``x/../x`` refused after sampling that ``x`` had "appeared"."""
    work = workdir / "work"
    assert main(["solve", INPAINT, *FAST, "--out", "run", "--seed", "1"]) == 0
    assert main(["solve", INPAINT, *FAST, "--out", "run/../run", "--seed", "2", "--overwrite"]) == 0
    assert json.loads((work / "run" / "summary.json").read_text())["seed"] == 2
    assert main(["solve", INPAINT, *FAST, "--out", "made/../other"]) == 0
    assert main(["solve", INPAINT, *FAST, "--out", "fresh/../fresh"]) == 0
    assert sorted(path.name for path in work.iterdir()) == ["data", "fresh", "notes.txt", "other", "run"]
    (work / "link").symlink_to(work / "run")   # the last part is kept: a link named through '..' is still refused
    assert "is a symbolic link" in error_of(["solve", INPAINT, *FAST, "--out", "data/../link", "--overwrite"], capsys)
    (work / "loop").symlink_to(work / "loop")
    assert "cannot be used" in error_of(["solve", INPAINT, *FAST, "--out", "loop/x/../y"], capsys)
    assert json.loads((work / "run" / "summary.json").read_text())["seed"] == 2


def test_the_output_folder_and_options_are_checked_before_the_problem_is_built(workdir, capsys, monkeypatch):
    """A bad --out or -o is refused before a network is loaded and a truth drawn (it took 35-55 s of a
    prior-draw truth before "is a file")."""
    monkeypatch.setattr("invdiff.problems.load_problem", lambda *args, **kwargs: pytest.fail("problem built"))
    assert "is a file, not a folder" in error_of(["solve", INPAINT, *FAST, "--out", "notes.txt"], capsys)
    assert "expects KEY=VALUE" in error_of(["solve", INPAINT, *FAST, "-o", "noequals", "--out", "new"], capsys)


def test_existing_folder_without_overwrite_is_refused(workdir, capsys):
    error = error_of(["solve", INPAINT, *FAST, "--out", "data"], capsys)
    assert "output folder data exists; choose another --out or pass --overwrite" in error


@pytest.mark.parametrize("case", ["file", "parent_is_file", "unwritable", "proc", "symlink", "link_loop",
                                  "name_too_long"])
def test_an_unusable_output_location_is_refused_before_any_work(tmp_path, capsys, monkeypatch, case):
    (tmp_path / "a_file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    (tmp_path / "link").symlink_to(tmp_path / "a_file")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    out = {"file": tmp_path / "a_file", "parent_is_file": tmp_path / "a_file" / "run",
           "unwritable": locked / "run", "proc": Path("/proc/invdiff-run"), "symlink": tmp_path / "link",
           "link_loop": tmp_path / "loop" / "run", "name_too_long": tmp_path / ("x" * 300)}[case]
    if case == "unwritable" and os.access(locked, os.W_OK):
        pytest.skip("running as a user who can write to read-only folders (root)")
    monkeypatch.setattr("invdiff.posterior.sample_posterior", lambda *args, **kwargs: pytest.fail("sampling started"))
    error = error_of(["solve", INPAINT, *FAST, "--out", str(out)], capsys)
    assert "--out" in error, error
    assert (tmp_path / "a_file").read_text() == "x"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "link", "locked", "loop"]


def test_a_root_user_cannot_write_into_proc(capsys):
    error = error_of(["solve", INPAINT, *FAST, "--out", "/proc/invdiff-run/deeper"], capsys)
    assert "cannot create folder /proc/invdiff-run" in error


def test_a_failed_run_leaves_no_folder_and_removes_the_parents_it_created(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("invdiff.posterior.sample_posterior", fail)
    assert main(["solve", INPAINT, *FAST, "--out", str(tmp_path / "new" / "deeper" / "run")]) == 130
    assert list(tmp_path.iterdir()) == [], "an interrupted run left files behind"


def test_run_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        folder = RunFolder(tmp_path / "run", overwrite=False)
        (folder.staging / "summary.json").write_text("{}")
        folder.commit()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755


@pytest.mark.parametrize("failure", [OSError("simulated failure while moving the new run into place"),
                                     KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_run_folder_is_replaced_only_after_the_new_one_is_complete(tmp_path, monkeypatch, failure):
    """The old run is renamed aside, the new one renamed in, and only then the old one deleted."""
    first = RunFolder(tmp_path / "run", overwrite=False)
    (first.staging / "summary.json").write_text("old")
    first.commit()
    second = RunFolder(tmp_path / "run", overwrite=True)
    (second.staging / "summary.json").write_text("new")

    original_rename = Path.rename

    def rename(self, target):
        if self == second.staging:
            raise failure
        return original_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(type(failure)):
        second.commit()
    monkeypatch.undo()
    assert (tmp_path / "run" / "summary.json").read_text() == "old", "the old run is not back in place"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["run", second.staging.name])


def test_run_folder_error_names_the_empty_and_file_cases(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunFolder(tmp_path / "file", overwrite=True)


def test_a_run_too_large_for_memory_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    """--num-samples 1000000000 (about 256 GB of states) is one line naming the estimate, not an allocation."""
    monkeypatch.setattr("invdiff.posterior.sample_posterior", lambda *args, **kwargs: pytest.fail("sampling started"))
    error = error_of(["solve", INPAINT, "--case", "digits-gmm-box", "--sampler", "dps", "--num-samples",
                      "1000000000", "--quiet", "--out", str(tmp_path / "run")], capsys)
    assert "this run needs about" in error and "are available" in error, error
    assert list(tmp_path.iterdir()) == [], "a refused run left files behind"
