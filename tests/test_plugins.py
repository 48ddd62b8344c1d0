"""Third-party compressors register through the `ltmpctl.compressors` entry-point group, like the built-ins.

Each test pip-installs a throwaway distribution into tmp_path (no network, no build isolation) and puts it on the
path only for the code under test.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ltmpctl.cli.commands  # noqa: F401  (registers the commands)
from ltmpctl.cli import app

PLUGIN_SOURCE = '''
from pydantic import Field

from ltmpctl.compressor import Compressor, Params, TokenBlock


class ShoutParams(Params):
    volume: int = Field(11, description="how loud")


class Shout(Compressor):
    """shout: reduces nothing, loudly."""

    name = "{name}"
    Params = ShoutParams
    block_class = TokenBlock

    @classmethod
    def identity_params(cls) -> dict:
        return {{}}

    def configure_block(self, block, index, depth, params) -> None:
        pass
'''


def install_dist(tmp_path: Path, dist: str, entry: str) -> Path:
    """Build and install distribution `dist` (version 0.0.1) registering compressor `entry`; returns its site dir."""
    module = dist.replace("-", "_")
    pkg = tmp_path / dist
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.0.1"

        [project.entry-points."ltmpctl.compressors"]
        {entry} = "{module}:Shout"

        [tool.setuptools]
        py-modules = ["{module}"]
    """))
    (pkg / f"{module}.py").write_text(PLUGIN_SOURCE.format(name=entry))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--target", str(site), str(pkg)], check=True, capture_output=True, timeout=300)
    return site


def test_third_party_plugin_listed_with_its_source(tmp_path):
    """The user-facing path: the installed `ltmpctl` CLI in a fresh process sees the plugin's entry point."""
    site = install_dist(tmp_path, "ltmpctl-shout", "shout")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_WAIT_POLICY": "passive"}
    done = subprocess.run([sys.executable, "-m", "ltmpctl", "plugins", "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["shout"]["source"] == "ltmpctl-shout 0.0.1"
    assert rows["shout"]["params"] == [{"name": "volume", "type": "int", "default": 11, "required": False,
                                       "description": "how loud"}]
    assert rows["shout"]["summary"] == "shout: reduces nothing, loudly."
    for name in ("ltmp", "tome", "topk"):
        assert rows[name]["source"] == "builtin"
    assert rows["ltmp"]["learnable"] and rows["ltmp"]["data_dependent"]
    assert not rows["tome"]["learnable"] and not rows["tome"]["data_dependent"]


def test_name_clash_names_both_sources(tmp_path, monkeypatch, capsys):
    site = install_dist(tmp_path, "ltmpctl-clash", "tome")
    monkeypatch.syspath_prepend(str(site))  # entry_points() reads sys.path on every call
    monkeypatch.setattr(sys, "argv", ["ltmpctl", "plugins"])
    from ltmpctl.cli._app import main

    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "'tome'" in err and "builtin" in err and "ltmpctl-clash 0.0.1" in err


def test_plugin_parameter_types_are_readable():
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    params = {r["name"]: {p["name"]: p for p in r["params"]} for r in json.loads(result.stdout)}
    assert params["tome"]["r"]["type"] == "int | list[int]"
    assert params["tome"]["r"]["default"] == 8
    assert params["topk"]["importance"]["type"] == "'mean' | 'cls'"
    assert params["ltmp"]["merge_threshold"]["description"]
