"""Does cutting FLOPs cut latency? Every compressor at about half the FLOPs, timed against the unreduced model in
torch eager, onnxruntime and (with --executorch) ExecuTorch's runtime, at batch 1 and 32, on deit_tiny at 224
(random weights and images) and on the offline demo ViT (its Fashion-MNIST test images).

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/latency_vs_flops.py --threads 2 --repeats 20
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/latency_vs_flops.py --models demo --executorch --profile

Each compressor is calibrated to --target on a probe batch of the model's own images (real ones for the demo) and
timed on other images of the same kind; base and compressed models run interleaved (one forward each in turn).
Calibration and exports run in a separate process: the timing process only builds the models and times them.
FLOPs = ltmpctl's analytic MACs of the tokens each timed image keeps, as a fraction of the unreduced model's;
exec = what the batched forward really computes (`ltmpctl.flops.executed_macs`: ltmp runs attention's n x n
products padded to the batch's widest image in eager, and its whole attention half so in the ONNX graph), equal
to FLOPs at batch 1. lat/FLOPs = latency ratio / FLOPs ratio
(1.00 = time falls exactly with FLOPs). bound = the latency ratio with zero reduction overhead: the base model's own
blocks fed the compressor's token schedule by plain slicing, on the threads the compressed models use (torch rows
where every image of the batch keeps the same counts; shared/SPEED.md). ops/blk = aten ops called from Python per
forward, over the blocks (torch rows; the plain timm block is the base row). `--profile` adds where each forward's
time goes.
The `A/A` rows time a second copy of the base (the same file for onnxruntime and ExecuTorch) in the same interleave:
their latency ratio, 1.000 on a quiet machine, is the table's own noise floor (a shared 2-core VM's busy hour put it at
0.97-1.20 at batch 1).
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP (shared/SETUP.md)

import torch  # noqa: E402

import ltmpctl  # noqa: E402
from ltmpctl.bench.local import (bench_onnx_files, bench_pte_files, bench_torch_models, compare_rows,  # noqa: E402
                                 random_batch, set_threads)
from ltmpctl.compressor import stem_values, token_counts  # noqa: E402
from ltmpctl.flops import batch_ratios  # noqa: E402
from ltmpctl.tokens import serial  # noqa: E402

from _methods import COMPRESSORS, in_fresh_process, methods_at, short  # noqa: E402
from _profile import op_count, ort_profile, print_profile, torch_profile  # noqa: E402


def deit_tiny() -> tuple[str, torch.nn.Module, Callable[[int, int], torch.Tensor]]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    return "deit_tiny 224 (random weights, random images)", model, lambda n, seed: random_batch((3, 224, 224), n, seed)


def demo() -> tuple[str, torch.nn.Module, Callable[[int, int], torch.Tensor]]:
    from ltmpctl import demo as demo_pkg
    from ltmpctl.data.loaders import DataSpec, calibration_batch
    from ltmpctl.models import ModelSpec, create

    model = create(ModelSpec("demo")).eval()
    return ("demo ViT 28x28 (Fashion-MNIST test images)", model,
            lambda n, seed: calibration_batch(DataSpec(), dict(demo_pkg.DATA_CONFIG), n, seed))


MODELS = {"deit_tiny": deit_tiny, "demo": demo}
CONTROL = "A/A"  # a copy of the base timed as one more model: the noise floor of every ratio


def model_args(doc: str, repeats: int, batches: list[int]) -> argparse.ArgumentParser:
    """The options every benchmark over `MODELS` shares (--models, --threads, --repeats, --batches), on a parser
    described by the first line of `doc`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--threads", type=int, default=None, help="torch/onnxruntime intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed forwards per row")
    p.add_argument("--batches", type=int, nargs="+", default=batches, help="batch sizes")
    return p


