"""Local benchmarks: torch eager on a tiny ViT, onnxruntime on a tiny export, stats and the FLOPs/latency flag."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import ltmpctl  # noqa: E402
from ltmpctl.bench.local import (  # noqa: E402
    bench_onnx, bench_torch, compare_rows, flops_ratio, random_batch, set_threads,
)
from ltmpctl.bench.stats import FLOPS_LATENCY_FLAG, SCHEMA, summarize  # noqa: E402
from ltmpctl.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=10).eval()


def _check_row(row: dict, batch: int, repeats: int) -> None:
    assert set(SCHEMA) <= set(row), set(SCHEMA) - set(row)
    assert row["batch"] == batch and row["repeats"] == repeats
    assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert row["mean_ms"] > 0 and row["std_ms"] >= 0
    assert row["images_per_s"] == pytest.approx(batch * 1000.0 / row["p50_ms"])
    assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] >= 0
    assert row["timing"] == "per-iteration"


def test_summarize_known_values() -> None:
    s = summarize([0.004, 0.001, 0.003, 0.002], batch=8)
    assert s["n"] == 4
    assert s["mean_ms"] == pytest.approx(2.5)
    assert s["p50_ms"] == pytest.approx(2.5)
    assert s["p90_ms"] == pytest.approx(3.7)  # linear interpolation, as numpy.percentile
    assert s["p99_ms"] == pytest.approx(3.97)
    assert s["std_ms"] == pytest.approx(1.2909944)
    assert s["images_per_s"] == pytest.approx(8 * 1000 / 2.5)
    assert summarize([0.01], batch=1)["std_ms"] == 0.0


def test_bench_torch_tiny_vit(tiny_vit: torch.nn.Module) -> None:
    before = torch.get_num_threads()
    row = bench_torch(tiny_vit, (3, 32, 32), batch=2, warmup=1, repeats=3, threads=1)
    _check_row(row, batch=2, repeats=3)
    assert row["backend"] == "torch" and row["device"] == "cpu" and row["threads"] == 1 and row["warmup"] == 1
    assert torch.get_num_threads() == before  # the thread count is process-global: restored afterwards


def test_compressed_copy_and_flops_ratio(tiny_vit: torch.nn.Module) -> None:
    x = random_batch((3, 32, 32), 2)
    assert flops_ratio(tiny_vit, x) == 1.0
    tome = ltmpctl.apply(copy.deepcopy(tiny_vit), "tome", r=4)
    ratio = flops_ratio(tome, x)
    assert 0.3 < ratio < 1.0
    row = bench_torch(tome, (3, 32, 32), batch=2, warmup=0, repeats=2, threads=1)
    _check_row(row, batch=2, repeats=2)


def test_bench_torch_rejects_bad_sizes(tiny_vit: torch.nn.Module) -> None:
    with pytest.raises(ConfigError):
        bench_torch(tiny_vit, (3, 32, 32), batch=0, warmup=0, repeats=1)
    with pytest.raises(ConfigError):
        bench_torch(tiny_vit, (3, 32, 32), batch=1, warmup=0, repeats=0)
    with pytest.raises(ConfigError):
        set_threads(0)


def _export(path, dynamic: bool) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 10)).eval()
    axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes=axes, dynamo=False)


def test_bench_onnx(tmp_path) -> None:
    path = tmp_path / "tiny.onnx"
    _export(path, dynamic=True)
    row = bench_onnx(path, (3, 8, 8), batch=4, warmup=1, repeats=3, threads=1)
    _check_row(row, batch=4, repeats=3)
    assert row["backend"] == "onnxruntime" and row["device"] == "cpu" and row["threads"] == 1


def test_bench_onnx_refuses_wrong_fixed_batch_and_missing_provider(tmp_path) -> None:
    path = tmp_path / "fixed.onnx"
    _export(path, dynamic=False)
    with pytest.raises(ConfigError, match="fixed batch of 1"):
        bench_onnx(path, (3, 8, 8), batch=4, warmup=0, repeats=1)
    with pytest.raises(ConfigError, match="not available"):
        bench_onnx(path, (3, 8, 8), batch=1, warmup=0, repeats=1, providers=["NoSuchExecutionProvider"])


def _row(p50: float) -> dict:
    return {"backend": "torch", "device": "cpu", "batch": 1, "mean_ms": p50, "p50_ms": p50}


def test_compare_rows_flags_flops_without_latency() -> None:
    flagged = compare_rows(_row(10.0), _row(9.8), flops_ratio=0.5)
    assert flagged["flag"] == FLOPS_LATENCY_FLAG
    assert flagged["latency_ratio"] == pytest.approx(0.98) and flagged["speedup"] == pytest.approx(10 / 9.8)
    ok = compare_rows(_row(10.0), _row(5.0), flops_ratio=0.5)
    assert ok["flag"] is None and ok["speedup"] == pytest.approx(2.0) and ok["flops_ratio"] == 0.5
    assert compare_rows(_row(10.0), _row(10.0), flops_ratio=None)["flag"] is None
    assert compare_rows(_row(10.0), _row(10.0), flops_ratio=0.97)["flag"] is None  # FLOPs barely moved


# --- `ltmpctl bench` on this machine, through the CLI's own entry point ------------------------------------------

TINY_KWARGS = ["--model-kwargs", "img_size=32", "--model-kwargs", "patch_size=8", "--model-kwargs", "embed_dim=32",
               "--model-kwargs", "depth=2", "--model-kwargs", "num_heads=2", "--model-kwargs", "num_classes=10"]


def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    import sys

    from ltmpctl.cli import main

    monkeypatch.setattr(sys, "argv", ["ltmpctl", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_cli_bench_model_with_compressor_saves_json(tmp_path, monkeypatch, capsys) -> None:
    import json

    code, out, err = _cli(monkeypatch, capsys, "bench", "vit_tiny_patch16_224", *TINY_KWARGS, "--compressor", "tome",
                          "--param", "r=4", "--batch", "1", "--batch", "2", "--warmup", "1", "--repeats", "2",
                          "--threads", "1", "--json", "--out", str(tmp_path / "res"))
    assert code == 0, err
    doc = json.loads(out)
    assert [(r["model"], r["batch"]) for r in doc["rows"]] == [("base", 1), ("tome", 1), ("base", 2), ("tome", 2)]
    assert doc["input_size"] == [3, 32, 32]
    comp = doc["rows"][1]
    assert comp["speedup"] > 0 and 0.3 < comp["flops_ratio"] < 1.0 and "flag" in comp
    saved = json.loads((tmp_path / "res" / "local-cpu.json").read_text())
    assert saved["rows"] == doc["rows"] and not list((tmp_path / "res").glob("*.tmp"))


def test_cli_bench_model_in_exported_runtimes(monkeypatch, capsys) -> None:
    """--backend onnxruntime / executorch: base and compressed exported (and verified) for that runtime, timed
    interleaved there, the compressed row compared with its own runtime's base row."""
    import json

    pytest.importorskip("executorch", reason="pip install 'ltmpctl[mobile]'")
    code, out, err = _cli(monkeypatch, capsys, "bench", "vit_tiny_patch16_224", *TINY_KWARGS, "--compressor", "tome",
                          "--param", "r=4", "--backend", "onnxruntime", "--backend", "executorch", "--warmup", "0",
                          "--repeats", "2", "--threads", "1", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["model"], r["backend"], r["batch"]) for r in rows] == [
        ("base", "onnxruntime", 1), ("tome", "onnxruntime", 1), ("base", "executorch", 1), ("tome", "executorch", 1)]
    for base, comp in (rows[:2], rows[2:]):
        assert comp["latency_ratio"] == pytest.approx(comp["p50_ms"] / base["p50_ms"], rel=1e-3)
        assert 0.3 < comp["flops_ratio"] < 1.0 and comp["speedup"] > 0
    assert "exporting tome for executorch" in err


