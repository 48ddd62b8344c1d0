"""`ltmpctl plugins`, `models`, `doctor`, and one-line errors (never a traceback) from every command taking a model."""
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import ltmpctl.cli.commands  # noqa: F401  (registers the commands)
from ltmpctl.cli import app
from ltmpctl.cli._app import main

runner = CliRunner()
MODEL_COMMANDS = ("flops", "bench", "compress")
registered = {c.name or c.callback.__name__ for c in app.registered_commands}


def test_plugins_table_lists_builtins():
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    for name in ("ltmp", "tome", "topk", "merge_threshold", "keep_rate"):
        assert name in result.stdout


def test_models_filters_aliases_and_timm_names():
    result = runner.invoke(app, ["models", "deit", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["deit_tiny"] == {"name": "deit_tiny", "kind": "alias", "what": "= deit_tiny_patch16_224"}
    assert rows["deit_small_patch16_224"]["kind"] == "timm"
    assert "vit_tiny" not in rows and "demo" not in rows
    assert runner.invoke(app, ["models", "deit"]).exit_code == 0


def test_models_demo_is_not_called_an_imagenet_model():
    rows = {r["name"]: r for r in json.loads(runner.invoke(app, ["models", "--json"]).stdout)}
    assert "Fashion-MNIST" in rows["demo"]["what"]
    assert "not an ImageNet model" in rows["demo"]["what"]
    assert rows["vit_base"]["what"] == "= vit_base_patch16_224"


def test_doctor_json():
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["versions"]["torch"] and report["versions"]["timm"] and report["versions"]["python"]
    assert "executorch" in report["versions"]
    assert report["torch_threads"] >= 1
    assert "CPUExecutionProvider" in report["onnxruntime_providers"]
    assert set(report["adb"]) == {"path", "version"}
    assert isinstance(report["cuda"]["available"], bool)
    assert isinstance(report["demo_data"]["found"], bool) and report["cache_dir"]
    assert runner.invoke(app, ["doctor"]).exit_code == 0


def _run_main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ltmpctl", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("model, message", [("resnet50", "not a timm VisionTransformer"),
                                            ("no_such_model", "unknown model 'no_such_model'")])
def test_bad_model_is_one_line(monkeypatch, capsys, command, model, message):
    if command not in registered:
        pytest.skip(f"`ltmpctl {command}` is not registered in this build")
    code, err = _run_main(monkeypatch, capsys, [command, model])
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_flops_rejects_a_directory_that_is_not_a_run(monkeypatch, capsys, tmp_path):
    code, err = _run_main(monkeypatch, capsys, ["flops", str(tmp_path)])
    assert code != 0 and "resolved.yaml" in err and len(err.strip().splitlines()) == 1


def test_flops_param_without_compressor(monkeypatch, capsys):
    code, err = _run_main(monkeypatch, capsys, ["flops", "demo", "--param", "r=4"])
    assert code != 0 and "--param needs --compressor" in err


def test_bad_model_from_a_real_process():
    """The user-facing path (`python -m ltmpctl`): one line on stderr, exit 2, no traceback."""
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    done = subprocess.run([sys.executable, "-m", "ltmpctl", "flops", "resnet50"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: ResNet is not a timm VisionTransformer (ltmpctl compresses ViT/DeiT models; `ltmpctl models` "
        "lists them)"]
