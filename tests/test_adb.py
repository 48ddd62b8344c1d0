"""On-device benchmarking against a fake adb (tests/fake_adb/adb): device parsing and resolution, quoting of every
shell argument, the three runners' output formats, and each device error's exit code through the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from ltmpctl.bench.adb import Adb, list_devices  # noqa: E402
from ltmpctl.bench.devices import (  # noqa: E402
    AdbNotFoundError, AmbiguousDeviceError, DeviceNotFoundError, DeviceOfflineError, DeviceUnauthorizedError,
    NoDevicesError, load_aliases, parse_devices, resolve,
)
from ltmpctl.bench.runners import REMOTE_ROOT, RunnerOutputError, bench_adb  # noqa: E402
from ltmpctl.bench.stats import SCHEMA  # noqa: E402
from ltmpctl.errors import ConfigError, DeviceError  # noqa: E402

FAKE_DIR = Path(__file__).parent / "fake_adb"
LTMPCTL = Path(sys.executable).with_name("ltmpctl")

PIXEL7 = {"serial": "2A121FDH200B7Q", "state": "device", "model": "Pixel_7", "device": "panther",
          "product": "panther", "transport_id": "3",
          "props": {"ro.build.fingerprint": "google/panther/panther:14/UQ1A.240205.004/11269751:user/release-keys",
                    "ro.soc.model": "", "ro.board.platform": "gs201", "ro.hardware": "panther",
                    "ro.build.version.release": "14", "ro.product.cpu.abi": "arm64-v8a",
                    "ro.product.model": "Pixel 7"}}
PIXEL8 = {"serial": "39071FDJH004ZR", "state": "device", "model": "Pixel_8", "device": "shiba", "product": "shiba",
          "transport_id": "4", "props": {"ro.soc.model": "Tensor G3", "ro.product.model": "Pixel 8"}}
UNAUTHORIZED = {"serial": "R58M41XYZAB", "state": "unauthorized", "transport_id": "5"}
OFFLINE = {"serial": "emulator-5554", "state": "offline", "transport_id": "6"}

# executor_runner logs with ET_LOG (stderr): 2 warmup + 3 timed runs with per-iteration lines (newer runners).
EXECUTORCH_LOG = """\
I 00:00:00.000962 executorch:executor_runner.cpp:95] Resetting threadpool with num threads = 4
I 00:00:00.013718 executorch:executor_runner.cpp:147] Model file {model} is loaded.
I 00:00:00.013746 executorch:executor_runner.cpp:156] Using method forward
I 00:00:00.013763 executorch:executor_runner.cpp:203] Setting up planned buffer 0, size 4816896.
I 00:00:00.052171 executorch:executor_runner.cpp:226] Method loaded.
I 00:00:00.052170 executorch:executor_runner.cpp:291] Model loaded in 38.412000 ms.
I 00:00:00.121290 executorch:executor_runner.cpp:331] Iteration 1 of 5: 69.101000 ms
I 00:00:00.163800 executorch:executor_runner.cpp:331] Iteration 2 of 5: 42.499000 ms
I 00:00:00.204901 executorch:executor_runner.cpp:331] Iteration 3 of 5: 41.100000 ms
I 00:00:00.245902 executorch:executor_runner.cpp:331] Iteration 4 of 5: 41.000000 ms
I 00:00:00.289003 executorch:executor_runner.cpp:331] Iteration 5 of 5: 43.100000 ms
I 00:00:00.289020 executorch:executor_runner.cpp:340] Model executed successfully 5 time(s) in 236.800000 ms.
I 00:00:00.289031 executorch:executor_runner.cpp:349] 1 outputs:
OutputX 0: tensor(sizes=[1, 1000], [-0.512, 0.233, 1.02, ..., 0.0417, -0.905, 0.338])
"""
# Older executor_runner builds print only the total.
EXECUTORCH_TOTAL_ONLY = """\
I 00:00:00.052171 executorch:executor_runner.cpp:226] Method loaded.
I 00:00:00.289020 executorch:executor_runner.cpp:240] Model executed successfully 4 time(s) in 168.000000 ms.
I 00:00:00.289031 executorch:executor_runner.cpp:249] 1 outputs:
"""
ORT_PERF_TEST = """\
Setting intra_op_num_threads to 2
Disabling intra-op thread spinning between runs
Session creation time cost: 0.217932 s
First inference time cost: 96 ms
Total inference time cost: 1.2481 s
Total inference requests: 30
Average inference time cost total: 41.603333 ms
Total inference run time: 1.24854 s
Number of inferences per second: 24.0281
Avg CPU usage: 48 %
Peak working set size: 71303168 bytes
Avg CPU usage:48
Peak working set size:71303168
Runs:30
Min Latency: 0.0398204 s
Max Latency: 0.0461519 s
P50 Latency: 0.0412086 s
P90 Latency: 0.0441519 s
P95 Latency: 0.0451519 s
P99 Latency: 0.0461519 s
P999 Latency: 0.0461519 s
"""
TORCH_PEP = "".join(
    ["Starting benchmark.\nRunning warmup runs.\nMain runs.\n"]
    + [f'PyTorchObserver {{"type": "NET", "unit": "us", "metric": "latency", "value": "{us}"}}\n'
       for us in (52000, 50000, 51000, 53000)]
    + ["Main run finished. Microseconds per iter: 51500. Iters per second: 19.4175\n"]
)

Scenario = Callable[..., Path]


@pytest.fixture
def scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scenario:
    """Write a fake-adb scenario, point FAKE_ADB_SCENARIO at it and put the fake adb first on PATH."""
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LTMPCTL_DEVICES", str(tmp_path / "no-user-aliases.yaml"))
    (tmp_path / "no-user-aliases.yaml").write_text("{}\n")

    def write(devices: list[dict], runners: dict[str, Any] | None = None, name: str = "scenario") -> Path:
        spec = {"devices": devices, "runners": runners or {}, "root": str(tmp_path / f"{name}-fs"),
                "log": str(tmp_path / f"{name}-log.jsonl")}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(spec))
        monkeypatch.setenv("FAKE_ADB_SCENARIO", str(path))
        return path

    return write


def _log(scenario_path: Path) -> list[dict]:
    spec = json.loads(scenario_path.read_text())
    return [json.loads(line) for line in Path(spec["log"]).read_text().splitlines()]


def _device_fs(scenario_path: Path) -> Path:
    return Path(json.loads(scenario_path.read_text())["root"])


def _files(tmp_path: Path, model_name: str, runner_name: str) -> tuple[Path, Path]:
    d = tmp_path / "host dir"
    d.mkdir(exist_ok=True)
    (d / model_name).write_bytes(b"model bytes")
    (d / runner_name).write_bytes(b"\x7fELF runner")
    return d / model_name, d / runner_name


# --- parsing and resolution -------------------------------------------------------------------------------------


def test_parse_devices_l() -> None:
    out = """* daemon not running; starting now at tcp:5037
