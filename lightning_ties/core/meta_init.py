"""A model built without its weights: its parameters on the meta device, filled from the base where it runs.

A big model should not be built whole on every rank only to be sharded. Given a factory instead of a module
(``model=lambda: Net(cfg)``), the merger builds it with :func:`parameters_on_meta`: each parameter goes to the
meta device as it is registered (its initialisation then costs nothing), while buffers stay real, because the
non-persistent ones (a BERT's position ids, a rotary inverse-frequency table) are computed by the constructor
and held by no checkpoint. :func:`fill_from_base` then gives the model its weights from the base where it
runs: whole in one process, or each rank's own rows once FSDP2 has sharded it (no rank ever holds it whole).
A module built on the meta device by the user (``with torch.device("meta"): net = Net()``) is filled the same
way when the base holds every buffer it needs.

Example:
    >>> from torch import nn
    >>> from lightning_ties.merging import as_source
    >>> with parameters_on_meta():
    ...     net = nn.BatchNorm1d(2)
    >>> net.weight.device.type, net.running_mean.device.type
    ('meta', 'cpu')
    >>> base = as_source({k: v + 1 for k, v in nn.BatchNorm1d(2).state_dict().items()}, "base")
    >>> fill_from_base(net, base, torch.device("cpu"))
    >>> net.weight.tolist(), net.running_var.tolist()
    ([2.0, 2.0], [2.0, 2.0])
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..merging.sources import TensorSource


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device; their buffers stay where they are made.

    A parameter registered under two names (tied weights) stays one parameter.
    """
    register = nn.Module.register_parameter
    # the meta twin of each parameter moved, by id: a parameter registered twice gets the same twin. A weak
    # reference proves the id is still that parameter's (one dropped after its move frees its memory, and a later
    # parameter may reuse its id); tensors compare by value, so they cannot be the keys themselves
    twins: dict[int, tuple[weakref.ref[nn.Parameter], nn.Parameter]] = {}

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta and not isinstance(param, nn.parameter.UninitializedParameter):
            seen = twins.get(id(param))
            if seen is not None and seen[0]() is param:
                param = seen[1]
            else:
                twin = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
                twins[id(param)] = (weakref.ref(param), twin)
                param = twin
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_on_meta(factory: Callable[[], Any]) -> nn.Module:
    """``factory()`` built inside :func:`parameters_on_meta`: the module, with no parameter memory."""
    if not callable(factory):
        raise TypeError(
            f"model= must be an nn.Module or a function of no arguments that builds one (e.g. model=lambda: "
            f"Net(config)), got {type(factory).__name__} {factory!r}"
        )
    try:
        with parameters_on_meta():
            model = factory()
    except (RuntimeError, NotImplementedError) as err:
        if "meta" not in str(err):
            raise
        raise type(err)(
            f"model=: the factory failed with its parameters on the meta device ({err}); its constructor reads a "
            "parameter's value, which a model built without weights does not have. Pass the model built (an "
            "nn.Module with its weights)"
        ) from err
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model= was called as a factory (it is not an nn.Module) and returned {type(model).__name__}; pass an "
            "nn.Module or a function of no arguments that builds one (e.g. model=lambda: Net(config))"
        )
    return model


