"""The Typer app object and the one place where domain errors become a one-line message and an exit code."""
from __future__ import annotations

import os
import sys
import traceback

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


DEBUG_FLAG = "--debug"  # anywhere on the command line: show the traceback behind an error
INTERNAL_EXIT = 1  # an error ltmpctl did not expect (a bug, or a case it does not know yet)
OS_EXIT = 5  # an operating-system error nobody translated: the same code as WriteError


def _error(debug: bool, line: str, code: int) -> None:
    """Print the one error line (after the traceback of the error being handled, with --debug) and exit."""
    if debug:
        traceback.print_exc()
    err_console.print(f"[bold red]error:[/] {line}", highlight=False, markup=True)
    sys.exit(code)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def main() -> None:
    # OpenMP's default spin-wait makes shared cores crawl (../shared/SETUP.md); passive waiting costs nothing here.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    debug = DEBUG_FLAG in sys.argv[1:]
    if debug:
        sys.argv = [a for a in sys.argv if a != DEBUG_FLAG]
    from . import commands  # noqa: F401  (registers the commands)

    # The one place errors become text: a domain error is its own message and fix; anything else is still one
    # line (the traceback is for --debug), so scripts and people never see a wall of frames.
    try:
        app()
    except LtmpctlError as e:
        _error(debug, str(e).replace("\n", " "), e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _error(debug, f"{where}{e.strerror or _first_line(e)} (check the path, the free space and the "
               "permissions)", OS_EXIT)
    except Exception as e:  # noqa: BLE001  (the last line of defence: one line, never a traceback)
        what = f"{type(e).__name__}: {_first_line(e)}".rstrip(": ")
        _error(debug, f"unexpected {what} (rerun with {DEBUG_FLAG} for the traceback)", INTERNAL_EXIT)
