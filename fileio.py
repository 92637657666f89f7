"""Files written all at once or not at all, and the small readers every script shares.

A job killed at any moment (SIGKILL, a full disk) must never leave a file that looks finished but is
truncated: everything is written under a temporary name in the same directory and renamed into place
(an atomic operation on POSIX file systems) only once it is complete.
"""
import contextlib
import json
import os
import secrets

from errors import InputError


def check_output(path, folder=False):
    """InputError unless `path` (a file, or a folder with folder=True) can be created or replaced.

    A folder where a file is wanted (or a file where a folder is), a parent path that is a file or not
    writable: scripts call this before their work, so that a bad output path fails at once with its
    name rather than with a traceback after hours of computing.
    """
    shown = os.fspath(path)
    path = os.path.abspath(shown)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{shown}: exists and is not a folder")
    if not folder and os.path.isdir(path):
        raise InputError(f"{shown}: is a folder, expected a file name")
    parent = path if folder else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{shown}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{shown}: cannot be created, {parent} is not writable")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success rename it to `path`, on failure remove it.

    The temporary file gets the mode open() would give `path` (0o666 less the umask), not
    tempfile.mkstemp's 0o600, which would leave checkpoints and results unreadable to the user's group.
    Its name, `.{name}.{pid}.{random}.tmp`, never looks like a finished file.
    """
    path = os.fspath(path)
    check_output(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise InputError(f"{path}: cannot be written ({err.strerror})") from None
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(text, path):
    """Write the string `text` to `path` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(obj, path):
    """Write `obj` as indented JSON to `path` atomically."""
    write_text(json.dumps(obj, indent=2) + "\n", path)


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
