"""The reliability matrix (README "Reliability"): killed runs resume exactly, live run dirs have one writer, bad
files are one line and never execute, full or read-only disks are one line, adb faults clean up.

The SIGKILL and second-writer rows run the real demo through the CLI in subprocesses (about a minute on 2 cores,
most of it three processes importing torch); every other row runs in this process on a 2-block 28x28 ViT.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

import ltmpctl
from ltmpctl.config import resolve
from ltmpctl.demo import RECIPE as DEMO_RECIPE
from ltmpctl.errors import RunBusyError, WriteError
from ltmpctl.pipeline import Hooks, run_compress
from ltmpctl.rundir import LOCK, RunDir, atomic_write

LTMPCTL = Path(sys.executable).with_name("ltmpctl")
DEMO_WEIGHTS = Path(ltmpctl.__file__).parent / "demo" / "demo_vit.safetensors"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_demo = pytest.mark.skipif(not DEMO_WEIGHTS.exists() or not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="needs the bundled demo weights and Fashion-MNIST")
ENV = {**os.environ, "OMP_WAIT_POLICY": "passive", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

# The demo, small: 16 fine-tune steps of 32 images, a checkpoint after every step, one thread (same sums in every
# process, so an in-process and a CLI run agree to the bit).
DEMO_SETS = ["stages.finetune.max_steps=16", "stages.finetune.batch_size=32", "stages.finetune.checkpoint_every=1",
             "stages.calibrate.images=32", "stages.evaluate.images=64", "stages.flops.enabled=false"]
DEMO_ARGS = ["--target", "0.5", "--threads", "1", *[a for s in DEMO_SETS for a in ("--set", s)]]
TIMED = ("images_per_s",)  # wall-clock numbers: the only summary values two identical runs may differ in


def _results(summary: dict[str, Any]) -> dict[str, Any]:
    """What must come out the same: everything but where the run lived, how it got there, and timings."""
    out = {k: v for k, v in summary.items() if k not in ("run_dir", "finetune")}
    for label in ("base", "compressed"):
        out[label] = {k: v for k, v in out[label].items() if k not in TIMED}
    out["finetune"] = {k: v for k, v in summary["finetune"].items() if k != "resumed_from_step"}
    return out


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# -- 1 + 2. SIGKILL mid-fine-tune, resume == uninterrupted; a second writer is refused --------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted demo run, in this process; at fine-tune step 3 a second `ltmpctl compress` into the same
    --out is started and waited for (the first writer is live and mid-run the whole time)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    recipe = resolve(DEMO_RECIPE, {"model.name": "demo", "target": 0.5, "threads": 1, "out": str(out)},
                     DEMO_SETS)
    second: dict[str, Any] = {}

    def progress(task: str, done: int, total: int, info: dict) -> None:
        if task == "finetune" and done == 3 and not second:
            proc = subprocess.run([str(LTMPCTL), "compress", "demo", "--out", str(out), *DEMO_ARGS], env=ENV,
                                  capture_output=True, text=True, timeout=300)
            second.update(rc=proc.returncode, err=proc.stderr, state=RunDir(out).state(),
                          ckpt_step=torch.load(out / "finetune.ckpt", weights_only=True)["step"])

    threads = torch.get_num_threads()
    try:
        summary = run_compress(recipe, Hooks(progress=progress))
    finally:
        torch.set_num_threads(threads)
    return {"dir": out, "summary": summary, "second": second}


@needs_demo
def test_second_writer_is_refused_and_first_run_unaffected(reference: dict[str, Any]) -> None:
    second = reference["second"]
    assert second["rc"] == RunBusyError.exit_code, second["err"]
    err = _lines(second["err"])
    assert len(err) == 1 and "Traceback" not in second["err"], err
    assert f"{reference['dir']} is being written by ltmpctl (pid {os.getpid()}" in err[0]
    assert second["state"] == "running" and second["ckpt_step"] == 2  # step 3 is told before it is saved
    run = RunDir(reference["dir"])
    assert run.state() == "complete" and run.read_summary()["finetune"]["steps"] == 16
    assert run.writer() is None  # a clean end leaves no lock to take over


@needs_demo
def test_sigkill_mid_finetune_then_resume_matches_uninterrupted(reference: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen([str(LTMPCTL), "compress", "demo", "--out", str(out), *DEMO_ARGS], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt, step, deadline = out / "finetune.ckpt", 0, time.monotonic() + 240
    while step < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        if ckpt.is_file():
            step = torch.load(ckpt, weights_only=True)["step"]  # replaced atomically: never half a file
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()

    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "running" and status["writer"]["pid"] == proc.pid  # what the killed process left
    assert RunDir(out).state() == "interrupted"  # ... and what the next command makes of it
    assert not (out / "summary.json").exists() or "finetune" not in json.loads((out / "summary.json").read_text())
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 3 <= killed_at < 16

    resumed = subprocess.run([str(LTMPCTL), "compress", "demo", "--resume", str(out), "--json"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"taking over the lock of ltmpctl pid {proc.pid}" in resumed.stderr
    s = json.loads(resumed.stdout)
    assert s["finetune"]["resumed_from_step"] >= killed_at and s["finetune"]["steps"] == 16
    assert RunDir(out).state() == "complete"
    a = reference["summary"]
    assert s["params"] == a["params"]  # the learned thresholds, exact floats
    assert _results(s) == _results(a)


# -- 1. a kill while the checkpoint is being written leaves the previous one usable ----------------------------

TINY_VIT = {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "num_classes": 3}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/{train,val}/c<k>/<i>.png: 28x28 grayscale noise whose brightness says the class (3 classes)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((28, 28)) * 80 + c * 80).astype(np.uint8), "L").save(d / f"{i}.png")
    return root


def tiny_args(data: Path) -> list[str]:
    """CLI flags of a tiny LTMP run on `data` (about a second)."""
    return ["vit_tiny_patch16_224", "--no-pretrained", "--data", str(data), "--input-size", "1,28,28",
            "--mean", "0.5", "--std", "0.5", "--device", "cpu", "--target", "0.6",
            *[a for k, v in TINY_VIT.items() for a in ("--model-kwargs", f"{k}={v}")],
            *[a for s in ("stages.calibrate.images=16", "stages.finetune.max_steps=4",
                          "stages.finetune.batch_size=8", "stages.finetune.checkpoint_every=1",
                          "stages.evaluate.images=8", "stages.flops.enabled=false") for a in ("--set", s)]]


def tiny_recipe(data: Path, out: Path, **extra: Any) -> Any:
    overrides: dict[str, Any] = {
        "model.name": "vit_tiny_patch16_224", "model.pretrained": False, "model.kwargs": TINY_VIT,
        "data.path": str(data), "data.input_size": [1, 28, 28], "data.mean": [0.5], "data.std": [0.5],
        "device": "cpu", "target": 0.6, "out": str(out), "stages.calibrate.images": 16,
        "stages.finetune.max_steps": 5, "stages.finetune.batch_size": 8, "stages.finetune.checkpoint_every": 1,
        "stages.evaluate.images": 8, "stages.flops.enabled": False, **extra}
    return resolve(None, overrides)


@pytest.fixture(scope="module")
def tiny_run(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    run_compress(tiny_recipe(folder, out))
    return out


class _Killed(BaseException):
    """Stands in for SIGKILL inside this process: not an Exception, so nothing on the way handles it."""


def test_kill_during_checkpoint_write_keeps_previous(folder: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies while checkpoint 3's bytes go to disk (before the rename): checkpoint 2 stays whole and
    the resumed run ends exactly where an uninterrupted one does."""
    import ltmpctl.rundir as rd

    a = run_compress(tiny_recipe(folder, tmp_path / "a"))
    fsync, armed = rd.os.fsync, []

    def dies_on_next_file_sync(fd: int) -> None:
        if armed:
            raise _Killed
        fsync(fd)

    def progress(task: str, done: int, total: int, info: dict) -> None:
        if task == "finetune" and done == 3:
            armed.append(1)  # the next fsync is checkpoint 3's temporary file, written but not yet renamed

    monkeypatch.setattr(rd.os, "fsync", dies_on_next_file_sync)
    b = tmp_path / "b"
    with pytest.raises(_Killed):
        run_compress(tiny_recipe(folder, b), Hooks(progress=progress))
    monkeypatch.setattr(rd.os, "fsync", fsync)
    assert RunDir(b).state() != "complete"
    assert torch.load(b / "finetune.ckpt", weights_only=True)["step"] == 2  # the previous checkpoint, whole
    s = run_compress(resolve(b / "resolved.yaml"), resume=b)
    assert s["finetune"]["resumed_from_step"] == 2 and s["params"] == a["params"]
    assert _results(s) == _results(a)


