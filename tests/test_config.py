"""Recipe schema, precedence, error messages, dump round-trip, and the `ltmpctl recipe` commands."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ltmpctl.config import Recipe, config_hash, dump, load_yaml, resolve
from ltmpctl.errors import ConfigError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(*args, **kwargs)
    return info.value.message


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert "demo" in names
    assert {f"deit_{s}_{c}" for s in ("tiny", "small", "base") for c in ("ltmp", "tome", "topk")} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates(path: Path):
    recipe = resolve(path)
    assert recipe.compressor.name in {"ltmp", "tome", "topk"}
    if path.stem != "demo":
        model, compressor = path.stem.rsplit("_", 1)
        assert recipe.model.name == f"{model}_patch16_224" and recipe.model.pretrained
        assert recipe.compressor.name == compressor
        assert recipe.data.path == "imagenet"


def test_paper_settings():
    ltmp = resolve(RECIPES[0].with_name("deit_small_ltmp.yaml"))
    ft = ltmp.stages.finetune
    assert ltmp.target == 0.6 and ft.enabled and not ft.full
    assert (ft.epochs, ft.batch_size, ft.momentum, ft.lr_groups) == (1.0, 128, 0.0, {"merge": 5e-3, "prune": 5e-6})
    assert (ltmp.compressor.params["tau"], ft.lam, ft.label_smoothing) == (0.1, 10.0, 0.1)
    tome = resolve(RECIPES[0].with_name("deit_base_tome.yaml"))
    assert tome.compressor.params["r"] == 8 and not tome.stages.finetune.enabled
    topk = resolve(RECIPES[0].with_name("deit_tiny_topk.yaml"))
    assert max(topk.compressor.params["keep_rate"]) == 1.0 and min(topk.compressor.params["keep_rate"]) == 0.7
    assert not topk.stages.finetune.enabled


def test_defaults():
    r = resolve()
    assert isinstance(r, Recipe)
    assert (r.model.name, r.compressor.name, r.target, r.device, r.data.path) == ("demo", "ltmp", 0.5, "auto", "demo")
    assert r.stages.finetune.lr_groups == {} and not r.stages.export.enabled
    assert r.stages.bench.backends == ["torch"]
    # The plugin fills in its own defaults, so the resolved recipe shows every parameter.
    assert {"merge_threshold": 0.9, "prune_threshold": 0.0, "tau": 0.1}.items() <= r.compressor.params.items()


def test_misspelt_key(tmp_path):
    path = write(tmp_path, "stages:\n  finetune:\n    lr_grups: {merge: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        resolve(path)
    assert info.value.message.startswith("stages.finetune.lr_grups: unknown key")
    assert "lr_groups" in info.value.hint and f"{path}:3" in info.value.hint


def test_precedence(tmp_path):
    path = write(tmp_path, "target: 0.7\nseed: 3\nstages:\n  finetune:\n    epochs: 0.5\n    batch_size: 32\n")
    r = resolve(path)
    assert (r.target, r.seed, r.stages.finetune.epochs, r.stages.finetune.batch_size) == (0.7, 3, 0.5, 32)
    r = resolve(path, overrides={"target": 0.8, "stages.finetune.epochs": 0.25, "seed": None,
                                 "data": {"path": "/imagenet", "workers": None}})
    assert (r.target, r.seed, r.stages.finetune.epochs, r.stages.finetune.batch_size) == (0.8, 3, 0.25, 32)
    assert r.data.path == "/imagenet" and r.data.workers == 0
    r = resolve(path, overrides={"target": 0.8}, sets=["target=0.9", "stages.finetune.max_steps=10"])
    assert (r.target, r.stages.finetune.max_steps, r.stages.finetune.epochs) == (0.9, 10, 0.5)


def test_set_later_wins_and_parses_yaml():
    r = resolve(sets=["seed=1", "seed=2", "stages.bench.batch_sizes=[1, 8]", "stages.export.enabled=true",
                      "model.kwargs.img_size=32", "out=runs/x", "compressor.params.tau=0.2"])
    assert r.seed == 2 and r.stages.bench.batch_sizes == [1, 8] and r.stages.export.enabled
    assert r.model.kwargs == {"img_size": 32} and r.out == "runs/x" and r.compressor.params["tau"] == 0.2
    reset = resolve(sets=["stages.finetune.max_steps=5", "stages.finetune.max_steps=null"])
    assert reset.stages.finetune.max_steps is None


def test_switching_compressor_drops_its_params(tmp_path):
    path = write(tmp_path, "compressor:\n  name: ltmp\n  params:\n    merge_threshold: 0.8\n")
    assert resolve(path, sets=["compressor.name=tome"]).compressor.params["r"] == 8
    assert resolve(path, overrides={"compressor.name": "topk"}).compressor.name == "topk"


@pytest.mark.parametrize("item, start", [
    ("seed=abc", "seed: "),
    ("stages.finetune.epochs=[1]", "stages.finetune.epochs: "),
    ("stages.finetune.batch_size=1.5", "stages.finetune.batch_size: "),
    ("device=gpu", "device: "),
    ("stages.export.formats=[onnx, tflite]", "stages.export.formats.1: "),
    ("threads=0", "threads: "),
])
def test_set_type_errors(item, start):
    assert error_of(sets=[item]).startswith(start)


@pytest.mark.parametrize("item, message", [
    ("stages.finetune.lr_max=1", "stages.finetune.lr_max: unknown key"),
    ("nope=1", "nope: unknown key"),
    ("stages.warp.enabled=true", "stages.warp: unknown key"),
    ("target.x=1", "target.x: unknown key"),
])
def test_set_unknown_path(item, message):
    assert error_of(sets=[item]) == message


@pytest.mark.parametrize("item", ["seed", "=3", "stages..seed=1", ""])
def test_set_malformed(item):
    assert "expected PATH=VALUE" in error_of(sets=[item])


@pytest.mark.parametrize("value", [0, -0.1, 1.01])
def test_target_out_of_range(value):
    assert error_of(sets=[f"target={value}"]) == "target: must be in (0, 1]"


def test_target_one_is_allowed():
    assert resolve(sets=["target=1"]).target == 1.0


@pytest.mark.parametrize("sets, start", [
    (["compressor.name=tome", "compressor.params.r=-1"], "compressor.params.r: "),
    (["compressor.name=tome", "compressor.params.speed=2"], "compressor.params.speed: unknown key"),
    (["compressor.name=topk", "compressor.params.keep_rate=1.5"], "compressor.params.keep_rate: "),
    (["compressor.params.merge_threshold=2"], "compressor.params.merge_threshold: "),
    (["compressor.name=tokenator"], "compressor.name: unknown compressor"),
])
def test_compressor_errors(sets, start):
    assert error_of(sets=sets).startswith(start)


def test_data_checks():
    assert error_of(sets=["data.input_size=[3, 224]"]).startswith("data.input_size: ")
    assert error_of(sets=["data.input_size=[1, 28, 28]", "data.mean=[0.1, 0.2]"]).startswith("data: mean has 2")
    assert error_of(sets=["data.std=[0.0]"]).startswith("data.std: ")


def test_dump_round_trip(tmp_path):
    source = RECIPES[0].with_name("deit_tiny_topk.yaml")
    r = resolve(source, sets=["seed=7", "stages.export.formats=[onnx, torchscript]"])
    again = resolve(write(tmp_path, dump(r)))
    assert again == r
    assert dump(again) == dump(r)


def test_config_hash_ignores_out_only():
    base = resolve()
    assert config_hash(base) == config_hash(resolve(sets=["out=somewhere"]))
    assert config_hash(base) != config_hash(resolve(sets=["seed=1"]))
    assert len(config_hash(base)) == 12


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError) as info:
        load_yaml(write(tmp_path, "model:\n  name: demo\n  bad: [1, 2\n"))
    assert info.value.message.startswith(f"{tmp_path / 'r.yaml'}:") and "invalid YAML" in info.value.message
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(write(tmp_path, "- a\n- b\n"))
    assert load_yaml(write(tmp_path, "")) == {}


def ltmpctl_exe() -> str:
    return shutil.which("ltmpctl") or str(Path(sys.executable).with_name("ltmpctl"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "passive", "COLUMNS": "200"}
    return subprocess.run([ltmpctl_exe(), *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_validate(tmp_path):
    good = RECIPES[0].with_name("demo.yaml")
    bad = write(tmp_path, "stages:\n  finetune:\n    lr_max: 0.1\n")
    ok = run_cli("recipe", "validate", str(good))
    assert ok.returncode == 0, ok.stderr
    assert f"{good}: ok (compressor ltmp, target 0.5)" in ok.stdout
    fail = run_cli("recipe", "validate", str(bad), "--set", "seed=2")
    assert fail.returncode != 0
    lines = fail.stderr.strip().splitlines()
    assert len(lines) == 1 and "stages.finetune.lr_max: unknown key" in lines[0]
    assert "Traceback" not in fail.stderr + fail.stdout


def test_cli_show(tmp_path):
    # In-process (CliRunner): a subprocess per case would pay torch's import each time.
    import json

    from typer.testing import CliRunner

    from ltmpctl.cli import recipe_cmd  # noqa: F401  (registers `recipe`)
    from ltmpctl.cli._app import app

    demo = str(RECIPES[0].with_name("demo.yaml"))
    shown = CliRunner().invoke(app, ["recipe", "show", demo, "--set", "seed=5"])
    assert shown.exit_code == 0, shown.output
    assert resolve(write(tmp_path, shown.output)).seed == 5  # piped output is itself a valid recipe
    as_json = CliRunner().invoke(app, ["recipe", "show", demo, "--json"])
    assert json.loads(as_json.output)["stages"]["evaluate"]["images"] == 2000
    bad = CliRunner().invoke(app, ["recipe", "show", demo, "--set", "target=2"])
    assert isinstance(bad.exception, ConfigError) and bad.exception.message == "target: must be in (0, 1]"
