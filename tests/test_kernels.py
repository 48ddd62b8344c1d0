"""The C reduction kernel (`ltmpctl/_kernels.c`) against the torch forms it stands in for: bitwise the same."""
import copy
from types import SimpleNamespace

import pytest
import torch

import ltmpctl
import ltmpctl.tokens as tokens
from conftest import tiny_vit

VARIANTS = {"plain": {}, "distilled": {"distilled": True}, "registers": {"reg_tokens": 4}, "qk_norm": {"qk_norm": True}}


def test_kernel_is_built():
    """setup.py builds it wherever a C compiler and the Python headers are (CI's machines have both)."""
    assert tokens._kernels is not None, "ltmpctl._kernels missing: reinstall with gcc and python3-dev present"


def _forwards(model, images):
    """Batch-1 forwards of every image, then one batched forward, with their per-block token counts."""
    single, counts = [], []
    with torch.no_grad():
        for i in range(len(images)):
            single.append(model(images[i:i + 1]))
            counts.append(ltmpctl.token_counts(model))
        single.append(model(images))
        counts.append(ltmpctl.token_counts(model))
    return single, counts


# ltmp: merging and pruning, merging only, pruning only, images pruned to their prefix tokens (prune 0.05), nothing
# reduced at all; tome: a constant r, and a schedule that merges 80% of the tokens; topk: mean and class attention
# (batch 1 in the kernel), and fused (the torch form at every batch).
SETTINGS = [("ltmp", dict(merge_threshold=0.5, prune_threshold=0.02)), ("ltmp", dict(merge_threshold=0.3)),
            ("ltmp", dict(merge_threshold=1.0, prune_threshold=0.02)),
            ("ltmp", dict(merge_threshold=0.2, prune_threshold=0.05)), ("ltmp", dict(merge_threshold=1.0)),
            ("tome", dict(r=8)), ("tome", dict(r=[20, 16, 10, 6])),
            ("topk", dict(keep_rate=0.7)), ("topk", dict(keep_rate=0.5, importance="cls")),
            ("topk", dict(keep_rate=0.6, fuse=True))]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,params", SETTINGS)
def test_kernel_matches_torch_bitwise(images, variant, name, params, monkeypatch):
    """Logits and token counts at batch 1 and batched, with the kernel and with the torch forms."""
    model = ltmpctl.apply(tiny_vit(depth=4, **VARIANTS[variant]), name, **params)
    fused = _forwards(model, images)
    monkeypatch.setattr(tokens, "_kernels", None)
    plain = _forwards(copy.deepcopy(model), images)
    for a, b in zip(fused[0] + fused[1], plain[0] + plain[1]):
        assert torch.equal(a, b)
    if params.get("merge_threshold") != 1.0 or params.get("prune_threshold"):
        assert fused[1][-1][:, -1, 1].min() < fused[1][-1][0, 0, 0], "the settings should reduce tokens"


@pytest.mark.parametrize("name,params,kernel", [SETTINGS[0] + ("merge_prune",), SETTINGS[5] + ("merge_prune",),
                                                SETTINGS[7] + ("keep_top",)])
def test_kernel_is_used_and_stays_out_of_autograd(images, name, params, kernel, monkeypatch):
    """Eager no-grad eval forwards call it once per block (topk: at batch 1); a forward that records gradients keeps
    the torch form."""
    model = ltmpctl.apply(tiny_vit(depth=4), name, **params)
    calls = []
    real = getattr(tokens._kernels, kernel)
    others = {n: getattr(tokens._kernels, n) for n in dir(tokens._kernels) if not n.startswith("_")}
    counted = SimpleNamespace(**{**others, kernel: lambda *a: calls.append(a) or real(*a)})
    monkeypatch.setattr(tokens, "_kernels", counted)
    with torch.no_grad():
        model(images[:1])
        model(images)
    assert len(calls) == (2 if kernel == "merge_prune" else 1) * 4
    calls.clear()
    out = model(images[:1])  # eval mode with autograd on: gradients must still flow to the input's producers
    assert not calls and out.requires_grad


