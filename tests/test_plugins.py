"""Third-party compressors register through the `ltmpctl.compressors` entry-point group, like the built-ins, and
go through every stage on the contract alone (`Compressor`'s hooks), with no stage knowing their name.

Each test pip-installs a throwaway distribution into tmp_path (no network, no build isolation) and puts it on the
path only for the code under test.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ltmpctl
import ltmpctl.cli.commands  # noqa: F401  (registers the commands)
from conftest import tiny_vit
from ltmpctl import registry
from ltmpctl.cli import app
from ltmpctl.errors import PluginError

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


THIRD_PARTY = Path(__file__).parent / "third_party"


def _pip_install(tmp_path: Path, pkg: Path) -> Path:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--target", str(site), str(pkg)], check=True, capture_output=True, timeout=300)
    return site


def install_dist(tmp_path: Path, dist: str, entry: str, source: str = PLUGIN_SOURCE) -> Path:
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
    (pkg / f"{module}.py").write_text(source.format(name=entry))
    return _pip_install(tmp_path, pkg)


def run_cli(site: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed `ltmpctl` CLI in a fresh process that sees the distribution installed in `site`."""
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_WAIT_POLICY": "passive"}
    return subprocess.run([sys.executable, "-m", "ltmpctl", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=cwd)


def test_third_party_plugin_listed_with_its_source(tmp_path):
    """The user-facing path: the installed `ltmpctl` CLI in a fresh process sees the plugin's entry point."""
    site = install_dist(tmp_path, "ltmpctl-shout", "shout")
    done = run_cli(site, "plugins", "--json")
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
    monkeypatch.syspath_prepend(str(site))
    registry.reload()  # the registry is read once per process: this one must see the clash
    monkeypatch.setattr(sys, "argv", ["ltmpctl", "plugins"])
    from ltmpctl.cli._app import main

    try:
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "'tome'" in err and "builtin" in err and "ltmpctl-clash 0.0.1" in err
        with pytest.raises(PluginError, match="registered twice"):
            ltmpctl.apply(tiny_vit(), "tome", r=2)  # ambiguous: neither registration is used
        assert registry.get("topk").name == "topk"  # the others are unaffected
    finally:
        monkeypatch.undo()
        registry.reload()


BROKEN_SOURCE = "import a_module_that_does_not_exist  # {name}\n"


def test_broken_plugin_is_reported_and_breaks_only_itself(tmp_path):
    site = install_dist(tmp_path, "ltmpctl-broken", "broken", BROKEN_SOURCE)
    listed = run_cli(site, "plugins")
    assert listed.returncode == 2
    err = listed.stderr.strip().splitlines()
    assert len(err) == 1 and "'broken'" in err[0] and "ltmpctl-broken 0.0.1" in err[0], listed.stderr
    assert "ModuleNotFoundError" in err[0] and "a_module_that_does_not_exist" in err[0]
    assert "tome" in listed.stdout and "Traceback" not in listed.stderr
    as_json = {r["name"]: r for r in json.loads(run_cli(site, "plugins", "--json").stdout)}
    assert "error" in as_json["broken"] and as_json["tome"]["source"] == "builtin"
    code = ("import ltmpctl, sys; sys.path.insert(0, 'tests'); from conftest import tiny_vit; "
            "m = ltmpctl.apply(tiny_vit(), 'tome', r=2); print(type(m).__name__); ltmpctl.apply(tiny_vit(), 'broken')")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_WAIT_POLICY": "passive"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.stdout.strip() == "CompressedVisionTransformer", done.stderr
    assert "PluginError: compressor 'broken' from ltmpctl-broken 0.0.1 failed to load" in done.stderr


def test_registry_scans_entry_points_once(monkeypatch):
    calls = []
    real = registry.entry_points
    monkeypatch.setattr(registry, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    registry.reload()
    try:
        for name in ("ltmp", "tome", "topk", "tome"):
            ltmpctl.apply(tiny_vit(), name)
        registry.discover()
        assert len(calls) == 1
    finally:
        monkeypatch.undo()
        registry.reload()


def test_plugin_parameter_types_are_readable():
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    params = {r["name"]: {p["name"]: p for p in r["params"]} for r in json.loads(result.stdout)}
    assert params["tome"]["r"]["type"] == "int | list[int]"
    assert params["tome"]["r"]["default"] == 8
    assert params["topk"]["importance"]["type"] == "'mean' | 'cls'"
    assert params["ltmp"]["merge_threshold"]["description"]


DEMO_DATA = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.mark.skipif(not DEMO_DATA.exists(), reason="needs Fashion-MNIST (apt package dataset-fashion-mnist)")
def test_third_party_compressor_goes_through_every_stage(tmp_path):
    """tests/third_party/ltmpctl-normprune, installed as a package: calibrate -> fine-tune (its own loss, groups and
    clamp) -> re-fit -> evaluate -> flops -> export (ONNX, verified) -> bench (torch and onnxruntime), all through
    the public CLI, on the contract alone; then the run reopens for `ltmpctl bench RUN`."""
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    site = _pip_install(tmp_path, Path(shutil.copytree(THIRD_PARTY / "ltmpctl-normprune", tmp_path / "src")))
    run_dir = tmp_path / "run"
    sets = {"stages.finetune.max_steps": 3, "stages.finetune.batch_size": 32, "stages.calibrate.images": 256,
            "stages.calibrate.tolerance": 0.005,
            "stages.evaluate.images": 256, "stages.flops.images": 2, "stages.export.enabled": "true",
            "stages.bench.enabled": "true", "stages.bench.backends": "[torch, onnxruntime]",
            "stages.bench.batch_sizes": "[1, 2]", "stages.bench.repeats": 2, "stages.bench.warmup": 1}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    done = run_cli(site, "compress", "demo", "-c", "normprune", "--target", "0.6", "--out", str(run_dir), "--json",
                   "--threads", "2", *args)
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout)
    assert s["compressor"] == "normprune"
    assert abs(s["flops_ratio"] - 0.6) <= 0.02, s["flops_ratio"]  # measured on the val images, not calibrated on
    assert s["calibration"]["searched"].startswith("threshold") and s["recalibration"]["searched"].startswith("shift")
    learned = s["params"]["threshold"]
    assert len(learned) == 6 and len(set(learned)) > 1  # one threshold per block, trained apart
    assert s["finetune"]["steps"] == 3 and 0 < s["finetune"]["final_train_flops_ratio"] < 1
    assert s["flops"]["ok"] and 0 < s["flops"]["flops_ratio"] < 1
    (onnx,) = s["export"]
    assert onnx["format"] == "onnx" and onnx["passed"] and onnx["data_dependent"]
    backends = {(r["compressed"]["backend"], r["compressed"]["batch"]) for r in s["bench"]}
    assert backends == {("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)}
    assert all(r["compressed"]["input"] == "run images" for r in s["bench"])
    again = run_cli(site, "bench", str(run_dir), "--local", "--batch", "1", "--repeats", "2", "--warmup", "1",
                    "--json")
    assert again.returncode == 0, again.stderr
    row = json.loads(again.stdout)["rows"][-1]
    assert row["model"] == "compressed" and row["input"] == "run images"
    assert row["flops_ratio"] == pytest.approx(s["flops_ratio"])
