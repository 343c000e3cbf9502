"""YAML recipe -> a validated :class:`Recipe` (a model, its data, a baseline training and stages).

A recipe::

    model: lenet_300_100        # a zoo name (netshrink.models)
    model_args: {}              # optional keyword arguments of the zoo constructor
    data: mnist                 # mnist | digits
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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ._registry import config_type, handler_for
from .config import BaseConfig
from .errors import ConfigError, NetshrinkError
from .train import TrainConfig

_TOP_KEYS = {"name", "model", "model_args", "data", "seed", "train", "stages", "distill"}
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

    def fingerprint(self) -> str:
        """A short hash of the recipe's content: a resumed run must match the run it continues."""
        return hashlib.sha256(json.dumps(self.source, sort_keys=True, default=str).encode()).hexdigest()[:16]

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


def parse_recipe(data: Any, *, check_model: bool = True) -> Recipe:
    """Validate a recipe mapping (already parsed from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError("recipe", "expected a mapping at the top level")
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(str(key), f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    from .data import dataset_names
    from .models import list_models

    model = _require(data, "model", "", str)
    if model not in list_models():
        raise ConfigError("model", f"unknown model {model!r} (known: {', '.join(list_models())})")
    model_args = data.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ConfigError("model_args", f"expected a mapping, got {model_args!r}")
    data_name = data.get("data", "mnist")
    if data_name not in dataset_names():
        raise ConfigError("data", f"unknown data set {data_name!r} (known: {', '.join(dataset_names())})")
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
    )
    if check_model:
        check_against_model(recipe)
    return recipe


def check_against_model(recipe: Recipe) -> None:
    """Build the recipe's model once and check every stage against it (layer names, shapes)."""
    from .models import build_model

    try:
        model = build_model(recipe.model, **recipe.model_args)
    except ConfigError as err:
        raise err.under("model_args") from None
    check_input(model, recipe.data, "data")
    import copy

    baseline = copy.deepcopy(model) if any(st.distill is not None for st in recipe.stages) else None
    for i, st in enumerate(recipe.stages):
        previous = copy.deepcopy(model) if st.distill is not None and st.distill.teacher == "previous" else None
        try:
            st.config.check_model(model)
            if st.config.replaces_modules:  # later stages may name the layers this one creates
                handler_for(st.config)(model, st.config, data=None)
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
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(field, f"the model does not take {data_name} inputs of shape {shape}: {first}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file; any problem is one :class:`ConfigError` line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise NetshrinkError(f"{path}: cannot read recipe ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError("recipe", f"{path}: not valid YAML{where}: {problem}") from None
    return parse_recipe(data)