def setup_line() -> str:
    """What every benchmark's table was timed with: torch version, threads, OpenMP wait policy, CPUs."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY')}, {os.cpu_count()} CPUs")


def parse_args() -> argparse.Namespace:
    p = model_args(__doc__, 10, [1, 32])
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per row")
    p.add_argument("--target", type=float, default=0.5, help="FLOPs ratio every compressor is calibrated to")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the onnxruntime rows")
    p.add_argument("--executorch", action="store_true",
                   help="add ExecuTorch rows (batch 1; lowering takes about a minute per program)")
    p.add_argument("--profile", action="store_true", help="also print where each forward's time goes")
    return p.parse_args()


def export(model: torch.nn.Module, fmt: str, out: Path, images: torch.Tensor) -> Path:
    """A verified export of `model` (`ltmpctl.export`), checked on `images`."""
    from ltmpctl.export import FORMATS, export_model

    export_model(model, fmt, out, images[:1], images)
    return out / FORMATS[fmt].filename


class Bound(torch.nn.Module):
    """The zero-overhead bound of a token schedule: `base`'s own blocks, block i fed the first schedule[i] tokens,
    each part on the threads a compressed model gives it (`ltmpctl.tokens.serial`: one where the tokens are few)."""

    def __init__(self, base: torch.nn.Module, schedule: list[int]) -> None:
        super().__init__()
        self.base, self.schedule = base, schedule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.base
        with serial(stem_values(m, x)):
            x = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for blk, n in zip(m.blocks, self.schedule):
            x = x[:, :n]
            with serial(x):
                x = blk(x)
        with serial(x):
            x = m.norm(x)
        return m.forward_head(x)


def bound_of(base: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> Bound | None:
    """`model`'s schedule on `x` as a `Bound`, when every image keeps the same token counts (None otherwise)."""
    with torch.inference_mode():
        model(x)
    counts = token_counts(model)[..., 0]  # (B, depth): tokens into each block
    if not bool((counts == counts[:1]).all()):
        return None
    return Bound(base, [int(n) for n in counts[0].tolist()])


def timed_images(images: Callable[[int, int], torch.Tensor], batches: list[int]) -> torch.Tensor:
    """The images every row is timed (and the exports verified) on: not the calibration probe."""
    return images(max(batches + [32]), 0)


def compressed(base: torch.nn.Module, methods: list[tuple[str, dict[str, Any], float]]) -> dict[str, torch.nn.Module]:
    """The base and a compressed copy of it per calibrated method, by name."""
    return {"base": base, **{name: ltmpctl.apply(copy.deepcopy(base), name, **p) for name, p, _ in methods}}


def prepare(key: str, target: float, threads: int | None, batches: list[int], formats: dict[str, str],
            out: Path, names: tuple[str, ...] = COMPRESSORS) -> tuple[list, dict[str, dict[str, Path]]]:
    """Calibrate `names` on model `key`'s probe images and export base and compressed models in each of `formats`
    ({backend: export format}) under `out`: (methods, {backend: {name: file}}). Run through `in_fresh_process`."""
    set_threads(threads)
    _, base, images = MODELS[key]()
    methods = methods_at(base, target, images(64, 1), names)
    if not formats:  # calibration only: no models to build, no images to verify on
        return methods, {}
    verify = timed_images(images, batches)[:32]
    models = compressed(base, methods)
    files = {backend: {n: export(m, fmt, out / key / backend / n, verify) for n, m in models.items()}
             for backend, fmt in formats.items()}
    return methods, files


def calibrated(key: str, target: float, threads: int | None, names: tuple[str, ...] = COMPRESSORS) -> list:
    """`methods_at` on model `key`'s probe images, calibrated in a fresh process (`in_fresh_process`)."""
    return in_fresh_process(prepare, key, target, threads, [], {}, Path(), names)[0]


def ltmp_at(key: str, target: float, threads: int | None) -> tuple[str, torch.nn.Module, Callable, torch.nn.Module]:
    """(title, base, images, ltmp copy of the base calibrated to `target` in a fresh process) for model `key`."""
    (_, params, _), = calibrated(key, target, threads, names=("ltmp",))
    title, base, images = MODELS[key]()
    return title, base, images, ltmpctl.apply(copy.deepcopy(base), "ltmp", **params)


