"""Recipe schema and loading: defaults < recipe file < CLI flags (`overrides`) < `--set PATH=VALUE`.

A recipe is a YAML mapping checked against typed pydantic models that reject unknown keys. Every validation
problem becomes one `ConfigError` whose message starts with the dotted path of the offending key, e.g.
`stages.finetune.lr_max: unknown key`. Compressor parameters are checked by the compressor plugin itself.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, PluginError

SET_HINT = "write --set PATH=VALUE, e.g. --set stages.finetune.epochs=0.5"


class _Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, not silently ignored settings."""

    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    name: str = Field("demo", min_length=1)  # alias (deit_tiny), timm name, or `demo` (offline Fashion-MNIST ViT)
    pretrained: bool = True  # load timm's pretrained weights (ignored when `checkpoint` is given)
    checkpoint: Optional[str] = None  # a .pth/.safetensors state dict to load instead of timm's weights
    kwargs: dict[str, Any] = {}  # extra keyword arguments for timm.create_model (img_size, num_classes, ...)


class CompressorSection(_Section):
    name: str = Field("ltmp", min_length=1)  # registered compressor: `ltmpctl plugins` lists them
    params: dict[str, Any] = {}  # the compressor's own parameters, checked by its plugin; filled with its defaults

    @model_validator(mode="after")
    def _check_with_plugin(self) -> "CompressorSection":
        # Raised as ConfigError (not ValueError) so it escapes pydantic with the path and hint we choose.
        self.params = check_compressor(self.name, self.params)
        return self


