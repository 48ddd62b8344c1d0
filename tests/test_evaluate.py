"""The evaluate stage: several models over the same batches, timed side by side."""
from __future__ import annotations

import copy

import pytest
import torch

import ltmpctl
from ltmpctl.stages import evaluate as evaluate_mod
from ltmpctl.stages.evaluate import evaluate
from conftest import tiny_vit


def _batches(n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def test_models_alternate_and_first_forward_is_untimed(monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_vit()
    comp = ltmpctl.apply(copy.deepcopy(base), "tome", r=4)
    clock, calls = [0.0], []
    cost = {"base": 1.0, "compressed": 0.25}  # seconds a forward takes on the fake clock; the first one 100x more

    def timed(label: str):
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            clock[0] += cost[label] * (100 if label not in calls else 1)
            calls.append(label)
        return hook

    base.register_forward_hook(timed("base"))
    comp.register_forward_hook(timed("compressed"))
    monkeypatch.setattr(evaluate_mod.time, "perf_counter", lambda: clock[0])
    batches = _batches(4)
    res = evaluate({"base": base, "compressed": comp}, batches, torch.device("cpu"))

    assert calls == ["base", "compressed", "compressed", "base"] * 2  # each batch through both, order alternating
    assert res["base"]["images_per_s"] == pytest.approx(12 / 3.0)  # batches 2-4: 12 images in 3 s
    assert res["compressed"]["images_per_s"] == pytest.approx(12 / 0.75)
    with torch.no_grad():  # accuracy as computed directly, per model
        for label, m in (("base", base), ("compressed", comp)):
            hits = sum(int((m(x).argmax(-1) == y).sum()) for x, y in batches)
            assert res[label]["top1"] == pytest.approx(100.0 * hits / 16)
            assert res[label]["images"] == 16
    assert res["compressed"]["flops_ratio"] < 1.0 == res["base"]["flops_ratio"]


def test_one_batch_is_timed_anyway(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    base = tiny_vit()
    base.register_forward_hook(lambda *a: clock.__setitem__(0, clock[0] + 2.0))
    monkeypatch.setattr(evaluate_mod.time, "perf_counter", lambda: clock[0])
    res = evaluate({"base": base}, _batches(1, size=6), torch.device("cpu"))
    assert res["base"]["images_per_s"] == pytest.approx(3.0)