# -- 2. one writer per run dir ---------------------------------------------------------------------------------

# Another writer as ltmpctl's lock protocol sees it (flock on <run>/.lock, a JSON record of pid and host), in
# plain Python so the process starts in milliseconds instead of importing torch.
HOLDER = """
import fcntl, json, os, socket, sys, time
f = open(os.path.join(sys.argv[1], ".lock"), "a+b")
fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
f.truncate(0)
f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}).encode())
f.flush()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder() -> Callable[[Path], subprocess.Popen]:
    """Start a process that takes a run dir's lock and keeps it (killed at teardown)."""
    procs: list[subprocess.Popen] = []

    def start(path: Path) -> subprocess.Popen:
        path.mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=ENV)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_live_lock_refuses_create_and_stale_lock_is_taken_over(tmp_path: Path, holder: Callable,
                                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    p = holder(out)
    with pytest.raises(RunBusyError) as e:
        RunDir.create(out, "demo", "ltmp", 0.5)
    assert f"pid {p.pid}" in str(e.value) and "\n" not in str(e.value) and str(out / LOCK) in str(e.value)
    p.kill()
    p.wait()
    run = RunDir.create(out, "demo", "ltmp", 0.5)  # the kernel dropped the dead holder's flock
    assert f"taking over the lock of ltmpctl pid {p.pid}" in capsys.readouterr().err
    assert run.writer()["pid"] == os.getpid()
    run.close()
    assert run.writer() is None


def test_stale_lock_without_flock_uses_the_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """File systems without flock: the recorded pid decides (alive: refused; dead or reused: taken over)."""
    import ltmpctl.rundir as rd

    monkeypatch.setattr(rd, "fcntl", None)
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = rd._host()
    (out / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": host, "since": "earlier"}))
    with pytest.raises(RunBusyError, match=f"pid {os.getppid()} on {host} since earlier"):
        RunDir(out).lock()
    (out / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": host}))
    RunDir(out).lock().unlock()
    assert "which is no longer running" in capsys.readouterr().err
    (out / LOCK).write_text(json.dumps({"pid": 12345, "host": "another-machine"}))
    with pytest.raises(RunBusyError, match="another-machine"):  # can't tell from here: refused, with the fix
        RunDir(out).lock()


def test_running_status_of_dead_writer_reads_interrupted(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "run", "demo", "ltmp", 0.5)
    run.set_state("running")
    assert run.state() == "running"  # this process: alive
    st = run.status()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    st["writer"]["pid"] = int(dead.stdout)
    run.write_json("status.json", st)
    assert run.state() == "interrupted" and run.status()["state"] == "running"
    st["writer"].update(pid=os.getpid(), proc_start="0")  # our pid, another start time: a reused pid
    run.write_json("status.json", st)
    assert run.state() == "interrupted"


def cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run `ltmpctl ARGS` in this process through the real entry point; (exit code, stderr)."""
    from ltmpctl.cli import _app

    monkeypatch.setattr(sys, "argv", ["ltmpctl", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _app.main()
    return int(e.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("command", ["compress", "export", "bench"])
def test_writers_into_a_live_run_dir_are_refused(command: str, tiny_run: Path, folder: Path, tmp_path: Path,
                                                  holder: Callable, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "running"}))  # mid-run, as its holder sees it
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK}
    p = holder(run)
    args = {"compress": ["compress", *tiny_args(folder), "--out", str(run)],
            "export": ["export", str(run), "--format", "onnx"],
            "bench": ["bench", str(run), "--batch", "1", "--warmup", "0", "--repeats", "1"]}[command]
    code, err = cli(args, monkeypatch, capsys)
    assert code == RunBusyError.exit_code, err
    assert len(_lines(err)) == 1 and f"pid {p.pid}" in err
    assert {q.name: q.read_bytes() for q in run.iterdir() if q.is_file() and q.name != LOCK} == before
    assert not (run / "export").exists() and not (run / "bench").exists()


def test_compare_targets_never_share_a_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two targets that print alike (0.5 and 0.5000001 are both `0.5` in a dir name) still get a dir each."""
    import ltmpctl.compare as cmp

    made: list[Path] = []

    def fake_run(recipe: Any, hooks: Any = None, resume: Any = None) -> dict:
        run = RunDir.create(recipe.out, "demo", recipe.compressor.name, recipe.target)
        with run.guard():
            run.update_summary(params={})
        made.append(run.path)
        return {}

    monkeypatch.setattr(cmp, "run_compress", fake_run)
    cells = cmp.plan(cmp.CompareSpec(compressors=["topk"], targets=[0.5, 0.5000001]))
    index: dict = {}
    for cell in cells:
        cmp.ensure_run(cell, tmp_path / "runs", index, cmp.Hooks())
    assert len(made) == 2 and made[0] != made[1] and [c.run for c in cells] == made


# -- 3. bad files: non-zero, at most two lines naming the file, nothing runs, nothing overwritten ------------------

PWNED = Path("/tmp/ltmpctl-reliability-pwned")


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {PWNED}",))


def _bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\ncompressor:\n  name: ltmp\n  params: {bomb: *a8}\n"


def _demo_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(DEMO_WEIGHTS))


def _bad_shape(path: Path) -> None:
    from safetensors.torch import save_file

    sd = _demo_state()
    sd["head.weight"] = torch.zeros(3, 128)
    save_file(sd, str(path))


# name -> (file name, how to write it, CLI args with {f} = the file, {run} = a copy of a finished run dir).
RECIPE_ARGS = ["compress", "demo", "--recipe", "{f}", "--out", "{out}"]
CKPT_ARGS = ["compress", "demo", "--checkpoint", "{f}", "--out", "{out}"]
BAD: dict[str, tuple[str, Callable[[Path], Any], list[str]]] = {
    "recipe: tabs": ("r.yaml", lambda p: p.write_text("target:\n\t0.5\n"), RECIPE_ARGS),
    "recipe: wrong type": ("r.yaml", lambda p: p.write_text("target: half\n"), RECIPE_ARGS),
    "recipe: section is a list": ("r.yaml", lambda p: p.write_text("stages: [1, 2]\n"), RECIPE_ARGS),
    "recipe: !!python/object tag": ("r.yaml", lambda p: p.write_text(
        f"target: !!python/object/apply:os.system ['touch {PWNED}']\n"), RECIPE_ARGS),
    "recipe: !!python/name tag": ("r.yaml", lambda p: p.write_text("target: !!python/name:os.system\n"),
                                  RECIPE_ARGS),
    "recipe: alias bomb": ("r.yaml", lambda p: p.write_text(_bomb()), RECIPE_ARGS),
    "recipe: recursive alias": ("r.yaml", lambda p: p.write_text("model:\n  kwargs: &k {a: *k}\n"), RECIPE_ARGS),
    "recipe: binary garbage": ("r.yaml", lambda p: p.write_bytes(bytes(range(256)) * 4), RECIPE_ARGS),
    "recipe: NUL bytes": ("r.yaml", lambda p: p.write_text("target: 0.5\x00\n"), RECIPE_ARGS),
    "recipe: nested too deeply": ("r.yaml", lambda p: p.write_text("a: " + "[" * 50_000), RECIPE_ARGS),
    "recipe: huge integer": ("r.yaml", lambda p: p.write_text("seed: 123456789012345678901234567890\n"),
                             RECIPE_ARGS),
    "recipe: infinite float": ("r.yaml", lambda p: p.write_text("stages:\n  finetune:\n    epochs: 1.0e+999\n"),
                               RECIPE_ARGS),
    "recipe: seed past 32 bits": ("r.yaml", lambda p: p.write_text("seed: 4294967296\n"), RECIPE_ARGS),
    "checkpoint: truncated safetensors": ("w.safetensors", lambda p: p.write_bytes(DEMO_WEIGHTS.read_bytes()[:5000]),
                                          CKPT_ARGS),
    "checkpoint: pickle with code": ("w.pth", lambda p: torch.save({"x": _Evil()}, p), CKPT_ARGS),
    "checkpoint: wrong shapes": ("w.safetensors", _bad_shape, CKPT_ARGS),
    "checkpoint: wrong keys": ("w.safetensors", lambda p: __import__("safetensors.torch").torch.save_file(
        {"foo": torch.zeros(2)}, str(p)), CKPT_ARGS),
    "checkpoint: not a state dict": ("w.pth", lambda p: torch.save([torch.zeros(2)], p), CKPT_ARGS),
    "run dir: corrupted summary.json": ("summary.json", lambda p: p.write_text('{"params": '),
                                        ["export", "{run}", "--format", "onnx"]),
    "run dir: corrupted resolved.yaml": ("resolved.yaml", lambda p: p.write_text("model: [\n"),
                                         ["export", "{run}", "--format", "onnx"]),
    "run dir: missing resolved.yaml": ("resolved.yaml", lambda p: p.unlink(), ["bench", "{run}", "--repeats", "1"]),
    "run dir: truncated weights": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:3000]),
                                   ["export", "{run}", "--format", "onnx"]),
    "run dir: wrong weights": ("model.safetensors", _bad_shape, ["bench", "{run}", "--repeats", "1"]),
    "run dir: corrupted status.json": ("status.json", lambda p: p.write_bytes(b"\x00\xff garbage"),
                                       ["compress", "vit_tiny_patch16_224", "--resume", "{run}"]),
    "image folder: every image unreadable": ("data", lambda p: None, []),  # made in the test: needs tiny_args
    "file: truncated .onnx": ("model.onnx", lambda p: p.write_bytes(b"\x08\x07\x12\x07pytorch\x1a\xff\xff"),
                              ["bench", "{f}", "--repeats", "1"]),
    "file: truncated .pte": ("model.pte", lambda p: p.write_bytes(b"\x1c\x00\x00\x00ET12\x00\x00\x10\x00"),
                             ["bench", "{f}", "--adb", "pixel7", "--runner", "{f}"]),
    "file: garbage .pt": ("model.pt", lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"),
                          ["bench", "{f}", "--repeats", "1"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_one_line_and_harmless(case: str, tiny_run: Path, folder: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    name, write, template = BAD[case]
    if "checkpoint" in case and not DEMO_WEIGHTS.exists():
        pytest.skip("needs the bundled demo weights")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = tmp_path / "out"
    f = run / name if case.startswith("run dir") else tmp_path / name
    if case.startswith("image folder"):
        f = tmp_path / "data"
        for split in ("train", "val"):
            for c in range(3):
                (f / split / f"c{c}").mkdir(parents=True)
                (f / split / f"c{c}" / "0.png").write_bytes(b"\x89PNG truncated")
                (f / split / f"c{c}" / "1.png").write_text("text")
        template = ["compress", *tiny_args(f), "--out", "{out}", "--json"]  # --json: no progress lines
    else:
        write(f)
    PWNED.unlink(missing_ok=True)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK}
    args = [a.format(f=f, run=run, out=out) for a in template]
    code, err = cli(args, monkeypatch, capsys)
    lines = _lines(err)
    assert code != 0, err
    assert 1 <= len(lines) <= 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and "error: unexpected " not in err, err  # known, not the safety net
    shown = f.name if case.startswith("file") else str(f if not case.startswith("run dir") else run)
    assert shown in err, err
    assert not PWNED.exists()  # nothing executed
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK} == before  # untouched
    if "{out}" in template:  # refused before the run, or (unreadable images) a run marked failed, no weights
        assert not out.exists() or (RunDir(out).state() == "failed" and not (out / "model.safetensors").exists())


def test_empty_recipe_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    """Not an error (documented): an empty or comments-only recipe is every default."""
    (tmp_path / "r.yaml").write_text("# nothing set\n")
    code, _ = cli(["recipe", "validate", str(tmp_path / "r.yaml")], monkeypatch, capsys)
    assert code == 0


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    import ltmpctl.cli.recipe_cmd as recipe_cmd

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("something deep\nwith a second line")

    monkeypatch.setattr(recipe_cmd, "resolve", boom)
    code, err = cli(["recipe", "validate", "x.yaml"], monkeypatch, capsys)
    assert code == 1 and _lines(err) == ["error: unexpected RuntimeError: something deep (rerun with --debug for "
                                         "the traceback)"]
    code, err = cli(["--debug", "recipe", "validate", "x.yaml"], monkeypatch, capsys)
    assert code == 1 and "Traceback" in err and _lines(err)[-1].startswith("error: unexpected RuntimeError")


# -- 4. disk full and read-only outputs --------------------------------------------------------------------------


def test_atomic_write_on_full_disk_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import ltmpctl.rundir as rd

    target = tmp_path / "summary.json"
    target.write_text("old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rd.os, "fsync", full)
    with pytest.raises(WriteError, match=r"can't write .*summary.json: No space left on device") as e:
        atomic_write(target, b"new")
    assert "free some disk space" in str(e.value) and "\n" not in str(e.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Callable[[str], Path]:
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        path = tmp_path / f"mnt{len(mounted)}"
        if not _mount_tmpfs(path, options):
            pytest.skip("can't mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_run_is_one_line_and_not_complete(folder: Path, tmpfs: Callable, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    disk = tmpfs("size=48k")  # room for the small files, not for the ~120 KB weights
    out = disk / "run"
    code, err = cli(["compress", *tiny_args(folder), "--out", str(out), "--json"], monkeypatch, capsys)
    assert code == WriteError.exit_code, err
    assert len(_lines(err)) == 1 and err.startswith(f"error: can't write {out}/"), err
    assert err.strip().endswith(": No space left on device (free some disk space, or write elsewhere with --out)")
    assert not (out / "model.safetensors").exists() and not list(out.rglob("*.tmp"))
    assert RunDir(out).state() != "complete"


def test_read_only_output_is_one_line(folder: Path, tmpfs: Callable, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    disk = tmpfs("ro,size=64k")  # read-only even for root
    code, err = cli(["compress", *tiny_args(folder), "--out", str(disk / "run"), "--json"], monkeypatch, capsys)
    assert code == WriteError.exit_code, err
    assert _lines(err) == [f"error: can't write {disk / 'run'}: Read-only file system (write elsewhere with --out "
                           "(that location is read-only or not yours))"]


# -- 5. adb faults: one line each, the phone's temp files removed where the phone is still there --------------------

FAULT_ADB = Path(__file__).parent / "fault_adb" / "adb"
PIXEL7 = {"serial": "2A121FDH200B7Q", "state": "device", "model": "Pixel_7", "device": "panther",
          "product": "panther", "transport_id": "3", "props": {"ro.product.model": "Pixel 7"}}
ET_OK = "I 00:00:00.289020 executorch:executor_runner.cpp:240] Model executed successfully 4 time(s) in 168.0 ms.\n"


@pytest.mark.parametrize("fault,runner,match", [
    ("unplug", {"stderr": ET_OK}, r"adb -s 2A121FDH200B7Q shell .*failed \(exit 1\): adb: device '2A121FDH200B7Q' "
                                  r"not found"),
    ("hang", {"stderr": ET_OK}, r"timed out after 2 s"),
    ("storage_full", {"stderr": ET_OK}, r"push .*No space left on device"),
    ("", {"stderr": "Segmentation fault\n", "exit": 139}, r"failed \(exit 139\): Segmentation fault"),
    ("", {"stdout": "\x00\x01 garbage \ufffd\n" * 3}, r"could not parse executor_runner's output"),
])
def test_adb_fault_is_one_line_and_cleans_up(fault: str, runner: dict, match: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import ltmpctl.bench.runners as runners
    from ltmpctl.bench.runners import REMOTE_ROOT, bench_adb
    from ltmpctl.errors import DeviceError

    spec = {"devices": [PIXEL7], "runners": {"executor_runner": runner}, "root": str(tmp_path / "phone"),
            "log": str(tmp_path / "adb-log.jsonl")}
    (tmp_path / "scenario.json").write_text(json.dumps(spec))
    monkeypatch.setenv("FAKE_ADB_SCENARIO", str(tmp_path / "scenario.json"))
    monkeypatch.setenv("FAKE_ADB_FAULT", fault)
    monkeypatch.setenv("LTMPCTL_DEVICES", str(tmp_path / "aliases.yaml"))
    (tmp_path / "aliases.yaml").write_text("{}\n")
    monkeypatch.setattr(runners, "RUN_TIMEOUT_S", 2.0)
    host = tmp_path / "host"
    host.mkdir()
    (host / "m.pte").write_bytes(b"model bytes")
    (host / "executor_runner").write_bytes(b"\x7fELF runner")
    with pytest.raises(DeviceError, match=match) as e:
        bench_adb(PIXEL7["serial"], host / "m.pte", host / "executor_runner", (1, 28, 28), warmup=0,
                  iterations=3, adb_path=str(FAULT_ADB))
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in host.iterdir()) == ["executor_runner", "m.pte"]  # nothing left on the host
    work = tmp_path / "phone" / REMOTE_ROOT.lstrip("/")
    if fault == "unplug":  # the phone is gone: nothing can be removed from it; the next run uses a fresh dir
        return
    assert not work.exists() or list(work.iterdir()) == []  # the phone's temp dir removed
