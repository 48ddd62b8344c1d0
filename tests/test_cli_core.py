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
def test_bad_model_is_one_line(monkeypatch, capsys, tmp_path, command, model, message):
    assert command in registered, f"`ltmpctl {command}` is not registered"
    monkeypatch.chdir(tmp_path)  # a command that makes run directories makes them here
    code, err = _run_main(monkeypatch, capsys, [command, model])
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    # compress announces its stages ("> model") before it gets to the model; the error itself is one line.
    progress = [line for line in lines if line.startswith("> ")] if command == "compress" else []
    assert [line for line in lines if line not in progress] == [lines[-1]], err
    assert lines[-1].startswith("error: ") and message in lines[-1]


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


def test_flops_on_a_run_dir_reads_its_data_and_writes_flops_json(monkeypatch, tmp_path):
    """A run directory goes through ltmpctl.runs.load_run (stubbed: the models are tiny) and its own data."""
    import copy

    from PIL import Image
    from conftest import tiny_vit

    import ltmpctl
    import ltmpctl.runs

    for i, label in enumerate(("a", "a", "b")):
        (tmp_path / "data" / "val" / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(tmp_path / "data" / "val" / label / f"{i}.png")
    run = tmp_path / "run"
    run.mkdir()
    (run / "resolved.yaml").write_text("model: {name: vit_tiny}\n")
    base = tiny_vit()
    compressed = ltmpctl.apply(copy.deepcopy(base), "ltmp", merge_threshold=0.5, prune_threshold=0.01)
    cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
           "crop_pct": 1.0, "crop_mode": "center"}
    info = {"compressor": "ltmp", "data": {"path": str(tmp_path / "data"), "batch_size": 64, "workers": 2},
            "data_config": cfg, "input_size": [3, 32, 32]}
    monkeypatch.setattr(ltmpctl.runs, "load_run", lambda d: (base, compressed, info))

    result = runner.invoke(app, ["flops", str(run), "--images", "5"])
    assert result.exit_code == 0, result.output
    doc = json.loads((run / "flops.json").read_text())
    assert doc["images"] == 3 and doc["images_source"].startswith("3 images from")  # all the folder holds
    assert doc["compressed"]["data_dependent"] and "tokens_attn_p90" in doc["compressed"]["blocks"][0]
    assert doc["ok"]
    refused = runner.invoke(app, ["flops", str(run), "--compressor", "tome"])
    assert refused.exit_code != 0


def test_summary_table_shows_the_speedup_over_the_base():
    from rich.console import Console

    from ltmpctl.cli.compress_cmd import render_summary

    row = {"top1": 80.0, "top5": 95.0, "gmacs": 1.0, "flops_ratio": 1.0, "images_per_s": 100.0}
    summary = {"model": "m", "compressor": "ltmp", "target": 0.5, "base": row,
               "compressed": dict(row, gmacs=0.5, flops_ratio=0.5, images_per_s=250.0)}
    console = Console(record=True, width=120)
    console.print(render_summary(summary))
    lines = console.export_text().splitlines()
    assert "speedup" in lines[2]
    assert [line.split()[-2] for line in lines if "base" in line or "compressed" in line] == ["1.00x", "2.50x"]
    console.print(render_summary(dict(summary, base=None)))  # no base evaluated: nothing to compare with
    assert [line for line in console.export_text().splitlines() if "compressed" in line][0].split()[-2] == "-"
