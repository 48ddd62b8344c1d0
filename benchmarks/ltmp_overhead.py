"""What ltmp's batch-1 forward pays on top of timm's own blocks at the same token counts, by ablation: each part is
taken out of a copy of the calibrated model (~0.5 FLOPs) and the copies are timed interleaved with the base.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/ltmp_overhead.py --threads 1 --repeats 30

Rows: `bound` (the base's blocks fed ltmp's token counts by slicing, as in latency_vs_flops), `ltmp`, `no reduction`
(ltmp with each block's merge-and-prune step replaced by a slice to the counts that step keeps on this image) and
`no reduction, SDPA` (also without the attention statistics the reduction needs: importance and the matching metric
off, so attention takes the fused kernel). Differences of neighbouring rows are the cost of each part in context:
between timm's layers, with their caches cold, which a part timed alone in a loop does not show. The copies differ
only in what is taken out; their logits differ, their token counts don't.
"""
from __future__ import annotations

import copy
import os
import types
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import torch  # noqa: E402

from ltmpctl.bench.local import bench_torch_models, set_threads  # noqa: E402
from ltmpctl.compressor import token_counts  # noqa: E402

from latency_vs_flops import bound_of, ltmp_at, model_args, setup_line  # noqa: E402


def _slice_reduce(self: torch.nn.Module, x: torch.Tensor, size: torch.Tensor, mask: Optional[torch.Tensor],
                  a: Any) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A block's reduction replaced by keeping its first `kept` tokens (the count the real step keeps)."""
    return x[:, :self.kept], size[:, :self.kept], mask


def _slice_reduce_raw(self: torch.nn.Module, x: torch.Tensor, size: torch.Tensor, probs: torch.Tensor,
                      keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for the batch-1 forward's kernel step (`LTMPBlock.reduce_raw`)."""
    return x[:, :self.kept], size[:, :self.kept]


def without_reduction(model: torch.nn.Module, x: torch.Tensor, statistics: bool) -> torch.nn.Module:
    """A copy of the ltmp `model` whose blocks slice to the counts the real reduction keeps on `x` (batch 1);
    `statistics=False` also turns off the importance and metric attention computes for it."""
    with torch.inference_mode():
        model(x)
    kept = token_counts(model)[0, :, 1].tolist()  # tokens out of each block's reduction
    out = copy.deepcopy(model)
    for blk, n in zip(out.blocks, kept):
        blk.kept = int(n)
        blk.reduce = types.MethodType(_slice_reduce, blk)
        blk.reduce_raw = types.MethodType(_slice_reduce_raw, blk)
        if not statistics:  # the batch-1 block with keys only, which then takes the fused attention kernel
            blk.importance_mode, blk.need_metric = None, False
            blk.raw_probs = lambda n: False
    return out


def main() -> None:
    args = model_args(__doc__, 30, [1]).parse_args()
    set_threads(args.threads)
    print(setup_line())
    for key in args.models:
        title, base, images, model = ltmp_at(key, 0.5, args.threads)
        for batch in args.batches:
            x = images(max(batch, 32), 0)[:batch]
            bound = bound_of(base, model, x)
            if bound is None:
                print(f"\n{title}, batch {batch}: images keep different counts, no bound; use batch 1")
                continue
            rows = {"base": base, "bound": bound, "ltmp": model,
                    "no reduction": without_reduction(model, x, statistics=True),
                    "no reduction, SDPA": without_reduction(model, x, statistics=False)}
            timed = bench_torch_models(list(rows.values()), tuple(x.shape[1:]), batch, 3, args.repeats,
                                       threads=args.threads, images=x)
            ms = {name: r["p50_ms"] for name, r in zip(rows, timed)}
            depth = len(base.blocks)
            print(f"\n{title}, batch {batch}, ltmp calibrated to 0.5 FLOPs, p50 timed interleaved")
            for name, t in ms.items():
                print(f"  {name:<20} {t:8.2f} ms  {t / ms['base']:6.3f} of the base")
            parts = {"merge-and-prune step": ms["ltmp"] - ms["no reduction"],
                     "attention statistics (explicit softmax, importance, metric)":
                         ms["no reduction"] - ms["no reduction, SDPA"],
                     "the rest over the bound": ms["no reduction, SDPA"] - ms["bound"]}
            for name, t in parts.items():
                print(f"  {name:<60} {t:7.2f} ms a forward, {t * 1e3 / depth:6.0f} us a block")


if __name__ == "__main__":
    main()