def is_on_meta(model: nn.Module) -> bool:
    """Whether any of ``model``'s parameters or buffers has no memory yet (the meta device)."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def check_fillable(
    model: nn.Module, base: TensorSource, heads: Sequence[str] = (), tasks: Mapping[str, TensorSource] | None = None
) -> None:
    """Raise, naming the keys, when ``model`` (on the meta device) cannot get all its values from ``base``.

    Every key of its state dict on the meta device must be in the base (or share its tensor with a key there: a
    checkpoint of tied weights may hold one name), or be a head that every task holds (each task's head is
    swapped in before its batches); a buffer on the meta device must be in its state dict (a
    non-persistent one is in no checkpoint: build the model with a factory, whose buffers the constructor computes).
    Buffers with values keep them where the base lacks them, as a model built with its weights would. A model
    with all its memory passes.
    """
    if not is_on_meta(model):
        return
    state = model.state_dict(keep_vars=True)
    fits = _fitting_keys(base, {k: tuple(t.shape) for k, t in state.items()})
    filled = {id(state[k]) for k in fits}  # a tied key is filled through the key it shares its tensor with
    held_by_tasks = set.intersection(*(set(s.keys()) for s in tasks.values())) if tasks else set()
    missing = [k for k, t in state.items()
               if t.is_meta and id(t) not in filled and not (k in heads and k in held_by_tasks)]
    if missing:
        held = set(base.keys())
        shapes = [f"{k}: base {tuple(base.spec(k).shape)} vs model {tuple(state[k].shape)}" for k in missing if k in held]
        raise ValueError(
            f"the model was built on the meta device (no weights), but the base {base.label!r} lacks {len(missing)} "
            f"of its key(s), e.g. {missing[:5]}{' (other shapes: ' + '; '.join(shapes[:5]) + ')' if shapes else ''}: "
            "nothing would fill them. Give a base with every key of the model in its shape (a head may instead be "
            "held by every task), or pass the model built (an nn.Module with its weights)"
        )
    persistent = set(state)
    lost = [name for name, buf in model.named_buffers() if buf.is_meta and name not in persistent]
    if lost:
        raise ValueError(
            f"the model's non-persistent buffer(s) {lost[:5]} are on the meta device, and no checkpoint holds them. "
            "Pass model= as a factory (e.g. model=lambda: Net(config)) so that its constructor computes them; a "
            "buffer computed from a parameter's value cannot be computed without weights: then pass the model built "
            "(an nn.Module with its weights)"
        )


def fill_from_base(model: nn.Module, base: TensorSource, device: torch.device) -> None:
    """Give ``model`` (on the meta device) memory on ``device`` and the base's values, in place.

    A model that FSDP2 has sharded gets this rank's rows of the base only (collective: every rank calls it);
    otherwise the whole base. Tensors that had values (buffers the constructor computed, a parameter built for
    real) keep them, and the base overwrites those it holds; tensors held twice (tied weights, a shared
    buffer) stay shared. Keys the base lacks or holds in another shape (heads, see :func:`check_fillable`) stay
    unset until a task's are written in.
    """
    from ..distributed.shard import is_fully_sharded  # imports torch.distributed.fsdp only when used

    sharded = is_fully_sharded(model)
    before = _holders(model)  # every tensor and where it is held (the tensors survive to_empty)
    model.to_empty(device=device)
    with torch.no_grad():
        for tensor, ((module, slot, name), *others) in before:
            after = getattr(module, slot)[name]
            for other, other_slot, other_name in others:  # to_empty gives each holder its own copy: share it again
                if not (sharded and other_slot == "_parameters"):  # FSDP2 keeps its shared parameters shared itself
                    getattr(other, other_slot)[other_name] = after
            if not tensor.is_meta:
                after.copy_(tensor)  # the values before: a detached alias of the old storage
        if sharded:
            _fill_shards(model, base)
        else:
            targets = model.state_dict(keep_vars=True)
            for key in _fitting_keys(base, {k: tuple(t.shape) for k, t in targets.items()}):
                targets[key].data.copy_(base.get(key))


def _fill_shards(model: nn.Module, base: TensorSource) -> None:
    """This rank's rows of every key ``base`` holds in the model's shape, written into its shards (collective)."""
    from ..distributed.views import RowsSource, sharded_view

    view = sharded_view(model)
    rows = RowsSource(base, view.rows)
    fits = _fitting_keys(base, {k: tuple(spec.shape) for k, spec in view.specs().items()})
    view.write_((key, rows.get(key)) for key in view.keys if key in fits)


def _fitting_keys(base: TensorSource, shapes: Mapping[str, tuple[int, ...]]) -> set[str]:
    """The keys of ``shapes`` that ``base`` holds in that shape (a head of another shape comes from each task)."""
    return {k for k in base.keys() if k in shapes and tuple(base.spec(k).shape) == shapes[k]}


def _holders(model: nn.Module) -> list[tuple[torch.Tensor, list[tuple[nn.Module, str, str]]]]:
    """Every parameter and buffer of ``model`` (an alias of its values now) with the (module,
    ``_parameters``/``_buffers``, name) holding it."""
    holders: dict[int, tuple[torch.Tensor, list[tuple[nn.Module, str, str]]]] = {}
    for module in model.modules():  # a module held twice is one module: to_empty keeps it whole
        for slot in ("_parameters", "_buffers"):
            for name, tensor in getattr(module, slot).items():
                if tensor is not None:  # detached: to_empty swaps a real parameter's storage in place
                    holders.setdefault(id(tensor), (tensor.detach(), []))[1].append((module, slot, name))
    return list(holders.values())


__all__ = ["build_on_meta", "check_fillable", "fill_from_base", "is_on_meta", "parameters_on_meta"]
