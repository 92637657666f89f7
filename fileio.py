"""Files written all at once or not at all, and the small readers every script shares.

A job killed at any moment (SIGKILL, a full disk) must never leave a file that looks finished but is
truncated: everything is written under a temporary name in the same directory and renamed into place
(an atomic operation on POSIX file systems) only once it is complete.
"""
import contextlib
import json
import os
import tempfile

from errors import InputError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success rename it to `path`, on failure remove it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    """Write `obj` as indented JSON to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def read_json(path, what="JSON file"):
    """Read a JSON file, turning a missing or malformed file into an InputError naming it."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a valid {what} ({err})") from None


def read_lines(path, what="text file"):
    """Read a UTF-8 file with one non-blank entry per line (a trailing newline is fine).

    Returns a list of str. Missing, empty, non-UTF-8 files and blank lines are InputErrors: a blank
    caption line would silently shift every caption after it to the wrong image.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise InputError(f"{path}: {what} is empty")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"{path}: line {number} is blank")
    return [line.rstrip("\r") for line in lines]
