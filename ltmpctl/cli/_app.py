"""The Typer app object and the one place where domain errors become a one-line message and an exit code."""
from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from ..errors import LtmpctlError

app = typer.Typer(
    name="ltmpctl",
    help="Token reduction (LTMP, ToMe, top-k) for timm Vision Transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _width(stream: object) -> "int | None":
    """Rich fits tables into 80 columns when output is not a terminal, which folds the wide benchmark tables into
    unreadable stubs in logs and pipes; give those room instead. A terminal's own width, or COLUMNS, still wins."""
    if os.environ.get("COLUMNS") or getattr(stream, "isatty", lambda: False)():
        return None
    return 160


console = Console(soft_wrap=True, width=_width(sys.stdout))
err_console = Console(stderr=True, soft_wrap=True, width=_width(sys.stderr))


def main() -> None:
    # OpenMP's default spin-wait makes shared cores crawl (../shared/SETUP.md); passive waiting costs nothing here.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    from . import commands  # noqa: F401  (registers the commands)

    try:
        app()
    except LtmpctlError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