def test_ltmp_kernel_pruned_to_prefix_then_prune_only(monkeypatch):
    """A token sequence of prefix + 1 (nothing to match) through the kernel: the prune-only case of batch 1."""
    torch.manual_seed(0)
    x, size = torch.randn(3, 8), torch.tensor([[1.0], [2.0], [3.0]])
    imp = torch.tensor([[float("inf"), float("inf"), 0.5]])
    out = tokens.fused_merge_prune(x, size, 2, importance=imp, prune_threshold=torch.tensor(0.4))
    assert out is not None and out[2] is None
    torch.testing.assert_close(out[0], x * size / size, atol=0, rtol=0)
    out = tokens.fused_merge_prune(x, size, 2, importance=imp, prune_threshold=torch.tensor(0.6))
    assert out[0].shape == (2, 8) and torch.equal(out[1], size[:2])


def test_kernel_row_max_ties_nan_and_padding_as_torch():
    """Given the similarity scores, the kernel's matching is torch's max(dim): first maximum on ties, a NaN is a
    maximum, padding rows and columns never match."""
    torch.manual_seed(0)
    P, N, C = 1, 9, 4  # A = positions 2, 4, 6, 8; B = 1, 3, 5, 7
    x, size = torch.randn(2 * N, C), torch.ones(2 * N, 1)
    scores = torch.rand(2, 4, 4)
    scores[0, 0] = torch.tensor([0.9, 0.2, 0.9, 0.1])  # tie: the first
    scores[0, 1, 2] = float("nan")  # NaN wins, and then never merges (NaN > threshold is false)
    scores[1, :, 3] = 5.0  # image 1 keeps 7 tokens: its last B column and A row are padding
    scores[1, 3] = 7.0
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, 7:] = False
    rows = mask.reshape(-1).nonzero().squeeze(1)
    thr = torch.tensor(0.5)
    got = tokens.fused_merge_prune(x[rows], size[rows], P, 2, scores=scores, merge_threshold=thr, mask=mask)
    masked = scores.clone()
    masked[1, :, 3] = -float("inf")
    node_max, node_idx = masked.max(dim=-1)
    node_max[1, 3] = -float("inf")
    want = tokens.fused_merge_prune(x[rows], size[rows], P, 2, node_idx=node_idx, node_max=node_max,
                                    merge_threshold=thr, mask=mask)
    assert node_idx[0, 0] == 0 and node_max[0, 1].isnan()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("P", [1, 2, 5])
@pytest.mark.parametrize("N_extra", [1, 2, 10, 49])
def test_kernel_reduces_raw_attention_statistics_as_torch(P, N_extra):
    """One image's raw probabilities and keys: the kernel's importance and cosine similarity decide what torch's
    (`received_attention`, `similarity` of the keys' head sum) decide, and the kept tokens are bitwise the same;
    strided keys (a view of qkv) and contiguous ones (after k_norm) alike."""
    gen = torch.Generator().manual_seed(P * 100 + N_extra)
    H, hd, C, N = 3, 8, 16, P + N_extra
    qkv = torch.randn(1, N, 3, H, hd, generator=gen)
    keys = qkv.permute(2, 0, 3, 1, 4)[1, 0]  # (H, N, hd), strided
    probs = (torch.randn(H, N, N, generator=gen) * 3).softmax(-1)
    x, size = torch.randn(1, N, C, generator=gen), torch.randint(1, 4, (1, N, 1), generator=gen).float()
    imp = tokens.received_attention(probs.unsqueeze(0), None, P, fast=True)
    na, nb = [t.shape[1] for t in tokens.split_ab(imp, P)]
    scores = tokens.similarity(keys.sum(0, keepdim=True), P) if na and nb else None
    for merge, prune in [(0.3, 0.9 / N), (0.0, 0.0), (1.0, 1.2 / N), (-1.0, 0.0)]:
        want = tokens.fused_merge_prune(x, size, P, scores=scores, merge_threshold=merge, importance=imp,
                                        prune_threshold=prune)
        strided = probs.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, not contiguous
        for k, pr in ((keys, probs), (keys.contiguous(), probs), (keys, strided)):
            got = tokens.merge_prune_raw(x, size, P, merge, prune, pr, k)
            assert got[0].shape == want[0].shape
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if N_extra == 49:  # merging everything into B, then pruning half: the statistics really decide
        assert want[0].shape[1] < N


