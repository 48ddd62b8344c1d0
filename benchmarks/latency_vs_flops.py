"""Does cutting FLOPs cut latency? deit_tiny at 224 (random weights) with tome, topk and ltmp each set to about half
the analytic FLOPs, timed in torch eager on this machine at batch 1 and 32, against the unreduced model.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/latency_vs_flops.py --threads 2 --repeats 10

FLOPs ratios are ltmpctl's analytic MACs (ltmpctl.flops) of the token counts one forward on the timed batch
actually used. LTMP's counts depend on the input (random here, so only indicative) and a batch runs at its
largest image's count, which is one way FLOPs and latency part.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import torch  # noqa: E402

import ltmpctl  # noqa: E402
from ltmpctl.bench.local import bench_onnx, bench_torch, compare_rows, flops_ratio, random_batch, set_threads  # noqa: E402

from _methods import methods_at, short  # noqa: E402

MODEL = "deit_tiny_patch16_224"
INPUT = (3, 224, 224)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per row")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes")
    p.add_argument("--target", type=float, default=0.5, help="FLOPs ratio every compressor is calibrated to")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the onnxruntime rows")
    return p.parse_args()


def export_onnx(model: torch.nn.Module, out: Path) -> Path:
    """A verified ONNX file of `model` (dynamic batch), via `ltmpctl.export`."""
    from ltmpctl.export import export_model

    images = random_batch(INPUT, 32, seed=3)
    export_model(model, "onnx", out, images[:1], images)
    return out / "model.onnx"


def measure(base: torch.nn.Module, methods: list[tuple[str, dict[str, Any], float]], args: argparse.Namespace,
            tmp: Path) -> list[dict]:
    rows = []
    onnx_files: dict[str, Path] = {}
    if args.onnx:
        onnx_files["base"] = export_onnx(base, tmp / "base")
        for name, params, _ in methods:
            onnx_files[name] = export_onnx(patched(base, name, params), tmp / name)
    for batch in args.batches:
        print(f"batch {batch}: base", flush=True)
        b = bench_torch(base, INPUT, batch, args.warmup, args.repeats, threads=args.threads)
        rows.append({"method": "base", "params": "", **b, "flops_ratio": 1.0, "speedup": 1.0, "latency_ratio": 1.0,
                     "flag": None})
        if args.onnx:
            ob = bench_onnx(onnx_files["base"], INPUT, batch, args.warmup, args.repeats, threads=args.threads)
            rows.append({"method": "base", "params": "", **ob, "flops_ratio": 1.0, "speedup": 1.0,
                         "latency_ratio": 1.0, "flag": None})
        for name, params, _ in methods:
            print(f"batch {batch}: {name}", flush=True)
            model = patched(base, name, params)
            ratio = flops_ratio(model, random_batch(INPUT, batch))  # the very batch bench_torch times
            c = bench_torch(model, INPUT, batch, args.warmup, args.repeats, threads=args.threads)
            rows.append({"method": name, "params": short(params), **compare_rows(b, c, ratio)})
            if args.onnx:
                oc = bench_onnx(onnx_files[name], INPUT, batch, args.warmup, args.repeats, threads=args.threads)
                rows.append({"method": name, "params": short(params), **compare_rows(ob, oc, ratio)})
    return rows


def patched(base: torch.nn.Module, name: str, params: dict[str, Any]) -> torch.nn.Module:
    return ltmpctl.apply(copy.deepcopy(base), name, **params)


def print_table(rows: list[dict]) -> None:
    head = f"{'method':<6} {'backend':<11} {'params':<48} {'batch':>5} {'FLOPs':>6} {'p50 ms':>9} {'p90 ms':>9} {'img/s':>8} " \
           f"{'lat.':>6} {'speedup':>7}  flag"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<6} {r['backend']:<11} {r['params']:<48} {r['batch']:>5} {r['flops_ratio']:>6.3f} {r['p50_ms']:>9.2f} "
              f"{r['p90_ms']:>9.2f} {r['images_per_s']:>8.1f} {r['latency_ratio']:>6.3f} {r['speedup']:>6.2f}x"
              f"  {r['flag'] or ''}")


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    import timm

    torch.manual_seed(0)
    base = timm.create_model(MODEL, pretrained=False).eval()
    methods = methods_at(base, args.target, random_batch(INPUT, 8, seed=1))
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(base, methods, args, Path(tmp))
    print(f"\n{MODEL} {INPUT}, random weights, torch {torch.__version__} eager, {torch.get_num_threads()} threads, "
          f"warmup {args.warmup}, repeats {args.repeats}")
    print_table(rows)


if __name__ == "__main__":
    main()
