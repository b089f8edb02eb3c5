"""Writing output files safely: atomically, only over files robustcnn wrote, one writer per path at a time.

- :func:`atomic_write`: a temporary file in the target's folder, then ``os.replace``. A reader sees the old file or
  the new one, never half of one, even when the writer is killed mid-write.
- :func:`refuse_foreign` / :func:`is_ours`: a path that already holds a file robustcnn did not write (the user's own
  ``report.md``, a picture, a model of another tool) is never replaced. Our files are recognised by their content,
  so a rerun may replace its own earlier output.
- :class:`OutputLock`: an exclusive ``flock`` on a lock file next to an output, held while a command writes it, so
  two runs never write the same checkpoint or report folder at once. The operating system releases the lock when
  its process dies, so a lock file left behind by a killed run never blocks a later one.

A write that fails for want of room (a full disk, the file-size limit, a quota) raises :class:`WriteError`, one
line naming the file and the cause, whichever writer (``torch.save``, PIL, ``json``) hit it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

from robustcnn.errors import ForeignFileError, OutputBusyError, WriteError

#: Plain words for the errors a write hits when there is no room; other OS errors keep their own text.
_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large (the file-size limit was reached)",
           errno.EDQUOT: "disk quota exceeded"}
#: The "Software" text every PNG robustcnn writes carries, so that a later run recognises the picture as its own.
PNG_SOFTWARE = "robustcnn"
#: How every Markdown file robustcnn writes (a report's tables) begins.
MARKDOWN_TITLE = "# Robustness report"
#: The generator tag in the head of every HTML page robustcnn writes (a report's page).
HTML_GENERATOR = '<meta name="generator" content="robustcnn">'


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


# -- whose file is it ----------------------------------------------------------------------------------------------
def _ours_torch(path: Path) -> bool:
    """A checkpoint, a report's resume state, or a patch tensor whose PNG next to it is ours."""
    import torch

    from robustcnn.checkpoint import FORMAT

    doc = torch.load(path, weights_only=True, map_location="cpu")
    if isinstance(doc, dict):
        return doc.get("format") == FORMAT or {"request", "stages"} <= doc.keys()
    return isinstance(doc, torch.Tensor) and is_ours(path.with_suffix(".png"))


def png_tag():
    """The text chunk that marks a PNG written with PIL as robustcnn's (``img.save(..., pnginfo=png_tag())``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    return info


def _ours_png(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as img:
        return img.format == "PNG" and img.info.get("Software") == PNG_SOFTWARE


def _ours_json(path: Path) -> bool:
    """A JSON object that names the robustcnn version which wrote it (``{"versions": {"robustcnn": ...}}``)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    return isinstance(doc, dict) and isinstance(doc.get("versions"), dict) and "robustcnn" in doc["versions"]


def _ours_markdown(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        return handle.readline().startswith(MARKDOWN_TITLE)


def _ours_html(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        return HTML_GENERATOR in handle.read(4096)


_RECOGNISERS: dict[str, Callable[[Path], bool]] = {
    ".pt": _ours_torch, ".pth": _ours_torch, ".png": _ours_png, ".json": _ours_json, ".md": _ours_markdown,
    ".html": _ours_html,
}


def is_ours(path: str | Path) -> bool:
    """Whether ``path`` is a file robustcnn wrote, judged by its content: a checkpoint or a report's resume state
    (``.pt``), a patch tensor next to a PNG of ours, a PNG whose "Software" text is :data:`PNG_SOFTWARE`, a JSON
    object naming robustcnn's version under ``versions``, a Markdown report, a report page carrying
    :data:`HTML_GENERATOR`. Anything else is not: a folder, an unreadable or damaged file, a file of any other
    kind."""
    path = Path(path)
    recognise = _RECOGNISERS.get(path.suffix.lower())
    if recognise is None or not path.is_file():
        return False
    try:
        return recognise(path)
    except Exception:  # foreign or damaged bytes fail to parse in many ways; every one means "not ours"
        return False


def refuse_foreign(*paths: str | Path, option: str = "--out") -> None:
    """Raise :class:`ForeignFileError` (one line, naming the file) for the first of ``paths`` that exists and is
    not a file robustcnn wrote (:func:`is_ours`); paths that do not exist yet are fine. ``option`` is the option
    the message tells the user to change."""
    for path in map(Path, paths):
        if os.path.lexists(path) and not is_ours(path):
            what = "a folder" if path.is_dir() else "a file robustcnn did not write"
            raise ForeignFileError(f"{path} is {what}: refusing to replace it (move it away or choose another "
                                   f"{option})")


# -- one writer per output -----------------------------------------------------------------------------------------
def lock_file(target: str | Path) -> Path:
    """The lock file of an output (a file or a folder): ``.<name>.lock`` next to it."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


class OutputLock:
    """Holds ``target`` (an output file or folder) for this process while a ``with`` block writes it.

    Entering takes an exclusive, non-blocking ``flock`` on :func:`lock_file` and writes this process's id into it;
    if another process holds it, :class:`OutputBusyError` names the path and that process. Leaving removes the lock
    file and releases the lock. The lock belongs to the open file, so the operating system drops it when the holder
    dies in any way; a lock file a killed run left behind is taken over by the next run. ``enabled=False`` makes it
    a no-op (ranks of a distributed run that write nothing).
    """

    def __init__(self, target: str | Path, *, enabled: bool = True) -> None:
        self.target, self.path, self.enabled = Path(target), lock_file(target), enabled
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputBusyError(f"another robustcnn run is writing {self.target} ({holder}); wait for it or "
                                      "choose another --out") from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have removed the file between our open and our flock: then we hold a lock
            # on a file nobody else can see, and must lock the one now at the path instead.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        with contextlib.suppress(OSError):  # the process id only helps the message; a full disk must not stop us
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # removed while still locked, so no other process can hold it meanwhile
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def claim_outputs(*paths: str | Path, option: str = "--out") -> Iterator[None]:
    """Hold every one of ``paths`` for the block (:class:`OutputLock`) after refusing any of them that holds a file
    robustcnn did not write (:func:`refuse_foreign`): what a command calls before it starts the work whose results
    it will write there."""
    with contextlib.ExitStack() as held:
        for path in paths:
            held.enter_context(OutputLock(path))
        refuse_foreign(*paths, option=option)
        yield


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> str:
    """``pid N`` of the process holding the lock file ``fd`` (as far as it wrote it)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"
