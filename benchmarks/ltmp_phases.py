"""Where ltmp's batched eager forward spends its time, part by part: ms per forward in each piece of the packed
block (`LTMPBlock._forward_packed`: the per-token layers, the padded layout for attention, the attention core, the
reduction and, inside it, the C kernel's step from attention's raw statistics), with both models' p50 (timed
interleaved) beside it, at ~0.5 FLOPs.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/ltmp_phases.py --threads 2 --batches 32 --models deit_tiny
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/ltmp_phases.py --threads 2 --batches 64 --models demo

Each part is timed with `perf_counter` around its call (CPU ops run synchronously), over --repeats forwards after
two warm-up forwards; parts nest (the kernel step is inside the reduction), so they do not add up to the whole.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import torch  # noqa: E402

from ltmpctl.bench.local import bench_torch_models, set_threads  # noqa: E402

from latency_vs_flops import ltmp_at, model_args, setup_line  # noqa: E402

# Functions the packed block calls by their module-level names, and its methods, timed as parts.
FUNCTIONS = ("unpack_qkv", "unpack_attention", "attention_core", "pack", "pack_heads", "attention_proj",
             "merge_prune_raw_packed")
METHODS = ("_reduce_packed",)
MODULES = ("norm1", "attn.qkv", "norm2", "mlp")


def _timed(totals: dict[str, float], name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t
    return wrapper


def phases(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """ms per forward of each part of `model`'s (ltmp) blocks on `x`; the block class is patched and restored."""
    totals: dict[str, float] = defaultdict(float)
    cls = type(model.blocks[0])
    scope = cls._forward_packed.__globals__  # the plugin module (loaded under its entry point's name)
    saved_fns = {n: scope[n] for n in FUNCTIONS}
    saved_methods = {n: getattr(cls, n) for n in METHODS}
    for n in FUNCTIONS:
        scope[n] = _timed(totals, n, scope[n])
    for n in METHODS:
        setattr(cls, n, _timed(totals, n.lstrip("_"), getattr(cls, n)))
    patched = []
    for blk in model.blocks:
        for path in MODULES:
            mod = blk.get_submodule(path)
            mod.forward = _timed(totals, path, mod.forward)
            patched.append(mod)
    try:
        with torch.inference_mode():
            for _ in range(2):
                model(x)
            totals.clear()
            for _ in range(repeats):
                model(x)
    finally:
        scope.update(saved_fns)
        for n, f in saved_methods.items():
            setattr(cls, n, f)
        for mod in patched:
            del mod.forward  # back to the class's forward
    return {k: v * 1e3 / repeats for k, v in totals.items()}


def main() -> None:
    args = model_args(__doc__, 10, [32]).parse_args()
    set_threads(args.threads)
    print(setup_line())
    for key in args.models:
        title, base, images, model = ltmp_at(key, 0.5, args.threads)
        for batch in args.batches:
            x = images(batch, 0)
            parts = phases(model, x, args.repeats)
            b, c = bench_torch_models([base, model], tuple(x.shape[1:]), batch, 2, args.repeats, threads=args.threads,
                                      images=x)
            print(f"\n{title}, batch {batch}: base p50 {b['p50_ms']:.2f} ms, ltmp p50 {c['p50_ms']:.2f} ms "
                  "(timed interleaved)")
            for name, ms in parts.items():
                print(f"  {name:<16} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
