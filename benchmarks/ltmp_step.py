"""ltmp's batched eval step with and without the C kernel's raw statistics: the pieces alone at deit_tiny's and the
demo's batched shapes (`tokens.merge_prune_raw_packed` vs torch's `received_attention` + `similarity` then
`fused_merge_prune`; the padded qkv layout `unpack_qkv` with and without `_kernels.unpack_heads`; attention's output
back to packed rows, `pack_heads`, with and without `_kernels.pack_heads`; each kernel on one thread and on torch's
thread count), then whole ltmp forwards at ~0.5 FLOPs with the raw step on and off, interleaved with the base.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/ltmp_step.py --threads 2
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/ltmp_step.py --models demo --batches 64 --rounds 5

Outputs of each piece's forms are checked equal (bitwise) before timing; they are timed interleaved
(`attention_kernels.interleaved_ms`); times are medians (ms), ratios over the base.
"""
from __future__ import annotations

import os
import statistics
from typing import Any, Callable, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import torch  # noqa: E402

import ltmpctl.tokens as T  # noqa: E402
from ltmpctl.bench.local import set_threads  # noqa: E402

from attention_kernels import interleaved_ms  # noqa: E402
from latency_vs_flops import ltmp_at, model_args, setup_line  # noqa: E402

# (batch, heads, padded tokens, head_dim): deit_tiny's batch-32 blocks and the demo's batch-32 / 64 ones.
SHAPES = [(32, 3, 197, 64), (32, 3, 150, 64), (32, 3, 100, 64), (32, 4, 50, 32), (64, 4, 50, 32)]


def step_alone(B: int, H: int, N: int, hd: int, threads: int) -> dict[str, tuple[float, ...]]:
    """ms of each piece in its forms: the step (torch, raw on one kernel thread, raw on `threads`), `unpack_qkv`
    (torch, kernel on one thread, on `threads`) and `pack_heads` (torch's transpose and pack, kernel on one thread,
    on `threads`); a quarter of the images padded to 3/4 of N."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[::4, N * 3 // 4:] = False
    rows = T.real_rows(mask)
    qkv = torch.randn(rows.shape[0], 3 * H * hd, generator=g)
    heads = T.unpack_qkv(qkv, mask, H, rows).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd), heads-major as attention has it
    k, o = heads[1], heads[2]  # keys, and v standing in for attention's output (same layout)
    logits = torch.randn(H, B, N, N, generator=g).transpose(0, 1) * 3
    probs = logits.masked_fill(~mask[:, None, None, :], -float("inf")).softmax(-1)
    x, size = torch.randn(rows.shape[0], H * hd, generator=g), torch.ones(rows.shape[0], 1)
    kernels = T._kernels

    def torch_step() -> Any:
        imp = T.received_attention(probs, mask, 1, fast=True)
        scores = T.similarity(k.sum(1), 1)
        return T.fused_merge_prune(x, size, 1, B, scores=scores, merge_threshold=torch.tensor(0.5), importance=imp,
                                   prune_threshold=torch.tensor(0.5 / N), mask=mask, min_width=3)

    def raw_step(n: int) -> Callable[[], Any]:
        return lambda: T.merge_prune_raw_packed(x, size, 1, 0.5, 0.5 / N, probs, k, mask, 3, n)

    def on(n: Optional[int], f: Callable[[], Any]) -> Callable[[], Any]:
        """f with torch's thread count read as n (None: with the kernels unbuilt, torch's forms)."""
        def run() -> Any:
            count = torch.get_num_threads
            if n is None:
                T._kernels = None
            else:
                torch.get_num_threads = lambda: n  # type: ignore[assignment]
            try:
                return f()
            finally:
                T._kernels, torch.get_num_threads = kernels, count
        return run

    unpack, pack = (lambda: T.unpack_qkv(qkv, mask, H, rows)), (lambda: T.pack_heads(o, mask, rows))
    forms = {"step": [torch_step, raw_step(1), raw_step(threads)],
             "unpack_qkv": [on(None, unpack), on(1, unpack), unpack],
             "pack_heads": [on(None, pack), on(1, pack), pack]}
    out = {}
    for name, fs in forms.items():
        results = [f() for f in fs]
        first = results[0] if isinstance(results[0], tuple) else (results[0],)
        for r in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(first, r if isinstance(r, tuple) else (r,))), name
        out[name] = tuple(interleaved_ms(fs, 20, warmup=3))
    return out


def forwards(key: str, batch: int, rounds: int, repeats: int, threads: int | None) -> None:
    """ltmp's forward with the raw step (new) and with torch's statistics (the plugin's kernel_ready check off for
    attention only), interleaved with the base; one line per round."""
    _, base, images, model = ltmp_at(key, 0.5, threads)
    plugin = type(model.blocks[0])._forward_packed.__globals__  # the plugin module (loaded under its entry point)
    x = images(batch, 0)
    ready = plugin["kernel_ready"]

    def torch_stats() -> Any:
        plugin["kernel_ready"] = lambda t: False
        try:
            return model(x)
        finally:
            plugin["kernel_ready"] = ready

    with torch.inference_mode():
        assert torch.equal(model(x), torch_stats())
        runs = [lambda: base(x), lambda: model(x), torch_stats]
        ratios: list[tuple[float, float]] = []
        for i in range(rounds):
            m = [ms / 1e3 for ms in interleaved_ms(runs, repeats, warmup=2 if i == 0 else 0)]
            ratios.append((m[1] / m[0], m[2] / m[0]))
            print(f"  {key} b{batch}: base {m[0] * 1e3:8.2f} ms   raw step {ratios[-1][0]:.3f}   "
                  f"torch statistics {ratios[-1][1]:.3f}", flush=True)
        print(f"  {key} b{batch} median of rounds: raw step {statistics.median(r[0] for r in ratios):.3f}   "
              f"torch statistics {statistics.median(r[1] for r in ratios):.3f}")


def main() -> None:
    p = model_args(__doc__, 5, [32])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --repeats forwards each")
    args = p.parse_args()
    set_threads(args.threads)
    print(setup_line())
    threads = torch.get_num_threads()
    print(f"\neach piece alone, ms (batch, heads, tokens, head_dim): torch -> kernel on 1 thread -> on {threads}")
    with torch.inference_mode():
        for shape in SHAPES:
            parts = step_alone(*shape, threads)
            print(f"  {str(shape):<18} " + "   ".join(f"{name} " + " -> ".join(f"{ms:.2f}" for ms in times)
                                                   for name, times in parts.items()))
    print("\nwhole forwards, latency over the base (interleaved)")
    for key in args.models:
        for batch in args.batches:
            forwards(key, batch, args.rounds, args.repeats, args.threads)


if __name__ == "__main__":
    main()
