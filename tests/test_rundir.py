"""Run directories: naming, collisions, atomic writes, summary merging, status under success/failure/Ctrl-C."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ltmpctl.errors import ConfigError
from ltmpctl.rundir import RunDir, run_name


def leftovers(path: Path) -> list[str]:
    return [p.name for p in path.rglob("*.tmp")]


def test_naming_and_collision_suffix(tmp_path):
    a = RunDir.create(None, "deit_tiny_patch16_224", "ltmp", 0.6, root=tmp_path)
    assert re.fullmatch(r"\d{8}-\d{6}-deit_tiny_patch16_224-ltmp-0\.6", a.path.name)
    name = run_name("demo", "tome", 0.5)
    (tmp_path / name).mkdir()
    (tmp_path / f"{name}-2").mkdir()
    # Pin the clock's name by creating the collisions first, then ask for the same name again.
    b = RunDir._fresh(tmp_path, name)
    assert b.name == f"{name}-3"


def test_model_name_is_made_safe(tmp_path):
    run = RunDir.create(None, "hf-hub:timm/vit tiny", "topk", 1.0, root=tmp_path)
    assert run.path.parent == tmp_path and run.path.name.endswith("-hf-hub_timm_vit_tiny-topk-1")


def test_out_is_created_and_reused(tmp_path):
    out = tmp_path / "a" / "b"
    run = RunDir.create(out, "demo", "ltmp", 0.5)
    assert run.path == out and out.is_dir()
    with pytest.raises(ZeroDivisionError), run.guard():
        1 / 0
    assert RunDir.create(out, "demo", "ltmp", 0.5).path == out  # a failed run may be resumed in place


def test_complete_run_is_refused_unless_overwrite(tmp_path):
    run = RunDir.create(tmp_path / "r", "demo", "ltmp", 0.5)
    with run.guard():
        run.update_summary(accuracy={"top1": 0.9})
    with pytest.raises(ConfigError, match="already holds a complete run"):
        RunDir.create(run.path, "demo", "ltmp", 0.5)
    again = RunDir.create(run.path, "demo", "ltmp", 0.5, overwrite=True)
    assert again.read_summary() == {} and again.status() is None


def test_foreign_nonempty_dir_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        RunDir.create(tmp_path, "demo", "ltmp", 0.5)
    assert RunDir.create(tmp_path, "demo", "ltmp", 0.5, overwrite=True).path == tmp_path


def test_atomic_writes_leave_no_tmp_files(tmp_path):
    run = RunDir.create(tmp_path / "r", "demo", "ltmp", 0.5)
    run.write_json("a.json", {"x": [1, 2], "p": Path("/x")})
    run.write_text("sub/b.txt", "hello")
    run.write_bytes("c.bin", b"\x00\x01")
    run.write_json("a.json", {"x": 3})  # replacing an existing file
    assert json.loads((run.path / "a.json").read_text()) == {"x": 3}
    assert (run.path / "sub" / "b.txt").read_text() == "hello"
    assert (run.path / "c.bin").read_bytes() == b"\x00\x01"
    assert leftovers(run.path) == []


def test_atomic_writes_get_plain_open_permissions(tmp_path):
    """Not mkstemp's owner-only 0600: other users and CI jobs read run directories."""
    import os

    from ltmpctl.rundir import atomic_write

    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    written = atomic_write(tmp_path / "atomic", b"x")
    assert os.stat(written).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_failed_json_write_keeps_old_file(tmp_path):
    run = RunDir.create(tmp_path / "r", "demo", "ltmp", 0.5)
    run.update_summary(a=1)
    with pytest.raises(TypeError):
        run.update_summary(b=object())
    assert run.read_summary() == {"a": 1} and leftovers(run.path) == []


def test_names_cannot_escape(tmp_path):
    run = RunDir.create(tmp_path / "r", "demo", "ltmp", 0.5)
    for name in ("../x", "/tmp/x", ""):
        with pytest.raises(ConfigError):
            run.write_text(name, "x")


def test_summary_deep_merge(tmp_path):
    run = RunDir.create(tmp_path / "r", "demo", "ltmp", 0.5)
    assert run.read_summary() == {}
    run.update_summary(flops={"base": 10, "compressed": 5}, model="demo")
    merged = run.update_summary(flops={"compressed": 4, "ratio": 0.4}, accuracy={"top1": 0.8})
    assert merged == {"flops": {"base": 10, "compressed": 4, "ratio": 0.4}, "model": "demo",
                      "accuracy": {"top1": 0.8}}
    assert RunDir.open(run.path).read_summary() == merged


def test_guard_complete(tmp_path):
    run = RunDir.create(tmp_path / "r", "demo", "ltmp", 0.5)
    with run.guard():
        assert run.status()["state"] == "running" and run.status()["finished"] is None
    st = run.status()
    assert st["state"] == "complete" and st["error"] is None and st["finished"] >= st["started"]


def test_guard_failed(tmp_path):
    run = RunDir.create(tmp_path / "r", "demo", "ltmp", 0.5)
    with pytest.raises(ConfigError), run.guard():
        raise ConfigError("target: must be in (0, 1]\nsecond line", "fix it")
    st = run.status()
    assert st["state"] == "failed" and st["error"] == "ConfigError: target: must be in (0, 1]"
    log = (run.path / "run.log").read_text()
    assert "run failed" in log and "Traceback" in log


def test_guard_interrupted(tmp_path):
    run = RunDir.create(tmp_path / "r", "demo", "ltmp", 0.5)
    with pytest.raises(KeyboardInterrupt), run.guard():
        raise KeyboardInterrupt
    assert run.state() == "interrupted"


def test_open(tmp_path):
    with pytest.raises(ConfigError, match="no such run directory"):
        RunDir.open(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a ltmpctl run directory"):
        RunDir.open(tmp_path)
    run = RunDir.create(tmp_path / "r", "demo", "ltmp", 0.5)
    with run.guard():
        pass
    assert RunDir.open(run.path).state() == "complete"


def test_env_and_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    run = RunDir.create(tmp_path / "r", "demo", "ltmp", 0.5)
    env = run.write_env(seed=3, device="cpu", threads=2)
    saved = json.loads((run.path / "env.json").read_text())
    assert saved == env
    assert env["seed"] == 3 and env["device"] == "cpu" and env["omp_wait_policy"] == "passive"
    assert env["torch"] and env["timm"] and env["ltmpctl"] and env["python"] and env["torch_threads"] >= 1
    run.log_line("hello")
    run.logger.info("from logging")
    run.close()
    log = (run.path / "run.log").read_text()
    assert "hello" in log and "from logging" in log
