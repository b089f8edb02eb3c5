"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A reader sees the old file or the new one, never half of one, even when the writer is killed mid-write.
A write that fails for want of room (a full disk, the file-size limit, a quota) raises :class:`WriteError`, one
line naming the file and the cause, whichever writer (``torch.save``, PIL, ``json``) hit it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from robustcnn.errors import WriteError


#: Plain words for the errors a write hits when there is no room; other OS errors keep their own text.
_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large (the file-size limit was reached)",
           errno.EDQUOT: "disk quota exceeded"}


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace ``path`` with what ``write(file)`` writes; on any failure ``path`` is left as it was.

    The file gets the permissions a plain ``open`` would give it (``0o666`` less the umask), not the owner-only
    ones of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    recording: Optional[_RecordingFile] = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            recording = _RecordingFile(handle)
            write(recording)
            recording.finished = True
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        failure = write_failure(path, exc, recording)
        if failure is not None:
            raise failure from None
        raise
    return path


class _RecordingFile:
    """A binary file that remembers the OS error its last failed write hit. Writers such as ``torch.save`` turn
    that error into their own message ("unexpected pos ..."); the recorded one says what really happened."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self.error: Optional[OSError] = None
        self.finished = False  # set once the writer returned: later errors (flush, fsync, rename) are the file's

    def write(self, data) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def write_failure(path: Path, exc: BaseException, recording: Optional[_RecordingFile] = None) -> Optional[WriteError]:
    """The :class:`WriteError` for a write of ``path`` that failed with ``exc``, or None when the failure is not the
    target file's: a bug, an interruption, or an error of the writer's own (reading its source, say) stays what it
    is."""
    cause = getattr(recording, "error", None)
    if cause is None and isinstance(exc, OSError) and (recording is None or recording.finished):
        cause = exc
    if cause is None or not isinstance(exc, Exception):
        return None
    why = _CAUSES.get(cause.errno) or cause.strerror or str(cause)
    return WriteError(f"cannot write {path}: {why}; any earlier version of the file is unchanged")


def _umask() -> int:
    """The process's umask (read by setting it and putting it back; there is no other portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