class DataSection(_Section):
    path: str = Field("demo", min_length=1)  # `demo` = offline Fashion-MNIST; else ImageFolder root with train/, val/
    input_size: Optional[list[int]] = None  # (C, H, W) fed to the model; None = the model's own data config
    mean: Optional[list[float]] = None  # per-channel normalisation mean; None = the model's own
    std: Optional[list[float]] = None  # per-channel normalisation std; None = the model's own
    batch_size: int = Field(64, ge=1)  # loader batch size where a stage does not set its own
    workers: int = Field(0, ge=0)  # DataLoader worker processes (0 = load in the main process)

    @field_validator("input_size")
    @classmethod
    def _chw(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (len(v) != 3 or any(x < 1 for x in v)):
            raise ValueError("must be three positive integers [C, H, W]")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and any(x <= 0 for x in v):
            raise ValueError("every std must be > 0")
        return v

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> "DataSection":
        channels = self.input_size[0] if self.input_size else None
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and channels is not None and len(values) != channels:
                raise ValueError(f"{key} has {len(values)} values but input_size has {channels} channels")
        return self


class CalibrateStage(_Section):
    enabled: bool = True  # search the compressor's parameters that hit `target` before fine-tuning
    images: int = Field(256, ge=1)  # training images the search measures FLOPs on
    tolerance: float = Field(0.02, gt=0)  # stop when |FLOPs fraction - target| is below this
    max_iters: int = Field(30, ge=1)  # bisection steps at most


class FinetuneStage(_Section):
    enabled: bool = True  # train after calibration (learnable compressors, or `full`)
    epochs: float = Field(1.0, gt=0)  # passes over the train split; fractions allowed (0.1 = a tenth)
    max_steps: Optional[int] = Field(None, ge=1)  # stop after this many optimizer steps, whatever `epochs` says
    batch_size: int = Field(128, ge=1)  # training batch size (LTMP paper: 128)
    # SGD learning rate per trainable group of the compressor (ltmp: merge, prune); unset = the compressor's
    # default (ltmp: the paper's 5e-3 and 5e-6). `ltmpctl plugins` names the groups.
    lr_groups: dict[str, Annotated[float, Field(ge=0)]] = {}
    full: bool = False  # train the whole model too; false = ltmp learns only its thresholds
    lr: float = Field(1e-5, ge=0)  # learning rate of the model weights, used only when `full`
    momentum: float = Field(0.0, ge=0, lt=1)  # SGD momentum (LTMP paper: none)
    lam: float = Field(10.0, ge=0)  # weight of the FLOPs term (ratio - target)^2 in the loss
    label_smoothing: float = Field(0.1, ge=0, lt=1)  # cross-entropy label smoothing
    distill: bool = False  # distil from the uncompressed model's logits instead of the labels
    augment: bool = True  # random training augmentation (flips and shifts/crops)
    checkpoint_every: int = Field(50, ge=1)  # steps between resumable checkpoints in the run dir


class EvaluateStage(_Section):
    enabled: bool = True  # top-1 accuracy of the original and the compressed model
    images: Optional[int] = Field(None, ge=1)  # validation images to use; None = the whole val split
    batch_size: int = Field(64, ge=1)  # evaluation batch size


class FlopsStage(_Section):
    enabled: bool = True  # count MACs (analytic and fvcore) before and after compression
    images: int = Field(64, ge=1)  # validation images averaged over (data-dependent compressors vary per image)


class ExportStage(_Section):
    enabled: bool = False  # write deployable files of the compressed model
    formats: list[Literal["onnx", "torchscript", "mobile"]] = Field(["onnx"], min_length=1)  # what to write
    opset: int = Field(18, ge=7)  # ONNX opset version
    verify_images: int = Field(32, ge=0)  # images on which exported outputs are compared with eager (0 = skip)


class BenchStage(_Section):
    enabled: bool = False  # measure latency and throughput of the original and compressed model
    batch_sizes: list[int] = Field([1, 32], min_length=1)  # batch sizes to time
    warmup: int = Field(5, ge=0)  # untimed iterations before measuring
    repeats: int = Field(20, ge=1)  # timed iterations per batch size
    # runtimes to time; onnxruntime times the run's exported ONNX file (stages.export with format onnx)
    backends: list[Literal["torch", "onnxruntime"]] = Field(["torch"], min_length=1)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("every batch size must be >= 1")
        return v


class Stages(_Section):
    calibrate: CalibrateStage = Field(default_factory=CalibrateStage)  # fit parameters to the FLOPs target
    finetune: FinetuneStage = Field(default_factory=FinetuneStage)  # learn thresholds (and weights if `full`)
    evaluate: EvaluateStage = Field(default_factory=EvaluateStage)  # accuracy before and after
    flops: FlopsStage = Field(default_factory=FlopsStage)  # MACs before and after
    export: ExportStage = Field(default_factory=ExportStage)  # ONNX / TorchScript / mobile files
    bench: BenchStage = Field(default_factory=BenchStage)  # latency, locally and over adb


class Recipe(_Section):
    # default_factory: building the default compressor section asks the plugin registry, so not at import time.
    model: ModelSection = Field(default_factory=ModelSection)  # what to compress
    compressor: CompressorSection = Field(default_factory=CompressorSection)  # how to compress it
    target: float = 0.5  # fraction of the original FLOPs to keep, in (0, 1]
    seed: int = Field(0, ge=0, lt=2**32)  # seeds torch, data order and augmentation (NumPy takes 32 bits)
    out: Optional[str] = None  # run directory; None = runs/<UTC time>-<model>-<compressor>-<target>/
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    threads: Optional[int] = Field(None, ge=1, le=1024)  # torch CPU threads; None = torch's default
    data: DataSection = Field(default_factory=DataSection)  # images for calibration, training, evaluation
    stages: Stages = Field(default_factory=Stages)  # what the run does, in order

    @field_validator("target")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v


def check_compressor(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The plugin's parsed parameters (defaults filled in), or a ConfigError naming `compressor.*`."""
    from . import registry

    try:
        cls = registry.get(name)
    except PluginError as e:
        raise ConfigError(f"compressor.name: {e.message}", e.hint) from None
    try:
        parsed = cls.parse_params(dict(params))
    except ConfigError as e:
        raise ConfigError(_params_message(name, e.message), e.hint) from None
    return parsed.model_dump(mode="json")


def _params_message(name: str, message: str) -> str:
    # parse_params words its errors "<compressor>: <key>: <problem>"; turn that into our dotted-path form.
    prefix = f"{name}: "
    rest = message[len(prefix):] if message.startswith(prefix) else message
    key, sep, problem = rest.partition(": ")
    if sep and re.fullmatch(r"[\w.]+", key):
        if problem == "Extra inputs are not permitted":  # pydantic's words for extra="forbid"; say it our way
            problem = "unknown key"
        return f"compressor.params.{key}: {_strip_value_error(problem)}"
    return f"compressor.params: {rest}"


def _strip_value_error(msg: str) -> str:
    # pydantic prefixes messages from our own validators with "Value error, "; the path already says enough.
    return msg.removeprefix("Value error, ")


MAX_RECIPE_BYTES = 1 << 20  # a hand-written recipe is a few KB; more is a wrong file (a checkpoint, a log)
MAX_NODES = 100_000  # YAML values after expanding aliases: far above any recipe, far below an alias bomb
MAX_INT = 2**63 - 1  # what torch and NumPy can take; larger integers only overflow somewhere deep inside


def load_yaml(path: Union[str, Path]) -> dict[str, Any]:
    """The recipe file's mapping; an empty file is an empty recipe (all defaults).

    The file is untrusted: plain YAML only (`yaml.SafeLoader`: no `!!python/...` tags, nothing executes), no
    alias bombs, no nesting deep enough to exhaust the stack, no non-finite or overflowing numbers.
    """
    p = Path(path)
    try:
        if p.is_file() and p.stat().st_size > MAX_RECIPE_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size} bytes is too big for a recipe",
                              "pass the YAML recipe file (a few KB), not a data or weights file")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such recipe file", "check the path; recipes/ has examples") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read recipe ({type(e).__name__}: {_first_line(e)})",
                          "pass a YAML text file") from None
    try:
        data = _safe_load(text, p)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: {e.problem}", "recipes are plain YAML: remove the `!!` tag or the value "
                          "that needs it") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or _first_line(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}", "fix the YAML syntax at that line") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid YAML: nested too deeply", "a recipe is a few levels of sections") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}:1: a recipe must be a mapping of sections, not a {type(data).__name__}",
                          "start the file with keys such as `model:`, `compressor:`, `target:`")
    check_numbers(data, str(p))
    return data


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _safe_load(text: str, path: Path) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand to more than MAX_NODES values (billion laughs:
    a few lines of anchors that PyYAML keeps shared, but that validation and merging would walk in full)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise ConfigError(f"{path}: its anchors and aliases expand to more than {MAX_NODES} values",
                              "write the values out, or use fewer nested aliases") from None
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """How many values `root` holds with every alias expanded; memoised per node, so linear in the file."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:  # an alias to its own ancestor: infinite when expanded
            return MAX_NODES + 1
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [c for pair in node.value for c in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                break
        active.discard(key)
        sizes[key] = total
        return total

    return size(root)


def check_numbers(tree: Any, where: str, path: str = "") -> None:
    """Refuse nan/inf and integers past 64 bits anywhere in a recipe tree: no setting needs them, and they would
    overflow (or make loops endless) deep inside torch instead of failing here with the key's name."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            check_numbers(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            check_numbers(v, where, f"{path}.{i}" if path else str(i))
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(f"{path or 'recipe'}: {tree} is not a finite number", f"give a finite value ({where})")
    elif isinstance(tree, int) and not isinstance(tree, bool) and abs(tree) > MAX_INT:
        raise ConfigError(f"{path or 'recipe'}: {tree:.3g} is too large", f"give a value below 2**63 ({where})")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys (`stages.finetune.epochs`) to nested dicts; None values dropped (= flag not given)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = _nest(value)
            if not value:
                continue
        _put(tree, str(key).split("."), value)
    return tree


