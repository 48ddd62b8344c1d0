"""The analytic FLOPs model (`ltmpctl.flops`) against fvcore, unreduced and after each compressor; `ltmpctl flops`."""
import copy
import json

import pytest
import torch
from conftest import tiny_vit
from typer.testing import CliRunner

import ltmpctl
import ltmpctl.cli.commands  # noqa: F401  (registers the commands)
from ltmpctl import demo
from ltmpctl.analysis import TOLERANCE, analyze_flops
from ltmpctl.cli import app
from ltmpctl.flops import LN, base_macs, batch_ratios, fvcore_macs, is_merging, measured_ratio, model_macs, vit_shape
from ltmpctl.tokens import onnx_products

VARIANTS = {"plain": {}, "distilled": {"distilled": True}, "qk_norm": {"qk_norm": True}}
COMPRESSORS = [
    ("ltmp", {"merge_threshold": 0.5, "prune_threshold": 0.01}),
    ("tome", {"r": 8}),
    ("topk", {"keep_rate": 0.5}),
    ("topk", {"keep_rate": 0.5, "fuse": True}),
]


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.fixture(scope="module", params=list(VARIANTS))
def base(request) -> torch.nn.Module:
    return tiny_vit(**VARIANTS[request.param])


def test_base_macs_match_fvcore(base, images):
    """Unfused attention is counted by both; fvcore_macs turns timm's fused attention off for the trace."""
    assert base.blocks[0].attn.fused_attn  # the model as timm builds it; fvcore_macs must unfuse it
    assert rel(base_macs(vit_shape(base)), fvcore_macs(base, images)) <= TOLERANCE
    assert base.blocks[0].attn.fused_attn  # and restore it


@pytest.mark.parametrize("name, params", COMPRESSORS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()))
def test_reduced_macs_match_fvcore(base, images, name, params):
    """Analytic MACs from each image's token counts vs fvcore traced on that image alone (batch 1)."""
    model = ltmpctl.apply(copy.deepcopy(base), name, **params)
    shape = vit_shape(model)
    merging = is_merging(model)
    assert merging == (name in ("ltmp", "tome"))
    for i in range(3):
        one = images[i:i + 1]
        with torch.no_grad():
            model(one)
        counts = ltmpctl.token_counts(model)[0]
        assert counts[-1, 1] < shape.tokens  # the parameters really reduce
        analytic = float(model_macs(shape, counts[:, 0].tolist(), counts[:, 1].tolist(), merging=merging))
        assert rel(analytic, fvcore_macs(model, one)) <= TOLERANCE


def test_ltmp_counts_differ_per_image(images):
    """The analysis' per-image path is exercised: LTMP keeps different counts in different images."""
    model = ltmpctl.apply(tiny_vit(), "ltmp", merge_threshold=0.5, prune_threshold=0.01)
    result = analyze_flops(tiny_vit(), model, images, data_dependent=True)
    blocks = result["compressed"]["blocks"]
    assert any(b["tokens_mlp_p10"] != b["tokens_mlp_p90"] for b in blocks)
    assert result["compressed"]["check"]["fvcore_runs"].startswith("per image")
    assert result["ok"]


def _bmm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's bmm count, except for matrix-vector products: the eager forward sums attention received (LTMP's
    importance) as a (1 x N) @ (N x N) product, a reduction like the softmax that no FLOPs count includes."""
    batch, n, k = a_shape
    return 0 if n == 1 else 2 * batch * n * k * b_shape[2]


def _matmul_macs(model, x) -> float:
    """Multiply-adds of every matrix product and convolution one eager forward really runs (torch's own
    counter counts 2 per multiply-add, and no norms, which cancel in the differences below)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping={torch.ops.aten.bmm: _bmm_flops}) as fc:
        model(x)
    return fc.get_total_flops() / 2


def test_batch_ratios_mean_and_what_the_packed_batch_computes(images):
    """A batch pays its images' own counts except attention's n x n products (padded to the widest image): what
    the eager batched forward really multiplies, minus what its images cost one by one, is exactly that padding."""
    model = ltmpctl.apply(tiny_vit(), "ltmp", merge_threshold=0.5, prune_threshold=0.01)
    base = base_macs(vit_shape(model))
    mean, executed = batch_ratios(model, images)
    assert mean == pytest.approx(measured_ratio(model, images))
    assert executed > mean  # these images keep different counts
    single = sum(_matmul_macs(model, images[i:i + 1]) for i in range(len(images)))
    padding = _matmul_macs(model, images) - single
    # rel: the formula counts the matching product as ((n - P) / 2)^2 where the code multiplies |A| * |B|.
    assert padding == pytest.approx((executed - mean) * base * len(images), rel=1e-3)
    assert batch_ratios(model, images[:1])[1] == pytest.approx(measured_ratio(model, images[:1]))
    static = ltmpctl.apply(tiny_vit(), "topk", keep_rate=0.5)
    assert batch_ratios(static, images)[1] == pytest.approx(measured_ratio(static, images))
    assert batch_ratios(tiny_vit(), images) == (1.0, 1.0)


