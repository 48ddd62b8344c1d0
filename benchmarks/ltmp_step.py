"""ltmp's batched eval step with and without the C kernel's raw statistics: the step alone at deit_tiny's and the
demo's batched shapes (`tokens.merge_prune_raw_packed` vs torch's `received_attention` + `similarity` then
`fused_merge_prune`; the padded qkv layout `unpack_qkv` with and without `_kernels.unpack_heads`), then whole ltmp
forwards at ~0.5 FLOPs with the raw step on and off, interleaved with the base.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/ltmp_step.py --threads 2
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/ltmp_step.py --models demo --batches 64 --rounds 5

Outputs of each pair are checked equal (bitwise) before timing; each pair is timed interleaved
(`attention_kernels.interleaved_ms`); times are medians (ms), ratios over the base.
"""
from __future__ import annotations

import os
import statistics
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import torch  # noqa: E402

import ltmpctl.tokens as T  # noqa: E402
from ltmpctl.bench.local import set_threads  # noqa: E402

from attention_kernels import interleaved_ms  # noqa: E402
from latency_vs_flops import ltmp_at, model_args, setup_line  # noqa: E402

# (batch, heads, padded tokens, head_dim): deit_tiny's batch-32 blocks and the demo's batch-32 / 64 ones.
SHAPES = [(32, 3, 197, 64), (32, 3, 150, 64), (32, 3, 100, 64), (32, 4, 50, 32), (64, 4, 50, 32)]


def step_alone(B: int, H: int, N: int, hd: int) -> tuple[float, float, float, float]:
    """(torch step, raw step, torch unpack, kernel unpack) in ms; a quarter of the images padded to 3/4 of N."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[::4, N * 3 // 4:] = False
    rows = T.real_rows(mask)
    qkv = torch.randn(rows.shape[0], 3 * H * hd, generator=g)
    k = T.unpack_qkv(qkv, mask, H, rows).permute(2, 0, 3, 1, 4)[1]  # (B, H, N, hd), heads-major as attention has it
    logits = torch.randn(H, B, N, N, generator=g).transpose(0, 1) * 3
    probs = logits.masked_fill(~mask[:, None, None, :], -float("inf")).softmax(-1)
    x, size = torch.randn(rows.shape[0], H * hd, generator=g), torch.ones(rows.shape[0], 1)

    def torch_step() -> Any:
        imp = T.received_attention(probs, mask, 1, fast=True)
        scores = T.similarity(k.sum(1), 1)
        return T.fused_merge_prune(x, size, 1, B, scores=scores, merge_threshold=torch.tensor(0.5), importance=imp,
                                   prune_threshold=torch.tensor(0.5 / N), mask=mask, min_width=3)

    def raw_step() -> Any:
        return T.merge_prune_raw_packed(x, size, 1, 0.5, 0.5 / N, probs, k, mask, 3)

    kernels = T._kernels

    def torch_unpack() -> Any:
        T._kernels = None
        try:
            return T.unpack_qkv(qkv, mask, H, rows)
        finally:
            T._kernels = kernels

    assert all(torch.equal(a, b) for a, b in zip(torch_step(), raw_step()))
    assert torch.equal(torch_unpack(), T.unpack_qkv(qkv, mask, H, rows))
    return (*interleaved_ms([torch_step, raw_step], 20, warmup=3),
            *interleaved_ms([torch_unpack, lambda: T.unpack_qkv(qkv, mask, H, rows)], 20, warmup=3))


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
    print("\nthe step alone, ms (batch, heads, tokens, head_dim): torch -> raw step | unpack_qkv torch -> kernel")
    with torch.inference_mode():
        for shape in SHAPES:
            a, b, c, d = step_alone(*shape)
            print(f"  {str(shape):<18} {a:7.2f} -> {b:7.2f}   | {c:6.2f} -> {d:6.2f}")
    print("\nwhole forwards, latency over the base (interleaved)")
    for key in args.models:
        for batch in args.batches:
            forwards(key, batch, args.rounds, args.repeats, args.threads)


if __name__ == "__main__":
    main()