def test_cli_bench_times_torch_before_exports(monkeypatch, capsys) -> None:
    """Torch eager is timed before anything is exported in the process, whatever order --backend lists."""
    from ltmpctl.cli import bench_cmd

    order: list[str] = []
    real_pair, real_exported = bench_cmd._bench_pair, bench_cmd._bench_exported_pair
    monkeypatch.setattr(bench_cmd, "_bench_pair", lambda *a, **k: order.append("torch") or real_pair(*a, **k))
    monkeypatch.setattr(bench_cmd, "_bench_exported_pair",
                        lambda backend, *a, **k: order.append(backend) or real_exported(backend, *a, **k))
    code, out, err = _cli(monkeypatch, capsys, "bench", "vit_tiny_patch16_224", *TINY_KWARGS, "--backend",
                          "onnxruntime", "--backend", "torch", "--warmup", "0", "--repeats", "1", "--threads", "1",
                          "--json")
    assert code == 0, err
    assert order == ["torch", "onnxruntime"]


def test_cli_bench_pte_file_here(tiny_vit, tmp_path, monkeypatch, capsys) -> None:
    """A .pte without --adb runs in ExecuTorch's runtime on this machine, one image at a time."""
    import json

    pytest.importorskip("executorch", reason="pip install 'ltmpctl[mobile]'")
    from ltmpctl.export import export_model, probe_images

    export_model(tiny_vit, "mobile", tmp_path, probe_images((3, 32, 32), 2), probe_images((3, 32, 32)))
    pte = str(tmp_path / "model.pte")
    code, out, err = _cli(monkeypatch, capsys, "bench", pte, "--warmup", "0", "--repeats", "3", "--json")
    assert code == 0, err
    (row,) = json.loads(out)["rows"]
    assert row["model"] == "model.pte" and row["backend"] == "executorch" and row["batch"] == 1 and row["p50_ms"] > 0
    code, out, err = _cli(monkeypatch, capsys, "bench", pte, "--batch", "2")
    assert code == 2 and "takes one image" in err
    broken = tmp_path / "broken.pte"
    broken.write_bytes((tmp_path / "model.pte").read_bytes()[:4096])  # the header survives, the program doesn't
    code, out, err = _cli(monkeypatch, capsys, "bench", str(broken), "--input-size", "3,32,32")
    assert code == 3 and "broken.pte is not a readable pte file" in err and "Traceback" not in err


