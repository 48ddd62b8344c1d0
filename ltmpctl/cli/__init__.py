"""Command-line interface (thin: parses, calls the library, renders)."""
from .app import main

__all__ = ["main"]
