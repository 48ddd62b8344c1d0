"""Where a forward's time goes: matrix products vs every other op vs the host-side cost around the ops.

Shared by the benchmark scripts' `--profile` tables. torch: torch.profiler over a few eager forwards (times are
under the profiler, which adds some cost of its own to every op). onnxruntime: the session's own node profiling.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch

# The kernels whose work is the model's multiply-adds (what the FLOPs ratio predicts).
TORCH_GEMM = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"}
ORT_GEMM = {"MatMul", "FusedMatMul", "Gemm", "Conv", "Attention", "MultiHeadAttention"}


def op_count(model: torch.nn.Module, x: torch.Tensor) -> int:
    """aten ops called from Python (top-level) in one eval forward of `model` on `x`."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    return sum(1 for e in prof.events() if e.cpu_parent is None)


def torch_profile(model: torch.nn.Module, x: torch.Tensor, forwards: int = 3) -> dict[str, Any]:
    """Per forward: top-level op calls, wall ms, ms in GEMM kernels, ms in other ops, ms outside any op."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(forwards):
                model(x)
            wall_ms = (time.perf_counter() - t0) * 1e3 / forwards
    events = prof.events()
    top = [e for e in events if e.cpu_parent is None]  # ops called from Python, children excluded
    in_ops = sum(e.cpu_time_total for e in top) / 1e3 / forwards
    gemm = sum(e.self_cpu_time_total for e in events if e.name in TORCH_GEMM) / 1e3 / forwards
    return {"ops": len(top) / forwards, "wall_ms": wall_ms, "gemm_ms": gemm, "other_ms": in_ops - gemm,
            "host_ms": wall_ms - in_ops}


def ort_profile(path: Path, x: "Any", threads: Optional[int], runs: int = 5) -> dict[str, Any]:
    """Per run: nodes executed, wall ms, kernel ms in GEMM-type nodes and in the rest, ms outside kernels."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or 0
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        # Every run is profiled, the first (slower) one too, so the wall clock covers the same runs as the trace.
        t0 = time.perf_counter()
        for _ in range(runs):
            session.run(None, {name: x})
        wall_ms = (time.perf_counter() - t0) * 1e3 / runs
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_op: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_op[e["args"]["op_name"]] += e["dur"] / 1e3  # microseconds in the trace
    total, gemm = sum(by_op.values()) / runs, sum(v for k, v in by_op.items() if k in ORT_GEMM) / runs
    return {"ops": len(kernels) / runs, "wall_ms": wall_ms, "gemm_ms": gemm, "other_ms": total - gemm,
            "host_ms": wall_ms - total}


def print_profile(rows: list[dict[str, Any]]) -> None:
    head = (f"{'method':<6} {'backend':<11} {'batch':>5} {'ops':>6} {'wall ms':>8} {'GEMM ms':>8} {'other ms':>9} "
            f"{'host ms':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<6} {r['backend']:<11} {r['batch']:>5} {r['ops']:>6.0f} {r['wall_ms']:>8.1f} "
              f"{r['gemm_ms']:>8.1f} {r['other_ms']:>9.1f} {r['host_ms']:>8.1f}")
