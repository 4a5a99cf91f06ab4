"""Files the package writes: to a temporary name in the same folder, then renamed.

A model file that is being written must never replace a working one half-way: the
bytes go to a temporary file next to the target (same file system, so the rename is
atomic), are flushed and fsynced, and only then ``os.replace`` puts the complete file
in place. A writer killed at any moment leaves either the old file or the new one,
never a stub; a write that fails removes its temporary file.

SIGTERM (``terminate_as_exception``) unwinds the command like Ctrl-C, so every
``finally`` runs; when the process sits in native code that does not return (a
runtime executing a hostile graph, a blocking system call), a watchdog thread woken
by the signal itself removes the temporary files still open and ends the process
after a short grace period.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = [
    "TERMINATE_GRACE_SECONDS",
    "ModelFileError",
    "Terminated",
    "atomic_write",
    "longest_file_name",
    "temporary_name",
    "terminate_as_exception",
]

#: How long SIGTERM waits for the command to unwind before the process is ended.
TERMINATE_GRACE_SECONDS = 2.0
# Longest file name most file systems take (bytes); ``os.pathconf`` where it answers.
_NAME_MAX = 255
_TEMPORARY_SUFFIX = ".tmp"
_RANDOM_CHARACTERS = 8  # what tempfile.mkstemp puts between prefix and suffix

# Temporary files being written right now: removed by a forced exit.
_temporaries: set[str] = set()
_temporaries_lock = threading.Lock()


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
            prefix=temporary_name(path.name, longest_file_name(folder)),
            suffix=_TEMPORARY_SUFFIX,
            dir=folder,
        )
    except PermissionError as error:
        _release(held)
        raise PermissionError(f"Cannot write {path}: {error.strerror}.") from error
    except BaseException:
        _release(held)
        raise
    with _temporaries_lock:
        _temporaries.add(temporary)
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
    finally:
        with _temporaries_lock:
            _temporaries.discard(temporary)
    with suppress(OSError):  # make the rename itself durable (POSIX)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def temporary_name(name: str, name_max: int = _NAME_MAX) -> str:
    """The prefix of the temporary file written for ``name``: ``.name.``, the name
    shortened (at a character boundary) so that prefix, random part and suffix fit
    in ``name_max`` bytes, the longest file name the folder takes."""
    room = name_max - len(_TEMPORARY_SUFFIX) - _RANDOM_CHARACTERS - 2
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > room:
        name = encoded[:room].decode("utf-8", "ignore")
    return f".{name}."


def longest_file_name(folder) -> int:
    """The longest file name, in bytes, that ``folder`` takes (255 where the system
    does not say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):
        return _NAME_MAX


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
def terminate_as_exception(
    grace: float = TERMINATE_GRACE_SECONDS, exit_code: int = 143
) -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only).

    Python's default SIGTERM handling ends the process at once, leaving temporary
    files behind; raising instead runs every ``finally`` and ``except`` on the way
    out. But Python runs its handler only between bytecodes: in native code that does
    not return (an onnxruntime graph looping for ever, a read that blocks) it would
    never run. So the signal also wakes a watchdog thread (``signal.set_wakeup_fd``,
    written by the C-level handler); if the block has not ended ``grace`` seconds
    later, the watchdog removes the temporary files of :func:`atomic_write` still
    open, says so on stderr and ends the process with ``exit_code``.

    Parameters
    ----------
    grace : float, default=TERMINATE_GRACE_SECONDS
        Seconds the block has to unwind before the process is ended.
    exit_code : int, default=143
        The exit status of a forced end (128 + SIGTERM, as the shell reports it).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    finished = threading.Event()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)  # set_wakeup_fd needs a non-blocking fd
    watchdog = threading.Thread(
        target=_watch,
        args=(wake_read, finished, grace, exit_code),
        name="skdfm-sigterm-watchdog",
        daemon=True,
    )
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        previous_fd = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    except BaseException:
        signal.signal(signal.SIGTERM, previous)
        os.close(wake_read)
        os.close(wake_write)
        raise
    # The watchdog is started with SIGTERM blocked, so it never takes the signal
    # itself (threads inherit the mask): the signal stays the main thread's, which
    # holds it while atomic_write makes a temporary file.
    held = _hold_sigterm()
    try:
        watchdog.start()
    finally:
        _release(held)
    try:
        yield
    finally:
        finished.set()
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous)
        os.close(wake_write)  # the watchdog reads the end of the pipe and returns
        watchdog.join()
        os.close(wake_read)


def _watch(wake_read: int, finished: threading.Event, grace: float, code: int):
    """The watchdog: waits for SIGTERM's byte on the wake-up pipe, then for the
    block to end; past ``grace``, cleans up and ends the process."""
    while True:
        try:
            woken_by = os.read(wake_read, 64)
        except OSError:
            return
        if not woken_by or finished.is_set():
            return
        if signal.SIGTERM in woken_by:
            if not finished.wait(grace):
                _end_now(code)
            return


def _end_now(code: int) -> None:
    """Remove the temporary files being written, say why, end the process."""
    with _temporaries_lock:
        for temporary in list(_temporaries):
            with suppress(OSError):
                os.unlink(temporary)
    with suppress(OSError):
        os.write(
            2, b"skdfm: terminated (inside native code; temporary files removed)\n"
        )
    os._exit(code)


class ModelFileError(ValueError):
    """A model file is damaged, foreign or holds something skdfm does not load."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"Model file {self.path!r} {problem}")

    def __reduce__(self):  # picklable across processes (joblib workers)
        return (type(self), (self.path, self.problem))
