"""Which attention kernel wins per shape: torch's fused `scaled_dot_product_attention` against the explicit form
(one batched GEMM with the key bias, softmax, one batched GEMM), both through `ltmpctl.tokens.attention_core` as
a compressor's eval forward calls it when only the output is needed (tome), with proportional attention's
log(size) bias. Shapes of deit_tiny (3 heads of 64) and the demo (4 heads of 32) at the token counts their
compressed blocks see; the last column says which form `tokens.explicit_wins` picks and whether that is the faster.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/attention_kernels.py --threads 2

The two forms are timed interleaved (one call of each in turn), median of --repeats calls after warm-up; they
differ in rounding only, which the script checks (max |diff| column).
"""
from __future__ import annotations

import os
import statistics
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import torch  # noqa: E402
from timm.models.vision_transformer import Attention  # noqa: E402

import ltmpctl.tokens as tokens  # noqa: E402
from ltmpctl.bench.local import interleaved, set_threads  # noqa: E402

from latency_vs_flops import model_args, setup_line  # noqa: E402

# (model, width, heads, token counts its compressed blocks run attention on)
SHAPES = (("deit_tiny", 192, 3, (197, 149, 101, 53, 23)), ("demo", 128, 4, (50, 34, 18)))
CHOSEN = tokens.explicit_wins


def attention_fn(attn: Attention, qkv: torch.Tensor, size: torch.Tensor, explicit: bool) -> Callable[[], object]:
    """One call of the attention core with the kernel forced to `explicit` or fused."""
    def run() -> torch.Tensor:
        tokens.explicit_wins = lambda *shape: explicit
        try:
            return tokens.attention_core(attn, qkv, size, None, 1, None, False).out
        finally:
            tokens.explicit_wins = CHOSEN
    return run


def interleaved_ms(fns: list[Callable[[], object]], repeats: int, warmup: int = 5) -> list[float]:
    """Median ms of each of `fns`, called in turn (`ltmpctl.bench.local.interleaved`) after `warmup` untimed rounds."""
    interleaved(fns, warmup, lambda: None)
    return [statistics.median(t) * 1e3 for t in interleaved(fns, repeats, lambda: None)]


def main() -> None:
    args = model_args(__doc__, 40, [1, 32, 64]).parse_args()
    set_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"{setup_line()}, median of {args.repeats}")
    print(f"{'model':<10} {'batch':>5} {'tokens':>6} {'fused ms':>9} {'explicit ms':>11} {'expl/fused':>10} "
          f"{'max |diff|':>10}  picked")
    with torch.inference_mode():
        for model, width, heads, counts in SHAPES:
            if model not in args.models:
                continue
            attn = Attention(width, heads, qkv_bias=True).eval()
            for batch in args.batches:
                for n in counts:
                    qkv = torch.randn(batch, n, 3 * width, generator=g)
                    size = torch.randint(1, 5, (batch, n, 1), generator=g).float()  # merged tokens: a real bias
                    fused, explicit = attention_fn(attn, qkv, size, False), attention_fn(attn, qkv, size, True)
                    diff = float((fused() - explicit()).abs().max())
                    t_fused, t_expl = interleaved_ms([fused, explicit], args.repeats)
                    pick = CHOSEN(batch, heads, n, width // heads)
                    right = (t_expl < t_fused) == pick
                    print(f"{model:<10} {batch:>5} {n:>6} {t_fused:>9.3f} {t_expl:>11.3f} {t_expl / t_fused:>10.2f} "
                          f"{diff:>10.1e}  {'explicit' if pick else 'fused'}{'' if right else ' (slower here)'}")


if __name__ == "__main__":
    main()
