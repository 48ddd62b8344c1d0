"""Export to ONNX / TorchScript / ExecuTorch, verified against eager; ltmp's data-dependent token counts in ONNX."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import ltmpctl
from ltmpctl.errors import ConfigError, ExportError
from ltmpctl.export import VERIFY_FILE, export_model, probe_images, torchscript

SHAPE = (3, 32, 32)
# On the random tiny model these make ltmp keep 5..10 of 17 tokens depending on the image: prune below half the
# uniform attention share (1/N), merge above cosine 0.3.
LTMP = dict(merge_threshold=0.3, prune_threshold=0.5 / 17)
STATIC = {"tome": dict(r=3), "topk": dict(keep_rate=0.6)}
RECORD_KEYS = {"format", "file", "size_bytes", "opset", "images", "max_abs_diff", "top1_agree", "tokens_min",
               "tokens_max", "passed"}


def tiny(compressor: str | None = None, **params) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, num_classes=10).eval()
    return ltmpctl.apply(model, compressor, **params) if compressor else model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return probe_images(SHAPE, 32, seed=0)


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return probe_images(SHAPE, 2, seed=1)


def kept(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """Tokens each image keeps after the last block (eager)."""
    with torch.no_grad():
        model(x)
    return ltmpctl.token_counts(model)[:, -1, 1].long().tolist()


def records(out: Path) -> dict[str, dict]:
    return {r["format"]: r for r in json.loads((out / VERIFY_FILE).read_text())}


def no_temp_files(out: Path) -> bool:
    return not list(out.glob(".*.tmp"))


# ---- ltmp: data-dependent token counts inside the ONNX graph ------------------------------------------------------

@pytest.fixture(scope="module")
def ltmp_onnx(tmp_path_factory, images, example):
    out = tmp_path_factory.mktemp("ltmp_onnx")
    model = tiny("ltmp", **LTMP)
    record = export_model(model, "onnx", out, example, images)
    return model, out, record


@pytest.fixture(scope="module")
def session(ltmp_onnx):
    import onnxruntime as ort

    return ort.InferenceSession(str(ltmp_onnx[1] / "model.onnx"), providers=["CPUExecutionProvider"])


def ort_logits(session, x: torch.Tensor) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_ltmp_onnx_record(ltmp_onnx, images):
    model, out, record = ltmp_onnx
    assert record["passed"] and RECORD_KEYS <= set(record)
    assert record["file"] == "model.onnx" and (out / "model.onnx").stat().st_size == record["size_bytes"]
    assert record["max_abs_diff"] <= 1e-4 and record["top1_agree"] == 1.0 and record["images"] == 32
    assert record["batch_sizes"] == [1, 32] and record["opset"] == 18
    counts = kept(model, images)
    assert record["tokens_min"] == min(counts) < max(counts) == record["tokens_max"]
    assert records(out) == {"onnx": record} and no_temp_files(out)


def test_ltmp_onnx_graph_is_data_dependent(ltmp_onnx):
    import onnx

    graph = onnx.load(str(ltmp_onnx[1] / "model.onnx")).graph
    assert "NonZero" in {n.op_type for n in graph.node}  # the kept-token count is computed, not a constant
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch


def accumulating_scatters(path: Path) -> list[str]:
    """Nodes of an ONNX file that scatter with a reduction: onnxruntime runs their updates in parallel without atomics,
    so duplicate indices race (`ltmpctl.tokens.onnx_products`)."""
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type.startswith("Scatter")
            and any(a.name == "reduction" and a.s not in (b"", b"none") for a in n.attribute)]


def test_ltmp_onnx_merges_without_racing_scatters(ltmp_onnx, session, images):
    assert accumulating_scatters(ltmp_onnx[1] / "model.onnx") == []
    first = ort_logits(session, images)
    assert all(np.array_equal(ort_logits(session, images), first) for _ in range(5))  # run to run, the same bits


@pytest.mark.parametrize("padded", [False, True])
def test_onnx_importance_product_is_the_reduction(padded):
    """Under `onnx_products` (the ONNX export) importance is one (1 x h * N) @ (h * N x N) product per image: the
    same values as the reductions (to rounding), padding query rows (here holding nonzero probabilities) weighed out."""
    from ltmpctl.tokens import onnx_products, received_attention

    B, h, N, P = 3, 2, 9, 1
    probs = torch.randn(B, h, N, N, generator=torch.Generator().manual_seed(3)).softmax(-1)
    mask = torch.arange(N) < torch.tensor([[9], [5], [3]]) if padded else None
    want = received_attention(probs, mask, P)
    with onnx_products():
        got = received_attention(probs, mask, P)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert got[:, :P].isinf().all() and torch.isfinite(got[:, P:]).all()


def test_ltmp_onnx_matches_eager_per_image(ltmp_onnx, session, images, example):
    model = ltmp_onnx[0]
    counts = kept(model, images)
    assert len(set(counts)) >= 3, counts
    unseen = [i for i, c in enumerate(counts) if c not in kept(model, example)]
    assert unseen, "some images must keep a token count the export example did not"
    for i in range(len(images)):
        x = images[i:i + 1]
        with torch.no_grad():
            want = model(x).numpy()
        got = ort_logits(session, x)
        assert np.abs(got - want).max() <= 1e-4 and got.argmax() == want.argmax(), (i, counts[i])


def test_ltmp_onnx_mixed_batch(ltmp_onnx, session, images):
    model = ltmp_onnx[0]
    counts = kept(model, images)
    # One image per distinct count: the batch is padded to the largest, and each image must still get its own
    # batch-1 answer.
    pick = sorted({c: i for i, c in enumerate(counts)}.values())
    batch = images[pick]
    assert len(set(kept(model, batch))) == len(pick) >= 3
    with torch.no_grad():
        alone = torch.cat([model(x) for x in batch.split(1)]).numpy()
    got = ort_logits(session, batch)
    assert got.shape == (len(pick), 10)
    assert np.abs(got - alone).max() <= 1e-4
    assert (got.argmax(1) == alone.argmax(1)).all()


# ---- static-count compressors: ONNX and TorchScript ----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(STATIC))
def test_static_onnx(name, tmp_path, images, example):
    record = export_model(tiny(name, **STATIC[name]), "onnx", tmp_path, example, images)
    assert record["passed"] and record["batch_sizes"] == [1, 32] and record["max_abs_diff"] <= 1e-4
    assert record["tokens_min"] == record["tokens_max"] < 17  # static: every image keeps the same count
    assert (tmp_path / "model.onnx").is_file() and no_temp_files(tmp_path)
    assert accumulating_scatters(tmp_path / "model.onnx") == []


@pytest.mark.parametrize("name", sorted(STATIC))
def test_static_torchscript(name, tmp_path, images, example):
    model = tiny(name, **STATIC[name])
    record = export_model(model, "torchscript", tmp_path, example, images)
    assert record["passed"] and record["file"] == "model.pt" and record["opset"] is None
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    with torch.no_grad():
        assert torch.allclose(loaded(images[:5]), model(images[:5]), atol=1e-5, rtol=0)
    assert records(tmp_path)["torchscript"]["passed"]


def test_uncompressed_torchscript(tmp_path, images, example):
    record = export_model(tiny(), "torchscript", tmp_path, example, images)
    assert record["passed"] and record["tokens_min"] == record["tokens_max"] == 17 and record["compressor"] is None


# ---- mobile: ExecuTorch .pte with XNNPACK (the optional `mobile` extra; CI installs it) ---------------------------

MOBILE = {"ltmp": LTMP, **STATIC}


@pytest.fixture(scope="module")
def mobile_exports(tmp_path_factory, images, example):
    pytest.importorskip("executorch", reason="pip install 'ltmpctl[mobile]'")
    out = {}
    for name, params in MOBILE.items():
        d = tmp_path_factory.mktemp(f"mobile_{name}")
        model = tiny(name, **params)
        out[name] = (model, d, export_model(model, "mobile", d, example, images))
    return out


@pytest.mark.parametrize("name", sorted(MOBILE))
def test_mobile_export_verified(name, mobile_exports):
    model, out, record = mobile_exports[name]
    assert record["passed"] and record["file"] == "model.pte" and record["batch_sizes"] == [1]
    assert record["max_abs_diff"] <= 1e-4 and record["top1_agree"] == 1.0 and record["images"] == 32
    assert (out / "model.pte").stat().st_size == record["size_bytes"] and no_temp_files(out)
    assert records(out) == {"mobile": record}


def test_mobile_ltmp_drops_tokens_per_image(mobile_exports, images, example):
    from ltmpctl.export import mobile

    model, out, record = mobile_exports["ltmp"]
    counts = kept(model, images)
    assert record["tokens_min"] == min(counts) < max(counts) == record["tokens_max"]
    unseen = [i for i, c in enumerate(counts) if c not in kept(model, example[:1])]
    assert unseen, "some images must keep a token count the export example did not"
    run = mobile.load(out / "model.pte")
    for i in unseen:
        with torch.no_grad():
            want = model(images[i:i + 1])
        got = run(images[i:i + 1])
        assert (got - want).abs().max() <= 1e-4 and got.argmax() == want.argmax(), (i, counts[i])


def test_mobile_ltmp_dense_layers_run_in_xnnpack(example):
    """Past ltmp's first reduction the token count is data-dependent; XNNPACK must still take every matrix product
    (on ExecuTorch's portable kernels the program ran 13x slower than the base)."""
    pytest.importorskip("executorch", reason="pip install 'ltmpctl[mobile]'")
    from executorch.devtools.backend_debug import get_delegation_info

    from ltmpctl.export import mobile

    model = tiny("ltmp", **LTMP)
    lowered = mobile.lower(model, example)
    table = get_delegation_info(lowered.exported_program().graph_module).get_operator_delegation_dataframe()
    ops = {row.op_type: (row.occurrences_in_delegated_graphs, row.occurrences_in_non_delegated_graphs)
           for row in table.itertuples()}
    assert ops["aten_linear_default"] == (2 * 4 + 1, 0)  # qkv, proj, fc1, fc2 per block, and the head
    assert ops["aten_bmm_default"][1] == 0 and ops["aten__softmax_default"][1] == 0
    # Sizes that may be 0 stay refused: the partitioner's own rule, kept outside the export.
    from executorch.backends.xnnpack.partition.config import xnnpack_config
    from torch.fx.experimental.symbolic_shapes import has_free_unbacked_symbols

    assert xnnpack_config.has_free_unbacked_symbols is has_free_unbacked_symbols


def test_mobile_program_takes_one_image(mobile_exports, images):
    from ltmpctl.export import mobile

    with pytest.raises(ExportError, match="takes one image, got 2"):
        mobile.load(mobile_exports["topk"][1] / "model.pte")(images[:2])


# ---- refusals and failures -----------------------------------------------------------------------------------------

def test_torchscript_refuses_ltmp(tmp_path, images, example):
    with pytest.raises(ExportError, match="torchscript can't export ltmp") as info:
        export_model(tiny("ltmp", **LTMP), "torchscript", tmp_path, example, images)
    assert "--format onnx" in info.value.hint
    assert not list(tmp_path.iterdir())


def test_mobile_without_executorch(tmp_path, images, example, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)  # import fails even where it is installed
    with pytest.raises(ExportError, match="needs ExecuTorch") as info:
        export_model(tiny("tome", r=2), "mobile", tmp_path, example, images)
    assert "pip install 'ltmpctl[mobile]'" in info.value.hint
    assert not list(tmp_path.iterdir())


def test_bad_requests(tmp_path, images, example):
    model = tiny("topk", keep_rate=0.5)
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        export_model(model, "tflite", tmp_path, example, images)
    with pytest.raises(ConfigError, match="at least 32 images"):
        export_model(model, "onnx", tmp_path, example, images[:8])
    with pytest.raises(ExportError, match="opset 17 is not supported"):
        export_model(model, "onnx", tmp_path, example, images, opset=17)
    assert not list(tmp_path.glob("model.*"))


def test_failed_verification_keeps_no_model(tmp_path, images, example, monkeypatch):
    model = tiny("topk", keep_rate=0.5)
    export_model(model, "torchscript", tmp_path, example, images)  # a good, older file ...
    real_load = torchscript.load

    def drifting_load(path):
        run = real_load(path)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(torchscript, "load", drifting_load)
    with pytest.raises(ExportError, match=r"torchscript export failed verification.*logits of image \d+") as info:
        export_model(model, "torchscript", tmp_path, example, images)
    assert "model.pt.failed" in info.value.hint
    # ... is gone: the name model.pt would claim this model exported correctly.
    assert not (tmp_path / "model.pt").exists() and (tmp_path / "model.pt.failed").is_file()
    record = records(tmp_path)["torchscript"]
    assert record["passed"] is False and record["file"] == "model.pt.failed" and record["max_abs_diff"] > 1e-4
    assert no_temp_files(tmp_path)


def test_model_mode_is_restored(tmp_path, images, example):
    model = tiny("topk", keep_rate=0.5).train()
    assert export_model(model, "torchscript", tmp_path, example, images)["passed"]
    assert model.training


# ---- CLI -------------------------------------------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch):
    """Invoke `ltmpctl export` in-process on a run whose loader returns a tiny topk model."""
    from typer.testing import CliRunner

    import ltmpctl.export as export
    from ltmpctl.cli import commands  # noqa: F401  (registers every command, as `ltmpctl` does)
    from ltmpctl.cli._app import app

    monkeypatch.setattr(export, "_load_run", lambda run: (tiny(), tiny("topk", keep_rate=0.6), {"input_size": SHAPE}))
    monkeypatch.setitem(sys.modules, "executorch", None)
    return lambda *args: CliRunner().invoke(app, ["export", *map(str, args)])


def test_cli_all_json(cli, tmp_path):
    result = cli(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["format"]: r for r in json.loads(result.stdout)}
    assert rows["onnx"]["passed"] and rows["torchscript"]["passed"]
    assert rows["mobile"]["passed"] is None and "ltmpctl[mobile]" in rows["mobile"]["skipped"]
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"model.onnx", "model.pt", VERIFY_FILE}


def test_cli_table_and_errors(cli, tmp_path):
    shown = cli(tmp_path, "--format", "torchscript", "--out", tmp_path / "x")
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.stdout.splitlines() if "torchscript" in line)
    cells = row.split()
    size = (tmp_path / "x" / "model.pt").stat().st_size / 1e6
    assert cells[:2] == ["torchscript", "model.pt"] and float(cells[2]) == pytest.approx(size, abs=0.006)
    # The traced graph runs in TorchScript's interpreter, which may round differently from eager (3.7e-08 on an AMD
    # EPYC host, exactly 0 on Xeon): the table shows the measured difference, well inside the verify tolerance.
    assert cells[3] == "-" and float(cells[4]) <= 1e-6 and cells[5:] == ["32/32", "7-7", "pass"]
    assert (tmp_path / "x" / "model.pt").is_file()
    mobile = cli(tmp_path, "--format", "mobile")
    assert isinstance(mobile.exception, ExportError) and "ltmpctl[mobile]" in str(mobile.exception)
    bad = cli(tmp_path, "--format", "coreml")
    assert isinstance(bad.exception, ConfigError)