def test_cli_bench_onnx_file_table(tmp_path, monkeypatch, capsys) -> None:
    path = tmp_path / "tiny.onnx"
    _export(path, dynamic=True)
    from ltmpctl.cli import _app

    monkeypatch.setattr(_app.console, "width", 160)  # captured output has no terminal: keep the table unwrapped
    code, out, err = _cli(monkeypatch, capsys, "bench", str(path), "--batch", "3", "--warmup", "0", "--repeats", "2")
    assert code == 0, err
    assert "onnxruntime" in out and "tiny.onnx" in out and "p50 ms" in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "no_such_model_xyz"], "unknown model"),
    (["bench", "missing.onnx"], "not found"),
    (["bench", "vit_tiny_patch16_224", "--batch", "0"], "bad sizes"),
    (["bench", "vit_tiny_patch16_224", "--backend", "executorch", "--batch", "2"], "takes one image"),
    (["bench", "vit_tiny_patch16_224", "--backend", "tflite"], "unknown --backend tflite"),
    (["bench", "vit_tiny_patch16_224", "--param", "r"], "key=value"),
    (["bench", "vit_tiny_patch16_224", "--adb", "pixel7"], "--adb runs exported files"),
])
def test_cli_bench_bad_input_is_one_line(argv, message, monkeypatch, capsys) -> None:
    code, out, err = _cli(monkeypatch, capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
