"""Whole-model patching: ``nn.Linear`` -> ``FusedLinear`` in place, and model-level adapter switching.

    model = fusedlora.patch_model(model)                      # every linear but the LM head
    model = fusedlora.patch_model(model, ["q_proj", "v_proj"])  # PEFT-style suffixes (or a regex string)
    fusedlora.set_adapter(model, "task")                      # on every FusedLinear that has it

A patched layer shares the original weight and bias (no copy) and, with no
active adapter, computes exactly what ``nn.Linear`` does, so the patched
model's outputs are unchanged.
"""
from __future__ import annotations

import re
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .module import FusedLinear
from .ops import _FLOAT_DTYPES  # what FusedLinear runs

ALL_LINEAR = "all-linear"
TargetModules = Union[None, str, Sequence[str]]

# Hook tables a replaced layer hands to its FusedLinear (the same dict objects,
# so existing RemovableHandles still remove them).
_HOOK_TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def fused_layers(model: nn.Module) -> Iterator[Tuple[str, FusedLinear]]:
    """(name, layer) of every FusedLinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FusedLinear):
            yield name, module


def adapter_names(model: nn.Module) -> List[str]:
    """Every adapter name found on some FusedLinear of ``model``, in the order first seen."""
    seen: Dict[str, None] = {}
    for _, layer in fused_layers(model):
        seen.update(dict.fromkeys(layer.adapter_names))
    return list(seen)


def check_target_modules(target_modules: TargetModules):
    """Normalise ``target_modules``: None (all linears but the output layer), a regex
    string (``re.fullmatch`` on the module name, as PEFT) or suffixes (as PEFT's list)."""
    if target_modules is None or (isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR):
        return None  # PEFT compares "all-linear" case-insensitively
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regular expression: {e}") from None
        return target_modules
    try:
        targets = list(target_modules)
    except TypeError:
        raise TypeError(f"target_modules: expected None, a regex string or a list of module-name suffixes, "
                        f"got {type(target_modules).__name__}") from None
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules: expected a non-empty list of non-empty strings, got {target_modules!r}")
    return targets


def name_matches(targets, name: str) -> bool:
    """PEFT's rule: a regex must match the whole name; a list entry must equal the
    name or be a suffix of it on a '.' boundary."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def output_layer_names(model: nn.Module) -> set:
    """Names of the output embedding (``get_output_embeddings()``) and of any linear whose
    weight is tied to an ``nn.Embedding``: left alone unless asked for by name."""
    out = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            out = getter()
        except (AttributeError, NotImplementedError):
            out = None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name for name, m in model.named_modules(remove_duplicate=False)
            if (out is not None and m is out)
            or (isinstance(m, nn.Linear) and id(m.weight) in embedding_weights)}


def refuse_peft_layers(model: nn.Module) -> None:
    """Patching under PEFT's own layers would run both; from_peft converts them instead."""
    for name, m in model.named_modules():
        if type(m).__module__.split(".")[0] == "peft":
            raise ValueError(f"model: {name or 'the model'} is a PEFT module ({type(m).__module__}."
                             f"{type(m).__name__}); convert a PeftModel with fusedlora.from_peft(peft_model)")


def check_replaceable(name: str, linear: nn.Module) -> None:
    if "forward" in vars(linear) or hasattr(linear, "_hf_hook"):
        raise ValueError(f"{name}: this nn.Linear has a replaced forward (e.g. an accelerate hook from "
                         "device_map/offloading) that FusedLinear cannot carry over; patch the model "
                         "before dispatching it")
    # A quantized weight (an integer or float8 dtype, or a tensor subclass such as torchao's)
    # runs in nn.Linear through F.linear's dispatch, never in FusedLinear's kernels.
    weight = getattr(linear, "weight", None)
    kind = type(weight.detach()) if isinstance(weight, torch.Tensor) else None
    if kind is not None and (kind is not torch.Tensor or weight.dtype not in _FLOAT_DTYPES):
        raise ValueError(f"{name}: its weight is a {kind.__name__} of dtype {weight.dtype} "
                         f"(a quantized layer?); FusedLinear runs plain {list(_FLOAT_DTYPES)} weights only")


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> List[str]:
    """Put ``new`` everywhere ``old`` is registered in ``model`` (a shared module may sit
    under several names); returns those names."""
    places = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            if child is old:
                places.append((parent, child_name, f"{parent_name}.{child_name}" if parent_name else child_name))
    for parent, child_name, _ in places:
        setattr(parent, child_name, new)
    return [p[2] for p in places]


def to_fused(linear: nn.Linear, hooks_from: Optional[nn.Module] = None) -> FusedLinear:
    """FusedLinear sharing ``linear``'s parameters and training flag, with the hooks of
    ``hooks_from`` (default: ``linear``), the module it replaces."""
    fused = FusedLinear.from_linear(linear)
    source = linear if hooks_from is None else hooks_from
    for table in _HOOK_TABLES:
        hooks = getattr(source, table, None)
        if hooks:
            own = getattr(fused, table, None)
            if own and not isinstance(source, FusedLinear):
                # FusedLinear's own (the load post-hook that forgets sparse layouts) join the
                # shared table, last: the handles of the replaced layer's hooks keep working
                hooks.update(own)
            setattr(fused, table, hooks)
    # which kind the backward hooks are (register_full_backward_hook sets it): nn.Module runs
    # the table's hooks only when it is set
    if getattr(source, "_is_full_backward_hook", None) is not None:
        fused._is_full_backward_hook = source._is_full_backward_hook
    return fused


def patch_model(model: nn.Module, target_modules: TargetModules = None) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers by FusedLinear layers that share their
    parameters, in place; returns ``model``.

    ``target_modules``: None or ``"all-linear"`` patches every ``nn.Linear`` except the
    output embedding (``model.get_output_embeddings()``) and linears tied to an
    ``nn.Embedding``; a list of name suffixes (``["q_proj", "v_proj"]``) or a regex
    string (full match) patches the linears it names, the LM head too if named.
    Only exact ``nn.Linear`` instances are patched (subclasses may not run their
    forward). Idempotent: FusedLinear layers are left as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise TypeError("model: a bare nn.Linear cannot be patched in place; use FusedLinear.from_linear(linear)")
    refuse_peft_layers(model)
    targets = check_target_modules(target_modules)
    excluded = output_layer_names(model) if targets is None else set()
    todo: Dict[int, Tuple[str, nn.Linear]] = {}
    found = False
    for name, m in model.named_modules(remove_duplicate=False):
        if not name or name in excluded or (targets is not None and not name_matches(targets, name)):
            continue
        if isinstance(m, FusedLinear):
            found = True
        elif type(m) is nn.Linear:
            found = True
            check_replaceable(name, m)
            todo.setdefault(id(m), (name, m))
    if targets is not None and not found:
        raise ValueError(f"target_modules: {target_modules!r} matches no nn.Linear of the model")
    for _, m in todo.values():
        replace_module(model, m, to_fused(m))
    return model


def set_adapter(model: nn.Module, names: Union[str, Iterable[str], None]) -> None:
    """Activate adapter ``names`` (one, several summed, or None for the base model) on
    every FusedLinear of ``model``; a layer activates those of the names it has (an
    adapter may target only some layers, as in PEFT). A name that no layer has is an
    error, raised before any layer changes. Merged layers are unmerged first (with a
    warning), as PEFT's ``set_adapter`` does: a merged layer runs its weight only."""
    layers = [layer for _, layer in fused_layers(model)]
    if not layers:
        raise ValueError("model: no FusedLinear layers; fusedlora.patch_model(model) first")
    if names is None:
        wanted: List[str] = []
    elif isinstance(names, str):
        wanted = [names]
    elif isinstance(names, Iterable):
        wanted = list(names)
    else:
        raise TypeError(f"names: expected an adapter name, a list of names or None, got {type(names).__name__}")
    if not all(isinstance(n, str) for n in wanted):
        raise TypeError(f"names: expected a string, a list of strings or None, got {names!r}")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"names: duplicate adapter names in {wanted}")
    known = adapter_names(model)
    missing = [n for n in wanted if n not in known]
    if missing:
        raise ValueError(f"names: no layer of the model has adapter(s) {missing}; it has {known}")
    merged = [layer for layer in layers if layer.merged]
    if merged:  # as PEFT's model-level set_adapter: a merged layer would run only what is merged
        warnings.warn("set_adapter: the model has merged adapters; unmerging them first (as PEFT does)",
                      stacklevel=2)
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        have = set(layer.adapter_names)
        layer.set_adapter([n for n in wanted if n in have])


def active_adapters(model: nn.Module) -> List[str]:
    """The adapters active on at least one FusedLinear of ``model``, in order."""
    seen: Dict[str, None] = {}
    for _, layer in fused_layers(model):
        seen.update(dict.fromkeys(layer.active_adapters))
    return list(seen)
