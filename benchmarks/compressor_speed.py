"""Compressor speed on CPU: deit_tiny at 224, each compressor calibrated to ~50% FLOPs, vs the unpatched model.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/compressor_speed.py --threads 2 --repeats 10

Prints, per compressor and batch size (1 and 32): tokens per block (into the MLP, mean over the batch), analytic
GMACs per image (ltmpctl.flops, fvcore-checked in tests), and measured eval latency (median of `--repeats` after
warm-up) with the speedup over the unpatched model, timed interleaved with it. Random weights: latency does not
depend on them, but LTMP's data-dependent token counts do (so its row is indicative for real images).
"""
from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import timm  # noqa: E402
import torch  # noqa: E402

import ltmpctl  # noqa: E402
from ltmpctl.bench.local import bench_torch_models, random_batch, set_threads  # noqa: E402
from ltmpctl.flops import base_macs, image_macs, vit_shape  # noqa: E402

from _methods import in_fresh_process, methods_at, short  # noqa: E402

INPUT = (3, 224, 224)


def _base(name: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same random weights in every process
    return timm.create_model(name, pretrained=False).eval()


def _calibrated(name: str, target: float, threads: int) -> list:
    """Every compressor calibrated on `name` and a random probe batch (run in a fresh process: `in_fresh_process`)."""
    set_threads(threads)
    return methods_at(_base(name), target, random_batch(INPUT, 8, seed=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = p.parse_args()
    set_threads(args.threads)
    methods = in_fresh_process(_calibrated, args.model, args.target, args.threads)
    base = _base(args.model)
    s = vit_shape(base)
    print(f"{args.model} {INPUT}, random weights, torch {torch.__version__} eager, {args.threads} threads, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'method':7} {'batch':>5} {'GMACs':>7} {'ratio':>6} {'p50 ms':>9} {'speedup':>8}  tokens per block (MLP)"
          f"  params")
    models = {name: ltmpctl.apply(copy.deepcopy(base), name, **params) for name, params, _ in methods}
    for batch in args.batches:
        # Interleaved: the base and every compressed model see the same machine, so the speedups hold.
        b, *timed = bench_torch_models([base, *models.values()], INPUT, batch, args.warmup, args.repeats,
                                       threads=args.threads)
        print(f"{'base':7} {batch:>5} {base_macs(s) / 1e9:7.3f} {1.0:6.3f} {b['p50_ms']:9.1f} {1.0:7.2f}x  "
              f"{s.tokens} x {s.depth}")
        for (name, params, _), c in zip(methods, timed):
            model = models[name]
            with torch.no_grad():
                model(random_batch(INPUT, batch))  # the batch that was timed (same seed)
            counts = ltmpctl.token_counts(model)
            gmacs = sum(image_macs(model, counts)) / len(counts) / 1e9
            tokens = " ".join(f"{v:.0f}" for v in counts[:, :, 1].float().mean(0))
            print(f"{name:7} {batch:>5} {gmacs:7.3f} {gmacs * 1e9 / base_macs(s):6.3f} {c['p50_ms']:9.1f} "
                  f"{b['p50_ms'] / c['p50_ms']:7.2f}x  {tokens}  {short(params)}", flush=True)


if __name__ == "__main__":
    main()
