"""Accuracy vs FLOPs on the offline demo: every compressor at several FLOPs targets, through `compress`'s stages.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/accuracy_vs_flops.py
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/accuracy_vs_flops.py --targets 0.5 --eval-images 2000

Each (compressor, target) is the demo recipe (ltmpctl/demo/recipe.yaml: calibrate on train images, LTMP's
threshold fine-tune, evaluate on the Fashion-MNIST test split) with its target and compressor swapped; flops,
export and bench stages off. Prints measured FLOPs ratio (per-image analytic MACs of the tokens really kept),
top-1 and its change from the uncompressed model. Run dirs land in --runs (default: a temporary folder).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import torch  # noqa: E402

from ltmpctl.config import resolve  # noqa: E402
from ltmpctl.demo import RECIPE  # noqa: E402
from ltmpctl.pipeline import run_compress  # noqa: E402

from _methods import COMPRESSORS, short  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    p.add_argument("--compressors", nargs="+", default=list(COMPRESSORS))
    p.add_argument("--eval-images", type=int, default=None, help="test images (default: the recipe's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=Path, default=None, help="keep run dirs here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = args.runs or Path(tempfile.mkdtemp(prefix="ltmpctl-acc-"))
    rows = []
    for target in args.targets:
        for name in args.compressors:
            sets = [f"target={target}", f"compressor.name={name}", "compressor.params={}",
                    "stages.flops.enabled=false", f"out={root / f'{name}-{target}'}"]
            if args.eval_images:
                sets.append(f"stages.evaluate.images={args.eval_images}")
            s = run_compress(resolve(RECIPE, None, sets))
            rows.append((name, target, s))
            print(f"{name:5} target {target:.2f}: FLOPs {s['flops_ratio']:.3f} top-1 {s['compressed']['top1']:.2f} "
                  f"(base {s['base']['top1']:.2f})", flush=True)
    print(f"\ndemo ViT (self-trained on Fashion-MNIST), {rows[0][2]['compressed']['images']} test images, "
          f"torch {torch.__version__}, {args.threads} threads")
    print(f"{'compressor':10} {'target':>6} {'FLOPs':>6} {'GMACs':>7} {'top-1':>6} {'d top-1':>7}  params")
    for name, target, s in rows:
        c, b = s["compressed"], s["base"]
        print(f"{name:10} {target:6.2f} {s['flops_ratio']:6.3f} {c['gmacs']:7.4f} {c['top1']:6.2f} "
              f"{c['top1'] - b['top1']:+7.2f}  {short(s['params'])}")


if __name__ == "__main__":
    main()
