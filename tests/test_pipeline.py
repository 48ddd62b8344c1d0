"""The `compress` job end to end on a 2-block 28x28 ViT and a ~40-image ImageFolder made on the fly.

Every run is seeded, offline and takes about a second on 2 CPU cores; the DDP and demo tests take longer and say so.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import ltmpctl
from ltmpctl import models
from ltmpctl.config import Recipe, dump, resolve
from ltmpctl.errors import ConfigError
from ltmpctl.flops import measured_ratio
from ltmpctl.pipeline import Hooks, data_spec, model_spec, run_compress, seed_everything, train_images
from ltmpctl.rundir import RunDir
from ltmpctl.runs import load_run

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 8, 5
TINY_VIT = {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "num_classes": CLASSES}  # 16 patches + cls = 17 tokens per block


def make_folder(root: Path, corrupt: bool = False, val_per_class: int = VAL_PER_CLASS) -> Path:
    """root/{train,val}/c<k>/<i>.png: 28x28 grayscale noise whose brightness says the class (39 images)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", val_per_class)):
        for c in range(CLASSES):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((28, 28)) * 80 + c * 80).astype(np.uint8)  # (H, W)
                Image.fromarray(pixels, "L").save(d / f"{i:02d}.png")
        if corrupt:
            (root / split / "c0" / "empty.png").write_bytes(b"")
            (root / split / "c1" / "notes.png").write_text("not an image, just text named .png\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


def recipe(data: Path, out: Path, **extra: Any) -> Recipe:
    """The tiny model on `data` with small, fast stages; `extra` holds dotted recipe keys (`stages.x.y`)."""
    overrides: dict[str, Any] = {
        "model.name": "vit_tiny_patch16_224", "model.pretrained": False, "model.kwargs": TINY_VIT,
        "data.path": str(data), "data.input_size": [1, 28, 28], "data.mean": [0.5], "data.std": [0.5],
        "data.workers": 0, "device": "cpu", "seed": 0, "target": 0.6, "out": str(out),
        "stages.calibrate.images": 16,
        "stages.finetune.epochs": 3, "stages.finetune.max_steps": 4, "stages.finetune.batch_size": 8,
        "stages.finetune.checkpoint_every": 2, "stages.finetune.augment": False,
        "stages.evaluate.images": 20, "stages.evaluate.batch_size": 8,
        "stages.flops.images": 4, "stages.flops.enabled": False,
    }
    overrides.update(extra)
    return resolve(None, overrides)


def thresholds(params: dict[str, Any]) -> tuple[list[float], list[float]]:
    return list(params["merge_threshold"]), list(params["prune_threshold"])


# -- 1. calibration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", ["ltmp", "tome", "topk"])
def test_calibrate_hits_target(folder: Path, tmp_path: Path, compressor: str) -> None:
    r = recipe(folder, tmp_path / "run", **{"compressor.name": compressor, "stages.finetune.enabled": False,
                                            "stages.evaluate.enabled": False})
    s = run_compress(r)
    cal = s["calibration"]
    assert cal["images"] == 16
    assert abs(cal["flops_ratio"] - 0.6) <= r.stages.calibrate.tolerance, cal
    assert s["params"] == {**r.compressor.params, **cal["params"]}


def test_calibrate_tome_closest_when_target_unreachable(folder: Path, tmp_path: Path) -> None:
    """ToMe's r is an integer and merges at most half the tokens per block: with 16 patches and 2 blocks the
    cheapest schedule keeps ~0.56 of the FLOPs, so a 0.5 target must give the closest achievable ratio."""
    r = recipe(folder, tmp_path / "run", **{"compressor.name": "tome", "target": 0.5,
                                            "stages.finetune.enabled": False, "stages.evaluate.enabled": False})
    cal = run_compress(r)["calibration"]
    seed_everything(r.seed)
    spec = model_spec(r)
    base = models.create(spec)
    images = train_images(data_spec(r), models.data_config(base, spec), 16, r.seed)[:2]  # tome: static counts
    achievable = [measured_ratio(ltmpctl.apply(copy.deepcopy(base), "tome", r=[a, b]), images)
                  for a, b in itertools.product(range(9), repeat=2)]
    assert min(achievable) > 0.5 + r.stages.calibrate.tolerance  # really out of reach
    assert cal["flops_ratio"] == pytest.approx(min(achievable, key=lambda x: abs(x - 0.5)), abs=1e-9)


# -- 2. a short LTMP fine-tune and the run dir it leaves -----------------------------------------------------------


@pytest.fixture(scope="module")
def ltmp_run(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("ltmp") / "run"
    return run_dir, run_compress(recipe(folder, run_dir))


def test_finetune_moves_thresholds_and_writes_run(ltmp_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, s = ltmp_run
    for key in ("model", "compressor", "params", "target", "flops_ratio", "tokens_per_block"):
        assert key in s, key
    assert s["model"] == "vit_tiny_patch16_224" and s["compressor"] == "ltmp" and s["target"] == 0.6
    for label in ("base", "compressed"):
        assert 0.0 <= s[label]["top1"] <= 100.0 and s[label]["gmacs"] > 0
    assert s["base"]["flops_ratio"] == pytest.approx(1.0)
    assert s["flops_ratio"] == pytest.approx(s["compressed"]["gmacs"] / s["base"]["gmacs"])
    assert 0.3 < s["flops_ratio"] < 0.9
    assert len(s["tokens_per_block"]) == TINY_VIT["depth"]
    assert s["finetune"]["steps"] == 4 and math.isfinite(s["finetune"]["final_loss"])

    calibrated = s["calibration"]["params"]
    merge, prune = thresholds(s["params"])
    assert len(merge) == len(prune) == TINY_VIT["depth"]
    assert any(m != calibrated["merge_threshold"] for m in merge)  # they learned
    assert all(0.0 <= v <= 1.0 for v in merge + prune)

    assert RunDir.open(run_dir).state() == "complete"
    for name in ("env.json", "resolved.yaml", "run.log", "model.safetensors", "summary.json", "finetune.ckpt"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert json.loads((run_dir / "env.json").read_text())["seed"] == 0
    assert resolve(run_dir / "resolved.yaml") == recipe(Path(s["data"]), run_dir)


# -- 3. interrupt + resume == uninterrupted -------------------------------------------------------------------------


def interrupt(at: int) -> Hooks:
    """Hooks that press Ctrl-C right after fine-tune step `at` (mid-loop, as a terminal would deliver it)."""

    def progress(task: str, done: int, total: int, info: dict) -> None:
        if task == "finetune" and done == at:
            raise KeyboardInterrupt

    return Hooks(progress=progress)


@pytest.mark.parametrize("interrupt_at", [3, 4])  # between checkpoints, and on a checkpoint step
def test_resume_matches_uninterrupted(folder: Path, tmp_path: Path, interrupt_at: int) -> None:
    # Augmentation on, so the resumed run must also restore the RNG streams augmentation draws from.
    extra = {"stages.finetune.max_steps": 6, "stages.finetune.augment": True, "stages.finetune.momentum": 0.9,
             "stages.evaluate.enabled": False}
    a = run_compress(recipe(folder, tmp_path / "a", **extra))

    b_dir = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        run_compress(recipe(folder, b_dir, **extra), interrupt(interrupt_at))
    status = RunDir.open(b_dir).status()
    assert status is not None and status["state"] == "interrupted"
    assert (b_dir / "finetune.ckpt").is_file()
    assert torch.load(b_dir / "finetune.ckpt", weights_only=True)["step"] == interrupt_at

    b = run_compress(resolve(b_dir / "resolved.yaml"), resume=b_dir)
    assert RunDir.open(b_dir).state() == "complete"
    assert b["finetune"]["resumed_from_step"] == interrupt_at and b["finetune"]["steps"] == 6
    assert thresholds(b["params"]) == thresholds(a["params"])  # exact floats
    assert b["finetune"]["final_loss"] == a["finetune"]["final_loss"]


def test_resume_after_ctrl_c_mid_step(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C inside step 4's forward, after its batch was loaded and augmented: the resumed run redoes step 4
    with the augmentation the uninterrupted run drew for it."""
    import ltmpctl.stages.finetune as ft

    extra = {"stages.finetune.max_steps": 6, "stages.finetune.augment": True, "stages.evaluate.enabled": False}
    a = run_compress(recipe(folder, tmp_path / "a", **extra))

    forward, calls = ft._LossModel.forward, []

    def interrupted(self: Any, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return forward(self, *args)

    monkeypatch.setattr(ft._LossModel, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_compress(recipe(folder, tmp_path / "b", **extra))
    monkeypatch.setattr(ft._LossModel, "forward", forward)
    b = run_compress(resolve(tmp_path / "b" / "resolved.yaml"), resume=tmp_path / "b")
    assert b["finetune"]["resumed_from_step"] == 3
    assert thresholds(b["params"]) == thresholds(a["params"])


def test_rerun_into_interrupted_dir_starts_over(folder: Path, tmp_path: Path) -> None:
    """Without --resume, a reused run dir must not pick up the earlier attempt's checkpoint or results: they may
    come from another recipe."""
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_compress(recipe(folder, run_dir, target=0.7, **{"stages.evaluate.enabled": False}), interrupt(3))
    assert "calibration" in RunDir.open(run_dir).read_summary()
    again = recipe(folder, run_dir, **{"stages.evaluate.enabled": False, "stages.calibrate.enabled": False,
                                       "compressor.params": {"merge_threshold": 0.8, "prune_threshold": 0.01}})
    s = run_compress(again)
    assert s["finetune"]["resumed_from_step"] is None and s["finetune"]["steps"] == 4
    assert "calibration" not in RunDir.open(run_dir).read_summary()
    assert RunDir.open(run_dir).state() == "complete"


def test_epoch_ends_in_unreadable_batch(tmp_path: Path) -> None:
    """Batch size 1 with unreadable training images: a batch of nothing readable still counts as a step (no
    update), so training ends after `total` steps even when an epoch's last batches are all unreadable."""
    from ltmpctl.stages.finetune import EpochSampler

    data = make_folder(tmp_path / "images")
    for i in range(3):
        (data / "train" / "c2" / f"zz{i}.png").write_bytes(b"")
    n = CLASSES * TRAIN_PER_CLASS + 3
    bad = set(range(CLASSES * TRAIN_PER_CLASS, n))  # sorted last: c2's zz*.png
    seed = next(s for s in range(100) if EpochSampler(n, s, 0).indices[-1] in bad)
    s = run_compress(recipe(data, tmp_path / "run", seed=seed, **{
        "stages.finetune.batch_size": 1, "stages.finetune.epochs": 2, "stages.finetune.max_steps": None,
        "stages.finetune.checkpoint_every": 100, "stages.calibrate.images": 8, "stages.evaluate.enabled": False}))
    assert s["finetune"]["steps"] == 2 * n
    assert math.isfinite(s["finetune"]["final_loss"])


@pytest.mark.parametrize("n", [1, 7, 16, 17, 33])
def test_epoch_sampler_ranks_get_equal_batches(n: int) -> None:
    from ltmpctl.stages.finetune import EpochSampler

    shards = [EpochSampler(n, 0, 1, rank=r, world=2).indices for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == math.ceil(n / 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert EpochSampler(n, 0, 1, start=3, rank=1, world=2).indices == shards[1][3:]


# -- 4. label-free distillation -------------------------------------------------------------------------------------


def test_distill_is_label_free(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ltmpctl.stages.finetune as ft

    def no_labels(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("distillation must not use the labels")

    monkeypatch.setattr(ft.F, "cross_entropy", no_labels)
    s = run_compress(recipe(folder, tmp_path / "run", **{"stages.finetune.distill": True}))
    assert s["finetune"]["distill"] is True and math.isfinite(s["finetune"]["final_loss"])
    merge, _ = thresholds(s["params"])
    assert any(m != s["calibration"]["params"]["merge_threshold"] for m in merge)
    assert RunDir.open(tmp_path / "run").state() == "complete"


# -- 5. unreadable images -------------------------------------------------------------------------------------------


def test_corrupt_images_skipped_and_counted(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "images", corrupt=True)
    logged: list[str] = []
    s = run_compress(recipe(data, tmp_path / "run", **{"stages.evaluate.images": None}), Hooks(log=logged.append))
    assert RunDir.open(tmp_path / "run").state() == "complete"
    assert s["base"]["skipped_images"] == 2 and s["compressed"]["skipped_images"] == 2
    assert s["base"]["images"] == CLASSES * VAL_PER_CLASS
    assert any("unreadable images skipped" in line for line in logged)


# -- 6. bad targets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0, -0.1, 1.5])
def test_bad_target_is_config_error(folder: Path, tmp_path: Path, target: float) -> None:
    with pytest.raises(ConfigError, match=r"^target: must be in \(0, 1\]"):
        recipe(folder, tmp_path / "run", target=target)


@pytest.mark.parametrize("target", ["0", "-0.1", "1.5"])
def test_bad_target_cli_one_line_error(folder: Path, tmp_path: Path, target: str, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from ltmpctl.cli import _app

    argv = ["ltmpctl", "compress", "vit_tiny_patch16_224", f"--target={target}", "--data", str(folder),
            "--out", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        _app.main()
    assert exit_info.value.code == ConfigError.exit_code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: target: must be in (0, 1]") and "\n" not in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


# -- 7. reopening a run ---------------------------------------------------------------------------------------------


def test_load_run_rebuilds_models(ltmp_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, s = ltmp_run
    r = resolve(run_dir / "resolved.yaml")
    seed_everything(r.seed)  # what run_compress does before creating the base model
    base_mem = models.create(model_spec(r)).eval()
    comp_mem = ltmpctl.apply(copy.deepcopy(base_mem), "ltmp", **s["params"]).eval()

    base1, comp1, info = load_run(run_dir)
    _, comp2, _ = load_run(run_dir)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(base1(x), base_mem(x))
        out1 = comp1(x)
        assert torch.equal(out1, comp2(x))
        assert torch.equal(out1, comp_mem(x))
    loaded = ([float(b.merge_threshold.detach()) for b in comp1.blocks],
              [float(b.prune_threshold.detach()) for b in comp1.blocks])
    assert loaded == thresholds(s["params"])
    assert info["params"] == s["params"] and info["flops_ratio"] == s["flops_ratio"]
    assert info["input_size"] == [1, 28, 28]


def test_bench_run_dir_times_the_runs_own_images(ltmp_run: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """`ltmpctl bench RUN` times the run's evaluation images, so what the timed batch executes is what the run
    measured, not what ltmp keeps on noise; rows say so and land in <run>/bench/."""
    import json
    import sys

    from ltmpctl.cli import main

    run_dir, s = ltmp_run
    monkeypatch.setattr(sys, "argv", ["ltmpctl", "bench", str(run_dir), "--batch", "8", "--warmup", "0",
                                      "--repeats", "2", "--threads", "1", "--json"])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert (e.value.code or 0) == 0, out.err
    saved = json.loads((run_dir / "bench" / "local-cpu.json").read_text())
    base, comp = saved["rows"]
    assert base["input"] == comp["input"] == "run images" and comp["flops_ratio"] == s["flops_ratio"]
    assert abs(comp["executed_flops_ratio"] - s["flops_ratio"]) <= 0.05


# -- 8. DDP on 2 CPU processes (gloo) ---------------------------------------------------------------------------------


def test_ddp_finetune_evaluate_and_resume(folder: Path, tmp_path: Path) -> None:
    """2 CPU ranks (gloo) under torchrun: A runs through; B is interrupted at step 2 and resumed (tests/ddp_worker.py).
    About 30-60 s, most of it two processes importing torch."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    out = tmp_path / "ranks"
    out.mkdir()
    for name in ("a", "b"):
        r = recipe(folder, tmp_path / name, threads=1, **{"stages.finetune.max_steps": 4})
        (tmp_path / f"{name}.yaml").write_text(dump(r))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"}
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--standalone", str(worker), str(out),
                           str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["world"] for x in ranks] == [2, 2]
    assert ranks[0]["a"]["params"] == ranks[1]["a"]["params"]  # DDP kept the ranks' thresholds in step
    assert ranks[1]["a"]["run_dir"] is None  # only rank 0 has a run dir
    assert sorted(tmp_path.rglob("summary.json")) == [tmp_path / name / "summary.json" for name in ("a", "b")]

    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert RunDir.open(tmp_path / "a").state() == "complete"
    assert a["finetune"]["steps"] == 4
    merge, prune = thresholds(a["params"])
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in merge + prune)
    assert merge != [a["calibration"]["params"]["merge_threshold"]] * len(merge)
    assert a["base"]["images"] == a["compressed"]["images"] == CLASSES * VAL_PER_CLASS  # each image once
    assert 0.0 < a["flops_ratio"] < 1.0

    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert RunDir.open(tmp_path / "b").state() == "complete"
    assert b["finetune"]["resumed_from_step"] == 2
    assert ranks[1]["b"]["finetune"]["resumed_from_step"] == 2  # rank 1 resumed from rank 0's checkpoint too
    assert thresholds(b["params"]) == thresholds(a["params"]) == thresholds(ranks[1]["b"]["params"])


# -- 9. the offline demo ----------------------------------------------------------------------------------------------

DEMO_WEIGHTS = Path(ltmpctl.__file__).parent / "demo" / "demo_vit.safetensors"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEMO_WEIGHTS.exists() or not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="needs the bundled demo weights and Fashion-MNIST")
def test_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from ltmpctl.cli import _app

    run_dir = tmp_path / "run"
    argv = ["ltmpctl", "compress", "demo", "--target", "0.5", "--out", str(run_dir), "--json", "--threads", "2",
            "--set", "stages.finetune.max_steps=2", "--set", "stages.evaluate.images=64",
            "--set", "stages.calibrate.images=32", "--set", "stages.flops.images=2"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        _app.main()
    assert exit_info.value.code == 0
    s = json.loads(capsys.readouterr().out)
    assert RunDir.open(run_dir).state() == "complete"
    assert abs(s["flops_ratio"] - 0.5) <= 0.05, s["flops_ratio"]
    assert s["finetune"]["steps"] == 2 and s["base"]["images"] == 64
    assert s["flops"]["compressed"]["total_gmacs"] < s["flops"]["base"]["total_gmacs"]


# -- the flops stage ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", ["ltmp", "tome"])
def test_flops_stage_agrees_with_evaluate(folder: Path, tmp_path: Path, compressor: str) -> None:
    s = run_compress(recipe(folder, tmp_path / "run", **{"compressor.name": compressor,
                                                         "stages.flops.enabled": True}))
    flops = s["flops"]
    assert flops["images"] == 4 and flops["ok"], flops
    assert flops["base"]["total_gmacs"] == pytest.approx(s["base"]["gmacs"])
    assert 0.0 < flops["flops_ratio"] < 1.0
    if compressor == "tome":  # the same tokens for every image: the 4 images measure what evaluate measured
        assert flops["flops_ratio"] == pytest.approx(s["flops_ratio"])
