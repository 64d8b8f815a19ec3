"""Typed configs for every workflow of the ``lightning-ties`` command (omegaconf YAML + dotlist overrides).

One dataclass per workflow (:class:`MergeConfig`, :class:`SearchConfig`, :class:`EvaluateConfig`,
:class:`DemoConfig`) is the schema: :func:`load_config` layers the schema's defaults, then the
YAML file, then each ``key=value`` override, and checks every layer as it is applied, so an
unknown key, a wrong type or a missing required value is one :class:`ConfigError` line naming
the key and the file (or the override) before any work starts.

The ``method`` section is not a dataclass: it is read from the engine's registry
(:data:`lightning_ties.merging.METHODS`), so a method added there is usable here with no change.
``method=task_arithmetic`` (in a file or on the command line) replaces the whole section with
that method's defaults (from ``methods/<name>.yaml`` beside the config when present, else from
the registry); ``method.k=0.3`` changes one parameter.

Example:
    >>> cfg = load_config(MergeConfig, overrides=["base=b.safetensors", "models=[a.safetensors]",
    ...                                           "output=out.safetensors", "method=task_arithmetic"])
    >>> cfg.method["name"], cfg.method["lam"]
    ('task_arithmetic', 0.4)
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .merging import METHODS, check_k_grid, check_lam, check_lam_grid, get_method
from .merging.grids import grid_size_problem
from .merging.plan import compile_patterns

#: The method name that trains per-task/per-layer coefficients (lightning_ties.lightning.learned).
LEARNED = "learned"
#: ``${oc.env:NAME}`` (possibly nested in another interpolation) reads the environment: off unless allowed.
_ENV_INTERPOLATION = re.compile(r"\$\{[^\n]*\boc\.env\s*:")
_INTERPOLATION = re.compile(r"\$\{")
ALLOW_ENV_HINT = "pass --allow-env (load_config(..., allow_env=True)) to let configs read environment variables"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file (or override) and the key."""


# ---- fixed choices: omegaconf checks these fields (an unknown value is an error naming the key) ----
class Choice(str, Enum):
    """A config value from a fixed set; compares equal to, prints as and is saved as its plain string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Logger(Choice):
    """Where the evaluation Trainer logs: ``csv`` (default), ``tensorboard`` or ``none``."""

    csv = "csv"
    tensorboard = "tensorboard"
    none = "none"


class SearchStrategy(Choice):
    """How the lam/k search walks its grid (:func:`lightning_ties.lightning.run_search`)."""

    grid = "grid"
    coarse_to_fine = "coarse_to_fine"


class OnMismatch(Choice):
    """What ``merge`` does with keys that differ across models: stop (``error``) or keep ``base``'s value."""

    error = "error"
    base = "base"


class OutputFormat(Choice):
    """What ``merge`` writes (None: chosen from the output's name)."""

    folder = "folder"
    safetensors = "safetensors"
    ckpt = "ckpt"


class ComputeDtype(Choice):
    """The dtype the merge is computed in (the output keeps each tensor's own dtype)."""

    float32 = "float32"
    float64 = "float64"


#: The logger choices (kept for callers of the former tuple).
LOGGERS = tuple(c.value for c in Logger)


