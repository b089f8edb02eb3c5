"""The ``robustcnn`` Typer application: the root app, and the commands it registers.

The command modules define plain functions (and the ``patch`` sub-app); this module imports them and registers
them, so the imports run one way. How failures end (one line, an exit code) is :mod:`cli.errors`.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

import robustcnn
from cli.commands import attack, patch, report, train
from cli.errors import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    name="robustcnn",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Train CNNs and find out, honestly and fast, how much of their accuracy survives an attacker.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"robustcnn {robustcnn.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Train CNNs and find out, honestly and fast, how much of their accuracy survives an attacker."""


app.command("attack")(attack.attack_cmd)
app.command("attacks")(attack.attacks_cmd)
app.command("report")(report.report_cmd)
app.command("train")(train.train_command)
app.command("eval")(train.eval_command)
app.add_typer(patch.patch_app, name="patch")


def main() -> None:
    """Console-script entry point."""
    app()
