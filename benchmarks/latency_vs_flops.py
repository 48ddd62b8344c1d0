"""Does cutting FLOPs cut latency? deit_tiny at 224 (random weights) with tome, topk and ltmp each set to about half
the analytic FLOPs, timed in torch eager and onnxruntime on this machine at batch 1 and 32, against the unreduced model.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/latency_vs_flops.py --threads 2 --repeats 10 --profile

FLOPs = ltmpctl's analytic MACs (ltmpctl.flops) of the token counts each image of the timed batch keeps, as a
fraction of the unreduced model's; exec = what the batched forward really computes (each block runs at the batch's
largest count, ltmp pads the others), equal to FLOPs at batch 1. lat/FLOPs = latency ratio / FLOPs ratio: the goal
is <= 1.10. LTMP's counts depend on the input (random here, so only indicative).
`--profile` adds where each forward's time goes: op calls, time in matrix-product kernels (what FLOPs predict),
in all other ops, and outside any op (Python and dispatch).
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
from ltmpctl.bench.local import (bench_onnx_files, bench_torch_models, compare_rows, random_batch,  # noqa: E402
                                 set_threads)
from ltmpctl.flops import batch_ratios  # noqa: E402

from _methods import methods_at, short  # noqa: E402
from _profile import ort_profile, print_profile, torch_profile  # noqa: E402

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
    p.add_argument("--profile", action="store_true", help="also print where each forward's time goes")
    return p.parse_args()


def export_onnx(model: torch.nn.Module, out: Path) -> Path:
    """A verified ONNX file of `model` (dynamic batch), via `ltmpctl.export`."""
    from ltmpctl.export import export_model

    images = random_batch(INPUT, 32, seed=3)
    export_model(model, "onnx", out, images[:1], images)
    return out / "model.onnx"


def measure(base: torch.nn.Module, methods: list[tuple[str, dict[str, Any], float]], args: argparse.Namespace,
            tmp: Path) -> tuple[list[dict], list[dict]]:
    """(latency rows, profile rows): every model at every batch, torch then onnxruntime."""
    rows, profiles = [], []
    models = {"base": base, **{name: patched(base, name, params) for name, params, _ in methods}}
    params = {"base": "", **{name: short(p) for name, p, _ in methods}}
    onnx_files = {name: export_onnx(m, tmp / name) for name, m in models.items()} if args.onnx else {}
    for batch in args.batches:
        x = random_batch(INPUT, batch)  # the very batch the benchmarks time (same seed)
        print(f"batch {batch}", flush=True)
        # Every model of a backend timed interleaved, so all of them see the same machine.
        timed = {"torch": bench_torch_models(list(models.values()), INPUT, batch, args.warmup, args.repeats,
                                             threads=args.threads)}
        if args.onnx:
            timed["onnxruntime"] = bench_onnx_files(list(onnx_files.values()), INPUT, batch, args.warmup,
                                                    args.repeats, threads=args.threads)
        for i, (name, model) in enumerate(models.items()):
            ratio, executed = batch_ratios(model, x)  # one forward on the timed batch
            for backend_rows in timed.values():
                rows.append({"method": name, "params": params[name], "exec_ratio": executed,
                             **compare_rows(backend_rows[0], backend_rows[i], ratio)})
            if args.profile:
                profiles.append({"method": name, "backend": "torch", "batch": batch, **torch_profile(model, x)})
                if args.onnx:
                    profiles.append({"method": name, "backend": "onnxruntime", "batch": batch,
                                     **ort_profile(onnx_files[name], x.numpy(), args.threads)})
    return rows, profiles


def patched(base: torch.nn.Module, name: str, params: dict[str, Any]) -> torch.nn.Module:
    return ltmpctl.apply(copy.deepcopy(base), name, **params)


def print_table(rows: list[dict]) -> None:
    head = (f"{'method':<6} {'backend':<11} {'params':<46} {'batch':>5} {'FLOPs':>6} {'exec':>6} {'p50 ms':>9} "
            f"{'p90 ms':>9} {'img/s':>7} {'lat.':>6} {'speedup':>7} {'lat/FLOPs':>9}  flag")
    print(head)
    print("-" * len(head))
    for r in rows:
        per_flop = r["latency_ratio"] / r["flops_ratio"]
        print(f"{r['method']:<6} {r['backend']:<11} {r['params']:<46} {r['batch']:>5} {r['flops_ratio']:>6.3f} "
              f"{r['exec_ratio']:>6.3f} {r['p50_ms']:>9.2f} {r['p90_ms']:>9.2f} {r['images_per_s']:>7.1f} "
              f"{r['latency_ratio']:>6.3f} {r['speedup']:>6.2f}x {per_flop:>9.2f}  {r['flag'] or ''}")


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    import timm

    torch.manual_seed(0)
    base = timm.create_model(MODEL, pretrained=False).eval()
    methods = methods_at(base, args.target, random_batch(INPUT, 8, seed=1))
    with tempfile.TemporaryDirectory() as tmp:
        rows, profiles = measure(base, methods, args, Path(tmp))
    print(f"\n{MODEL} {INPUT}, random weights, torch {torch.__version__} eager, {torch.get_num_threads()} threads, "
          f"warmup {args.warmup}, repeats {args.repeats}")
    print_table(rows)
    if profiles:
        print("\nwhere the time goes, per forward (torch: under torch.profiler; onnxruntime: its node profiling)")
        print_profile(profiles)


if __name__ == "__main__":
    main()
