"""Imports every command module so their `@app.command()` decorators register."""
from . import bench_cmd, compare_cmd, compress_cmd, core, export_cmd, recipe_cmd  # noqa: F401
