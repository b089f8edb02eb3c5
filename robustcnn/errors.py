"""Errors the training core raises on purpose.

The CLI maps them to exit codes: :class:`UsageError` -> 2 (the user asked for something invalid),
any other :class:`RobustCNNError` -> 1 (the request was valid but could not be carried out: a missing file,
a corrupt checkpoint, a dataset that cannot be found).
"""

from __future__ import annotations

import difflib


class RobustCNNError(Exception):
    """Base class of every error the library raises deliberately. Exit code 1 in the CLI."""

    exit_code = 1


class UsageError(RobustCNNError, ValueError):
    """An invalid option or value (unknown model, non-positive epochs, ...). Exit code 2 in the CLI."""

    exit_code = 2


class DataNotFoundError(RobustCNNError):
    """A dataset's files were found nowhere and could not be downloaded."""


class CheckpointError(RobustCNNError):
    """A checkpoint is missing, truncated, not a robustcnn checkpoint, or does not match the request."""


class WriteError(RobustCNNError):
    """A file could not be written (no space left, file too large, ...); the file it was to replace is unchanged."""


class ForeignFileError(UsageError):
    """An output path holds a file robustcnn did not write; it is never replaced (exit code 2: choose another path)."""


class OutputBusyError(RobustCNNError):
    """Another robustcnn process is writing the same output path (exit code 1: wait for it, or write elsewhere)."""


def check_choice(what: str, value: str, choices: "tuple[str, ...] | list[str]") -> str:
    """Return ``value`` (normalised to lower case) if it is one of ``choices``, else raise :class:`UsageError`.

    The message names the closest choices, e.g. ``unknown model 'vgq': did you mean 'vgg'? (choose from ...)``.
    """
    key = str(value).strip().lower()
    if key in choices:
        return key
    close = difflib.get_close_matches(key, choices, n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UsageError(f"unknown {what} {value!r}: {hint}(choose from {', '.join(choices)})")
