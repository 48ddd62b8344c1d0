"""The design card's commands as typed, in a folder holding one finished compress run under runs/:
`ltmpctl bench`, `ltmpctl bench --adb pixel7` (fake adb whose runners behave like the real binaries),
`ltmpctl compare ltmp tome`, plus devices.yaml, the per-block parameter table and `--model-kwargs a=1 b=2`.

The run is the 2-block 28x28 ViT of test_pipeline (about a second to compress); the one export it needs on demand
is ONNX (seconds), and the ExecuTorch path reuses a placed, verified program instead of a ~45 s lowering.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ltmpctl.cli.commands  # noqa: F401  (registers the commands)
from ltmpctl.bench import devconfig
from ltmpctl.bench.devices import AmbiguousDeviceError
from ltmpctl.bench.runners import RUN_IMAGES, bench_adb
from ltmpctl.bench.stats import SCHEMA
from ltmpctl.cli._app import main
from ltmpctl.cli._pairs import expand_pairs
from ltmpctl.errors import ConfigError
from ltmpctl.latest import finished_runs, latest_run
from ltmpctl.pipeline import run_compress

sys.path.insert(0, str(Path(__file__).parent))
from test_adb import FAKE_DIR, PIXEL7, PIXEL8  # noqa: E402
from test_pipeline import make_folder, recipe  # noqa: E402

ET_MS = [41.0, 39.5, 44.0, 40.25]  # per-run times the emulated runners print (cycled)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An "empty folder" after `ltmpctl compress`: one finished ltmp run under runs/ (plus the images it used)."""
    root = tmp_path_factory.mktemp("card")
    data = make_folder(root / "data")
    run_compress(recipe(data, root / "runs" / "20260101-000000-vit-ltmp-0.6"))
    return root


