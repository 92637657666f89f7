"""Files written all at once or not at all, and the small readers every script shares.

A job killed at any moment (SIGKILL, a full disk) must never leave a file that looks finished but is
truncated: everything is written under a temporary name in the same directory and renamed into place
(an atomic operation on POSIX file systems) only once it is complete.
"""
import contextlib
import datetime
import json
import os
import secrets
import subprocess
import sys
import zipfile

import numpy as np

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


# ------------------------------------------------------------------------------------------------
# Arrays: region features and similarity matrices


def load_npy(path, what):
    """A numeric .npy array, memory-mapped (nothing is read until used); InputError naming `path` otherwise."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: {what} not found")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # np.load reads 'PK...' as .npz
        raise InputError(f"{path}: not a .npy array file ({str(err)[:120]})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise InputError(f"{path}: not a numeric .npy array (the {what} must hold numbers)")
    return array


def open_sims(paths, n_captions=None, captions_file=None):
    """Similarity matrices (.npy) memory-mapped and checked for shape: (n, 5n), the same for all.

    With n_captions, the shape must be (n_captions / 5, n_captions) (the split's size, from
    `captions_file`). A transposed matrix or a file that is not .npy -> InputError naming it. Nothing is
    read yet: `sims_block` reads and checks the values of any block.
    """
    mats, shape = [], None
    for path in paths:
        mat = load_npy(path, "similarity matrix")
        if mat.ndim != 2:
            raise InputError(f"{path}: expected a 2-D (n_images, n_captions) array, got shape {mat.shape}")
        rows, cols = mat.shape
        if n_captions is not None:
            expected = (n_captions // 5, n_captions)
            if (rows, cols) != expected:
                hint = " (it looks transposed: rows must be images, columns captions)" \
                    if (cols, rows) == expected else ""
                raise InputError(f"{path}: shape {mat.shape} does not match {captions_file} "
                                 f"({n_captions} captions -> expected {expected}){hint}")
        elif cols != 5 * rows:
            hint = " (it looks transposed: rows must be images, columns captions)" if rows == 5 * cols else ""
            raise InputError(f"{path}: shape {mat.shape} is not (n_images, 5 n_images){hint}")
        if shape is not None and mat.shape != shape:
            raise InputError(f"{path}: shape {mat.shape} differs from {paths[0]}'s {shape}")
        shape = mat.shape
        mats.append(mat)
    return mats


def sims_dtype(mats):
    """The dtype of the average of `mats`: float64 if any is float64, else float32."""
    return np.dtype(np.float64 if any(m.dtype == np.float64 for m in mats) else np.float32)


def sims_block(mats, paths, rows=slice(None), cols=slice(None)):
    """The average of block [rows, cols] (two slices) of open_sims' matrices, read into memory and checked
    finite (NaN/inf -> InputError naming the file and the entry). Returns float32, or float64 if any
    input is float64; each entry is the same whatever block it is read in."""
    total = None
    for path, mat in zip(paths, mats):
        block = np.array(mat[rows, cols], dtype=np.float64 if mat.dtype == np.float64 else np.float32)
        finite = np.isfinite(block)
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            r, c = r + (rows.start or 0), c + (cols.start or 0)
            raise InputError(f"{path}: {int((~finite).sum())} entries are NaN or inf in this block (first at "
                             f"[{r}, {c}])" if (rows, cols) != (slice(None), slice(None)) else
                             f"{path}: {int((~finite).sum())} entries are NaN or inf (first at [{r}, {c}])")
        total = block if total is None else total + block
    return total if len(paths) == 1 else total / len(paths)


def load_sims(paths, n_captions=None, captions_file=None):
    """Load and average similarity matrices (.npy), checked: (n, 5n) float, finite, same shapes.

    With n_captions, the shape must be (n_captions / 5, n_captions) (the split's size, from
    `captions_file`). A transposed matrix, NaN/inf, a file that is not .npy -> InputError naming it.
    Returns float32, or float64 if any input is float64.
    """
    return sims_block(open_sims(paths, n_captions, captions_file), paths)


@contextlib.contextmanager
def open_npy_for_writing(path, shape, dtype):
    """A .npy file of `shape` and `dtype` memory-mapped for writing under a temporary name next to `path`
    (np.lib.format.open_memmap): a context manager yielding the array, filled chunk by chunk by the caller
    (a matrix larger than memory); on success it is flushed, synced and renamed to `path`, on failure
    removed (see atomic_path)."""
    with atomic_path(path) as tmp:
        try:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        except OSError as err:
            raise InputError(f"{path}: cannot be written ({err.strerror})") from None
        yield array
        array.flush()
        del array


def save_npy(array, path):
    """np.save atomically (a killed run never leaves a truncated .npy)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


# ------------------------------------------------------------------------------------------------
# Provenance of every JSON result


def git_commit():
    """The repository's HEAD commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def json_safe(value):
    """Options and paths as plain JSON types (anything else as its str)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def provenance(argv, **fields):
    """The provenance block every JSON output carries."""
    out = {key: json_safe(value) for key, value in fields.items()}
    args = list(argv if argv is not None else sys.argv[1:])
    out.update({"git_commit": git_commit(), "argv": sys.argv[:1] + args,
                "date": datetime.datetime.now().isoformat(timespec="seconds")})
    return out
