"""Contract tests for the built-in compressors on tiny seeded ViTs (offline, seconds)."""
import copy

import pytest
import torch

import ltmpctl
from ltmpctl.errors import ConfigError, ModelError, PluginError
from ltmpctl.registry import get
from ltmpctl.tokens import BIAS_AFTER_TOKENS
from conftest import tiny_vit

COMPRESSORS = ["ltmp", "tome", "topk"]
VARIANTS = {
    "plain": {},
    "layerscale": {"init_values": 0.1},
    "distilled": {"distilled": True},
    "registers": {"reg_tokens": 4},
    "qk_norm": {"qk_norm": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", COMPRESSORS)
def test_reducing_nothing_reproduces_timm(name, variant, images):
    model = tiny_vit(**VARIANTS[variant])
    with torch.no_grad():
        ref = model(images)
        out = ltmpctl.apply(copy.deepcopy(model), name, **get(name).identity_params())(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_prefix_tokens_never_pruned_even_when_everything_else_is(images):
    model = ltmpctl.apply(tiny_vit(reg_tokens=2), "ltmp", merge_threshold=1.0, prune_threshold=1.0)
    with torch.no_grad():
        model(images)
    counts = ltmpctl.token_counts(model)
    assert counts[:, 0, 0].eq(67).all() and counts[:, :, 1].eq(3).all()  # cls + 2 registers only


def test_distilled_head_reads_class_and_dist_tokens(images):
    """Merging must keep the distillation token at index 1, where timm's distilled head reads it."""
    base = tiny_vit(distilled=True)
    model = ltmpctl.apply(copy.deepcopy(base), "tome", r=20)
    feats = {}
    model.norm.register_forward_hook(lambda m, i, o: feats.setdefault("x", o))
    with torch.no_grad():
        out = model(images)
    x = feats["x"]
    expect = (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2
    torch.testing.assert_close(out, expect)
    # and the tokens at 0/1 are the prefix ones: with the patch tokens' pos-embeddings ignored, the dist token's
    # output differs from every merged patch token
    assert not torch.allclose(x[:, 1], x[:, 2])


@pytest.mark.parametrize("variant", ["plain", "distilled", "registers", "qk_norm"])
def test_ltmp_batched_equals_batch1_with_different_counts(images, variant):
    """The packed batched form (prefix tokens of every kind in front) gives each image what batch 1 gives."""
    # Four register tokens take attention from the patches, so their importances are lower: lower prune thresholds.
    prune = [0.005, 0.008, 0.012, 0.015] if variant == "registers" else [0.0153, 0.02, 0.03, 0.04]
    model = ltmpctl.apply(tiny_vit(depth=4, **VARIANTS[variant]), "ltmp", merge_threshold=[0.5, 0.45, 0.4, 0.4],
                          prune_threshold=prune)
    with torch.no_grad():
        batched = model(images)
        counts = ltmpctl.token_counts(model)[:, :, 1]  # (B, depth)
        single = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
    assert len({tuple(c) for c in counts.tolist()}) > 1, "test needs images that keep different numbers of tokens"
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_ltmp_batched_equals_batch1_over_many_tokens():
    """Blocks of more than `BIAS_AFTER_TOKENS` tokens add attention's key bias (log size, padding) after the product:
    still each image's batch-1 answer."""
    images = torch.randn(6, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    model = ltmpctl.apply(tiny_vit(img_size=56, depth=3), "ltmp", merge_threshold=0.7, prune_threshold=0.004)
    with torch.no_grad():
        batched = model(images)
        counts = ltmpctl.token_counts(model)[:, 1:, 0]  # (B, depth - 1): tokens into the blocks after the first
        single = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
    assert counts.min() > BIAS_AFTER_TOKENS and len({tuple(c) for c in counts.tolist()}) > 1
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_ltmp_traced_batch_runs_the_mlp_on_real_tokens_only(images, monkeypatch):
    """The form exports trace (a padded batch with a bool mask) gathers each block's real tokens for the MLP: fc1
    sees the images' own token counts, not the widest image's, and every image still gets its batch-1 answer."""
    import sys

    model = ltmpctl.apply(tiny_vit(depth=4), "ltmp", merge_threshold=[0.5, 0.45, 0.4, 0.4],
                          prune_threshold=[0.0153, 0.02, 0.03, 0.04])
    with torch.no_grad():
        single = torch.cat([model(images[i:i + 1]) for i in range(len(images))])
        model(images)
    kept = ltmpctl.token_counts(model)[:, :, 1]  # (B, depth): tokens into each block's MLP
    assert (kept.amax(0) * len(images) > kept.sum(0)).any(), "test needs images that keep different counts"
    rows = []
    for blk in model.blocks:
        blk.mlp.fc1.register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    # Every module takes the branches a trace takes (as under torch.export), run eagerly so the hooks see them.
    for module in ("ltmpctl.tokens", "ltmpctl.compressor", type(model.blocks[0]).__module__):
        monkeypatch.setattr(sys.modules[module], "eager", lambda: False)
    with torch.no_grad():
        traced = model(images)
    assert rows == kept.sum(0).int().tolist()
    torch.testing.assert_close(traced, single, atol=1e-5, rtol=0)


def test_ltmp_traced_reduction_decides_as_eager(monkeypatch):
    """The traced reduction step (what exports run) keeps a merge destination when its own importance or a merged
    source's is above the prune threshold (the reference's test on their maximum) and drops it when neither is;
    tokens, sizes and order as eager's batch-1 step, alone and as the real image of a padded batch."""
    import sys

    from ltmpctl.tokens import AttentionOut

    blk = ltmpctl.apply(tiny_vit(depth=1), "ltmp", merge_threshold=0.9, prune_threshold=0.01).blocks[0]
    # One class token, then B (odd positions) and A (even): A 2 -> B 1 and A 4 -> B 3 match, A 6 matches nothing.
    metric = torch.eye(8)[[7, 0, 0, 1, 1, 2, 3]].unsqueeze(0)
    importance = torch.tensor([[float("inf"), 0.001, 0.5, 0.001, 0.002, 0.5, 0.5]])  # B 1: its source is above; B 3: not
    x, size = torch.randn(1, 7, 4), torch.tensor([1.0, 1, 2, 3, 1, 1, 2]).view(1, 7, 1)
    # A second image of 5 real tokens padded to 7, whose padding must take no part.
    other = [t.roll(1, dims=1) for t in (x, size, importance, metric)]
    with torch.no_grad():
        want_x, want_size, _ = blk._reduce_eval(x, size, None, AttentionOut(None, importance, metric))
        other_x, other_size, _ = blk._reduce_eval(other[0][:, :5], other[1][:, :5], None,
                                                  AttentionOut(None, other[2][:, :5], other[3][:, :5]))
        monkeypatch.setattr(sys.modules[type(blk).__module__], "eager", lambda: False)
        monkeypatch.setattr(sys.modules["ltmpctl.tokens"], "eager", lambda: False)
        got_x, got_size, mask = blk._reduce_eval(x, size, None, AttentionOut(None, importance, metric))
        pad = torch.zeros(1, 7, dtype=torch.bool)
        pad[0, :5] = True
        batch = [torch.cat([t, o]) for t, o in zip((x, size, importance, metric), other)]
        bx, bsize, bmask = blk._reduce_eval(batch[0], batch[1], torch.cat([torch.ones_like(pad), pad]),
                                            AttentionOut(None, batch[2], batch[3]))
    # Prefix, A 6 (unmerged), B 1 (kept for A 2), B 5; B 3 and its source A 4 are gone.
    assert want_size.flatten().tolist() == [1.0, 2.0, 3.0, 1.0]
    assert mask.all() and got_size.flatten().tolist() == want_size.flatten().tolist()
    torch.testing.assert_close(got_x, want_x, atol=1e-6, rtol=0)
    for i, (wx, wsize) in enumerate(((want_x, want_size), (other_x, other_size))):
        kept = int(bmask[i].sum())
        assert kept == wsize.shape[1] and bsize[i, :kept].flatten().tolist() == wsize.flatten().tolist()
        torch.testing.assert_close(bx[i, :kept], wx[0], atol=1e-6, rtol=0)


def test_serial_scope_is_one_thread_only_for_small_eager_tokens():
    from ltmpctl.tokens import SERIAL_ELEMENTS, serial

    threads = torch.get_num_threads()
    if threads == 1:
        pytest.skip("needs more than one intra-op thread")
    small, large = torch.zeros(1, 8, 8), torch.zeros(SERIAL_ELEMENTS + 1)
    seen = []
    for x in (small, large, small.numel(), large.numel()):  # the tokens, or their number of values
        with serial(x):
            seen.append(torch.get_num_threads())
    assert seen == [1, threads, 1, threads] and torch.get_num_threads() == threads
    from ltmpctl.tokens import SERIAL_REDUCE_ELEMENTS  # reduction steps: one thread up to a larger size
    for x, want in ((large, 1), (torch.zeros(SERIAL_REDUCE_ELEMENTS + 1), threads)):
        with serial(x, reduce_ops=True):
            assert torch.get_num_threads() == want
    with pytest.raises(RuntimeError), serial(small):  # restored on the way out of an error too
        raise RuntimeError
    assert torch.get_num_threads() == threads

    def traced(t):
        with serial(t):
            seen.append(torch.get_num_threads())
        return t + 1

    torch.jit.trace(traced, small, check_trace=False)  # not eager (exports, fvcore): the caller's threads
    assert seen[-1] == threads


def test_compressed_model_runs_small_blocks_on_one_thread(images):
    """The stem and each block run on one thread exactly where the tokens entering them are few (`serial`): all
    of a batch-1 forward of the tiny ViT (65 x 64 values), the stem and first block of a batch of 6 (25k) on the
    caller's threads, the blocks after them by their own reduced counts."""
    from ltmpctl.tokens import SERIAL_ELEMENTS

    threads = torch.get_num_threads()
    if threads == 1:
        pytest.skip("needs more than one intra-op thread")
    model = ltmpctl.apply(tiny_vit(), "topk", keep_rate=0.5)
    seen: list[int] = []
    for m in (model.patch_embed, *(blk.mlp for blk in model.blocks)):
        m.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    with torch.no_grad():
        model(images[:1])
        assert seen == [1] * 4
        seen.clear()
        model(images)
    entering = ltmpctl.token_counts(model)[0, :, 0].tolist()  # tokens into each block
    values = [len(images) * n * 64 for n in entering]
    assert seen == [threads] + [1 if v <= SERIAL_ELEMENTS else threads for v in values]
    assert seen[:2] == [threads, threads] and seen[-1] == 1
    assert torch.get_num_threads() == threads


def test_stem_of_an_embedding_without_grid_arithmetic_keeps_the_callers_threads(images):
    """A custom patch embedding that lacks timm's `dynamic_feat_size`: the compressed model still runs (its blocks
    take the scope by their own tokens) and its stem stays on the caller's threads, its token count unknown."""
    from timm.layers import PatchEmbed

    class Plain(PatchEmbed):
        dynamic_feat_size = None

    threads = torch.get_num_threads()
    if threads == 1:
        pytest.skip("needs more than one intra-op thread")
    model = ltmpctl.apply(tiny_vit(embed_layer=Plain), "topk", keep_rate=0.5)
    seen: list[int] = []
    model.patch_embed.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    with torch.no_grad():
        assert model(images[:1]).shape == (1, 10)
    assert seen == [threads]


@pytest.mark.parametrize("name,params", [("ltmp", dict(merge_threshold=0.5, prune_threshold=0.02)),
                                         ("tome", dict(r=8)), ("topk", dict(keep_rate=0.6))])
def test_serial_scope_changes_no_decision(name, params, images, monkeypatch):
    """Batch 1 and batched forwards keep the same tokens with the one-thread scope on and off, and the same logits
    to rounding: MKL multiplies matrices of a dozen rows or fewer differently on one thread (1e-5 to 4e-5 apart on
    unit-scale operands 128-512 wide); norms, softmax, attention and the compressors' own ops give bitwise the same
    values."""
    import ltmpctl.tokens as tokens

    model = ltmpctl.apply(tiny_vit(), name, **params)
    on, off = [], []
    with torch.no_grad():
        for got in (on, off):
            for x in (images[:1], images):
                got.append((model(x), ltmpctl.token_counts(model)))
            monkeypatch.setattr(tokens, "SERIAL_ELEMENTS", -1)
            monkeypatch.setattr(tokens, "SERIAL_REDUCE_ELEMENTS", -1)
    for (a, ca), (b, cb) in zip(on, off):
        assert torch.equal(ca, cb)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prune", [0.01, 0.02])
def test_ltmp_eval_really_removes_tokens(images, prune):
    model = ltmpctl.apply(tiny_vit(), "ltmp", merge_threshold=0.4, prune_threshold=prune)
    shapes = []
    model.blocks[-1].mlp.fc1.register_forward_hook(lambda m, i, o: shapes.append(i[0].shape[1]))
    with torch.no_grad():
        model(images[:1])
    kept = int(ltmpctl.token_counts(model)[0, -1, 1])
    # Eager batch 1 runs exactly the kept tokens, down to the class token alone (prune 0.02); only the exported
    # graphs keep a floor of class token + one A and one B token (padding) so that they can always split A/B.
    assert shapes[0] == kept < 65
    assert (kept > 3) if prune == 0.01 else (kept == 1)


def test_ltmp_train_mode_learns_thresholds(images):
    model = ltmpctl.apply(tiny_vit(), "ltmp", merge_threshold=0.4, prune_threshold=0.015)
    ltmp = get("ltmp")()
    model.train()
    logits = model(images)
    assert logits.shape == (6, 10)
    for mask in model.ltmpctl_masks:  # straight-through masks are exactly hard in the forward
        assert torch.all((mask == 0) | (mask == 1))
    task = torch.nn.functional.cross_entropy(logits, torch.arange(6) % 10)
    loss, ratio = ltmp.loss(model, task, target=0.5, lam=10.0)
    assert 0 < ratio.item() < 1
    loss.backward()
    for blk in model.blocks:
        assert blk.merge_threshold.grad is not None and blk.prune_threshold.grad is not None
    assert any(float(b.merge_threshold.grad) != 0 for b in model.blocks)
    assert any(float(b.prune_threshold.grad) != 0 for b in model.blocks)
    with torch.no_grad():
        model.blocks[0].merge_threshold.fill_(1.7)
    ltmp.after_step(model)
    assert float(model.blocks[0].merge_threshold) == 1.0


def test_ltmp_thresholds_are_the_only_new_parameters():
    base = tiny_vit()
    n_base = len(list(base.parameters()))
    model = ltmpctl.apply(base, "ltmp")
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == n_base + 2 * 3
    assert "blocks.0.merge_threshold" in names and "blocks.2.prune_threshold" in names


def test_tome_merges_r_per_block_and_schedule(images):
    model = ltmpctl.apply(tiny_vit(), "tome", r=8)
    with torch.no_grad():
        model(images)
    counts = ltmpctl.token_counts(model)[0]
    assert counts[:, 0].tolist() == [65, 57, 49] and counts[:, 1].tolist() == [57, 49, 41]
    ltmpctl.apply(model, "tome", r=40)  # clamped to half of the non-prefix tokens
    with torch.no_grad():
        model(images)
    assert ltmpctl.token_counts(model)[0, :, 1].tolist() == [33, 17, 9]
    tome_mod = __import__("ltmpctl_plugins.tome", fromlist=["parse_r"])
    assert tome_mod.parse_r(12, 8, 0.0) == [8] * 12
    assert tome_mod.parse_r(4, 6, -0.5) == [9, 7, 5, 3]


def test_topk_counts_and_fuse(images):
    model = ltmpctl.apply(tiny_vit(), "topk", keep_rate=0.5)
    with torch.no_grad():
        model(images)
    assert ltmpctl.token_counts(model)[0, :, 1].tolist() == [33, 17, 9]
    model = ltmpctl.apply(tiny_vit(), "topk", keep_rate=[1.0, 0.5, 0.5], fuse=True)
    with torch.no_grad():
        model(images)
    assert ltmpctl.token_counts(model)[0, :, 1].tolist() == [65, 34, 19]  # + one fused token (ceil(0.5 * 33) = 17)


@pytest.mark.parametrize("name,params,msg", [
    ("ltmp", {"merge_threshold": [0.5, 0.5]}, "has 2 entries but the model has 3 blocks"),
    ("ltmp", {"prune_threshold": 1.5}, "prune_threshold"),
    ("ltmp", {"bogus": 1}, "bogus"),
    ("tome", {"r": -1}, "r must be >= 0"),
    ("topk", {"keep_rate": 0.0}, "keep_rate"),
])
def test_bad_params_are_clear_errors(name, params, msg):
    with pytest.raises(ConfigError, match=msg):
        ltmpctl.apply(tiny_vit(), name, **params)


def test_unknown_compressor_and_unsupported_models():
    with pytest.raises(PluginError, match="unknown compressor 'nope'"):
        ltmpctl.apply(tiny_vit(), "nope")
    with pytest.raises(ModelError, match="not a timm VisionTransformer"):
        ltmpctl.apply(torch.nn.Linear(2, 2), "tome")
    with pytest.raises(ModelError, match="class token"):
        ltmpctl.apply(tiny_vit(class_token=False, global_pool="avg"), "tome")
    model = ltmpctl.apply(tiny_vit(), "tome", r=2)
    with pytest.raises(ModelError, match="already compressed with tome"):
        ltmpctl.apply(model, "topk")


def test_attention_kernel_follows_the_shape(images, monkeypatch):
    """Eager eval attention that needs only its output (tome) takes the explicit products for large batches of
    narrow heads over 32-128 tokens, else the fused kernel (`tokens.explicit_wins`); both give the same logits to
    rounding."""
    import torch.nn.functional as F

    import ltmpctl.tokens as tokens

    model = ltmpctl.apply(tiny_vit(), "tome", r=8)  # 2 heads of 32, 65 tokens, then 57, 49
    fused_calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fused = model(images)  # 6 images x 2 heads: too few matrices
        assert len(fused_calls) == len(model.blocks)
        monkeypatch.setattr(tokens, "EXPLICIT_MIN_MATRICES", 12)
        explicit = model(images)
        assert len(fused_calls) == len(model.blocks)  # explicit in every block
        model(images[:1])
        assert len(fused_calls) == 2 * len(model.blocks)  # batch 1: 2 matrices, fused
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)
    assert not tokens.explicit_wins(64, 3, 101, 64) and tokens.explicit_wins(64, 4, 50, 32)  # deit_tiny, the demo
