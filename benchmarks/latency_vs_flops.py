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
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import torch  # noqa: E402

import ltmpctl  # noqa: E402
from ltmpctl.bench.local import bench_torch, compare_rows, flops_ratio, random_batch, set_threads  # noqa: E402

MODEL = "deit_tiny_patch16_224"
INPUT = (3, 224, 224)
TOME_R = 13  # ToMe's r for ~0.5 FLOPs on deit_tiny (197 tokens, 12 blocks)
LTMP_MERGE = 0.95  # fixed; the shared prune threshold is searched


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per row")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes")
    p.add_argument("--target", type=float, default=0.5, help="FLOPs ratio topk and ltmp are tuned to")
    return p.parse_args()


def bisect(ratio_of: Callable[[float], float], lo: float, hi: float, target: float, steps: int = 14) -> float:
    """The x in [lo, hi] whose ratio is closest to `target`, for a ratio that falls as x grows."""
    best, best_err = lo, abs(ratio_of(lo) - target)
    for _ in range(steps):
        mid = (lo + hi) / 2
        r = ratio_of(mid)
        if abs(r - target) < best_err:
            best, best_err = mid, abs(r - target)
        lo, hi = (mid, hi) if r > target else (lo, mid)
    return best


def patched(base: torch.nn.Module, name: str, params: dict[str, Any]) -> torch.nn.Module:
    return ltmpctl.apply(copy.deepcopy(base), name, **params)


def tune(base: torch.nn.Module, target: float) -> list[tuple[str, dict[str, Any]]]:
    """(compressor, params) for each method at about `target` FLOPs, measured on a small random batch."""
    probe = random_batch(INPUT, 4, seed=1)
    keep = bisect(lambda k: flops_ratio(patched(base, "topk", {"keep_rate": 1.0 - k}), probe), 0.0, 0.95, target)
    prune = bisect(lambda t: flops_ratio(patched(base, "ltmp", {"merge_threshold": LTMP_MERGE,
                                                                 "prune_threshold": t}), probe), 0.0, 0.05, target)
    return [("tome", {"r": TOME_R}), ("topk", {"keep_rate": round(1.0 - keep, 4)}),
            ("ltmp", {"merge_threshold": LTMP_MERGE, "prune_threshold": round(prune, 6)})]


def measure(base: torch.nn.Module, methods: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> list[dict]:
    rows = []
    for batch in args.batches:
        print(f"batch {batch}: base", flush=True)
        b = bench_torch(base, INPUT, batch, args.warmup, args.repeats, threads=args.threads)
        rows.append({"method": "base", "params": "", **b, "flops_ratio": 1.0, "speedup": 1.0, "latency_ratio": 1.0,
                     "flag": None})
        for name, params in methods:
            print(f"batch {batch}: {name}", flush=True)
            model = patched(base, name, params)
            ratio = flops_ratio(model, random_batch(INPUT, batch))  # the very batch bench_torch times
            c = bench_torch(model, INPUT, batch, args.warmup, args.repeats, threads=args.threads)
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            rows.append({"method": name, "params": shown, **compare_rows(b, c, ratio)})
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'method':<6} {'params':<48} {'batch':>5} {'FLOPs':>6} {'p50 ms':>9} {'p90 ms':>9} {'img/s':>8} " \
           f"{'lat.':>6} {'speedup':>7}  flag"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<6} {r['params']:<48} {r['batch']:>5} {r['flops_ratio']:>6.3f} {r['p50_ms']:>9.2f} "
              f"{r['p90_ms']:>9.2f} {r['images_per_s']:>8.1f} {r['latency_ratio']:>6.3f} {r['speedup']:>6.2f}x"
              f"  {r['flag'] or ''}")


def onnx_note() -> str:
    import ltmpctl.export as export

    if callable(getattr(export, "export_onnx", None)):
        return "ONNX: export each model with `ltmpctl export` and time it with `ltmpctl bench FILE.onnx`."
    return "ONNX rows skipped: ltmpctl.export has no ONNX exporter yet."


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    import timm

    torch.manual_seed(0)
    base = timm.create_model(MODEL, pretrained=False).eval()
    methods = tune(base, args.target)
    rows = measure(base, methods, args)
    print(f"\n{MODEL} {INPUT}, random weights, torch {torch.__version__} eager, {torch.get_num_threads()} threads, "
          f"warmup {args.warmup}, repeats {args.repeats}")
    print_table(rows)
    print(onnx_note())


if __name__ == "__main__":
    main()
