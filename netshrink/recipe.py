"""YAML recipe -> a validated :class:`Recipe` (a model, its data, a baseline training and stages).

A recipe::

    model: lenet_300_100        # a zoo name (netshrink.models), or my_pkg.my_module:build_model
    model_args: {}              # optional keyword arguments of the zoo constructor or the factory
    weights: net.safetensors    # optional: weights loaded into the built model (safetensors, or a
                                # torch state dict read with weights_only=True)
    data: mnist                 # a registered data set (mnist, digits, plugins), an .npz file, a folder
                                # of MNIST IDX files, or my_pkg.data:make_splits
    data_args: {}               # optional keyword arguments of the data set, .npz reader or factory
    task: classification        # optional: classification | language_modeling | regression,
                                # {name: ..., target_key: ...}, or my_pkg.tasks:make_task
    seed: 0
    train: {epochs: 30, lr: 0.05, ...}     # baseline training (TrainConfig fields)
    stages:
      - method: magnitude       # a registered method (``netshrink methods`` lists them)
        label: prune            # optional row name in the report
        sparsity: 0.92          # the method's own config fields
        finetune: {epochs: 10, lr: 0.01}   # optional fine-tuning after the stage (TrainConfig)
    distill: {temperature: 4, alpha: 0.9} # optional: every fine-tuning distils from the model before
                                          # compression (netshrink.distill.finetune); a stage's own
                                          # ``finetune.distill`` overrides it, ``distill: null`` turns it off

Every error names its field (``stages[1].bits: must lie in [1, 16], got 20``). Methods resolve only
through the registry. Layer names are checked against a freshly built model before anything runs.
Relative paths (``weights``, ``data``) are taken from the recipe's folder when the file is there, else
from the current folder. ``package.module:attribute`` names the user's own Python: the module is
imported (that runs its code, as a script would); nothing read from a data or weights file runs code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ._plugins import call_factory, is_object_spec
from ._registry import HandlerContext, config_type, run_handler
from .config import BaseConfig
from .errors import ConfigError, DataError, ModelError, NetshrinkError
from .task import Task, resolve_task
from .train import TrainConfig

_TOP_KEYS = {"name", "model", "model_args", "weights", "data", "data_args", "task", "seed", "train", "stages", "distill"}
_STAGE_KEYS = {"method", "label", "finetune"}


@dataclass
class Stage:
    """One step of a recipe: a method config, its row label, and optional fine-tuning after it."""

    label: str
    config: BaseConfig
    finetune: TrainConfig | None = None
    #: distillation fine-tuning (``finetune.distill``, or the recipe's ``distill`` default); None: plain
    distill: Any = None
    #: where ``distill`` was written (for error messages)
    distill_field: str = ""


@dataclass
class Recipe:
    name: str
    model: str
    model_args: dict[str, Any]
    data: str
    seed: int
    train: TrainConfig
    stages: list[Stage] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    #: a file of weights loaded into the built model (resolved path), or None
    weights: str | None = None
    data_args: dict[str, Any] = field(default_factory=dict)
    task: Task = field(default_factory=resolve_task)

    @property
    def user_model(self) -> bool:
        """Whether the model comes from the user's factory (``package.module:function``), not the zoo."""
        return is_object_spec(self.model)

    def build_model(self, *, weights: bool = True):
        """The recipe's model: the zoo's or the factory's, with ``weights`` loaded when the recipe names them."""
        model = build_recipe_model(self.model, self.model_args)
        if weights and self.weights is not None:
            load_weights(model, self.weights)
        return model

    def load_data(self):
        """The recipe's :class:`~netshrink.data.Splits`."""
        from ._datasource import resolve_data

        return resolve_data(self.data, self.data_args)

    def fingerprint(self) -> str:
        """A short hash of the recipe's content: a resumed run must match the run it continues."""
        return hashlib.sha256(json.dumps(self.source, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _base_source(self) -> dict[str, Any]:
        return {k: v for k, v in self.source.items() if k not in ("stages", "name")}

    def base_fingerprint(self) -> str:
        """A short hash of everything but the name and the stages (model, data, task, baseline training)."""
        return hashlib.sha256(json.dumps(self._base_source(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stage_fingerprints(self) -> list[tuple[str, int]]:
        """Per stage of the recipe, ``(hash of everything up to and including it, stages it expands to)``:
        a resume keeps the finished stages of the longest prefix a changed recipe shares with the run."""
        base = self._base_source()
        raw = list(self.source.get("stages") or [])
        out = []
        for j, st in enumerate(self.stages):
            key = json.dumps([base, raw[: j + 1]], sort_keys=True, default=str)
            out.append((hashlib.sha256(key.encode()).hexdigest()[:16], len(st.config.substages())))
        return out

    def expanded(self) -> list[Stage]:
        """The stages as they run: iterative methods expanded into their rounds, each fine-tuned."""
        out: list[Stage] = []
        for st in self.stages:
            subs = st.config.substages()
            for k, cfg in enumerate(subs, start=1):
                label = st.label if len(subs) == 1 else f"{st.label} {k}/{len(subs)}"
                out.append(Stage(label, cfg, st.finetune, st.distill, st.distill_field))
        return out


def _require(mapping: dict, key: str, where: str, kind: type) -> Any:
    if key not in mapping:
        raise ConfigError(f"{where}{key}", "required field is missing")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}{key}", f"expected {kind.__name__}, got {value!r}")
    return value


def _path(value: str, base: Path | None) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute() and base is not None and (base / p).exists():
        return base / p
    return p


def _mapping(data: dict, key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    return value


def parse_recipe(data: Any, *, check_model: bool = True, base: str | Path | None = None) -> Recipe:
    """Validate a recipe mapping (already parsed from YAML); ``base``: the folder relative paths start from."""
    if not isinstance(data, dict):
        raise ConfigError("recipe", "expected a mapping at the top level")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(str(key), f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    from .data import dataset_names
    from .models import list_models

    base = Path(base) if base is not None else None
    model = _require(data, "model", "", str)
    if not is_object_spec(model) and model not in list_models():
        raise ConfigError("model", f"unknown model {model!r} (known: {', '.join(list_models())}; "
                                   "or a factory 'package.module:function')")
    model_args = _mapping(data, "model_args")
    weights = data.get("weights")
    if weights is not None:
        if not isinstance(weights, str) or not weights:
            raise ConfigError("weights", f"expected a path to a .safetensors or torch state-dict file, got {weights!r}")
        wpath = _path(weights, base)
        if not wpath.is_file():
            raise ConfigError("weights", f"{wpath}: file not found")
        weights = str(wpath)
    data_name = data.get("data", "mnist")
    if not isinstance(data_name, str) or not data_name:
        raise ConfigError("data", f"expected a data set name, a path or 'package.module:function', got {data_name!r}")
    data_args = _mapping(data, "data_args")
    if not is_object_spec(data_name) and data_name not in dataset_names():
        dpath = _path(data_name, base)
        if not dpath.exists() and (dpath.suffix or "/" in data_name or "\\" in data_name):
            raise ConfigError("data", f"{dpath}: no such file or folder")
        if not dpath.exists():
            raise ConfigError("data", f"unknown data set {data_name!r} (known: {', '.join(dataset_names())}; "
                                      "or an .npz file, a folder of MNIST IDX files, or 'package.module:function')")
        if not dpath.is_dir() and dpath.suffix != ".npz":
            raise ConfigError("data", f"{dpath}: not an .npz file or a folder of MNIST IDX files")
        data_name = str(dpath)
    task = parse_task(data.get("task"))
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError("seed", f"expected an integer, got {seed!r}")
    train = TrainConfig.from_dict(data.get("train") or {}, where="train")
    from .distill.finetune import as_finetune_distill

    raw_distill = data.get("distill")
    default_distill = as_finetune_distill(raw_distill, "distill") if raw_distill is not None else None
    raw_stages = data.get("stages") or []
    if not isinstance(raw_stages, list):
        raise ConfigError("stages", "expected a list of stages")
    stages = []
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(where, "expected a mapping with a 'method' key")
        method = _require(raw, "method", f"{where}.", str)
        cls = config_type(method, field=f"{where}.method")
        args = {k: v for k, v in raw.items() if k not in _STAGE_KEYS}
        config = cls.from_dict(args, where=where)
        label = raw.get("label", method)
        if not isinstance(label, str):
            raise ConfigError(f"{where}.label", f"expected a string, got {label!r}")
        ft = raw.get("finetune")
        distill, distill_field = default_distill, "distill"
        if isinstance(ft, dict) and "distill" in ft:
            ft = dict(ft)
            own = ft.pop("distill")
            distill_field = f"{where}.finetune.distill"
            distill = as_finetune_distill(own, distill_field) if own is not None else None
        finetune = TrainConfig.from_dict(ft, where=f"{where}.finetune") if ft is not None else None
        if finetune is None:
            distill = None
        stages.append(Stage(label, config, finetune, distill, distill_field if distill is not None else ""))
    recipe = Recipe(
        name=str(data.get("name", model)),
        model=model,
        model_args=model_args,
        data=data_name,
        seed=seed,
        train=train,
        stages=stages,
        source=data,
        weights=weights,
        data_args=data_args,
        task=task,
    )
    if check_model:
        check_against_model(recipe)
    return recipe


def check_against_model(recipe: Recipe) -> None:
    """Build the recipe's model once and check every stage against it (layer names, shapes)."""
    try:
        model = recipe.build_model(weights=False)
    except ConfigError as err:
        if recipe.user_model:
            raise
        raise err.under("model_args") from None
    check_input(model, recipe.data, "data")
    import copy

    baseline = copy.deepcopy(model) if any(st.distill is not None for st in recipe.stages) else None
    for i, st in enumerate(recipe.stages):
        previous = copy.deepcopy(model) if st.distill is not None and st.distill.teacher == "previous" else None
        try:
            st.config.check_model(model)
            if st.config.replaces_modules:  # later stages may name the layers this one creates
                run_handler(model, st.config, HandlerContext(data=None, task=recipe.task))
        except ConfigError as err:
            raise err.under(f"stages[{i}]") from None
        if st.distill is not None:  # hint layers: the teacher's before the stage, the student's after it
            try:
                st.distill.check_layers(previous if previous is not None else baseline, model)
            except ConfigError as err:
                raise err.under(st.distill_field) from None


def check_input(model, data_name: str, field: str) -> None:
    """One forward pass on a zero batch of the data set's input shape: a model that cannot take the
    data fails here, with one line, instead of deep inside training."""
    import torch

    from .data import INPUT_SHAPES

    shape = INPUT_SHAPES.get(data_name)
    if shape is None:
        return
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *shape))
    except NetshrinkError:
        raise
    except Exception as err:  # a user's model may raise anything on inputs it does not take
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(field, f"the model does not take {data_name} inputs of shape {shape}: {first}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file; any problem is one :class:`ConfigError` line."""
    from ._inputs import load_yaml

    path = Path(path)
    data = load_yaml(path)  # size-bounded, safe loader, no aliases (netshrink._inputs)
    return parse_recipe(data, base=path.parent)


# ------------------------------------------------------------------------------ models, weights, tasks


def build_recipe_model(spec: str, args: dict[str, Any]):
    """A zoo model (:func:`netshrink.models.build_model`) or what the factory ``package.module:function``
    builds with ``args``; anything else than an ``nn.Module`` is a :class:`ConfigError`."""
    from torch import nn

    from .models import build_model

    if not is_object_spec(spec):
        return build_model(spec, **args)
    model = call_factory(spec, dict(args), "model", "the model")
    if not isinstance(model, nn.Module):
        raise ConfigError("model", f"the factory {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model, path: str | Path, field: str = "weights") -> None:
    """Load a state dict into ``model``: a ``.safetensors`` file, or a torch file read with
    ``torch.load(weights_only=True)`` (a dict of tensors, or one under ``state_dict``). Names and
    shapes must match the model's exactly; any mismatch is one :class:`ModelError` line."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(field, f"{path}: file not found") from None
    except Exception as err:  # a corrupt file, or a pickle that weights_only refuses
        kind = "safetensors" if path.suffix == ".safetensors" else "torch state-dict (read with weights_only=True)"
        raise DataError(f"{path}: not a readable {kind} file: {_first_line(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DataError(f"{path}: expected a dict of named tensors (a state dict), got {type(state).__name__}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        what = f"the model's {missing[0]!r} is not in the file" if missing else f"the file's {extra[0]!r} is not in the model"
        raise ModelError(f"{path}: {what} ({len(missing)} missing, {len(extra)} unexpected)")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ModelError(f"{path}: {k!r} has shape {list(state[k].shape)} in the file, {list(v.shape)} in the model")
    model.load_state_dict(state)


def parse_task(spec: Any, field: str = "task") -> Task:
    """The recipe's task: None (classification), a registered name, ``{name: ..., <args>}``, or a factory
    ``package.module:function`` (optionally ``{name: 'pkg.mod:fn', <its args>}``) returning a Task."""
    args: dict[str, Any] = {}
    name = spec
    if isinstance(spec, dict):
        args = {k: v for k, v in spec.items() if k != "name"}
        name = spec.get("name")
    if is_object_spec(name):
        task = call_factory(name, args, field, "a Task")
        if not isinstance(task, Task):
            raise ConfigError(field, f"the factory {name!r} returned a {type(task).__name__}, not a netshrink.task.Task")
        return task
    return resolve_task(spec, field)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
