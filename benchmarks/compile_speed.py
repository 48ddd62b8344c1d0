"""Would `torch.compile` be worth a `--compile` option? Base and every compressor at about half the FLOPs, eager vs
compiled (inductor, static shapes), timed interleaved on deit_tiny 224 (random weights and images) and the demo
(its own images). Why ltmpctl ships no such option: read the table.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/compile_speed.py --threads 2 --batches 32
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/compile_speed.py --models demo --batches 64

Columns: compile s = the first compiled forward (compilation included); again s = the compiled forward on a second
batch of other images of the same shape (a recompilation when the token counts depend on the image, as ltmp's do);
max diff = largest |logit| difference compiled vs eager on the timed batch (a changed token choice shows as a large
one); eager / compiled = latency ratio to the *eager* base; vs compiled base = compiled over the compiled base.
Takes about a minute of compilation per model and shape on 2 cores.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)
# Compile from scratch, as a first run on a new machine would: inductor's on-disk caches would otherwise make a
# repeated run's `compile s` a cache lookup.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

from ltmpctl.bench.local import bench_torch_models, set_threads  # noqa: E402

from latency_vs_flops import MODELS, calibrated, compressed, model_args, setup_line  # noqa: E402


def _seconds(f, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = f(x)
    return time.perf_counter() - t, out


def main() -> None:
    p = model_args(__doc__, 10, [32])
    p.add_argument("--target", type=float, default=0.5, help="FLOPs ratio every compressor is calibrated to")
    args = p.parse_args()
    set_threads(args.threads)
    print(f"{setup_line()}, median of {args.repeats}")
    print(f"{'model':<10} {'batch':>5} {'method':<6} {'compile s':>9} {'again s':>8} {'max diff':>9} {'eager':>6} "
          f"{'compiled':>8} {'vs compiled base':>16}")
    for key in args.models:
        methods = calibrated(key, args.target, args.threads)
        _, base, images = MODELS[key]()
        models = compressed(base, methods)
        for batch in args.batches:
            x, other = images(batch, 0), images(batch, 2)
            torch._dynamo.reset()
            compiled, info = {}, {}
            with torch.inference_mode():
                for name, m in models.items():
                    c = torch.compile(m, dynamic=False)
                    first, out = _seconds(c, x)
                    again, _ = _seconds(c, other)
                    compiled[name] = c
                    info[name] = (first, again, float((out - m(x)).abs().max()))
            eager = list(models.values())
            rows = bench_torch_models(eager + list(compiled.values()), tuple(x.shape[1:]), batch, 2, args.repeats,
                                      threads=args.threads, images=x)
            p50 = [r["p50_ms"] for r in rows]
            k = len(eager)
            for i, name in enumerate(models):
                first, again, diff = info[name]
                print(f"{key:<10} {batch:>5} {name:<6} {first:>9.1f} {again:>8.2f} {diff:>9.1e} "
                      f"{p50[i] / p50[0]:>6.3f} {p50[k + i] / p50[0]:>8.3f} {p50[k + i] / p50[k]:>16.3f}")


if __name__ == "__main__":
    main()
