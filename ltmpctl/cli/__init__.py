"""Command-line interface: thin Typer commands that call the library and render with rich."""
from ._app import app, main

__all__ = ["app", "main"]