def test_ltmp_batch_one_reads_thresholds_again_when_they_change(images):
    """The eager batch-1 forward keeps the thresholds as floats between forwards; writing to a threshold in place,
    giving it new data or putting a new parameter in its place is seen by the next forward."""
    model = ltmpctl.apply(tiny_vit(depth=2), "ltmp", merge_threshold=1.0, prune_threshold=0.0)
    x = images[:1]

    def kept() -> int:
        with torch.no_grad():
            model(x)
        return int(ltmpctl.token_counts(model)[0, -1, 1])

    assert kept() == 65
    with torch.no_grad():
        model.blocks[0].merge_threshold.fill_(0.0)
    merged = kept()
    assert merged < 65
    model.blocks[0].merge_threshold.data = torch.tensor(1.0)
    assert kept() == 65
    model.blocks[0].merge_threshold = torch.nn.Parameter(torch.tensor(0.0))
    assert kept() == merged
    model.blocks[0].merge_threshold = torch.nn.Parameter(torch.tensor(1.0))
    assert kept() == 65
    model.blocks[1].prune_threshold = torch.nn.Parameter(torch.tensor(0.02))
    assert kept() < 65


@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("heads_major", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_reduces_a_padded_batch_image_by_image(P, heads_major, threads, monkeypatch):
    """Raw statistics of a padded batch (`merge_prune_raw_packed`): each image's kept tokens, sizes and count are
    bitwise what its own statistics give alone (`merge_prune_raw`); padding (NaN here) is never read, in either
    memory order of the batch and head dims (`unpack_qkv` lays them out heads-major), on one thread or with the
    images split over three (the batch is big enough for every thread asked for)."""
    real, used = tokens._kernels.merge_prune, []
    monkeypatch.setattr(tokens._kernels, "merge_prune", lambda *a: (r := real(*a), used.append(r[2]))[0])
    gen = torch.Generator().manual_seed(7 + P)
    H, hd, C, N = 3, 8, 16, P + 100
    counts = [N, P + 1, P + 2, P + 17, P + 70, P + 9] * 4  # down to nothing to match (P + 1)
    B = len(counts)
    mask = torch.arange(N) < torch.tensor(counts).unsqueeze(1)
    shape = (H, B) if heads_major else (B, H)
    probs = torch.full(shape + (N, N), float("nan"))
    keys = torch.full(shape + (N, hd), float("nan"))
    pv, kv = (probs.transpose(0, 1), keys.transpose(0, 1)) if heads_major else (probs, keys)  # (B, H, ...) views
    singles = []
    for b, n in enumerate(counts):
        k = torch.randn(H, n, hd, generator=gen)
        pr = (torch.randn(H, n, n, generator=gen) * 3).softmax(-1)
        kv[b, :, :n], pv[b, :, :n, :n] = k, pr
        pv[b, :, :n, n:] = 0.0  # a padding key's probability, as the masked softmax gives it
        x, size = torch.randn(1, n, C, generator=gen), torch.randint(1, 4, (1, n, 1), generator=gen).float()
        singles.append((x, size, pr, k))
    x = torch.cat([s[0][0] for s in singles])
    size = torch.cat([s[1][0] for s in singles])
    for merge, prune in [(0.3, 0.03), (0.0, 0.0), (1.0, 0.05), (-1.0, 0.0)]:
        used.clear()
        got_x, got_size, got_mask = tokens.merge_prune_raw_packed(x, size, P, merge, prune, pv, kv, mask, P + 2,
                                                                  threads)
        assert used == [threads]
        row = 0
        for b, (xs, ss, pr, k) in enumerate(singles):
            want_x, want_size = tokens.merge_prune_raw(xs, ss, P, merge, prune, pr, k)
            kept = want_x.shape[1]
            assert int(got_mask[b].sum()) == kept and bool(got_mask[b, :kept].all())
            assert torch.equal(got_x[row:row + kept], want_x[0]) and torch.equal(got_size[row:row + kept], want_size[0])
            row += kept
        assert row == got_x.shape[0] and got_mask.shape[1] == max(P + 2, int(got_mask.sum(1).max()))


def _keys_probs(P: int, N_extra: int, H: int = 3, hd: int = 8):
    gen = torch.Generator().manual_seed(P * 100 + N_extra)
    N = P + N_extra
    keys = torch.randn(1, N, 3, H, hd, generator=gen).permute(2, 0, 3, 1, 4)[1, 0]  # (H, N, hd), strided
    probs = (torch.randn(H, N, N, generator=gen) * 3).softmax(-1)
    return N, keys, probs, gen


@pytest.mark.parametrize("P", [1, 2, 5])
@pytest.mark.parametrize("N_extra", [2, 3, 10, 49])
def test_kernel_ranks_tome_merges_from_raw_keys_as_torch(P, N_extra):
    """ToMe at batch 1 from raw keys: the kernel's similarities, partners and ranking give what torch's `match`, its
    topk over the row maxima and `fused_merge_prune` with that order give, bitwise, for every r."""
    N, keys, _, gen = _keys_probs(P, N_extra)
    x, size = torch.randn(1, N, 16, generator=gen), torch.randint(1, 4, (1, N, 1), generator=gen).float()
    node_max, node_idx = tokens.match(keys.sum(0, keepdim=True), P, None)
    order = node_max.topk(node_max.shape[1], dim=-1).indices
    for r in sorted({1, 2, N_extra // 3, N_extra // 2} & set(range(1, N_extra // 2 + 1))):
        want = tokens.fused_merge_prune(x, size, P, node_idx=node_idx, src_order=order[:, :r])
        for k in (keys, keys.contiguous()):
            got = tokens.merge_top_raw(x, size, P, r, k)
            assert got[0].shape == (1, N - r, 16)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_kernel_tome_ranking_breaks_ties_by_position_and_ranks_nan_first():
    """Equal row maxima (two A tokens with the same keys) rank by position; a NaN maximum (a zero key's cosine)
    ranks above every number, as torch's topk puts it."""
    P, C = 1, 4
    keys = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(3))  # A = 2, 4, 6, 8; B = 1, 3, 5, 7
    keys[:, 4] = keys[:, 2]  # A tokens 0 and 1 alike: the same best partner, the same similarity
    keys[:, 1] = keys[:, 2] * 2.0  # ... and it is B token 0 at similarity 1, the highest there is
    x, size = torch.randn(1, 9, C), torch.ones(1, 9, 1)
    out, out_size = tokens.merge_top_raw(x, size, P, 1, keys)
    # A token 0 (position 2) merged into B token 0 (position 1); A token 1 (position 4) kept, first of the A's.
    assert torch.equal(out[0, 1], x[0, 4]) and out_size[0, -4] == 2.0
    keys[:, 8] = 0.0  # A token 3: a zero metric, NaN similarities, a NaN maximum: ranked first, never a NaN merge
    node_max, _ = tokens.match(keys.sum(0, keepdim=True), P, None)
    assert node_max[0, 3].isnan() and node_max.topk(4).indices[0, 0] == 3
    out, out_size = tokens.merge_top_raw(x, size, P, 1, keys)
    # Position 8 merged into its partner, the first of its NaN row (B token 0, position 1).
    assert out_size[0, :, 0].tolist() == [1, 1, 1, 1, 2, 1, 1, 1]
    assert torch.equal(out[0, :4], x[0, [0, 2, 4, 6]]) and torch.equal(out[0, 4], (x[0, 1] + x[0, 8]) / 2)


@pytest.mark.parametrize("P", [1, 2, 5])
@pytest.mark.parametrize("N_extra", [1, 2, 10, 49])
@pytest.mark.parametrize("cls", [False, True])
def test_kernel_keeps_topk_from_raw_probabilities_as_torch(P, N_extra, cls):
    """topk at batch 1: the kernel's importance (mean attention received, or the class token's over heads) keeps
    the tokens torch's importance and topk keep, in their order, rows copied bitwise."""
    N, _, probs, gen = _keys_probs(P, N_extra)
    x, size = torch.randn(1, N, 16, generator=gen), torch.ones(1, N, 1)
    p4 = probs.unsqueeze(0)
    imp = p4[:, :, 0, :].mean(1) if cls else tokens.received_attention(p4, None, P, fast=True)
    for keep in sorted({0, 1, N_extra // 2, N_extra - 1, N_extra}):
        top = tokens.ascending(imp[:, P:].topk(keep, dim=1).indices) + P
        rows = torch.cat([torch.arange(P), top[0]])
        got = tokens.keep_top_raw(x, size, P, keep, probs, cls)
        assert torch.equal(got[0], x[:, rows]) and torch.equal(got[1], size[:, rows])


def test_kernel_topk_ties_keep_the_first():
    """Equal importance at the cut: the earlier token is kept (torch's topk leaves the choice open)."""
    P, N = 1, 5
    probs = torch.full((2, N, N), 1.0 / N)  # every token receives the same attention
    x, size = torch.randn(1, N, 4), torch.ones(1, N, 1)
    got, _ = tokens.keep_top_raw(x, size, P, 2, probs)
    assert torch.equal(got, x[:, [0, 1, 2]])


def test_kernel_empty_merge_order_merges_nothing():
    """ToMe's form with r = 0 (an empty src_order, no row maxima): every token kept, in the reference's order."""
    x, size = torch.randn(9, 4), torch.ones(9, 1)
    node_idx = torch.zeros(1, 4, dtype=torch.long)
    out, out_size, _ = tokens.fused_merge_prune(x, size, 1, node_idx=node_idx, src_order=node_idx[:, :0])
    assert torch.equal(out, x[[0, 2, 4, 6, 8, 1, 3, 5, 7]]) and torch.equal(out_size, size)


@pytest.mark.parametrize("counts", [[5, 2, 7], [7, 7, 7], [1, 7, 3], [64, 3, 50, 64, 17, 1, 60] * 3])
def test_unpack_qkv_kernel_lays_out_heads_as_torch(counts, monkeypatch):
    """The packed qkv rows of a padded batch, heads-major with zeros in the padding: the kernel's copy is bitwise
    torch's index_copy and index_fill (same values, same layout), its images split over torch's threads where the
    batch is big enough (the last case: 21 images of up to 64 tokens, 8 x 256-wide heads, on 3 threads)."""
    B, N, (h, hd) = len(counts), max(counts), (2, 4) if len(counts) < 5 else (8, 256)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # what unpack_qkv hands the kernel
    mask = torch.arange(N) < torch.tensor(counts).unsqueeze(1)
    qkv = torch.randn(sum(counts), 3 * h * hd, generator=torch.Generator().manual_seed(sum(counts)))
    got, kernels = tokens.unpack_qkv(qkv, mask, h), tokens._kernels
    monkeypatch.setattr(tokens, "_kernels", None)
    want = tokens.unpack_qkv(qkv, mask, h)
    assert torch.equal(got, want) and got.stride() == want.stride()
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    out, flat = torch.empty(3 * h, B * N, hd), mask.contiguous()
    used = kernels.unpack_heads(qkv.data_ptr(), flat.data_ptr(), B, N, 3 * h, hd, out.data_ptr(), 3)
    assert used == (3 if B > 5 else 1) and torch.equal(out.view(3, h, B, N, hd).permute(2, 3, 0, 1, 4), got)


@pytest.mark.parametrize("counts", [[5, 2, 7], [7, 7, 7], [4], [64, 3, 50, 64, 17, 1, 60] * 3])
@pytest.mark.parametrize("sized", [True, False])
def test_unpack_attention_makes_the_key_bias_with_the_layout(counts, sized, monkeypatch):
    """`unpack_attention`'s padded qkv is `unpack_qkv`'s, and its key bias is bitwise `key_bias` of the padded sizes
    (log size of a real key, 0 without proportional attention, -inf in padding) on every head, heads-major as q and
    k lie, whatever the threads; none where there is neither padding nor proportional attention."""
    B, N, (h, hd) = len(counts), max(counts), (2, 4) if len(counts) < 5 else (8, 256)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    mask = torch.arange(N) < torch.tensor(counts).unsqueeze(1)
    g = torch.Generator().manual_seed(sum(counts))
    qkv = torch.randn(sum(counts), 3 * h * hd, generator=g)
    size = torch.randint(1, 9, (sum(counts), 1), generator=g).float()
    got, bias = tokens.unpack_attention(qkv, mask, h, (size - 1.0).log1p() if sized else None)
    layout = tokens.unpack_qkv(qkv, mask, h)
    assert torch.equal(got, layout) and got.stride() == layout.stride()
    padded = sum(counts) < B * N
    want = tokens.key_bias(tokens.unpack(size, mask), mask if padded else None, sized, fast=True)  # (B, 1, 1, N)
    if want is None:
        assert bias is None and not padded and not sized
        return
    assert bias.shape == (B, h if B > 1 else 1, 1, N) and torch.equal(bias, want.expand_as(bias))
    assert B == 1 or tokens.heads_major(bias) and bias.transpose(0, 1).is_contiguous()


@pytest.mark.parametrize("counts", [[5, 2, 7], [7, 7, 7], [64, 3, 50, 64, 17, 1, 60] * 3])
def test_pack_heads_takes_attention_output_back_to_packed_rows(counts, monkeypatch):
    """`pack_heads` of the heads-major layout `unpack_qkv` made gives back the packed rows it came from (here v's
    columns), bitwise, with the kernel and in torch's form. Of the 3 threads offered, the kernel takes one for a
    small batch, two for the last (a copy of 2.75M floats: `COPY_PER_THREAD` each)."""
    B, N, (h, hd) = len(counts), max(counts), (2, 4) if len(counts) < 5 else (8, 256)
    mask = torch.arange(N) < torch.tensor(counts).unsqueeze(1)
    qkv = torch.randn(sum(counts), 3 * h * hd, generator=torch.Generator().manual_seed(B))
    v = tokens.unpack_qkv(qkv, mask, h).permute(2, 0, 3, 1, 4)[2]  # (B, h, N, hd), as attention's output lies
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    calls = []
    real = tokens._kernels.pack_heads
    monkeypatch.setattr(tokens._kernels, "pack_heads", lambda *a: calls.append(real(*a)) or calls[-1])
    assert torch.equal(tokens.pack_heads(v, mask), qkv[:, 2 * h * hd:])
    assert calls == [2 if B > 5 else 1]
    monkeypatch.setattr(tokens, "_kernels", None)
    assert torch.equal(tokens.pack_heads(v, mask), qkv[:, 2 * h * hd:])


def test_kernel_refuses_raw_statistics_of_mismatched_shapes():
    """Sizes the kernel would read past (keys laid out (B, N, h, hd) instead of (B, h, N, hd), a mask of another
    batch) are refused before any buffer is read."""
    B, H, N, hd, C = 2, 3, 9, 4, 8
    keys, probs = torch.randn(B, H, N, hd), torch.rand(B, H, N, N)
    mask = torch.ones(B, N, dtype=torch.bool)
    x, size = torch.randn(B * N, C), torch.ones(B * N, 1)
    assert tokens.merge_prune_raw_packed(x, size, 1, 0.5, 0.0, probs, keys, mask, 3)[0].shape[1] == C
    with pytest.raises(ValueError, match="mismatched"):
        tokens.merge_prune_raw_packed(x, size, 1, 0.5, 0.0, probs, keys.transpose(1, 2), mask, 3)
    with pytest.raises(ValueError, match="mismatched"):
        tokens.merge_prune_raw_packed(x, size, 1, 0.5, 0.0, probs, keys, mask[:1], 3)