def test_batch_ratios_of_the_exported_graph(images, monkeypatch):
    """What an exported ONNX graph computes on a padded batch: the attention half at the widest image's counts, the
    MLP on the real tokens (`TokenBlock._mlp_gathers`), the merge sums as one-hot products (`onnx_products`),
    checked against the multiply-adds of the traced form."""
    import sys

    model = ltmpctl.apply(tiny_vit(), "ltmp", merge_threshold=0.5, prune_threshold=0.01)
    static = ltmpctl.apply(tiny_vit(), "tome", r=3)
    base = base_macs(vit_shape(model))
    mean, executed = batch_ratios(model, images)
    mean_x, exported = batch_ratios(model, images, exported=True)
    assert mean_x == mean and exported > executed
    n_attn = ltmpctl.token_counts(model)[:, :, 0]  # (B, depth), from the last (batched) forward
    # torch's counter has no norms: take the padded rows' norm1 (LN MACs a value) out of the formula's difference.
    norm1 = LN * vit_shape(model).dim * float((n_attn.amax(0) - n_attn).sum())
    single = sum(_matmul_macs(model, images[i:i + 1]) for i in range(len(images)))
    static_mean, static_exported = batch_ratios(static, images, exported=True)
    static_single = sum(_matmul_macs(static, images[i:i + 1]) for i in range(len(images)))
    for module in ("ltmpctl.tokens", "ltmpctl.compressor", type(model.blocks[0]).__module__):
        monkeypatch.setattr(sys.modules[module], "eager", lambda: False)  # the branches a trace takes
    with onnx_products():
        padding = _matmul_macs(model, images) - single
        merge_sums = _matmul_macs(static, images) - static_single
    # rel: the matching product, as above.
    assert padding == pytest.approx((exported - mean) * base * len(images) - norm1, rel=1e-3)
    assert merge_sums > 0 and merge_sums == pytest.approx((static_exported - static_mean) * base * len(images))


def test_analyze_flops_totals_add_up(images):
    base = tiny_vit()
    compressed = ltmpctl.apply(copy.deepcopy(base), "tome", r=8)
    result = analyze_flops(base, compressed, images, data_dependent=False)
    for key in ("base", "compressed"):
        s = result[key]
        blocks = sum(b["attn_gmacs"] + b["mlp_gmacs"] for b in s["blocks"])
        assert s["total_gmacs"] == pytest.approx(s["embed_gmacs"] + blocks + s["head_gmacs"])
        assert s["blocks"][-1]["cumulative_gmacs"] == pytest.approx(s["embed_gmacs"] + blocks)
        assert abs(s["check"]["rel_diff"]) <= TOLERANCE
    assert result["base"]["blocks"][0]["tokens_attn"] == 65
    assert [b["tokens_mlp"] for b in result["compressed"]["blocks"]] == [57, 49, 41]
    assert result["flops_ratio"] == pytest.approx(result["compressed"]["total_gmacs"] / result["base"]["total_gmacs"])
    assert result["flops_ratio"] < 1.0 and result["ok"]
    assert "tokens_attn_p10" not in result["compressed"]["blocks"][0]  # spread only for data-dependent ones


def test_flops_cli_tiny_model_writes_json(tmp_path):
    args = ["flops", "vit_tiny", "--no-pretrained", "--model-kwargs", "img_size=32", "--model-kwargs", "patch_size=4",
            "--model-kwargs", "depth=2", "--model-kwargs", "embed_dim=64", "--model-kwargs", "num_heads=2",
            "-c", "topk", "-p", "keep_rate=0.5", "-n", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "random images" in result.stdout and "GMACs" in result.stdout
    saved = json.loads((tmp_path / "flops.json").read_text())
    assert saved["input_size"] == [3, 32, 32]  # the img_size kwarg, not the pretrained config's 224
    assert saved["compressed"]["compressor"] == "topk" and saved["ok"]


@pytest.mark.skipif(not demo.CHECKPOINT.is_file(), reason="the demo checkpoint is not trained yet")
def test_flops_demo_tome_json():
    result = CliRunner().invoke(app, ["flops", "demo", "--compressor", "tome", "--param", "r=4", "--json",
                                      "--images", "4"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["input_size"] == [1, 28, 28] and "demo data" in doc["images_source"]
    assert doc["base"]["blocks"][0]["tokens_attn"] == 50  # 7x7 patches + class token
    assert [b["tokens_mlp"] for b in doc["compressed"]["blocks"]] == [46, 42, 38, 34, 30, 26]
    assert 0.5 < doc["flops_ratio"] < 1.0
    assert doc["ok"] and doc["compressed"]["check"]["fvcore_runs"] == "one batch of 4"
