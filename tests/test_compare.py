"""`compare`: compressors x targets on a tiny grayscale ViT; files, reuse of finished runs, one-line errors."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import ltmpctl.cli.commands  # noqa: F401  (registers the commands)
import ltmpctl.compare as cmp
from ltmpctl.cli import app
from ltmpctl.cli._app import main
from ltmpctl.errors import ConfigError, PluginError
from ltmpctl.report import pareto_front
from ltmpctl.rundir import RunDir

MODEL = "vit_tiny_patch16_224"
# 28x28 grayscale, patch 7 -> 16 patch tokens + class token, width 32, depth 2: milliseconds per forward.
RECIPE = """\
model:
  pretrained: false
  kwargs: {img_size: 28, patch_size: 7, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 2, num_classes: 2}
compressor:
  name: ltmp
  params: {merge_threshold: 0.9}   # an ltmp-only key: tome must not inherit it
data:
  path: {data}
  input_size: [1, 28, 28]
  mean: [0.5]
  std: [0.5]
stages:
  calibrate: {images: 8}
  finetune: {max_steps: 2, batch_size: 8}
  evaluate: {images: 16}
  bench: {repeats: 2, warmup: 1}
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_folder(root: Path) -> None:
    """train/ and val/ with 2 classes of 8 noise images each (32 images, 28x28 grayscale PNG)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(8):
                pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    _write_folder(root / "data")
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE.replace("{data}", str(root / "data")))
    return {"root": root, "recipe": recipe, "out": root / "cmp"}


def _spec(setup: dict, **kw) -> cmp.CompareSpec:
    args = dict(model=MODEL, compressors=["ltmp", "tome"], targets=[0.5, 0.7], recipe=setup["recipe"],
                out=setup["out"])
    args.update(kw)
    return cmp.CompareSpec(**args)


@pytest.fixture(scope="module")
def first(setup: dict) -> dict:
    return cmp.compare(_spec(setup))


def _run_dirs(out: Path) -> dict[str, float]:
    return {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "runs").iterdir()}


def test_compare_writes_table_files(setup: dict, first: dict) -> None:
    out = setup["out"]
    assert sorted(_run_dirs(out)) == ["ltmp-0.5", "ltmp-0.7", "tome-0.5", "tome-0.7"]
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert tuple(rows[0]) == cmp.COLUMNS
    assert [(r["compressor"], float(r["target"])) for r in rows] == [("ltmp", 0.5), ("ltmp", 0.7), ("tome", 0.5),
                                                                      ("tome", 0.7)]
    for r in rows:
        assert 0 < float(r["flops_ratio"]) <= 1.0 and float(r["gmacs"]) > 0 and float(r["latency_p50_ms"]) > 0
        assert float(r["speedup"]) > 0 and 0 <= float(r["top1"]) <= 100
    doc = json.loads((out / "compare.json").read_text())
    assert doc["base"]["compressor"] == "base" and doc["base"]["flops_ratio"] == 1.0
    assert doc["bench"] == {"batch": 1, "warmup": 1, "repeats": 2, "device": "cpu", "threads": None}
    assert [r["reused"] for r in doc["rows"]] == [False] * 4
    for r in doc["rows"]:
        assert r["delta_top1"] == pytest.approx(r["top1"] - doc["base"]["top1"])
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE
    with Image.open(out / "pareto.png") as im:
        assert im.size[0] > 400 and im.size[1] > 200
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporaries behind


def test_params_reset_per_compressor(setup: dict, first: dict) -> None:
    # The recipe's ltmp params would be an unknown key for tome; each compressor starts from its own defaults.
    tome = json.loads((setup["out"] / "runs" / "tome-0.5" / "summary.json").read_text())
    assert "merge_threshold" not in tome["params"] and "r" in tome["params"]
    assert not (setup["out"] / "runs" / "ltmp-0.5" / "export").exists()  # export stays off


def test_second_compare_reuses_runs(setup: dict, first: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _run_dirs(setup["out"])

    def refuse(*args, **kwargs):
        raise AssertionError("run_compress called although a matching complete run exists")

    monkeypatch.setattr(cmp, "run_compress", refuse)
    doc = cmp.compare(_spec(setup))
    assert _run_dirs(setup["out"]) == before
    assert [r["reused"] for r in doc["rows"]] == [True] * 4
    assert [r["top1"] for r in doc["rows"]] == [r["top1"] for r in first["rows"]]


def test_cli_json_reuses_runs(setup: dict, first: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _run_dirs(setup["out"])
    monkeypatch.setattr(cmp, "run_compress", lambda *a, **k: pytest.fail("should have reused"))
    result = CliRunner().invoke(app, ["compare", "ltmp", "tome", "--model", MODEL, "--targets", "0.5,0.7",
                                      "--recipe", str(setup["recipe"]), "--out", str(setup["out"]),
                                      "--no-pretrained", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["rows"]) == 4 and doc["files"]["plot"].endswith("pareto.png")
    assert _run_dirs(setup["out"]) == before
    table = CliRunner().invoke(app, ["compare", "tome", "--model", MODEL, "--targets", "0.5",
                                     "--recipe", str(setup["recipe"]), "--out", str(setup["out"])])
    assert table.exit_code == 0, table.output
    assert "speedup" in table.stdout and "base" in table.stdout


def test_interrupted_run_is_resumed_in_place(setup: dict, first: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(setup["out"] / "runs" / "tome-0.7")
    run.set_state("interrupted", "interrupted by the user")
    calls = []

    def fake_compress(recipe, hooks=None, resume=None):
        calls.append((recipe.out, resume))
        RunDir(resume).set_state("complete")  # its summary and model are still the first compare's

    monkeypatch.setattr(cmp, "run_compress", fake_compress)
    doc = cmp.compare(_spec(setup, compressors=["tome"], targets=[0.7]))
    assert calls == [(str(run.path), run.path)]
    assert [(r["run_dir"], r["reused"]) for r in doc["rows"]] == [(str(run.path), False)]
    assert sorted(p.name for p in (setup["out"] / "runs").iterdir()) == ["ltmp-0.5", "ltmp-0.7", "tome-0.5",
                                                                         "tome-0.7"]


@pytest.mark.parametrize("text, message", [
    ("0.4,abc", "'abc' is not a number"), ("0.4,,0.5", "empty entry"), ("", "empty entry"),
    ("0,0.5", "0 is outside (0, 1]"), ("1.5", "1.5 is outside (0, 1]"), ("nan", "nan is outside (0, 1]"),
])
def test_bad_targets(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        cmp.parse_targets(text)


def test_unknown_compressor_fails_before_any_run(setup: dict, tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="unknown compressor 'nope'"):
        cmp.compare(_spec(setup, compressors=["ltmp", "nope"], out=tmp_path / "c"))
    with pytest.raises(ConfigError, match="stages.finetune.nope: unknown key"):
        cmp.compare(_spec(setup, sets=["stages.finetune.nope=1"], out=tmp_path / "c"))
    with pytest.raises(ConfigError, match="bad benchmark sizes"):
        cmp.compare(_spec(setup, batch=0, out=tmp_path / "c"))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("argv, message", [
    (["compare", "ltmp", "nope", "--model", MODEL], "unknown compressor 'nope'"),
    (["compare", "ltmp", "--model", MODEL, "--targets", "0.5,x"], "'x' is not a number"),
    (["compare", "ltmp", "--model", MODEL, "--targets", "0.5,2"], "2 is outside (0, 1]"),
])
def test_cli_errors_are_one_line(monkeypatch, capsys, tmp_path: Path, argv: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ltmpctl", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code != 0 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "runs").exists()


def test_pareto_front() -> None:
    # (cost, accuracy): (2, 70) is beaten by (1, 75); (3, 75) adds cost without accuracy.
    points = [(1.0, 75.0), (2.0, 70.0), (3.0, 75.0), (4.0, 80.0), (0.5, 60.0)]
    assert pareto_front(points) == [4, 0, 3]
