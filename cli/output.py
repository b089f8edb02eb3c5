"""Where output goes: results on stdout (Rich tables or one JSON document), progress and errors on stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from robustcnn.jsonutil import json_safe

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def emit_json(doc: Any) -> None:
    """Print exactly one JSON document on stdout (and nothing else)."""
    sys.stdout.write(json.dumps(json_safe(doc), default=_json_default, indent=2) + "\n")
    sys.stdout.flush()


def progress_enabled(json_mode: bool) -> bool:
    return not json_mode and stderr.is_terminal


@contextmanager
def progress(json_mode: bool, *extra_columns: Any) -> Iterator[Progress]:
    """A Rich progress display on stderr; silent when stderr is not a terminal or ``--json`` is set."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra_columns,
    ]
    with Progress(*columns, console=stderr, disable=not progress_enabled(json_mode), transient=False) as bar:
        yield bar
