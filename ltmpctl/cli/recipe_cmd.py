"""`ltmpctl recipe validate|show`: check a recipe and print it fully resolved."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.syntax import Syntax

from ..config import dump, resolve, to_dict
from ..errors import ConfigError
from ._app import app, console

recipe_app = typer.Typer(help="Check recipes and print them fully resolved.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="PATH=VALUE", help="Override one key, e.g. --set stages.finetune.epochs=0.5 "
                 "(repeatable; the value is read as YAML)."),
]


@recipe_app.command("validate")
def validate(
    files: Annotated[list[Path], typer.Argument(help="Recipe YAML file(s).", show_default=False)],
    sets: SetOption = None,
) -> None:
    """Check recipes against the schema and the compressor's parameters; stops at the first invalid one."""
    for file in files:
        try:
            recipe = resolve(file, sets=sets or [])
        except ConfigError as e:
            # Name the file only when several are checked; with one, the message already is about it.
            raise (ConfigError(f"{file}: {e.message}", e.hint) if len(files) > 1 else e) from None
        console.print(f"{file}: ok (compressor {recipe.compressor.name}, target {recipe.target:g})",
                      highlight=False, markup=False)


@recipe_app.command("show")
def show(
    file: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    sets: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
) -> None:
    """Print the recipe with every default filled in (what a run would use)."""
    recipe = resolve(file, sets=sets or [])
    if as_json:
        typer.echo(json.dumps(to_dict(recipe), indent=2))
    elif console.is_terminal:
        console.print(Syntax(dump(recipe), "yaml", background_color="default"))
    else:
        # Plain text when piped, so the output can be saved and used as a recipe.
        typer.echo(dump(recipe), nl=False)