def _cli(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str,
                                                                                                      str]:
    monkeypatch.setattr(sys, "argv", ["ltmpctl", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err, cap.err
    return e.value.code or 0, cap.out, cap.err


@pytest.fixture
def phone(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """cwd = the folder with the run; the fake adb first on PATH with a Pixel 7 and emulated runners; a
    devices.yaml that names no runner yet (tests add them)."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}")
    scenario = {"devices": [PIXEL7], "root": str(tmp_path / "fs"), "log": str(tmp_path / "log.jsonl"),
                "runners": {name: {"emulate": name, "ms": ET_MS} for name in
                            ("executor_runner", "onnxruntime_perf_test", "speed_benchmark_torch")}}
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    monkeypatch.setenv("FAKE_ADB_SCENARIO", str(tmp_path / "scenario.json"))
    config = tmp_path / "devices.yaml"
    config.write_text("{}\n")
    monkeypatch.setenv(devconfig.ENV, str(config))
    bins = tmp_path / "bin"
    bins.mkdir()
    for name in ("executor_runner", "onnxruntime_perf_test", "speed_benchmark_torch"):
        (bins / name).write_bytes(b"\x7fELF fake runner")
    return {"config": config, "bins": bins, "log": tmp_path / "log.jsonl"}


def _runner_calls(log: Path) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, log.read_text().splitlines()) if "runner" in e]


# -- 1. bench with no target ---------------------------------------------------------------------------------------


def test_bench_without_target_uses_latest_run(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    run = latest_run()
    assert run.name == "20260101-000000-vit-ltmp-0.6" and finished_runs() == [run]
    code, out, err = _cli(["bench", "--repeats", "2", "--warmup", "0", "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert err.splitlines()[0] == f"benchmarking the latest finished run: {run}"
    doc = json.loads(out)
    assert [r["model"] for r in doc["rows"]] == ["base", "compressed"]
    assert {r["input"] for r in doc["rows"]} == {RUN_IMAGES} and doc["rows"][0]["repeats"] == 2
    # --run chooses, and gives the same run here; TARGET and --run together is one line.
    code, out, _ = _cli(["bench", "--run", str(run), "--repeats", "1", "--warmup", "0", "--json"], monkeypatch,
                        capsys)
    assert code == 0 and json.loads(out)["target"] == str(run)
    code, _, err = _cli(["bench", str(run), "--run", str(run)], monkeypatch, capsys)
    assert code == ConfigError.exit_code and err.startswith("error: give a TARGET or --run")


def test_bench_without_any_run_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(["bench"], monkeypatch, capsys)
    assert code == ConfigError.exit_code and len(err.strip().splitlines()) == 1
    assert "no finished run under runs/" in err and "ltmpctl compress demo --target 0.5" in err


# -- 1 + 2. bench --adb pixel7 on the run ----------------------------------------------------------------------------


def test_bench_adb_without_runner_is_one_line(phone: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(["bench", "--adb", "pixel7"], monkeypatch, capsys)
    assert code == ConfigError.exit_code, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("benchmarking the latest finished run")
    assert len(lines) == 2 and lines[1].startswith("error: no on-device runner for this run")
    assert "executor_runner" in lines[1] and str(phone["config"]) in lines[1] and "--runner" in lines[1]
    assert not phone["log"].exists()  # nothing was pushed, exported or run


def test_bench_adb_pixel7_exports_onnx_on_demand_and_pushes_run_images(
        workdir: Path, phone: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    phone["config"].write_text(f"default_device: pixel7\nrunners:\n  onnxruntime_perf_test: "
                               f"{phone['bins'] / 'onnxruntime_perf_test'}\n")
    run = latest_run(workdir / "runs")
    assert not (run / "export" / "model.onnx").exists()
    code, out, err = _cli(["bench", "--adb", "pixel7", "--taskset", "f0", "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert (run / "export" / "model.onnx").is_file()  # exported now ...
    verify = json.loads((run / "export" / "verify.json").read_text())
    assert [r["passed"] for r in verify if r["format"] == "onnx"] == [True]  # ... and verified
    row = json.loads(out)["rows"][0]
    assert set(SCHEMA) <= set(row)
    assert row["backend"] == "onnxruntime_perf_test" and row["input"] == RUN_IMAGES
    assert (row["warmup"], row["repeats"]) == (1, 200)  # --adb default: 200 timed runs (ORT does 1 warmup itself)
    ts = sorted(ET_MS * 50)
    assert row["p50_ms"] == pytest.approx(ts[100], abs=1e-6) and row["p99_ms"] == pytest.approx(44.0)
    assert row["fingerprint"]["model"] == "Pixel 7" and row["fingerprint"]["android"] == "14"
    assert row["fingerprint"]["soc"] == "gs201" and row["fingerprint"]["abi"] == "arm64-v8a"
    assert row["taskset"] == "f0" and 0 < row["executed_flops_ratio"] <= 1 and row["flops_ratio"] is not None
    call = _runner_calls(phone["log"])[-1]
    assert "-I" not in call["args"] and call["args"][call["args"].index("-r") + 1] == "200"
    # The run's image, preprocessed (1, 1, 28, 28) float32 as a TensorProto, beside the model.
    assert 28 * 28 * 4 <= call["files"]["test_data_set_0/input_0.pb"] < 28 * 28 * 4 + 64
    saved = json.loads(next((run / "bench").glob("Pixel_7-*.json")).read_text())
    assert saved["rows"][0]["input"] == RUN_IMAGES
    # `--adb default` means devices.yaml's default_device.
    code, out, err = _cli(["bench", "--adb", "default", "--repeats", "3", "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["rows"][0]["serial"] == PIXEL7["serial"]


def test_bench_adb_executorch_reads_the_run_image_file(workdir: Path, phone: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = latest_run(workdir / "runs")
    export = run / "export"
    export.mkdir(exist_ok=True)
    # A verified program in place: bench uses it as it is (lowering to XNNPACK is `ltmpctl export`'s test).
    records = json.loads((export / "verify.json").read_text()) if (export / "verify.json").exists() else []
    (export / "verify.json").write_text(json.dumps([*records, {"format": "mobile", "passed": True}]))
    (export / "model.pte").write_bytes(b"ET program")
    phone["config"].write_text(f"runners:\n  executorch: {phone['bins'] / 'executor_runner'}\n")
    code, out, err = _cli(["bench", "--adb", "pixel7", "--json"], monkeypatch, capsys)
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["backend"] == "executorch" and row["input"] == RUN_IMAGES and row["timing"] == "per-iteration"
    assert (row["warmup"], row["repeats"]) == (50, 200)
    assert row["p50_ms"] == pytest.approx(float(np.percentile(ET_MS * 50, 50)))
    call = _runner_calls(phone["log"])[-1]
    assert "--num_executions=250" in call["args"]
    inputs = next(a for a in call["args"] if a.startswith("--inputs="))
    assert inputs.endswith("/input_0.bin") and call["files"]["input_0.bin"] == 1 * 28 * 28 * 4  # raw float32
    code, _, err = _cli(["bench", "--adb", "pixel7", "--batch", "2"], monkeypatch, capsys)
    assert code == ConfigError.exit_code and "takes one image" in err


def test_speed_benchmark_torch_gets_the_images_bundled(phone: dict[str, Any], tmp_path: Path) -> None:
    model = tmp_path / "tiny.pt"
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 3, 2, 2)), str(model))
    images = torch.randn(2, 3, 2, 2)
    row = bench_adb("pixel7", model, phone["bins"] / "speed_benchmark_torch", (3, 2, 2), 3, 4, batch=2,
                    images=images)
    assert row["input"] == RUN_IMAGES and row["repeats"] == 4 and row["p50_ms"] == pytest.approx(40.625)
    call = _runner_calls(phone["log"])[-1]
    assert "--use_bundled_input=0" in call["args"] and not any(a.startswith("--input_dims") for a in call["args"])
    assert call["files"]["tiny.pt"] > model.stat().st_size  # the pushed copy carries the images
    row = bench_adb("pixel7", model, phone["bins"] / "speed_benchmark_torch", (3, 2, 2), 3, 4)
    assert row["input"] == "ones"  # without images the runner feeds all-ones tensors, and the row says so


# -- 2. devices.yaml and `ltmpctl devices` ---------------------------------------------------------------------------


def test_devices_yaml_locations_and_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(devconfig.ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert devconfig.config_path() == tmp_path / "xdg" / "ltmpctl" / "devices.yaml"
    assert devconfig.load().exists is False  # no file: an empty setup
    path = devconfig.config_path()
    path.parent.mkdir(parents=True)
    path.write_text("default_device: lab\nrunners:\n  executor_runner: bin/executor_runner\naliases:\n  lab: shiba\n")
    cfg = devconfig.load()
    assert cfg.default_device == "lab" and cfg.aliases == {"lab": "shiba"}
    assert cfg.runners == {"executorch": path.parent / "bin" / "executor_runner"}  # relative to the file
    path.write_text("lab: shiba\n")  # the older form: aliases only
    assert devconfig.load().aliases == {"lab": "shiba"}
    for bad, message in (("runners: {tflite: x}\n", "unknown runner 'tflite'"), ("[1, 2]\n", "must be a mapping"),
                         ("default_device: 7\n", "default_device")):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            devconfig.load()


def test_devices_command_shows_the_setup(phone: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    runner = phone["bins"] / "executor_runner"
    phone["config"].write_text(f"default_device: pixel7\nrunners: {{executorch: {runner}, torch: /nope/sbt}}\n"
                               "aliases: {labphone: shiba}\n")
    code, out, err = _cli(["devices", "--json"], monkeypatch, capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["setup"]["default_device"] == "pixel7" and doc["setup"]["aliases"] == {"labphone": "shiba"}
    assert doc["setup"]["runners"]["executorch"] == {"path": str(runner), "found": True}
    assert doc["setup"]["runners"]["torch"]["found"] is False
    assert [d["serial"] for d in doc["attached"]] == [PIXEL7["serial"]]
    code, out, _ = _cli(["devices"], monkeypatch, capsys)
    assert code == 0 and "default device (--adb default): pixel7" in out and "labphone -> shiba" in out
    assert "executor_runner" in out and "missing" in out and PIXEL7["serial"] in out


def test_default_device_without_a_configured_one(phone: dict[str, Any], tmp_path: Path) -> None:
    model = tmp_path / "m.pte"
    model.write_bytes(b"ET")
    runner = phone["bins"] / "executor_runner"
    assert bench_adb("default", model, runner, (1, 28, 28), 0, 2)["serial"] == PIXEL7["serial"]  # the only one
    scenario = json.loads(Path(os.environ["FAKE_ADB_SCENARIO"]).read_text())
    scenario["devices"] = [PIXEL7, PIXEL8]
    Path(os.environ["FAKE_ADB_SCENARIO"]).write_text(json.dumps(scenario))
    with pytest.raises(AmbiguousDeviceError, match="default_device"):
        bench_adb("default", model, runner, (1, 28, 28), 0, 2)


# -- 3. compare with no flag -----------------------------------------------------------------------------------------


def test_compare_without_model_uses_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import ltmpctl.compare as cmp

    seen: dict[str, Any] = {}

    def fake_compare(spec: cmp.CompareSpec, hooks: Any = None) -> dict[str, Any]:
        seen["spec"] = spec
        seen["cells"] = cmp.plan(spec)
        raise ConfigError("stopped here", "the test only checks what would run")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cmp, "compare", fake_compare)
    code, _, err = _cli(["compare", "ltmp", "tome"], monkeypatch, capsys)
    assert code == ConfigError.exit_code
    assert err.splitlines()[0].startswith("no --model given: comparing on the demo model (")
    assert "offline" in err.splitlines()[0]
    assert seen["spec"].model == "demo" and seen["spec"].compressors == ["ltmp", "tome"]
    assert {(c.compressor, c.recipe.model.name, c.recipe.data.path) for c in seen["cells"]} == \
        {("ltmp", "demo", "demo"), ("tome", "demo", "demo")}
    code, _, err = _cli(["compare", "tome", "--model", "vit_tiny_patch16_224", "--targets", "0.5"], monkeypatch,
                        capsys)
    assert "no --model given" not in err and seen["spec"].model == "vit_tiny_patch16_224"


def test_compare_reuses_a_finished_compress_run(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`ltmpctl compress` then `ltmpctl compare`: the compress run is a finished cell (its flops/export/bench
    stages don't change the row), so only the missing cell is compressed; table, csv, json and plot are written."""
    import ltmpctl.compare as cmp

    run = latest_run(workdir / "runs")
    base_recipe = tmp_path / "base.yaml"
    base_recipe.write_text((run / "resolved.yaml").read_text())
    monkeypatch.chdir(workdir)
    compressed: list[str] = []
    real = cmp.run_compress

    def counting(recipe: Any, hooks: Any = None, resume: Any = None) -> Any:
        compressed.append(f"{recipe.compressor.name}@{recipe.target:g}")
        return real(recipe, hooks, resume=resume)

    monkeypatch.setattr(cmp, "run_compress", counting)
    out = tmp_path / "cmp"
    code, stdout, err = _cli(["compare", "ltmp", "tome", "--model", "vit_tiny_patch16_224", "--targets", "0.6",
                              "--recipe", str(base_recipe), "--repeats", "2", "--warmup", "0", "--out", str(out)],
                             monkeypatch, capsys)
    assert code == 0, err
    assert compressed == ["tome@0.6"]  # ltmp @ 0.6 is the compress run
    doc = json.loads((out / "compare.json").read_text())
    assert [(r["compressor"], r["reused"]) for r in doc["rows"]] == [("ltmp", True), ("tome", False)]
    assert doc["rows"][0]["run_dir"] == str(Path("runs") / run.name)
    assert (out / "compare.csv").is_file() and (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "speedup" in stdout and "base" in stdout


# -- 5. parameters table; 6. --model-kwargs a=1 b=2 ----------------------------------------------------------------


def test_parameters_print_as_a_rounded_block_table(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from ltmpctl.cli.compress_cmd import render_params
    from rich.console import Console

    params = json.loads((latest_run(workdir / "runs") / "summary.json").read_text())["params"]
    console = Console(width=120, record=True)
    console.print(render_params(params))
    text = console.export_text()
    assert "merge_threshold" in text and "prune_threshold" in text and "block" in text
    first = params["merge_threshold"][0]
    assert format(first, ".4g") in text and repr(first) not in text  # rounded: no 16-digit floats
    assert len([ln for ln in text.splitlines() if ln.strip().startswith("│")]) == len(params["merge_threshold"])


def test_compress_summary_and_json(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`compress --model-kwargs k=v k=v` (timm's form) builds the same model as the repeated flag, the summary shows
    the parameter table and --json keeps full precision."""
    monkeypatch.chdir(tmp_path)
    args = ["compress", "vit_tiny_patch16_224", "--data", str(workdir / "data"), "--target", "0.7",
            "--input-size", "1,28,28", "--mean", "0.5", "--std", "0.5", "--no-pretrained",
            "--model-kwargs", "img_size=28", "patch_size=7", "in_chans=1", "embed_dim=32", "depth=2", "num_heads=2",
            "num_classes=3", "--set", "stages.finetune.enabled=false", "--set", "stages.evaluate.images=8",
            "--set", "stages.calibrate.images=8", "--set", "stages.flops.enabled=false",
            "--set", "stages.export.enabled=false", "--set", "stages.bench.enabled=false", "--set", "data.workers=0"]
    code, out, err = _cli([*args, "--out", "a"], monkeypatch, capsys)
    assert code == 0, err
    assert "parameters" in out and "merge_threshold" in out and "params: {" not in out  # scalars before fine-tuning
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    code, out, err = _cli([*args, "--out", "b", "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["params"] == summary["params"]  # full precision in --json
    resolved = (tmp_path / "b" / "resolved.yaml").read_text()
    assert "patch_size: 7" in resolved and "num_heads: 2" in resolved


def test_expand_pairs() -> None:
    assert expand_pairs(["bench", "--model-kwargs", "img_size=32", "patch_size=4", "runs/x=1", "--json"]) == \
        ["bench", "--model-kwargs", "img_size=32", "--model-kwargs", "patch_size=4", "runs/x=1", "--json"]
    assert expand_pairs(["flops", "m", "--model-kwargs=a=1", "b=[1,2]"]) == \
        ["flops", "m", "--model-kwargs=a=1", "--model-kwargs", "b=[1,2]"]
    assert expand_pairs(["x", "--model-kwargs", "a=1", "--", "b=2"]) == ["x", "--model-kwargs", "a=1", "--", "b=2"]
    assert expand_pairs(["x", "--param", "a=1", "b=2"]) == ["x", "--param", "a=1", "b=2"]  # only pairs options