# ---- schemas ----------------------------------------------------------------------------------
@dataclass
class TargetConfig:
    """A Python callable named by import path (``package.module:function``) and its keyword arguments."""

    target: str = MISSING
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the per-task dataloaders come from: ``target(split=<split>, **args) -> {task: DataLoader}``."""

    target: str = MISSING
    args: Dict[str, Any] = field(default_factory=dict)
    val_split: str = "val"
    test_split: Optional[str] = "test"


@dataclass
class SearchGrid:
    """What the lam/k search tries: ``lam="paper"`` is each method's grid from its paper's code.

    ``methods`` (``lightning-ties search`` only): registry methods to choose from on validation data
    (e.g. ``[ties, tsv, iso_c]``), each searched over its own lam grid; ``method.name``'s parameters
    reach the methods that have them. ``None``: only ``method.name``.

    ``max_candidates``: a grid of more (k, lam, method) candidates is refused before any work, as
    a likely typo (a list pasted twice, a range too fine); raise it to confirm a larger search.

    ``method: auto`` (``lightning-ties search`` only): choose among every registry method
    (RegMean included) coarse to fine on validation data, each over its own grids (only lists in
    ``k``/``lam`` replace them), within ``budget_s`` wall seconds (``None``: the whole schedule).

    ``finish`` (with ``method: auto``): learned coefficients after the search, in the time it leaves,
    on the shares of the best method found that splits into per-task shares (TSV-M when Iso-CTS
    wins); the hold-out keeps whichever of the learned merge and the search's winner is better
    (``learn_coefficients(method="auto")``). ``{name: learned, share: 0.6}`` plus any option of
    ``learn_coefficients`` (``granularity``, ``lr``, ``max_epochs``, ``holdout`` ...; unnamed ones
    from :data:`FINISH_DEFAULTS`); ``share``: the part of ``budget_s`` kept for the finish (the
    search gets the rest).
    """

    k: Any = field(default_factory=lambda: [0.1, 0.2, 0.3])
    lam: Any = "paper"
    strategy: SearchStrategy = SearchStrategy.grid
    objective: str = "mean"
    methods: Optional[List[str]] = None
    max_candidates: int = 10_000
    method: Optional[str] = None
    budget_s: Optional[float] = None
    finish: Optional[Dict[str, Any]] = None


#: The part of ``search.budget_s`` that ``search.finish`` keeps for learning when it names no ``share``.
FINISH_SHARE = 0.6
#: ``search.finish``'s learning recipe unless it says otherwise: per-tensor coefficients at a fast
#: rate, as many epochs as the budget allows, stopped once the hold-out loss has not improved for 3
#: (on the MiniLM suite 87.1 with the stop, 86.5 without: benchmarks/README.md)
FINISH_DEFAULTS: dict[str, Any] = {"granularity": "tensor", "lr": 0.1, "max_epochs": 100, "patience": 3}


@dataclass
class MergeConfig:
    """``lightning-ties merge``: merge checkpoint files into one output (folder, .safetensors or .ckpt)."""

    base: str = MISSING
    models: List[str] = MISSING
    output: str = MISSING
    method: Dict[str, Any] = field(default_factory=lambda: {"name": "ties"})
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    output_format: Optional[OutputFormat] = None
    overwrite: bool = False
    common_rows: bool = False
    on_mismatch: OnMismatch = OnMismatch.error
    max_shard_size: str = "5GB"
    prefix: Optional[str] = None
    trust_pickle: bool = False
    compute_dtype: ComputeDtype = ComputeDtype.float32
    #: informational, ignored by the command: what ``merge_to`` records in ``merge_config.yaml``
    #: (library version, each source's files and sha256, key counts), so that file re-runs as is
    provenance: Optional[Dict[str, Any]] = None


@dataclass
class SearchConfig:
    """``lightning-ties search``: pick lam (and k) on validation data, write the best model and the report."""

    base: str = MISSING
    tasks: Dict[str, str] = MISSING
    model: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = MISSING
    method: Dict[str, Any] = field(default_factory=lambda: {"name": "ties"})
    search: SearchGrid = field(default_factory=SearchGrid)
    heads: Optional[List[str]] = None
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    save_model: Optional[str] = "merged.safetensors"
    overwrite: bool = False
    logger: Logger = Logger.csv
    seed: int = 0


@dataclass
class EvaluateConfig:
    """``lightning-ties evaluate``: per-task metrics of the base, each fine-tuned model and given checkpoints."""

    base: str = MISSING
    tasks: Dict[str, str] = MISSING
    model: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output_dir: str = MISSING
    checkpoints: Dict[str, str] = field(default_factory=dict)
    split: str = "test"
    heads: Optional[List[str]] = None
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    overwrite: bool = False
    logger: Logger = Logger.csv
    seed: int = 0


@dataclass
class DemoModel:
    hidden: int = 32
    depth: int = 2


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64


@dataclass
class DemoData:
    val_fraction: float = 0.2
    test_fraction: float = 0.3
    train_limit: Optional[int] = None
    source_digits: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])


@dataclass
class DemoConfig:
    """``lightning-ties demo``: the offline digits suite, end to end (the README's main command).

    ``continual=true`` runs tasks one at a time: after each new fine-tune, the merge of every
    task so far is searched and scored on the tasks seen so far.
    """

    tasks: List[str] = field(default_factory=lambda: ["digit", "parity", "ge5", "mod3", "loop"])
    methods: List[str] = field(default_factory=lambda: ["average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "learned"])
    seed: int = 0
    data: DemoData = field(default_factory=DemoData)
    model: DemoModel = field(default_factory=DemoModel)
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=1e-3))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-3))
    search: SearchGrid = field(default_factory=SearchGrid)
    learned: Dict[str, Any] = field(
        default_factory=lambda: {"granularity": "layer", "max_epochs": 40, "lr": 0.05, "holdout": 0.3}
    )
    continual: bool = False
    output_dir: str = "runs/demo"
    overwrite: bool = True
    logger: Logger = Logger.csv
    fast: bool = False


WORKFLOWS: dict[str, type] = {
    "merge": MergeConfig,
    "search": SearchConfig,
    "evaluate": EvaluateConfig,
    "demo": DemoConfig,
}

#: What ``fast=true`` (or ``--fast``) changes in the demo: the reduced mode the tests run (seconds).
DEMO_FAST = {
    "fast": True,
    "data": {"train_limit": 300},
    "model": {"hidden": 16},
    "pretrain": {"epochs": 4},
    "finetune": {"epochs": 2},
    "search": {"k": [0.2], "lam": [0.4, 1.0], "strategy": "grid"},
    "learned": {"max_epochs": 1},
}


# ---- the method section -------------------------------------------------------------------------
def method_defaults(name: str, config_dir: Path | None = None) -> dict[str, Any]:
    """The full ``method`` section for ``name``: ``methods/<name>.yaml`` beside the config, else the registry.

    Example:
        >>> method_defaults("ties")
        {'name': 'ties', 'k': 0.2, 'scope': 'global', 'sign': 'mass', 'merge': 'mean', 'lam': 1.0}
    """
    if config_dir is not None:
        path = config_dir / "methods" / f"{name}.yaml"
        if path.is_file():
            section = _load_yaml(path)
            if not isinstance(section, Mapping):
                raise ConfigError(f"{path}: expected a mapping of method parameters, got {type(section).__name__}")
            return {"name": name, **{k: v for k, v in section.items() if k != "name"}}
    return {"name": name, **registry_parameters(name)}


def registry_parameters(name: str) -> dict[str, Any]:
    """Parameters (with defaults, and ``lam`` where the method has one) of a registered method or ``learned``."""
    if name == LEARNED:
        return learned_parameters()
    try:
        method = get_method(name)
    except ValueError:
        raise ConfigError(
            f"unknown merge method {name!r}; choose one of {', '.join(sorted([*METHODS, LEARNED]))}"
        ) from None
    params = dict(method.parameters())
    if method.has_lam:
        params["lam"] = method.default_lam
    return params


def learned_parameters() -> dict[str, Any]:
    """Defaults of ``learn_coefficients`` that a config may set (read from its signature)."""
    from .pytorch_lightning.learned import learn_coefficients  # imports Lightning: only when asked for

    # set elsewhere in the config (base, tasks, data, heads, include/exclude, seed) or not plain values
    skip = {"base", "tasks", "dataloaders", "model", "heads", "trainer_kwargs", "seed", "groups", "include", "exclude"}
    out = {}
    for p in inspect.signature(learn_coefficients).parameters.values():
        if p.name not in skip and p.default is not p.empty and isinstance(p.default, (int, float, str, type(None))):
            out[p.name] = p.default
    return out


def check_method(section: Mapping[str, Any], where: str, allow_learned: bool = False) -> dict[str, Any]:
    """Validate a ``method`` section against the registry; raise :class:`ConfigError` naming the key."""
    section = dict(section)
    name = section.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: method.name must be a method name, got {name!r}")
    if name == LEARNED and not allow_learned:
        raise ConfigError(
            f"{where}: method.name=learned trains coefficients on validation data: use `lightning-ties search`"
        )
    defaults = registry_parameters(name)
    for key, value in section.items():
        if key == "name":
            continue
        if key not in defaults:
            raise ConfigError(
                f"{where}: method.{key} is not a parameter of method {name!r}; its parameters are "
                f"{', '.join(defaults) or '(none)'}"
            )
        if name == LEARNED and _learned_choice(key, value, where):
            continue
        if key == "lam" and value is not None:
            _check_lam(value, "method.lam", where)
        _check_type(f"method.{key}", value, defaults[key], where)
    return section


def _learned_choice(key: str, value: Any, where: str) -> bool:
    """Learned coefficients' named choices: ``lam: search`` and ``granularity`` (``auto`` too); True: checked."""
    from .core.learned.groups import GRANULARITIES

    if key == "lam" and value == "search":
        return True  # walk the method's lam grid on the hold-out for the start
    if key == "granularity":
        if value not in (*GRANULARITIES, "auto"):
            raise ConfigError(f"{where}: method.granularity={value!r}: choose one of {', '.join([*GRANULARITIES, 'auto'])}")
        return True
    return False


def _check_lam(value: Any, key: str, where: str) -> None:
    """lam must be a finite number with a sane magnitude (the engine's own rule, checked before any work)."""
    if isinstance(value, str) and _INTERPOLATION.search(value):
        return  # checked once resolved
    try:
        check_lam(value, key)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_type(key: str, value: Any, default: Any, where: str) -> None:
    if default is None or value is None:
        return
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: {key}={value!r} has the wrong type: expected {type(default).__name__}")


def _apply_method_layer(current: dict[str, Any], layer: Any, config_dir: Path | None, where: str) -> dict[str, Any]:
    if isinstance(layer, str):
        return method_defaults(layer, config_dir)
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{where}: method must be a method name or a mapping, got {layer!r}")
    layer = dict(layer)
    name = layer.get("name", current.get("name"))
    base = method_defaults(name, config_dir) if name != current.get("name") else dict(current)
    base.update(layer)
    return base


# ---- loading -------------------------------------------------------------------------------------
def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; pass a YAML config file") from None
    except Exception as err:  # yaml.YAMLError and friends: name the file, not the parser internals
        raise ConfigError(f"{path}: {_yaml_problem(err, lines=True)}") from None


def _yaml_problem(err: BaseException, lines: bool) -> str:
    """One line saying what is wrong in a YAML text (duplicate key, tag, syntax) and what to do."""
    problem = str(getattr(err, "problem", None) or "")
    mark = getattr(err, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if lines and mark is not None else ""
    duplicate = re.match(r"found duplicate key (.*)", problem)
    if duplicate:
        return f"key {duplicate.group(1)!r} is given twice (again{at or ' in the same mapping'}); keep only one of them"
    tag = re.search(r"for the tag '(?:tag:yaml\.org,2002:)?([^']*)'", problem)
    if tag:
        return (
            f"YAML tags such as !!{tag.group(1)}{at} are not allowed in configs (plain values only); "
            "remove the tag or quote the value"
        )
    if problem:
        context = str(getattr(err, "context", None) or "").strip()
        where = f" ({context})" if context else ""
        return f"not a valid YAML config{at}: {problem}{where}; check brackets, quotes and indentation"
    return f"not a valid YAML config: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _merge_layer(cfg: DictConfig, layer: Mapping[str, Any], where: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        # omegaconf names no key for some type errors (`tasks: [a, b]` for a mapping): find it
        key = getattr(err, "full_key", None) or _failing_key(cfg, layer)
        msg = _first_line(err)
        raise ConfigError(f"{where}: key {key!r}: {msg}" if key else f"{where}: {msg}") from None


def _failing_key(cfg: DictConfig, layer: Mapping[str, Any], prefix: str = "") -> str:
    """The dotted key of ``layer`` whose merge into ``cfg`` fails ("" when each merges alone)."""
    for key, value in layer.items():
        try:
            OmegaConf.merge(cfg, {key: value})
        except (OmegaConfBaseException, TypeError, ValueError):
            inner = cfg.get(key) if isinstance(cfg, DictConfig) and key in cfg else None
            if isinstance(value, Mapping) and isinstance(inner, DictConfig):
                return _failing_key(inner, value, f"{prefix}{key}.") or f"{prefix}{key}"
            return f"{prefix}{key}"
    return ""


def _clip(text: str, limit: int = 60) -> str:
    """An override as errors quote it: a long value (a pasted grid) cut, so the error stays one short line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_override(text: str) -> dict[str, Any]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override {_clip(text)!r}: expected key=value (e.g. method.k=0.3)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([text]), resolve=False)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {_clip(text)!r}: {_first_line(err)}") from None
    except Exception as err:  # the value is parsed as YAML: a syntax error or a tag
        problem = str(getattr(err, "problem", None) or _first_line(err))
        if "tag" in problem:
            problem = _yaml_problem(err, lines=False)
        else:
            problem = (
                f"the value after '=' is not valid YAML ({problem}); close its brackets and quotes "
                "(e.g. models=[a.safetensors,b.safetensors]) or quote the whole value"
            )
        raise ConfigError(f"override {_clip(text)!r}: {problem}") from None


def load_config(
    schema: type,
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    presets: Sequence[tuple[str, Mapping[str, Any]]] = (),
    allow_env: bool = False,
    under_file: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> Any:
    """Build a checked config object: schema defaults, ``under_file``, the YAML file, ``presets``, the overrides.

    Args:
        schema: one of the workflow dataclasses (e.g. :class:`SearchConfig`).
        path: a YAML file, or None for the schema's defaults (the demo's embedded default).
        overrides: ``key=value`` dotlist items (``method=task_arithmetic`` replaces the method section).
        presets: named layers applied after the file and before the overrides (the demo's ``fast`` mode).
        allow_env: resolve ``${oc.env:NAME}`` interpolations. Off by default, so a config from
            elsewhere cannot read secrets from the environment into output names; when on, the saved
            config (:func:`to_yaml`, :func:`to_dict`) keeps the ``${oc.env:...}`` form, not the value.
        under_file: named layers applied before the file (the demo's ``fast`` mode that a file asks
            for itself: the file's own values beat it).

    Returns:
        An instance of ``schema`` (``method`` is a plain dict, validated against the registry).

    Raises:
        ConfigError: one line naming the file or override and the key, before any work.

    Example:
        >>> load_config(DemoConfig, overrides=["seed=3"]).seed
        3
    """
    cfg: DictConfig = OmegaConf.structured(schema)
    has_method = "method" in cfg
    method: dict[str, Any] = method_defaults(cfg.method["name"]) if has_method else {}
    config_dir = Path(path).parent if path is not None else None
    layers: list[tuple[str, Any]] = list(under_file)
    if path is not None:
        raw = _load_yaml(Path(path))
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
        layers.append((str(path), raw))
    layers += list(presets)  # a mode (the demo's fast one) beats the file, the command line beats both
    layers += [(f"override {_clip(o)!r}", _parse_override(o)) for o in overrides]
    uses_env = False
    for where, layer in layers:
        for key in _env_keys(layer):
            if not allow_env:
                raise ConfigError(
                    f"{where}: key {key!r} reads an environment variable (${{oc.env:...}}), which is off by "
                    f"default; {ALLOW_ENV_HINT}"
                )
            uses_env = True
    for where, layer in layers:
        layer = dict(layer)
        if has_method:
            _check_misplaced_method_keys(cfg, layer, method, where)
        if has_method and "method" in layer:
            method = _apply_method_layer(method, layer.pop("method"), config_dir, where)
            check_method(method, where, allow_learned=schema is not MergeConfig)
        cfg = _merge_layer(cfg, layer, where)
    sources = " + ".join(w for w, _ in layers) or "defaults"
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{sources}: missing required value for key {missing[0]!r}; set it in the file or as {missing[0]}=..."
        )
    if has_method:
        cfg.method = method
        check_method(method, sources, allow_learned=schema is not MergeConfig)
    try:
        obj = OmegaConf.to_object(cfg)  # resolves interpolations
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        what = f"key {key!r}: {_first_line(err)}" if key else _first_line(err)
        raise ConfigError(f"{sources}: {what}") from None
    if uses_env:  # what is saved next to outputs keeps ${oc.env:...}, never the value it resolved to
        obj._unresolved = OmegaConf.to_container(cfg, resolve=False)
    _check_choices(obj, sources)
    return obj


def load_demo_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    fast: bool = False,
    allow_env: bool = False,
) -> DemoConfig:
    """The demo's config, with the fast mode (:data:`DEMO_FAST`) where it is asked for.

    ``fast`` (``--fast``) or a ``fast=true`` override: the mode beats the file, the overrides beat
    both. A file that says ``fast: true`` itself keeps its own values over the mode's (the mode
    fills what it leaves out): the resolved ``config.yaml`` a fast run saves holds the mode's values
    and the command line's together, so re-running it repeats that run rather than applying the mode
    over them again.

    Example:
        >>> load_demo_config(overrides=["search.lam=[0.6,1.4]"], fast=True).search.lam
        [0.6, 1.4]
    """
    cfg = load_config(DemoConfig, path, overrides, allow_env=allow_env)
    if not (fast or cfg.fast):
        return cfg
    mode = [("fast mode", DEMO_FAST)]
    if fast or any("fast" in _parse_override(o) for o in overrides):
        return load_config(DemoConfig, path, overrides, presets=mode, allow_env=allow_env)
    return load_config(DemoConfig, path, overrides, allow_env=allow_env, under_file=mode)


def _check_misplaced_method_keys(cfg: DictConfig, layer: Mapping[str, Any], method: Mapping[str, Any], where: str) -> None:
    """A method parameter given at the top level (``lam=1.2``): the error says ``method.lam=1.2``."""
    name = layer["method"] if isinstance(layer.get("method"), str) else method.get("name")
    params = set(registry_parameters(name)) if isinstance(name, str) else set()
    for key, value in layer.items():
        if key in cfg or key not in params | {"lam", "k"}:
            continue
        shown = _as_override(value)
        grid = f", or search.{key}=[...] to search a grid of values" if "search" in cfg and key in ("lam", "k") else ""
        raise ConfigError(
            f"{where}: {key!r} is not a top-level key; did you mean method.{key}={shown}? (the merge method's "
            f"parameters go under method.{grid})"
        )


def _as_override(value: Any) -> str:
    """A value as it is written after ``key=`` on the command line (``[0.1,0.2]``, ``true``, ``1.2``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_as_override(v) for v in value) + "]"
    return str(value)


def _env_keys(layer: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``layer`` whose value uses ``${oc.env:...}``."""
    if isinstance(layer, Mapping):
        return [k for key, v in layer.items() for k in _env_keys(v, f"{prefix}{key}.")]
    if isinstance(layer, (list, tuple)):
        return [k for i, v in enumerate(layer) for k in _env_keys(v, f"{prefix[:-1]}[{i}].")]
    return [prefix[:-1]] if isinstance(layer, str) and _ENV_INTERPOLATION.search(layer) else []


def _check_choices(cfg: Any, where: str) -> None:
    for name in ("include", "exclude", "heads"):
        try:
            compile_patterns(getattr(cfg, name, None) or [], name)  # the engine's own compiler
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
    method = getattr(cfg, "method", None)
    if isinstance(method, Mapping) and method.get("lam") is not None and not (method.get("name") == LEARNED and method["lam"] == "search"):
        _check_lam(method["lam"], "method.lam", where)  # again once interpolations are resolved
    if isinstance(cfg, MergeConfig):
        if not cfg.models:
            raise ConfigError(f"{where}: models is empty; list at least one fine-tuned checkpoint")
    grid = getattr(cfg, "search", None)
    if isinstance(grid, SearchGrid):
        _check_grid(grid, getattr(cfg, "method", None), where)
    if isinstance(cfg, (SearchConfig, EvaluateConfig)) and not cfg.tasks:
        raise ConfigError(f"{where}: tasks is empty; map each task name to its fine-tuned checkpoint")
    if isinstance(cfg, DemoConfig):
        if getattr(cfg.search, "methods", None):
            raise ConfigError(f"{where}: search.methods: the demo runs every method of `methods` (its own rows); leave search.methods out")
        if getattr(cfg.search, "method", None):
            raise ConfigError(f"{where}: search.method: the demo runs every method of `methods` (its own rows); leave it out")
        unknown = [m for m in cfg.methods if m != LEARNED and m not in METHODS]
        if unknown:
            raise ConfigError(
                f"{where}: methods: unknown method(s) {unknown}; choose from {sorted([*METHODS, LEARNED])}"
            )
        # the task names' grammar belongs to the demo: `lightning-ties demo` checks them before any work
        if LEARNED in cfg.methods:
            try:
                check_method({"name": LEARNED, **cfg.learned}, where, allow_learned=True)
            except ConfigError as err:
                raise ConfigError(str(err).replace("method.", "learned.")) from None
        if len(cfg.tasks) < 2:
            raise ConfigError(f"{where}: tasks: the demo needs at least two tasks to merge, got {cfg.tasks}")


def _check_auto(grid: SearchGrid, method: Any, where: str) -> bool:
    """``search.method`` / ``search.budget_s``: whether the search is ``method: auto`` (refusing what contradicts it)."""
    if grid.budget_s is not None and not (isinstance(grid.budget_s, (int, float)) and grid.budget_s > 0):
        raise ConfigError(f"{where}: search.budget_s={grid.budget_s!r}: expected a positive number of seconds")
    if grid.method is None:
        if grid.budget_s is not None:
            raise ConfigError(f"{where}: search.budget_s limits search.method=auto only; set it or leave budget_s out")
        if grid.finish is not None:
            raise ConfigError(f"{where}: search.finish finishes search.method=auto only; set it or leave finish out")
        return False
    if grid.method != "auto":
        raise ConfigError(f"{where}: search.method={grid.method!r}: only 'auto' (name one method in method.name, "
                          "several in search.methods)")
    if grid.methods is not None:
        raise ConfigError(f"{where}: search.method=auto chooses among every registry method; leave search.methods out")
    if isinstance(method, Mapping) and method.get("name") == LEARNED:
        raise ConfigError(f"{where}: search.method=auto chooses among registry methods; leave it out with method.name=learned")
    if grid.finish is not None:
        finish_options(grid.finish, where)
    return True


def finish_options(finish: Any, where: str = "config") -> tuple[float, dict[str, Any]]:
    """``search.finish``: its ``share`` of the budget and the ``learn_coefficients`` options
    (:data:`FINISH_DEFAULTS` under the ones it names; checked by name).

    Example:
        >>> finish_options({"name": "learned", "share": 0.5, "granularity": "layer"})
        (0.5, {'granularity': 'layer', 'lr': 0.1, 'max_epochs': 100, 'patience': 3})
    """
    if not isinstance(finish, Mapping) or finish.get("name") != LEARNED:
        raise ConfigError(f"{where}: search.finish={finish!r}: expected a mapping with name: learned "
                          "(learned coefficients after the search), e.g. {name: learned, share: 0.6}")
    options = {k: v for k, v in finish.items() if k not in ("name", "share")}
    share = finish.get("share", FINISH_SHARE)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise ConfigError(f"{where}: search.finish.share={share!r}: expected a number between 0 and 1 (the budget's part for learning)")
    chosen = [k for k in ("method", "lam", "k") if k in options]
    if chosen:
        raise ConfigError(f"{where}: search.finish.{chosen[0]}: the search chooses it (the best method with shares, "
                          "at its best k and lam); leave it out")
    try:
        check_method({"name": LEARNED, **options}, where, allow_learned=True)
    except ConfigError as err:
        raise ConfigError(str(err).replace("method.", "search.finish.")) from None
    return float(share), {**FINISH_DEFAULTS, **options}


def _check_grid(grid: SearchGrid, method: Any, where: str) -> None:
    """The search grids, checked by the same validator the Lightning search uses (before any work)."""
    name = method.get("name") if isinstance(method, Mapping) else None
    name = name if name in METHODS else None  # "learned" searches TIES's k; its lam is learned
    if _check_auto(grid, method, where):
        return  # each method's own grids, an adaptive number of candidates
    names: list[Any] = [name]
    if grid.methods is not None:
        if isinstance(grid.methods, str) or not list(grid.methods):
            raise ConfigError(f"{where}: search.methods={grid.methods!r}: expected a non-empty list of method names")
        unknown = [m for m in grid.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"{where}: search.methods: unknown method(s) {unknown}; choose from {sorted(METHODS)}")
        if method.get("name") == LEARNED if isinstance(method, Mapping) else False:
            raise ConfigError(f"{where}: search.methods chooses among registry methods; leave it out with method.name=learned")
        names = list(grid.methods)
    checks = {
        "k": lambda v: [check_k_grid(v, n, "search.k") for n in names],
        "lam": lambda v: [check_lam_grid(n or "ties", v, "search.lam") for n in names],
    }
    sizes: dict[str, list[int]] = {}
    for key, check in checks.items():
        value = getattr(grid, key)
        if any(isinstance(v, str) and _INTERPOLATION.search(v) for v in (value if isinstance(value, list) else [value])):
            continue  # checked once resolved
        try:
            sizes[key] = [len(values) for values in check(value)]
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
    if len(sizes) == 2:
        problem = grid_size_problem(sum(nk * nl for nk, nl in zip(sizes["k"], sizes["lam"])), grid.max_candidates)
        if problem:
            raise ConfigError(f"{where}: {problem}")


def to_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML text (what is saved next to every output).

    Values read from the environment (``allow_env``) stay in their ``${oc.env:...}`` form.
    """
    unresolved = getattr(cfg, "_unresolved", None)
    if unresolved is not None:
        return OmegaConf.to_yaml(OmegaConf.create(unresolved))
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The fully resolved config as plain dicts and lists (what report.json records); ``${oc.env:...}`` kept."""
    unresolved = getattr(cfg, "_unresolved", None)
    if unresolved is not None:
        return dict(unresolved)
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def resolve_target(path: str, key: str) -> Callable[..., Any]:
    """Import ``package.module:attr`` (or ``package.module.attr``); errors name the config key.

    Example:
        >>> resolve_target("lightning_ties.demo.data:dataloaders", "data.target").__name__
        'dataloaders'
    """
    import importlib

    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{key}={path!r}: expected an import path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}={path!r}: cannot import module {module_name!r}: {err}") from None
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise ConfigError(f"{key}={path!r}: module {module_name!r} has no callable {attr!r}")
    return obj


__all__ = [
    "Choice",
    "ComputeDtype",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "EvaluateConfig",
    "FINISH_DEFAULTS",
    "FINISH_SHARE",
    "Logger",
    "MergeConfig",
    "OnMismatch",
    "OutputFormat",
    "SearchConfig",
    "SearchGrid",
    "SearchStrategy",
    "TargetConfig",
    "WORKFLOWS",
    "check_method",
    "finish_options",
    "load_config",
    "load_demo_config",
    "method_defaults",
    "resolve_target",
    "to_dict",
    "to_yaml",
]
