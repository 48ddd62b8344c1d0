"""One rank of the DDP compress test: `torchrun --nproc_per_node=2 --standalone tests/ddp_worker.py OUT A B`.

In one process group: recipe A uninterrupted, then recipe B interrupted (Ctrl-C after fine-tune step 2 on every
rank, as a terminal delivers it to the whole process group) and resumed from its run dir. Rank 0 alone writes the
run dirs; every rank writes what it ended with to OUT/rank<r>.json for the test to compare.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch.distributed as dist  # noqa: E402

from ltmpctl.config import resolve  # noqa: E402
from ltmpctl.pipeline import Hooks, run_compress  # noqa: E402

INTERRUPT_AT = 2


def _interrupt(task: str, done: int, total: int, info: dict) -> None:
    if task == "finetune" and done == INTERRUPT_AT:
        raise KeyboardInterrupt


def _keep(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary.get(k) for k in ("params", "finetune", "base", "compressed", "flops_ratio", "run_dir")}


def main() -> None:
    out, recipe_a, recipe_b = (Path(a) for a in sys.argv[1:4])
    a = run_compress(resolve(recipe_a))
    rank, world = dist.get_rank(), dist.get_world_size()
    b_recipe = resolve(recipe_b)
    try:
        run_compress(b_recipe, Hooks(progress=_interrupt))
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    dist.barrier()  # rank 0 has written the checkpoint
    b = run_compress(b_recipe, resume=Path(str(b_recipe.out)))
    result = {"rank": rank, "world": world, "a": _keep(a), "b": _keep(b)}
    (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
