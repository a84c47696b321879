"""Writing files and folders so that a crash or a full disk never destroys what was there before.

Every file the project writes goes to a temporary file in the destination folder, is fsynced, and
only then renamed over the target (rename is atomic on one filesystem). If writing fails, the
temporary file is removed, the old file is untouched, and the error becomes a UserError naming the
path and the cause (for example a full disk or a read-only folder). Whole folders (diffusers
models) are written beside the target and swapped in the same way (`replace_folder_atomically`).
The resumable training state has its own swap with fixed folder names (library/training/state.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from typing import Callable, Optional

from library.errors import UserError


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    try:
        _fsync_path(folder)
    except OSError:  # some filesystems refuse fsync on directories; the rename itself is done
        pass


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_path(os.path.join(root, name))


def _reason(error: OSError) -> str:
    return "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))


def ensure_writable_dir(folder: str) -> None:
    """Create `folder` if needed; UserError if it cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {folder}: {e.strerror}; choose another --output_dir") from e
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder} is not writable; fix its permissions or choose another folder")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(temp_path), fsync it and rename it to `path`; on any failure keep the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    ensure_writable_dir(folder)
    fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(temp_path)
        _fsync_path(temp_path)
        os.replace(temp_path, path)
    except BaseException as e:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        if isinstance(e, OSError):
            raise UserError(f"could not write {path}: {_reason(e)}; the previous file (if any) is unchanged") from e
        raise
    _fsync_dir(folder)


def replace_folder_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call write(temp_folder) beside `path`, fsync its files, then swap it in; on any failure the old
    folder (if any) stays as it was."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    ensure_writable_dir(parent)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"cannot write the folder {path}: a file with that name exists")
    temp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    backup = f"{temp}.previous"
    try:
        write(temp)
        _fsync_tree(temp)
        _swap_folder(temp, path, backup)
    except OSError as e:
        raise UserError(f"could not write the folder {path}: {_reason(e)}; nothing was replaced") from e
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)
    _fsync_dir(parent)


def _swap_folder(temp: str, path: str, backup: str) -> None:
    """Put the finished folder in place; an existing folder survives until the new one is there."""
    if os.path.exists(path):
        os.replace(path, backup)
    try:
        os.replace(temp, path)
    except OSError:
        if os.path.exists(backup):
            os.replace(backup, path)
        raise


def save_safetensors_atomic(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda temp: save_file(contiguous, temp, metadata=metadata))


def write_text_atomic(path: str, text: str) -> None:
    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