def measure(key: str, args: argparse.Namespace, tmp: Path) -> tuple[list[dict], list[dict]]:
    """(latency rows, profile rows): every model at every batch, on every backend."""
    formats = {backend: fmt for backend, fmt, on in (("onnxruntime", "onnx", args.onnx),
                                                     ("executorch", "mobile", args.executorch)) if on}
    methods, files = in_fresh_process(prepare, key, args.target, args.threads, args.batches, formats, tmp)
    label, base, images = MODELS[key]()
    models = {**compressed(base, methods), CONTROL: copy.deepcopy(base)}
    files = {backend: {**named, CONTROL: named["base"]} for backend, named in files.items()}
    params = {"base": "", **{name: short(p) for name, p, _ in methods}, CONTROL: "a copy of the base"}
    timed = timed_images(images, args.batches)
    input_shape = tuple(timed.shape[1:])
    depth = len(base.blocks)
    rows, profiles = [], []
    for batch in args.batches:
        x = timed[:batch]
        print(f"{label}: batch {batch}", flush=True)
        bounds = {n: b for n, m in models.items()
                  if n not in ("base", CONTROL) and (b := bound_of(base, m, x)) is not None}
        torch_rows = bench_torch_models([*models.values(), *bounds.values()], input_shape, batch, args.warmup,
                                        args.repeats, threads=args.threads, images=x)
        bound_ratio = {n: compare_rows(torch_rows[0], row, None)["latency_ratio"]
                       for n, row in zip(bounds, torch_rows[len(models):])}
        by_backend = {"torch": torch_rows[:len(models)]}
        if "onnxruntime" in files:
            by_backend["onnxruntime"] = bench_onnx_files(list(files["onnxruntime"].values()), input_shape, batch,
                                                         args.warmup, args.repeats, threads=args.threads, images=x)
        if "executorch" in files and batch == 1:
            by_backend["executorch"] = bench_pte_files(list(files["executorch"].values()), input_shape,
                                                       args.warmup, args.repeats, images=x)
        for i, (name, model) in enumerate(models.items()):
            ratio, executed = batch_ratios(model, x)  # one forward on the timed batch
            exported = batch_ratios(model, x, exported=True)[1]  # what the ONNX graph computes on it
            ops = op_count(model, x) / depth
            for backend, backend_rows in by_backend.items():
                rows.append({"model": label, "method": name, "params": params[name],
                             "exec_ratio": exported if backend == "onnxruntime" else executed,
                             "ops_per_block": ops if backend == "torch" else None,
                             "bound": bound_ratio.get(name) if backend == "torch" else None,
                             **compare_rows(backend_rows[0], backend_rows[i], ratio)})
            if args.profile:
                profiles.append({"model": label, "method": name, "backend": "torch", "batch": batch,
                                 **torch_profile(model, x)})
                if "onnxruntime" in files:
                    profiles.append({"model": label, "method": name, "backend": "onnxruntime", "batch": batch,
                                     **ort_profile(files["onnxruntime"][name], x.numpy(), args.threads)})
    return rows, profiles


def print_table(rows: list[dict]) -> None:
    head = (f"{'method':<6} {'backend':<11} {'batch':>5} {'FLOPs':>6} {'exec':>6} {'p50 ms':>9} {'img/s':>8} "
            f"{'lat.':>6} {'bound':>6} {'speedup':>7} {'lat/FLOPs':>9} {'ops/blk':>7}  params")
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"\n{model}")
        print(head)
        print("-" * (len(head) + 30))
        for r in (r for r in rows if r["model"] == model):
            ops = f"{r['ops_per_block']:7.0f}" if r["ops_per_block"] is not None else f"{'':7}"
            bound = f"{r['bound']:6.3f}" if r.get("bound") is not None else f"{'':6}"
            print(f"{r['method']:<6} {r['backend']:<11} {r['batch']:>5} {r['flops_ratio']:>6.3f} "
                  f"{r['exec_ratio']:>6.3f} {r['p50_ms']:>9.2f} {r['images_per_s']:>8.1f} {r['latency_ratio']:>6.3f} "
                  f"{bound} "
                  f"{r['speedup']:>6.2f}x {r['latency_ratio'] / r['flops_ratio']:>9.2f} {ops}  {r['params']}")


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    rows: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            r, p = measure(key, args, Path(tmp))
            rows += r
            profiles += p
    print(f"\n{setup_line()}, torch eager, warmup {args.warmup}, repeats {args.repeats}")
    print_table(rows)
    if profiles:
        print("\nwhere the time goes, per forward (torch: under torch.profiler; onnxruntime: its node profiling)")
        for model in dict.fromkeys(r["model"] for r in profiles):
            print(f"\n{model}")
            print_profile([r for r in profiles if r["model"] == model])


if __name__ == "__main__":
    main()