def _put(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    last = path[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = deep_merge(node[last], value)
    else:
        node[last] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: `top` wins; nested mappings merge key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _merge_layer(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge one precedence layer. Switching compressor drops the lower layers' params: they were another's."""
    comp_top, comp_base = top.get("compressor"), base.get("compressor")
    if (isinstance(comp_top, dict) and isinstance(comp_base, dict) and "params" not in comp_top
            and comp_top.get("name", comp_base.get("name")) != comp_base.get("name")):
        base = {**base, "compressor": {k: v for k, v in comp_base.items() if k != "params"}}
    return deep_merge(base, top)


def _schema_check(path: list[str]) -> None:
    """Refuse a --set path the schema does not have (free-form dicts such as compressor.params accept any key)."""
    model: Any = Recipe
    for i, part in enumerate(path):
        fields = model.model_fields
        if part not in fields:
            dotted = ".".join(path[: i + 1])
            raise ConfigError(f"{dotted}: unknown key", _did_you_mean(part, list(fields)) or SET_HINT)
        annotation = fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        if i < len(path) - 1 and not _is_dict(annotation):
            dotted = ".".join(path[: i + 2])
            raise ConfigError(f"{dotted}: unknown key", f"{'.'.join(path[: i + 1])} is a value, not a section")
        return


def _is_dict(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", annotation) is dict


def parse_set(item: str) -> tuple[list[str], Any]:
    """`PATH=VALUE` -> (path parts, value parsed as YAML: numbers, booleans, lists, null)."""
    path, sep, raw = item.partition("=")
    path = path.strip()
    if not sep or not path or any(not p for p in path.split(".")):
        raise ConfigError(f"--set {item!r}: expected PATH=VALUE", SET_HINT)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: --set value {raw!r} is not valid YAML",
                          "quote strings that contain ':', '#', '[' or '{'") from None
    parts = path.split(".")
    _schema_check(parts)
    return parts, value


def _did_you_mean(key: str, choices: list[str]) -> Optional[str]:
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(close)}?" if close else None


def _allowed_keys(loc: Sequence[Union[str, int]]) -> list[str]:
    """Keys the schema accepts at the parent of `loc` (for did-you-mean hints)."""
    model: Any = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _line_of(recipe: Optional[Path], loc: Sequence[Union[str, int]]) -> Optional[int]:
    """Line number of `loc` in the recipe file (1-based), if the key is written there."""
    if recipe is None:
        return None
    try:
        node = yaml.compose(recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            match = (node.value[part], node.value[part])
        else:
            match = None
        if match is None:
            return line
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error as `dotted.path: problem`."""
    path = ".".join(str(p) for p in err["loc"]) or "recipe"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if err["type"] == "value_error":
        return f"{path}: {err['ctx']['error']}"
    return f"{path}: {err['msg']}"


def _validation_error(e: ValidationError, recipe: Optional[Path]) -> ConfigError:
    """All of pydantic's complaints as one ConfigError; the first one leads and gets the hint."""
    errors = e.errors()
    first = errors[0]
    message = "; ".join(_describe(err) for err in errors[:3])
    if len(errors) > 3:
        message += f"; and {len(errors) - 3} more"
    hints = []
    if first["type"] == "extra_forbidden":
        hints.append(_did_you_mean(str(first["loc"][-1]), _allowed_keys(first["loc"])) or "remove it")
    line = _line_of(recipe, first["loc"])
    if line is not None:
        hints.append(f"{recipe}:{line}")
    return ConfigError(message, "; ".join(hints) or "`ltmpctl recipe show` prints every key with its default")


def resolve(recipe: Union[str, Path, None] = None, overrides: Optional[dict[str, Any]] = None,
            sets: Sequence[str] = ()) -> Recipe:
    """The validated recipe: defaults < recipe file < `overrides` (nested or dotted keys) < `sets`."""
    path = Path(recipe) if recipe is not None else None
    tree: dict[str, Any] = load_yaml(path) if path is not None else {}
    if overrides:
        tree = _merge_layer(tree, _nest(overrides))
    for item in sets:
        parts, value = parse_set(item)
        check_numbers(value, f"--set {item}", ".".join(parts))
        layer: dict[str, Any] = {}
        _put(layer, parts, value)
        tree = _merge_layer(tree, layer)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise _validation_error(e, path) from None
    except ConfigError as e:  # from the compressor plugin's own check
        raise _with_line(e, path) from None


def _with_line(e: ConfigError, recipe: Optional[Path]) -> ConfigError:
    """`e` with the recipe line of the dotted path its message starts with, when that key is in the file."""
    dotted = e.message.partition(": ")[0]
    line = _line_of(recipe, dotted.split(".")) if re.fullmatch(r"[\w.]+", dotted) else None
    if line is None:
        return e
    return ConfigError(e.message, f"{e.hint}; {recipe}:{line}" if e.hint else f"{recipe}:{line}")


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain JSON-able data."""
    return recipe.model_dump(mode="json")


class _Dumper(yaml.SafeDumper):
    """Block style for sections, but lists of plain values on one line (per-block keep rates stay readable)."""

    def represent_list(self, data: list) -> yaml.Node:
        flat = all(not isinstance(x, (dict, list)) for x in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _Dumper.represent_list)


def dump(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML; `resolve()` of this text gives the same recipe back."""
    return yaml.dump(to_dict(recipe), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def config_hash(recipe: Recipe) -> str:
    """Short stable hash of everything that decides a run's results (all but `out`), for reusing runs."""
    tree = to_dict(recipe)
    tree.pop("out", None)
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
