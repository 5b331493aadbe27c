"""Reading the YAML files a user hands to invdiff (problem files, training configurations).

Every way a file can be wrong is one line naming the file and what is wrong: missing, a
directory, a symlink loop, unreadable, not UTF-8, malformed YAML (with line and column), a key
given twice in one mapping, or a top level that is not a mapping. Only plain YAML is read
(``yaml.SafeLoader``: no tags that build Python objects).
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import yaml

__all__ = ["YAMLFileError", "read_mapping", "parse_value", "file_problem"]


class YAMLFileError(ValueError):
    """A YAML file or value cannot be read; the message is one line that says why."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key given twice in one mapping (YAML forbids it; PyYAML keeps the last).

    A merge key (``<<: *anchor``) is allowed: the mapping's own keys override the merged ones, as YAML says.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads 1e-3 and 1e9 as strings (its floats need a dot: 1.0e-3); YAML 1.2 and every user read
# them as numbers, so this loader does too (``-o scale=1e-3`` was "unable to parse string").
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


#: the largest YAML file read (problem files, benchmark and training configurations are a few KB)
MAX_YAML_BYTES = 10 * 10**6


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (missing, a directory, a symlink loop), or None."""
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop"
        if error.errno == errno.ENOENT:
            return f"{path} does not exist"
        return f"{path} cannot be read: {error.strerror}"
    if path.is_dir():
        return f"{path} is a directory, not a file"
    if not path.is_file():   # reading a device or a pipe does not end (/dev/zero) or waits for a writer
        return f"{path} is not a regular file (a device, a pipe or a socket)"
    return None


def _parse(text: str, where: str):
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise YAMLFileError(f"{where}: malformed YAML{at}: {reason}") from None


def read_mapping(path: str | Path, what: str) -> dict:
    """The top-level mapping of the YAML file ``path``; ``what`` names the file's kind in errors."""
    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise YAMLFileError(f"{what} {problem}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise YAMLFileError(f"{path.name}: {path.stat().st_size:,} bytes; a {what} is a YAML text of at most "
                            f"{MAX_YAML_BYTES:,} bytes (data go in the files it names)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise YAMLFileError(f"{path.name}: not UTF-8 text (byte {error.start}); a {what} is a YAML text "
                            f"file") from None
    except OSError as error:
        raise YAMLFileError(f"{what} {path} cannot be read: {error.strerror}") from None
    content = _parse(text, path.name)
    if content is None:
        raise YAMLFileError(f"{path.name}: the file is empty; a {what} is a mapping of keys")
    if not isinstance(content, dict):
        raise YAMLFileError(f"{path.name}: a {what} must be a mapping of keys, got {type(content).__name__}")
    return content


def parse_value(text: str, where: str):
    """One YAML value given on the command line (e.g. the VALUE of ``-o KEY=VALUE``)."""
    return _parse(text, where)