* daemon started successfully
List of devices attached
2A121FDH200B7Q         device usb:1-1 product:panther model:Pixel_7 device:panther transport_id:3
R58M41XYZAB            unauthorized usb:1-2 transport_id:5
emulator-5554          offline transport_id:6
{no_permissions}

"""
    no_permissions = ("0123456789ABCDEF       no permissions (missing udev rules? user is in the plugdev group); "
                      "see [http://developer.android.com/tools/device.html] usb:1-3 transport_id:7")
    devs = parse_devices(out.format(no_permissions=no_permissions))
    assert [d.serial for d in devs] == ["2A121FDH200B7Q", "R58M41XYZAB", "emulator-5554", "0123456789ABCDEF"]
    p7 = devs[0]
    assert (p7.state, p7.model, p7.device, p7.product, p7.transport_id) == \
        ("device", "Pixel_7", "panther", "panther", "3")
    assert devs[1].state == "unauthorized" and devs[1].model is None
    assert devs[2].state == "offline"
    assert devs[3].state.startswith("no permissions (missing udev rules?") and devs[3].transport_id == "7"


@pytest.mark.parametrize("query", ["2A121FDH200B7Q", "Pixel_7", "Pixel 7", "pixel_7", "panther", "PANTHER", "pixel7"])
def test_resolve_by_serial_model_codename_alias(query: str) -> None:
    devs = parse_devices("2A121FDH200B7Q device product:panther model:Pixel_7 device:panther transport_id:3\n"
                         "39071FDJH004ZR device product:shiba model:Pixel_8 device:shiba transport_id:4\n")
    assert resolve(query, devs, load_aliases(Path(os.devnull))).serial == "2A121FDH200B7Q"


def test_user_alias_file_extends_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "devices.yaml"
    f.write_text("lab-phone: shiba\n")
    monkeypatch.setenv("LTMPCTL_DEVICES", str(f))
    aliases = load_aliases()
    assert aliases["labphone"] == "shiba" and aliases["pixel7"] == "panther"
    devs = parse_devices("39071FDJH004ZR device product:shiba model:Pixel_8 device:shiba\n")
    assert resolve("lab-phone", devs).serial == "39071FDJH004ZR"
    f.write_text("- not a mapping\n")
    with pytest.raises(ConfigError):
        load_aliases()


def test_resolution_errors() -> None:
    two = parse_devices("AAA device product:panther model:Pixel_7 device:panther\n"
                        "BBB device product:panther model:Pixel_7 device:panther\n"
                        "CCC unauthorized transport_id:5\nDDD offline transport_id:6\n")
    with pytest.raises(AmbiguousDeviceError, match="AAA.*BBB"):
        resolve("pixel7", two, {})
    with pytest.raises(DeviceNotFoundError, match="pixel9") as e:
        resolve("pixel9", two, {})
    assert "CCC (unauthorized)" in (e.value.hint or "")
    with pytest.raises(DeviceUnauthorizedError, match="CCC") as e:
        resolve("CCC", two, {})
    assert "USB debugging prompt" in (e.value.hint or "")
    with pytest.raises(DeviceOfflineError):
        resolve("DDD", two, {})
    with pytest.raises(NoDevicesError):
        resolve("pixel7", [], {})
    codes = {c.exit_code for c in (AdbNotFoundError, NoDevicesError, DeviceNotFoundError, AmbiguousDeviceError,
                                   DeviceUnauthorizedError, DeviceOfflineError)}
    assert len(codes) == 6 and DeviceError.exit_code not in codes


# --- the Adb wrapper ---------------------------------------------------------------------------------------------


def test_shell_quotes_every_argument(scenario: Scenario, tmp_path: Path) -> None:
    path = scenario([PIXEL7])
    marker = tmp_path / "pwned"
    nasty = ["getprop", f"a b; touch {marker}", "$(reboot)", "`id`", "it's", "x|y&&z"]
    Adb(PIXEL7["serial"]).shell(nasty)
    shell_calls = [e for e in _log(path) if "shell" in e]
    assert shell_calls[-1]["shell"] == nasty  # the device's shell sees exactly these words
    assert shell_calls[-1]["operators"] == []  # ...and nothing it would execute
    argv = [e for e in _log(path) if "argv" in e][-1]["argv"]
    assert argv[:3] == ["-s", PIXEL7["serial"], "shell"] and len(argv) == 4  # one remote command string
    assert not marker.exists()


def test_getprop_fingerprint_and_errors(scenario: Scenario) -> None:
    scenario([PIXEL7, PIXEL8])
    adb = Adb(PIXEL7["serial"])
    assert adb.getprop("ro.product.model") == "Pixel 7"
    fp = adb.fingerprint()
    assert fp["soc"] == "gs201"  # ro.soc.model is empty before Android 12: falls back to ro.board.platform
    assert fp["android"] == "14" and fp["abi"] == "arm64-v8a" and fp["fingerprint"].startswith("google/panther")
    assert Adb(PIXEL8["serial"]).fingerprint()["soc"] == "Tensor G3"
    with pytest.raises(DeviceError, match="inaccessible or not found"):
        adb.shell(["/data/local/tmp/nothing-here"])
    assert len(list_devices()) == 2


# --- bench_adb with each runner ----------------------------------------------------------------------------------


def _runner_call(path: Path) -> list[str]:
    return [e["shell"] for e in _log(path) if "shell" in e and e["shell"][0] not in ("getprop", "mkdir", "chmod",
                                                                                       "rm")][-1]


def test_bench_adb_executorch_quotes_paths_and_cleans_up(scenario: Scenario, tmp_path: Path) -> None:
    model, runner = _files(tmp_path, "evil; touch pwned.pte", "executor_runner")
    path = scenario([PIXEL7, UNAUTHORIZED], {"executor_runner": {"stderr": EXECUTORCH_LOG}})
    row = bench_adb("pixel7", model, runner, (3, 224, 224), warmup=2, iterations=3, taskset="f0")
    assert set(SCHEMA) <= set(row)
    assert row["backend"] == "executorch" and row["serial"] == PIXEL7["serial"] and row["device"].startswith("Pixel_7")
    assert (row["warmup"], row["repeats"], row["timing"]) == (2, 3, "per-iteration")
    assert row["p50_ms"] == pytest.approx(41.1) and row["mean_ms"] == pytest.approx((41.1 + 41.0 + 43.1) / 3)
    assert row["images_per_s"] == pytest.approx(1000 / 41.1)
    assert row["fingerprint"]["soc"] == "gs201" and row["taskset"] == "f0"
    call = _runner_call(path)
    assert call[:2] == ["taskset", "f0"] and call[2].startswith(REMOTE_ROOT) and call[2].endswith("/executor_runner")
    work = call[2].rsplit("/", 1)[0]
    assert f"--model_path={work}/evil; touch pwned.pte" in call  # one argument, space and ';' included
    assert "--num_executions=5" in call
    assert all(not e.get("operators") for e in _log(path) if "shell" in e)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    assert list((_device_fs(path) / REMOTE_ROOT.lstrip("/")).iterdir()) == []  # temp dir removed


def test_bench_adb_executorch_total_only(scenario: Scenario, tmp_path: Path) -> None:
    model, runner = _files(tmp_path, "m.pte", "executor_runner")
    scenario([PIXEL7], {"executor_runner": {"stderr": EXECUTORCH_TOTAL_ONLY}})
    row = bench_adb(PIXEL7["serial"], model, runner, (3, 224, 224), warmup=1, iterations=3)
    assert row["timing"] == "mean" and row["repeats"] == 4 and row["warmup"] == 0  # the mean covers every run
    assert row["mean_ms"] == pytest.approx(42.0) and row["p50_ms"] is None
    assert row["images_per_s"] == pytest.approx(1000 / 42.0)


def test_bench_adb_onnxruntime_perf_test(scenario: Scenario, tmp_path: Path) -> None:
    import torch

    model = tmp_path / "tiny.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), (torch.randn(1, 3, 2, 2),),
                      str(model), input_names=["images"], dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    runner = tmp_path / "onnxruntime_perf_test"
    runner.write_bytes(b"\x7fELF")
    path = scenario([PIXEL8], {"onnxruntime_perf_test": {"stdout": ORT_PERF_TEST}})
    row = bench_adb("Pixel 8", model, runner, (3, 2, 2), warmup=5, iterations=30, threads=2, batch=4)
    assert row["backend"] == "onnxruntime_perf_test" and row["timing"] == "percentiles"
    assert row["mean_ms"] == pytest.approx(41.603333) and row["p50_ms"] == pytest.approx(41.2086)
    assert row["p90_ms"] == pytest.approx(44.1519) and row["p99_ms"] == pytest.approx(46.1519)
    assert row["std_ms"] is None and row["repeats"] == 30 and row["warmup"] == 1
    assert row["peak_mem_mb"] == pytest.approx(68.0) and row["images_per_s"] == pytest.approx(4000 / 41.2086)
    call = _runner_call(path)
    assert call[1:6] == ["-I", "-m", "times", "-r", "30"] and call[-1].endswith("/tiny.onnx")
    assert call[call.index("-x") + 1] == "2" and call[call.index("-f") + 1] == "batch:4"


def test_bench_adb_speed_benchmark_torch(scenario: Scenario, tmp_path: Path) -> None:
    model, runner = _files(tmp_path, "scripted model.pt", "speed_benchmark_torch")
    path = scenario([PIXEL7], {"speed_benchmark_torch": {"stdout": TORCH_PEP}})
    row = bench_adb("panther", model, runner, (3, 224, 224), warmup=3, iterations=4)
    assert row["backend"] == "speed_benchmark_torch" and row["timing"] == "per-iteration"
    assert row["p50_ms"] == pytest.approx(51.5) and row["repeats"] == 4 and row["warmup"] == 3
    call = _runner_call(path)
    assert "--input_dims=1,3,224,224" in call and "--warmup=3" in call and "--iter=4" in call
    assert any(a.startswith("--model=") and a.endswith("/scripted model.pt") for a in call)
    with pytest.raises(ConfigError, match="thread"):
        bench_adb("panther", model, runner, (3, 224, 224), warmup=3, iterations=4, threads=2)


def test_unparseable_output_and_runner_failure_still_clean_up(scenario: Scenario, tmp_path: Path) -> None:
    model, runner = _files(tmp_path, "m.pte", "executor_runner")
    path = scenario([PIXEL7], {"executor_runner": {"stdout": "Segmentation fault\nsomething else\n"}})
    with pytest.raises(RunnerOutputError, match="Segmentation fault | something else"):
        bench_adb("pixel7", model, runner, (3, 224, 224), warmup=0, iterations=1)
    assert list((_device_fs(path) / REMOTE_ROOT.lstrip("/")).iterdir()) == []
    path = scenario([PIXEL7], {"executor_runner": {"stderr": "E executor_runner.cpp:88] Loading failed 0x22\n",
                                                   "exit": 1}}, name="failing")
    with pytest.raises(DeviceError, match="failed \\(exit 1\\): E executor_runner.cpp:88\\] Loading failed 0x22"):
        bench_adb("pixel7", model, runner, (3, 224, 224), warmup=0, iterations=1)
    assert list((_device_fs(path) / REMOTE_ROOT.lstrip("/")).iterdir()) == []


def test_bench_adb_rejects_bad_input(scenario: Scenario, tmp_path: Path) -> None:
    scenario([PIXEL7])
    model, runner = _files(tmp_path, "m.pte", "executor_runner")
    with pytest.raises(ConfigError, match="taskset"):
        bench_adb("pixel7", model, runner, (3, 224, 224), 0, 1, taskset="f0; reboot")
    with pytest.raises(ConfigError, match="not found"):
        bench_adb("pixel7", tmp_path / "missing.pte", runner, (3, 224, 224), 0, 1)
    other = tmp_path / "model.tflite"
    other.write_bytes(b"")
    with pytest.raises(ConfigError, match="don't know how to run"):
        bench_adb("pixel7", other, runner, (3, 224, 224), 0, 1)


# --- the CLI: exit codes, one-line errors, no tracebacks ---------------------------------------------------------

CLI_CASES = ["happy", "devices", "no_adb", "no_devices", "not_found", "ambiguous", "unauthorized", "offline"]


def _cli_case(name: str, tmp_path: Path) -> tuple[dict, list[str], int, dict[str, str]]:
    """(scenario, argv after `ltmpctl`, expected exit code, environment) of one CLI case."""
    model, runner = _files(tmp_path, "model one.pte", "executor_runner")
    bench = ["bench", str(model), "--runner", str(runner), "--repeats", "3", "--warmup", "2", "--adb"]
    devices, argv, code = {
        "happy": ([PIXEL7], [*bench, "pixel7", "--json"], 0),
        "devices": ([PIXEL7, UNAUTHORIZED], ["devices", "--json"], 0),
        "no_adb": ([PIXEL7], ["devices"], AdbNotFoundError.exit_code),
        "no_devices": ([], [*bench, "pixel7"], NoDevicesError.exit_code),
        "not_found": ([PIXEL8], [*bench, "pixel7"], DeviceNotFoundError.exit_code),
        "ambiguous": ([PIXEL7, {**PIXEL7, "serial": "OTHER7"}], [*bench, "Pixel_7"], AmbiguousDeviceError.exit_code),
        "unauthorized": ([UNAUTHORIZED], [*bench, UNAUTHORIZED["serial"]], DeviceUnauthorizedError.exit_code),
        "offline": ([OFFLINE], [*bench, "emulator-5554"], DeviceOfflineError.exit_code),
    }[name]
    spec = {"devices": devices, "runners": {"executor_runner": {"stderr": EXECUTORCH_LOG}},
            "root": str(tmp_path / f"{name}-fs"), "log": str(tmp_path / f"{name}.jsonl")}
    (tmp_path / f"{name}.json").write_text(json.dumps(spec))
    empty_bin = tmp_path / "empty-bin"  # a PATH without adb (this machine may have a real one in /usr/bin)
    empty_bin.mkdir(exist_ok=True)
    path = str(empty_bin) if name == "no_adb" else f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}"
    env = {"PATH": path, "FAKE_ADB_SCENARIO": str(tmp_path / f"{name}.json"), "OMP_WAIT_POLICY": "passive",
           "LTMPCTL_DEVICES": os.devnull}
    return spec, argv, code, env


def _check_cli(name: str, tmp_path: Path, out: str, err: str, code: int, expected: int) -> None:
    assert code == expected, (name, code, err)
    assert "Traceback" not in err, (name, err)
    if expected:
        assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, (name, err)
    if name == "happy":
        row = json.loads(out)["rows"][0]
        assert row["backend"] == "executorch" and row["repeats"] == 3 and row["p50_ms"] == pytest.approx(41.1)
        shell = [json.loads(ln).get("shell", []) for ln in (tmp_path / "happy.jsonl").read_text().splitlines()]
        assert any(a.endswith("/model one.pte") for words in shell for a in words)
    elif name == "devices":
        listed = [(d["serial"], d["state"]) for d in json.loads(out)["attached"]]
        assert listed == [(PIXEL7["serial"], "device"), (UNAUTHORIZED["serial"], "unauthorized")]
    elif name == "no_adb":
        assert "apt-get install adb" in err
    elif name == "unauthorized":
        assert "accept the USB debugging prompt" in err
    elif name == "ambiguous":
        assert PIXEL7["serial"] in err and "OTHER7" in err and "serial" in err
    elif name == "not_found":
        assert PIXEL8["serial"] in err  # lists what is attached


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_in_process(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """Every case through `ltmpctl.cli.main` itself: the one place errors become a message and an exit code."""
    from ltmpctl.cli import main

    _, argv, expected, env = _cli_case(name, tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["ltmpctl", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    captured = capsys.readouterr()
    _check_cli(name, tmp_path, captured.out, captured.err, e.value.code or 0, expected)


SUBPROCESS_CASES = ["happy", "unauthorized"]  # the in-process test above covers every case


def test_cli_subprocess_exit_codes(tmp_path: Path) -> None:
    """The installed `ltmpctl` script in fresh processes: the user-facing path, exit code, no traceback.
    Kept to two cases: each start-up imports torch and timm (seconds of CPU apiece on 2 cores)."""
    procs = {}
    for name in SUBPROCESS_CASES:
        _, argv, expected, env = _cli_case(name, tmp_path)
        procs[name] = (expected, subprocess.Popen([str(LTMPCTL), *argv], env={**os.environ, **env},
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for name, (expected, proc) in procs.items():
        out, err = proc.communicate(timeout=1200)
        _check_cli(name, tmp_path, out, err, proc.returncode, expected)

