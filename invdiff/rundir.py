"""Run folders: written whole or not at all, and replaced only when invdiff wrote them.

A run is written into a staging folder beside its destination, created before any work so that an
unusable destination is an input error, not a traceback after sampling. When the run is complete
the staging folder is renamed onto the destination. ``--overwrite`` may replace only a folder that
holds invdiff's marker file and nothing but the files the marker lists: never the working
directory or one of its parents, never a folder a user made. The old run is moved aside by a
rename first and deleted only once the new one is in place, so nothing is lost if a step fails.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["RunFolderError", "RunFolder", "MARKER", "check_destination", "destination", "owned_files", "make_folders",
           "remove_empty"]

#: the file that marks a folder as an invdiff run (JSON: what wrote it and which files)
MARKER = ".invdiff-run.json"


class RunFolderError(ValueError):
    """The output folder cannot be used; the message is one line saying why and what to do."""


def _umask_permissions() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first (raises ``OSError``
    after removing what it created)."""
    created: list[Path] = []
    for path in [*reversed(folder.parents), folder]:
        if path.exists():
            continue
        try:
            path.mkdir()
        except OSError:
            remove_empty(created)
            raise
        created.append(path)
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (outermost first) from the innermost out, stopping at one that is not empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def destination(out: str | Path) -> Path:
    """``out`` as the folder it names: a path through ``..`` (``runs/a/../b``) has its parent resolved first, so
    that no folder on the way is created and renaming an old run aside does not unmake the path (``--overwrite``
    with ``--out r/../r`` would lose the run it replaces); its last part is kept, so that a symbolic link named as
    ``--out`` is still refused, not followed. Other paths are kept as given."""
    out = Path(out)
    if ".." not in out.parts:
        return out
    try:
        return out.resolve() if out.name in ("", "..") else out.parent.resolve() / out.name
    except (OSError, RuntimeError) as error:   # RuntimeError: Path.resolve's loop of symbolic links
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise RunFolderError(f"--out {out}: cannot be used ({reason}); choose another --out") from None


def check_destination(out: Path, purpose: str, example: str) -> None:
    """Refuse an output folder ``out`` that is the working directory or one of its parents, a symbolic link
    or a file (``RunFolderError``, one line; ``purpose`` and ``example`` complete it: "a run", "runs/my-run"), and
    one the system cannot look up (a name too long, a loop of links, no permission)."""
    try:
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            raise RunFolderError(f"--out {out}: that is the working directory or one of its parents; {purpose} "
                                 f"needs a folder of its own, e.g. --out {example}")
        if out.is_symlink():
            raise RunFolderError(f"--out {out}: is a symbolic link; name a folder")
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out}: is a file, not a folder; choose another --out")
    except (OSError, RuntimeError) as error:   # RuntimeError: Path.resolve's loop of symbolic links
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise RunFolderError(f"--out {out}: cannot be used ({reason}); choose another --out") from None


def owned_files(folder: Path, kind: str) -> set[str] | None:
    """The files the marker of ``folder`` lists, or None when ``folder`` is not an invdiff run of ``kind``."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        return set(marker["files"]) if marker["kind"] == kind else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_replaceable(out: Path, kind: str) -> None:
    """Refuse to replace ``out`` unless it is a run of ``kind`` holding only the files its marker lists."""
    owned = owned_files(out, kind)
    if owned is None:
        raise RunFolderError(f"--overwrite: {out} was not written by {kind} (no {MARKER} of that kind); --overwrite "
                             f"replaces only such runs: choose another --out")
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in owned | {MARKER})
    if foreign:
        raise RunFolderError(f"--overwrite: {out} holds files invdiff did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); move them or choose another --out")


class RunFolder:
    """The destination ``out`` of one run and its staging folder.

    ``RunFolder(out, overwrite, kind)`` checks the destination and creates the staging folder at once
    (raising ``RunFolderError``); write files into ``staging``, then ``commit()``, which marks the run
    as one of ``kind`` (``--overwrite`` replaces only runs of the same kind); ``discard()`` removes the
    staging folder (and parent folders it created) when the run does not complete.
    """

    def __init__(self, out: Path, overwrite: bool, kind: str = "invdiff solve"):
        self.out = destination(out)
        self.overwrite = overwrite
        self.kind = kind
        RunFolder.check(self.out, overwrite, kind)
        self._created_parents = self._make_parents()
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
            self.staging.chmod(_umask_permissions())
        except OSError as error:
            remove_empty(self._created_parents)
            raise RunFolderError(f"--out: cannot create a folder in {self.out.parent}: "
                                 f"{error.strerror or error}") from None

    @staticmethod
    def check(out: Path, overwrite: bool, kind: str = "invdiff solve") -> None:
        """What the constructor checks of the destination, creating nothing: a command can refuse an unusable
        ``--out`` before its slow preparations (loading a network), and stage the folder after them."""
        out = destination(out)
        check_destination(out, "a run", "runs/my-run")
        if not out.exists():
            return
        if not overwrite:
            raise RunFolderError(f"output folder {out} exists; choose another --out or pass --overwrite")
        _check_replaceable(out, kind)

    def _make_parents(self) -> list[Path]:
        """Create the missing parent folders of ``out``; returns those created, outermost first."""
        try:
            return make_folders(self.out.parent)
        except OSError as error:
            raise RunFolderError(f"--out: cannot create folder {error.filename}: {error.strerror or error}") from None

    def commit(self) -> Path | None:
        """Mark the staging folder as a run and move it onto ``out`` (replacing an old run).

        Returns None, or the folder holding the old run when it could not be deleted after the new
        run was in place (nothing is lost; the caller says so).
        """
        files = sorted(entry.name for entry in self.staging.iterdir())
        (self.staging / MARKER).write_text(json.dumps({"written_by": "invdiff", "kind": self.kind,
                                                       "files": files}) + "\n")
        old = None
        if self.out.exists():
            if not self.overwrite:
                raise RunFolderError(f"output folder {self.out} appeared while sampling; not overwritten")
            _check_replaceable(self.out, self.kind)
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            self.out.rename(old / self.out.name)
        try:
            self.staging.rename(self.out)
        except BaseException:  # Ctrl-C included: put the old run back where it was
            if old is not None:
                (old / self.out.name).rename(self.out)
                old.rmdir()
            raise
        if old is None:
            return None
        shutil.rmtree(old, ignore_errors=True)
        return old if old.exists() else None

    def discard(self) -> None:
        """Remove the staging folder and the parent folders this run created (when still empty)."""
        if self.staging.exists():
            shutil.rmtree(self.staging)
        remove_empty(self._created_parents)
