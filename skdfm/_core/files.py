"""Files the package writes: to a temporary name in the same folder, then renamed.

A model file that is being written must never replace a working one half-way: the
bytes go to a temporary file next to the target (same file system, so the rename is
atomic), are flushed and fsynced, and only then ``os.replace`` puts the complete file
in place. A writer killed at any moment leaves either the old file or the new one,
never a stub; a write that fails removes its temporary file.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["ModelFileError", "Terminated", "atomic_write", "terminate_as_exception"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success it replaces ``path``.

    Parameters
    ----------
    path : str or path-like
        The file to write. Its folder must exist.
    mode : {"wb", "w"}
        Binary or text.

    Raises
    ------
    FileNotFoundError, PermissionError
        When the folder does not exist or cannot be written, naming it.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot write {path}: no folder {folder}.")
    # SIGTERM is held while the temporary file is made, so that Terminated (see
    # terminate_as_exception) is raised inside the try below, which removes it,
    # never between its creation and the try.
    held = _hold_sigterm()
    try:
        fd, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp", dir=folder
        )
    except PermissionError as error:
        _release(held)
        raise PermissionError(f"Cannot write {path}: {error.strerror}.") from error
    except BaseException:
        _release(held)
        raise
    try:
        _release(held)  # a SIGTERM held meanwhile is raised here
        # mkstemp creates 0600: keep the permissions of the file being replaced, or
        # give a new one those a plain open() would.
        try:
            permissions = path.stat().st_mode & 0o7777
        except OSError:
            permissions = 0o666 & ~_umask()
        os.chmod(temporary, permissions)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
    with suppress(OSError):  # make the rename itself durable (POSIX)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _hold_sigterm():
    """Block SIGTERM in the main thread (POSIX); the previous mask, or None."""
    if not hasattr(signal, "pthread_sigmask") or (
        threading.current_thread() is not threading.main_thread()
    ):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _release(held) -> None:
    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so files are cleaned up."""


@contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only).

    Python's default SIGTERM handling ends the process at once, leaving temporary
    files behind; raising instead runs every ``finally`` and ``except`` on the way
    out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ModelFileError(ValueError):
    """A model file is damaged, foreign or holds something skdfm does not load."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"Model file {self.path!r} {problem}")

    def __reduce__(self):  # picklable across processes (joblib workers)
        return (type(self), (self.path, self.problem))
