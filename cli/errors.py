"""How the CLI ends on failure: one line on stderr and an exit code.

2 for usage errors (bad option or value), 1 for runtime errors (missing file, corrupt checkpoint, dataset not
found), 130 for Ctrl-C. No tracebacks, unless ``ROBUSTCNN_DEBUG=1`` asks for them.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape
from typer.core import TyperGroup

from attacks import LabelRangeError, NonFiniteOutputError
from cli import output
from robustcnn.distributed import Forwarded
from robustcnn.errors import RobustCNNError, UsageError

try:  # Typer >= 0.20 vendors Click; older releases use the click package
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click import exceptions as _cx


def _rank() -> int:
    """This process's rank when ``torchrun`` started several (0 otherwise)."""
    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except (KeyError, ValueError):
        return 0


def one_line(text: str) -> str:
    """``text`` on one line: line breaks and other control characters (a file name may hold them) are shown as
    escapes such as ``\\n``, so an error message stays one line whatever paths it names."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: str, code: int, *, shared: bool = False) -> None:
    """One line on stderr, then exit. Under torchrun, ranks other than 0 stay silent about errors every rank has
    alike (``shared``: usage errors, interruptions, errors rank 0 forwarded): rank 0 says it once. Their own
    failures they report, prefixed with their rank."""
    rank = _rank()
    if rank and shared:
        sys.exit(code)
    if rank and not message.startswith("rank "):
        message = f"rank {rank}: {message}"
    output.stderr.print(f"[bold red]error:[/] {escape(one_line(message))}", markup=True, highlight=False,
                        soft_wrap=True)
    sys.exit(code)


class OneLineErrors(TyperGroup):
    """Runs the commands with Click's standalone mode off, so errors become one line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        try:
            rv = super().main(args=args, prog_name=prog_name or "robustcnn", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except _cx.NoArgsIsHelpError:  # a bare command: its help was already printed
            sys.exit(0)
        except _cx.UsageError as exc:
            where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
            fail(f"{where}{exc.format_message()}", 2, shared=True)
        except _cx.ClickException as exc:
            fail(exc.format_message(), exc.exit_code, shared=True)
        except (typer.Abort, KeyboardInterrupt):
            fail("interrupted", 130, shared=True)
        except RobustCNNError as exc:
            fail(str(exc), exc.exit_code, shared=isinstance(exc, (UsageError, Forwarded)) or exc.exit_code == 130)
        except (NonFiniteOutputError, LabelRangeError) as exc:  # the model does not fit the data
            fail(str(exc), 1)
        except OSError as exc:
            fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", 1)
        except Exception as exc:  # a bug: still one line, but say how to see more
            if os.environ.get("ROBUSTCNN_DEBUG"):
                raise
            fail(f"internal error ({type(exc).__name__}: {exc}); rerun with ROBUSTCNN_DEBUG=1 for the traceback", 1)
        sys.exit(rv if isinstance(rv, int) else 0)
