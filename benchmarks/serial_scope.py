"""What `ltmpctl.tokens.serial` buys: every compressor at about half the FLOPs, its stem, blocks and reduction steps
on one thread where their tokens are few (ltmpctl's default) against the same model with the scope switched off,
interleaved with the uncompressed model, in torch eager at each batch size; deit_tiny 224 (random weights and images)
and the demo (its own images).

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/serial_scope.py --threads 2 --repeats 30
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/serial_scope.py --threads 2 --kernels   # single kernels

Both forms must keep the same tokens and give the same logits to 1e-5 (the script stops otherwise): the scope only
changes how many threads run the kernels, not which kernels run; MKL rounds products of a dozen rows or fewer
differently on one thread (tests/test_compressors.py).
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import torch  # noqa: E402

import ltmpctl  # noqa: E402
import ltmpctl.tokens as tokens  # noqa: E402
from ltmpctl.bench.local import bench_torch_models, set_threads  # noqa: E402
from ltmpctl.compressor import token_counts  # noqa: E402

from latency_vs_flops import MODELS, calibrated, model_args, setup_line  # noqa: E402

DEFAULT = tokens.SERIAL_ELEMENTS
DEFAULT_REDUCE = tokens.SERIAL_REDUCE_ELEMENTS


class Scoped(torch.nn.Module):
    """`model` with the serial scope on (ltmpctl's default) or off (-1: no tensor is small enough for it)."""

    def __init__(self, model: torch.nn.Module, on: bool) -> None:
        super().__init__()
        self.model, self.on = model, on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on:
            tokens.SERIAL_ELEMENTS = tokens.SERIAL_REDUCE_ELEMENTS = -1
        try:
            return self.model(x)
        finally:
            tokens.SERIAL_ELEMENTS, tokens.SERIAL_REDUCE_ELEMENTS = DEFAULT, DEFAULT_REDUCE


def kernels(repeats: int) -> None:
    """Single kernels at deit_tiny's batch-1 sizes, on the caller's threads vs inside the scope (microseconds)."""
    def median_us(f: Callable[[], object], scoped: bool) -> float:
        x = torch.zeros(1, 1, 1)  # small: the scope applies
        runs = []
        for i in range(repeats + 20):  # 20 warm-up calls
            t = time.perf_counter()
            if scoped:
                with tokens.serial(x):
                    f()
            else:
                f()
            if i >= 20:
                runs.append(time.perf_counter() - t)
        return statistics.median(runs) * 1e6

    g = torch.Generator().manual_seed(0)
    cases = []
    for n in (50, 100, 197):
        a, b = torch.randn(1, n // 2, 64, generator=g), torch.randn(1, 64, n // 2, generator=g)
        q, k = torch.randn(3, n, 64, generator=g), torch.randn(3, n, 64, generator=g)
        p = torch.randn(3, n, n, generator=g).softmax(-1)
        cases += [(f"matching product ({n // 2}x64)@(64x{n // 2})", lambda a=a, b=b: torch.bmm(a, b)),
                  (f"q @ k^T, 3 heads x {n} tokens", lambda q=q, k=k: torch.bmm(q, k.transpose(1, 2))),
                  (f"softmax (3, {n}, {n})", lambda p=p: p.softmax(-1)),
                  (f"P @ V, 3 heads x {n} tokens", lambda p=p, k=k: torch.bmm(p, k))]
    print(f"{'kernel':<40} {'threads us':>10} {'scope us':>9}")
    with torch.inference_mode():
        for name, f in cases:
            print(f"{name:<40} {median_us(f, False):>10.1f} {median_us(f, True):>9.1f}")


def main() -> None:
    p = model_args(__doc__, 30, [1])
    p.add_argument("--kernels", action="store_true", help="time single kernels instead of whole models")
    args = p.parse_args()
    set_threads(args.threads)
    if args.kernels:
        kernels(max(args.repeats, 300))
        return
    print(f"{setup_line()}, serial scope up to {DEFAULT} values (reduction steps {DEFAULT_REDUCE}), "
          f"median of {args.repeats}")
    print(f"{'model':<10} {'batch':>5} {'method':<6} {'base ms':>8} {'off ms':>8} {'on ms':>8} {'ratio off':>9} "
          f"{'ratio on':>8}")
    for key in args.models:
        methods = calibrated(key, 0.5, args.threads)
        _, base, images = MODELS[key]()
        models = {name: ltmpctl.apply(copy.deepcopy(base), name, **params) for name, params, _ in methods}
        for batch in args.batches:
            x = images(batch, 0)
            pairs = {name: (Scoped(m, False), Scoped(m, True)) for name, m in models.items()}
            with torch.inference_mode():
                for name, (off, on) in pairs.items():
                    a, kept_off = off(x), token_counts(off.model)  # one model under both wrappers
                    b, kept_on = on(x), token_counts(on.model)
                    if not torch.equal(kept_off, kept_on) or not torch.allclose(a, b, atol=1e-5, rtol=0):
                        raise SystemExit(f"{key} {name}: tokens or logits differ with the serial scope on and off")
            timed = [base] + [m for pair in pairs.values() for m in pair]
            rows = bench_torch_models(timed, tuple(x.shape[1:]), batch, 2, args.repeats, threads=args.threads,
                                      images=x)
            b = rows[0]["p50_ms"]
            for i, name in enumerate(pairs):
                off, on = rows[1 + 2 * i]["p50_ms"], rows[2 + 2 * i]["p50_ms"]
                print(f"{key:<10} {batch:>5} {name:<6} {b:>8.2f} {off:>8.2f} {on:>8.2f} {off / b:>9.3f} {on / b:>8.3f}")


if __name__ == "__main__":
    main()
