"""Writing files whole, with the permissions any new file gets under the user's umask.

A reader (or a run killed mid-write) never leaves half a file at the final name: each file is written
under a hidden temporary name in the same directory and renamed into place, which POSIX makes atomic.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask (``0o644`` under the usual ``022``)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory: ``0o777`` less the umask (``0o755`` under ``022``)."""
    return 0o777 & ~umask()


def write_whole(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, give it :func:`file_mode`, rename it to ``path``.

    The mode is set explicitly because some writers create private files (safetensors 0.8 writes
    ``0o600``); the temporary file is removed if ``write`` raises.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def replace_dir(new: Path, final: Path) -> None:
    """Move the finished directory ``new`` to ``final``: one rename, or three steps when ``final`` exists (POSIX
    cannot rename a directory onto a non-empty one): set the old one aside, rename, delete the old one."""
    if not final.exists() and not final.is_symlink():
        os.rename(new, final)
        return
    aside = final.with_name(f".{final.name}.replaced-{os.getpid()}-{time.time_ns()}")
    os.rename(final, aside)
    os.rename(new, final)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink()
