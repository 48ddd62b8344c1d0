"""The compressor contract seen from the stages: no stage knows a compressor by name, every recipe key is read by
some stage, re-fitting measures the model it fits, and the package's modules import each other without a circle."""
from __future__ import annotations

import ast
import copy
import re
from pathlib import Path
from typing import Any

import pytest
from test_pipeline import folder, make_folder, recipe  # noqa: F401  (folder: the module-scoped image fixture)

import ltmpctl
from ltmpctl import config, models
from ltmpctl.flops import measured_ratio
from ltmpctl.pipeline import run_compress, train_images
from ltmpctl.runs import data_spec, load_run, model_spec

PACKAGE = Path(ltmpctl.__file__).parent
BUILTINS = ("ltmp", "tome", "topk")


def _sources(skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))
            if not str(p.relative_to(PACKAGE)).startswith(skip)}


def test_stages_never_name_a_compressor() -> None:
    """Built-in names appear only in documentation and defaults, never in logic (string literals outside
    docstrings and comments, in every module but the CLI's help texts)."""
    hits = []
    for name, text in _sources(skip=("cli/",)).items():
        tree = ast.parse(text)
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in BUILTINS and id(node) not in docs:
                hits.append(f"{name}:{node.lineno} {node.value!r}")
    # The recipe's default compressor is the one documented default, not a switch.
    assert [h.split(":")[0] for h in hits] == ["config.py"], hits
    assert 'name: str = Field("ltmp"' in (PACKAGE / "config.py").read_text()


def _module_of(path: str) -> str:
    parts = ["ltmpctl", *Path(path).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> ltmpctl modules it imports, function-local imports included (they hide circles, not remove
    them)."""
    sources = _sources()
    modules = {_module_of(p): p for p in sources}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    # Compiled modules (setup.py's C extensions, e.g. ltmpctl._kernels) import nothing: leaves of the graph.
    leaves = {_module_of(str(p.relative_to(PACKAGE))): "" for p in PACKAGE.rglob("*.c")}
    graph.update({m: set() for m in leaves})
    for mod, path in modules.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(sources[path])):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules.keys() | leaves.keys() else base
                           for a in node.names]
            for t in targets:
                # `import ltmpctl.registry` -> ltmpctl.registry; attributes -> module
                while t and t not in modules and t not in leaves:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def test_no_import_circle_outside_the_cli() -> None:
    graph = {m: {t for t in ts if not t.startswith("ltmpctl.cli")} for m, ts in _import_graph().items()
             if not m.startswith("ltmpctl.cli")}
    assert "ltmpctl.pipeline" in graph["ltmpctl.compare"] and "ltmpctl.runs" in graph["ltmpctl.pipeline"]
    circles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == [], circles


def _fields(model: type, prefix: str = "") -> list[tuple[type, str, str]]:
    """(section class, field, dotted path) of every recipe key, sections included."""
    out = []
    for name, info in model.model_fields.items():
        out.append((model, name, prefix + name))
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, config._Section):
            out.extend(_fields(ann, f"{prefix}{name}."))
    return out


def test_every_recipe_key_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with every stage on reads every key of the recipe schema; a key no stage reads fails here (or it
    belongs in the schema with the stage that reads it)."""
    images = make_folder(tmp_path / "images", val_per_class=11)  # export verification wants 32 val images
    r = recipe(images, tmp_path / "run", **{
        "stages.flops.enabled": True, "stages.export.enabled": True, "stages.export.formats": ["onnx"],
        "stages.bench.enabled": True, "stages.bench.backends": ["torch", "onnxruntime"],
        "stages.bench.batch_sizes": [1], "stages.bench.repeats": 1, "stages.bench.warmup": 0,
        "stages.finetune.max_steps": 2, "stages.finetune.full": True})  # full: `lr` is read only then
    read: set[tuple[str, str]] = set()
    plain = config._Section.__getattribute__

    def recording(self: Any, name: str) -> Any:
        if name in type(self).model_fields:
            read.add((type(self).__name__, name))
        return plain(self, name)

    monkeypatch.setattr(config._Section, "__getattribute__", recording)
    run_compress(r)
    monkeypatch.undo()
    unread = [path for cls, name, path in _fields(config.Recipe) if (cls.__name__, name) not in read]
    assert unread == [], f"recipe keys no stage reads: {unread}"


def test_full_finetune_refits_on_the_trained_weights(folder: Path, tmp_path: Path) -> None:  # noqa: F811
    """With `full`, the weights change too: the re-fit must measure the fine-tuned network (the one saved), so the
    saved model at the saved thresholds keeps exactly the FLOPs the re-fit reported."""
    r = recipe(folder, tmp_path / "run", **{"stages.finetune.full": True, "stages.finetune.lr": 0.05,
                                            "stages.evaluate.enabled": False})
    s = run_compress(r)
    base, compressed, _ = load_run(tmp_path / "run")
    images = train_images(data_spec(r), models.data_config(base, model_spec(r)), r.stages.calibrate.images, r.seed)
    assert measured_ratio(compressed, images) == pytest.approx(s["recalibration"]["flops_ratio"], abs=1e-12)
    # The weights really moved: the uncompressed weights at the same thresholds keep other tokens.
    on_base = ltmpctl.apply(copy.deepcopy(base), "ltmp", **s["params"])
    assert any((a != b).any() for a, b in zip(base.state_dict().values(), compressed.state_dict().values()))
    assert measured_ratio(on_base, images) != measured_ratio(compressed, images)


def test_lr_groups_must_name_the_compressors_groups(folder: Path, tmp_path: Path) -> None:  # noqa: F811
    r = recipe(folder, tmp_path / "run", **{"stages.finetune.lr_groups": {"merge": 1e-3, "prnue": 1e-6}})
    with pytest.raises(ltmpctl.LtmpctlError, match=re.escape("has no parameter group 'prnue'")) as info:
        run_compress(r)
    assert "merge, prune" in info.value.hint


def test_class_count_mismatch_refused_before_any_work(folder: Path, tmp_path: Path) -> None:  # noqa: F811
    r = recipe(folder, tmp_path / "run", **{"model.kwargs.num_classes": 5})
    with pytest.raises(ltmpctl.LtmpctlError, match="has 3 classes but vit_tiny_patch16_224's head has 5") as info:
        run_compress(r)
    assert "num_classes=3" in info.value.hint
    assert not (tmp_path / "run").exists()  # refused before the run dir was made


def test_imagenet_label_order_warning(tmp_path: Path) -> None:
    from timm.data import ImageNetInfo

    from ltmpctl.data.sanity import check_classes

    synsets = ImageNetInfo().label_names()
    for name, folders in (("ok", synsets), ("words", [f"class{i:04d}" for i in range(1000)])):
        for c in folders:
            (tmp_path / name / "train" / c).mkdir(parents=True)
    assert check_classes(str(tmp_path / "ok"), 1000, "deit_tiny_patch16_224") is None
    warning = check_classes(str(tmp_path / "words"), 1000, "deit_tiny_patch16_224")
    assert warning is not None and "not ImageNet synset ids" in warning
