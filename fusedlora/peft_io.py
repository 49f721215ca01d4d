"""PEFT adapters in and out: load a PEFT adapter folder, save one (a live PeftModel is
converted by ``fusedlora.peft_convert.from_peft``).

    model = fusedlora.patch_model(AutoModelForCausalLM.from_pretrained(...))
    fusedlora.load_peft_adapter(model, "path/to/adapter", "task")   # LoRA, C3A or SHiRA
    fusedlora.set_adapter(model, "task")                            # loading does not activate
    fusedlora.save_peft_adapter(model, "out/", "task")              # PeftModel.from_pretrained loads it
    model = fusedlora.from_peft(peft_model)                         # a live PeftModel, in place

Name mapping (PEFT checkpoint key -> layer of ``model``; module names are relative
to the base model, the one PEFT wrapped):

    base_model.model.<module>.lora_A.weight   (r, in)        -> <module>.lora_A[name]
    base_model.model.<module>.lora_B.weight   (out, r)       -> <module>.lora_B[name]
    base_model.model.<module>.c3a_kernel      (out/b, in/b, b) -> <module>.c3a_kernel[name]
    base_model.model.<module>.shira_weight    (nnz,)         -> <module>.sparse_values[name]
    base_model.model.<module>.shira_indices   (2, nnz) int32 -> <module>.sparse_indices[name]

Base-model weights PEFT saves beside the adapter (``<module>.base_layer.weight`` of a
targeted lm_head / embedding, see PEFT's ``save_embedding_layers``) load when they equal
the model's own and are refused otherwise: fusedlora never overwrites base weights.

Everything is checked before the model changes: an adapter either loads whole
or not at all (ValueError naming what is wrong).
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import reference
from .module import FusedLinear
from .patch import (adapter_names, check_replaceable, fused_layers, name_matches, refuse_peft_layers,
                    replace_module, to_fused)
from .sparse import check_indices

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
SUPPORTED = ("LORA", "C3A", "SHIRA")

# Config keys each tuner may carry with any value: bookkeeping, module
# selection (the checkpoint's keys say which modules) and initialisation (the
# checkpoint's values replace it). Any other key must be falsy (off).
_COMMON_KEYS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                "bias", "fan_in_fan_out"}
_ALLOWED_KEYS = {
    "LORA": _COMMON_KEYS | {"r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "rank_pattern",
                            "alpha_pattern", "megatron_core", "loftq_config", "eva_config", "corda_config",
                            "lora_ga_config", "runtime_config", "qalora_group_size"},
    "C3A": _COMMON_KEYS | {"block_size", "block_size_pattern", "init_weights"},
    "SHIRA": _COMMON_KEYS | {"r", "mask_type", "random_seed", "init_weights"},
}
_REASONS = {
    "use_dora": "DoRA (use_dora=True) is not supported yet",
    "lora_bias": "a LoRA bias on lora_B (lora_bias=True) is not supported",
    "modules_to_save": "modules_to_save (full trained copies of other modules) cannot be loaded into FusedLinear",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora=True) is not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "megatron_config": "Megatron parallel layers (megatron_config) are not supported",
}
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_META_KEYS = ("task_type", "base_model_name_or_path", "revision")
_META_ATTR = "_fusedlora_peft_meta"


# ------------------------------------------------------------------ config
def check_config(config: dict, where: str, live: bool = False) -> str:
    """Refuse a config fusedlora cannot reproduce exactly; returns its peft_type. ``live``: the
    config of a PeftModel in memory, whose base weights already hold what its init wrote."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)  # a PeftType enum from a live config
    if peft_type not in SUPPORTED:
        raise ValueError(f"{where}: peft_type {peft_type!r} is not supported; fusedlora loads {list(SUPPORTED)}")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise ValueError(f"{where}: bias={bias!r} (trained biases) is not supported; only bias='none' loads")
    bad = {k: v for k, v in config.items() if k not in _ALLOWED_KEYS[peft_type] and v}
    if bad:
        reasons = [_REASONS[k] + ("" if f"{k}=" in _REASONS[k] else f" ({k}={v!r})") if k in _REASONS
                   else f"option {k}={v!r} is not supported" for k, v in sorted(bad.items())]
        raise ValueError(f"{where}: cannot load this {peft_type} adapter: " + "; ".join(reasons))
    if peft_type == "LORA":
        init = config.get("init_lora_weights", True)
        if not live and isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            # PEFT reruns these inits when it loads the adapter and they rewrite the base weight
            # (PiSSA: W - B0 A0); FusedLinear keeps W, so its output would differ by B0 A0
            raise ValueError(f"{where}: init_lora_weights={init!r} rewrites the base weight when PEFT loads the "
                             "adapter, which fusedlora does not reproduce; convert it to a plain LoRA adapter with "
                             "PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)")
        _positive_int(config.get("r", 8), f"{where}: r")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(key) or {}, dict):
                raise ValueError(f"{where}: {key} must be a mapping, got {config.get(key)!r}")
        p = config.get("lora_dropout", 0.0) or 0.0
        if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"{where}: lora_dropout must be in [0, 1), got {p!r}")
    elif peft_type == "C3A":
        _positive_int(config.get("block_size", 256), f"{where}: block_size")
        if not isinstance(config.get("block_size_pattern") or {}, dict):
            raise ValueError(f"{where}: block_size_pattern must be a mapping")
    return peft_type


def _positive_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{what}: expected a positive int, got {v!r}")
    return v


def _lora_pattern(pattern: Optional[dict], name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: first key k with re.match(r'(.*\\.)?(k)$', name)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _c3a_pattern(pattern: Optional[dict], name: str, default):
    """PEFT's C3A block_size_pattern lookup: first key k with re.match(r'.*\\.k$', name), else
    the key equal to the whole name (PEFT's ``pattern.get(name, default)``)."""
    pattern = pattern or {}
    for key, value in pattern.items():
        if re.match(rf".*\.{key}$", name):
            return value
    return pattern.get(name, default)


# ------------------------------------------------------------------- specs
@dataclass
class _Spec:
    """One layer's part of an adapter, validated, ready to add."""

    module: str
    kind: str  # "lora" | "c3a" | "sparse"
    tensors: Dict[str, torch.Tensor]
    r: int = 0  # LoRA rank
    block_size: int = 0  # C3A block size
    alpha: float = 0.0
    dropout: float = 0.0
    rslora: bool = False
    scaling: Optional[float] = None  # overrides the LoRA scale / the sparse scale
    trainable: Optional[Dict[str, bool]] = None


def _add(layer: FusedLinear, name: str, spec: _Spec, trainable: bool, adapter_dtype=None) -> None:
    """Add ``spec`` to ``layer``; ``adapter_dtype``: of LoRA's factors and SHiRA's values
    (None: the weight's; C3A kernels are float32 always)."""
    t = spec.tensors
    if spec.kind == "lora":
        layer.add_lora(name, r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_rslora=spec.rslora,
                       dtype=adapter_dtype)
        params = {"A": layer.lora_A[name], "B": layer.lora_B[name]}
        if spec.scaling is not None:
            layer.scaling[name] = float(spec.scaling)
    elif spec.kind == "c3a":
        layer.add_c3a(name, block_size=spec.block_size)
        params = {"kernel": layer.c3a_kernel[name]}
    else:
        layer.add_sparse(name, t["indices"].to(layer.weight.device),
                         t["values"].to(device=layer.weight.device, dtype=adapter_dtype or layer.weight.dtype),
                         scaling=1.0 if spec.scaling is None else float(spec.scaling))
        params = {"values": layer.sparse_values[name]}
    with torch.no_grad():
        for role, p in params.items():
            if spec.kind != "sparse":
                p.copy_(t[role])
            p.requires_grad_(spec.trainable[role] if spec.trainable else trainable)


def _check_layer_spec(spec: _Spec, layer: nn.Linear) -> Optional[str]:
    """What is wrong with ``spec`` for ``layer`` (None if nothing)."""
    N, K = layer.out_features, layer.in_features
    t = spec.tensors
    for role, x in t.items():
        if role != "indices" and (not isinstance(x, torch.Tensor) or not x.is_floating_point()):
            return f"{role} must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}"
    if spec.kind == "lora":
        missing = [k for k in ("A", "B") if k not in t]
        if missing:
            return f"lora_{missing[0]}.weight is missing (a LoRA layer needs lora_A and lora_B)"
        if tuple(t["A"].shape) != (spec.r, K):
            return f"lora_A has shape {tuple(t['A'].shape)}, expected (r={spec.r}, in_features={K})"
        if tuple(t["B"].shape) != (N, spec.r):
            return f"lora_B has shape {tuple(t['B'].shape)}, expected (out_features={N}, r={spec.r})"
    elif spec.kind == "c3a":
        k, b = t["kernel"], spec.block_size
        if K % b or N % b:
            return f"block_size {b} does not divide in_features={K} and out_features={N}"
        if tuple(k.shape) != (N // b, K // b, b):
            return f"c3a_kernel has shape {tuple(k.shape)}, expected (out/b, in/b, b) = ({N // b}, {K // b}, {b})"
    else:
        missing = [k for k, key in (("values", "shira_weight"), ("indices", "shira_indices")) if k not in t]
        if missing:
            return f"{'shira_weight' if missing[0] == 'values' else 'shira_indices'} is missing"
        v, idx = t["values"], t["indices"]
        if idx.is_floating_point():  # PEFT writes float32 indices on Windows
            if not torch.equal(idx, idx.round()):
                return "shira_indices are not integers"
            t["indices"] = idx = idx.long()
        if v.dim() != 1 or idx.dim() != 2 or idx.shape[0] != 2 or idx.shape[1] != v.shape[0]:
            return (f"shira_weight {tuple(v.shape)} and shira_indices {tuple(idx.shape)} do not agree "
                    "(expected (nnz,) and (2, nnz))")
        try:
            check_indices(idx, (N, K))
        except (TypeError, ValueError) as e:
            return str(e)
    return None


_NOT_LINEAR_HINTS = {"Conv1D": " (transformers' Conv1D, GPT-2 style, which PEFT adapts with fan_in_fan_out=True, "
                               "is not supported)"}


def _validate_and_apply(model: nn.Module, name: str, specs: List[_Spec], trainable: bool, where: str) -> None:
    """Check every spec against ``model``, then add them all (patching nn.Linear targets),
    or change nothing."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name: expected a non-empty string without '.', got {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"adapter_name: the model already has an adapter {name!r}; pick another name "
                         "or delete it first")
    if not specs:
        raise ValueError(f"{where}: the adapter has no weights")
    modules = dict(model.named_modules(remove_duplicate=False))
    unmatched, errors = [], []
    seen: Dict[int, str] = {}
    for spec in specs:
        m = modules.get(spec.module)
        if m is None:
            unmatched.append(spec.module)
        elif id(m) in seen:
            errors.append(f"{spec.module}: is the same layer as {seen[id(m)]} (one module under two names); "
                          "it can hold one adapter of a name, and PEFT adapts a shared module once")
        elif not (isinstance(m, FusedLinear) or type(m) is nn.Linear):
            errors.append(f"{spec.module}: is a {type(m).__name__}, not an nn.Linear / FusedLinear"
                          + _NOT_LINEAR_HINTS.get(type(m).__name__, " (a subclass of nn.Linear, e.g. a quantized "
                                                  "layer, is not supported)" if isinstance(m, nn.Linear) else ""))
        else:
            seen[id(m)] = spec.module
            if not isinstance(m, FusedLinear):
                try:
                    check_replaceable(spec.module, m)
                except ValueError as e:
                    errors.append(str(e))
                    continue
            problem = _check_layer_spec(spec, m)
            if problem:
                errors.append(f"{spec.module}: {problem}")
    if unmatched:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)][:3]
        errors.insert(0, f"{len(unmatched)} module(s) of the adapter match no layer of the model, e.g. "
                         f"{unmatched[:3]} (the model's linear layers are named like {linears}; load into the "
                         "model PEFT wrapped, e.g. the *ForCausalLM, not its inner model)")
    if errors:
        shown = errors[:8] + ([f"... and {len(errors) - 8} more"] if len(errors) > 8 else [])
        raise ValueError(f"{where}: cannot load adapter {name!r}, nothing was changed:\n  " + "\n  ".join(shown))

    patched: Dict[int, Tuple[nn.Linear, FusedLinear]] = {}
    added: List[Tuple[FusedLinear, List[str]]] = []
    try:
        for spec in specs:
            layer = modules[spec.module]
            if not isinstance(layer, FusedLinear):
                if id(layer) not in patched:  # a shared nn.Linear is patched once, everywhere
                    fused = to_fused(layer)
                    replace_module(model, layer, fused)
                    patched[id(layer)] = (layer, fused)
                layer = patched[id(layer)][1]
            before = layer.active_adapters
            added.append((layer, before))
            # trainable LoRA factors and SHiRA values of a 16-bit layer in float32, as PEFT's
            # autocast_adapter_dtype (their optimizer updates would round away in 16 bits);
            # inference: the weight's dtype
            sixteen = layer.weight.dtype in (torch.float16, torch.bfloat16)
            _add(layer, name, spec, trainable, torch.float32 if trainable and sixteen else None)
            layer.set_adapter(before)  # loading does not activate
    except BaseException:
        for layer, before in reversed(added):
            if name in layer.adapter_names:
                layer.delete_adapter(name)
            layer.set_adapter(before)
        for linear, fused in reversed(list(patched.values())):
            replace_module(model, fused, linear)
        raise


def _remember(model: nn.Module, name: str, config: dict) -> None:
    meta = dict(getattr(model, _META_ATTR, None) or {})
    meta[name] = {k: config.get(k) for k in _META_KEYS if config.get(k) is not None}
    meta[name] = {k: getattr(v, "value", v) for k, v in meta[name].items()}
    setattr(model, _META_ATTR, meta)


# -------------------------------------------------------------------- load
def read_peft_adapter(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(config, state_dict) of a local PEFT adapter folder (safetensors preferred, else .bin)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path!r} is not a folder; load_peft_adapter reads a local PEFT adapter "
                                "folder (download a Hub adapter first, e.g. huggingface_hub.snapshot_download)")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {path!r}")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON: {e}") from None
    st, bn = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        state = load_file(st, device="cpu")
    elif os.path.isfile(bn):
        state = torch.load(bn, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"path: neither {SAFETENSORS_NAME} nor {BIN_NAME} in {path!r}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: the adapter weights are not a mapping of names to tensors")
    return config, state


_ROLES = {
    "LORA": {"lora_A.weight": "A", "lora_B.weight": "B"},
    "C3A": {"c3a_kernel": "kernel"},
    "SHIRA": {"shira_weight": "values", "shira_indices": "indices"},
}
_HINTS = (("lora_magnitude_vector", "DoRA magnitudes"), ("lora_B.bias", "a LoRA bias"),
          ("lora_embedding", "LoRA on an embedding"), ("modules_to_save", "modules_to_save copies"))


def _same_values(saved: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether ``saved`` holds the values of parameter ``p`` (compared in the narrower of the two dtypes)."""
    if tuple(saved.shape) != tuple(p.shape) or p.device.type == "meta" or not saved.is_floating_point():
        return False
    p = p.detach()
    return torch.equal(saved.to(device=p.device, dtype=p.dtype), p) or torch.equal(p.to("cpu", saved.dtype), saved)


def _base_weights(model: nn.Module, state: Dict[str, torch.Tensor], keys: List[str], where: str) -> List[str]:
    """The keys of ``keys`` that are not the model's own weights.

    PEFT saves the weights of a targeted embedding / LM head beside the adapter
    (``save_embedding_layers="auto"`` does whenever target_modules names ``embed_tokens``
    or ``lm_head``): ``<module>.base_layer.weight``, or ``<module>.weight`` after a vocabulary
    resize. PEFT's load copies them into the model; those equal to the model's change
    nothing and are skipped; others are refused (fusedlora does not overwrite base weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    rest, differ = [], []
    for key in keys:
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        p = params.get(k.replace(".base_layer.", ".", 1))
        if p is None:
            rest.append(key)
        elif not _same_values(state[key], p):
            differ.append(f"{key} {tuple(state[key].shape)} vs the model's {tuple(p.shape)}")
    if differ:
        raise ValueError(f"{where}: {len(differ)} base-model weight(s) saved with the adapter (PEFT's "
                         f"save_embedding_layers: a targeted embedding / lm_head, or a resized vocabulary) differ "
                         f"from the model's, e.g. {differ[:3]}; fusedlora does not overwrite base weights: load "
                         "into a model that has these weights. Nothing was loaded")
    return rest


def _group(state: Dict[str, torch.Tensor], peft_type: str, where: str,
           model: Optional[nn.Module] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in state.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, role in _ROLES[peft_type].items():
            if k.endswith("." + suffix):
                groups.setdefault(k[: -len(suffix) - 1], {})[role] = tensor
                break
        else:
            foreign.append(key)
    if foreign and model is not None:
        foreign = _base_weights(model, state, foreign, where)
    if foreign:
        hints = sorted({h for key in foreign for s, h in _HINTS if s in key})
        raise ValueError(f"{where}: {len(foreign)} key(s) are not {peft_type} weights of a linear layer"
                         f"{' (' + ', '.join(hints) + ')' if hints else ''}, e.g. {foreign[:3]}; "
                         "nothing was loaded")
    return groups


def _specs_from_checkpoint(config: dict, state: Dict[str, torch.Tensor], peft_type: str,
                           where: str, model: Optional[nn.Module] = None) -> List[_Spec]:
    specs = []
    for module, tensors in _group(state, peft_type, where, model).items():
        if peft_type == "LORA":
            r = _lora_pattern(config.get("rank_pattern"), module, config.get("r", 8))
            alpha = _lora_pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
            _positive_int(r, f"{where}: rank of {module}")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise ValueError(f"{where}: lora_alpha of {module} must be a finite number, got {alpha!r}")
            specs.append(_Spec(module, "lora", tensors, r=r, alpha=float(alpha),
                               dropout=float(config.get("lora_dropout") or 0.0),
                               rslora=bool(config.get("use_rslora", False))))
        elif peft_type == "C3A":
            b = _c3a_pattern(config.get("block_size_pattern"), module, config.get("block_size", 256))
            specs.append(_Spec(module, "c3a", tensors, block_size=_positive_int(b, f"{where}: block_size of {module}")))
        else:
            specs.append(_Spec(module, "sparse", tensors))
    return sorted(specs, key=lambda s: s.module)


def load_peft_adapter(model: nn.Module, path: str, adapter_name: str = "default", *,
                      is_trainable: bool = False) -> nn.Module:
    """Load the PEFT adapter folder ``path`` (LoRA, C3A or SHiRA) into ``model`` as
    ``adapter_name``; returns ``model``.

    ``model`` is the base model PEFT's names refer to (e.g. the ``*ForCausalLM``),
    patched or not: each ``nn.Linear`` the adapter targets becomes a FusedLinear
    sharing its parameters. The adapter is added inactive (as PEFT's
    ``load_adapter``): activate it with ``fusedlora.set_adapter(model, adapter_name)``.
    Its parameters require grad only with ``is_trainable=True`` (as PEFT); then the LoRA
    factors of 16-bit layers are kept in float32, as PEFT's ``autocast_adapter_dtype`` keeps
    them (each forward reads them in the weight's dtype), else in the weight's dtype.

    Refused with a ValueError before anything changes: an unknown peft_type, DoRA,
    a trained bias, modules_to_save and other options fusedlora cannot run, keys
    that are not the tuner's weights, modules the model does not have or that are not
    linear, shapes that do not match the layer or the config's rank / block size,
    invalid SHiRA indices, base-model weights saved with the adapter that differ from
    the model's (equal ones, as PEFT saves for a targeted lm_head, are skipped), and a
    name the model already uses.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    refuse_peft_layers(model)
    config, state = read_peft_adapter(path)
    where = os.path.join(os.fspath(path), CONFIG_NAME)
    peft_type = check_config(config, where)
    specs = _specs_from_checkpoint(config, state, peft_type, os.fspath(path), model)
    _validate_and_apply(model, adapter_name, specs, is_trainable, os.fspath(path))
    _remember(model, adapter_name, config)
    return model


# -------------------------------------------------------------------- save
def _candidate_names(model: nn.Module) -> List[str]:
    """Module names PEFT would see in the unpatched model (none inside a FusedLinear)."""
    inner = set()
    for name, layer in fused_layers(model):
        inner.update(f"{name}.{child}" for child, _ in layer.named_modules() if child)
    return [n for n, _ in model.named_modules() if n and n not in inner]


def _target_modules(model: nn.Module, targets: List[str]) -> Union[List[str], str]:
    names = _candidate_names(model)
    want = set(targets)
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
    # a list entry matches every name ending in "." + entry, so a target whose full name ends
    # another module's (top-level q beside block.q) needs PEFT's string form: re.fullmatch
    exact = "|".join(re.escape(t) for t in sorted(targets))
    for choice in (suffixes, sorted(targets), exact):
        if {n for n in names if name_matches(choice, n)} == want:
            return choice
    raise ValueError(f"model: cannot name the adapted modules {sorted(want)[:3]}... as PEFT target_modules")


def _pattern_keys(values: Dict[str, object], default, lookup, what: str) -> dict:
    """A pattern dict (read with PEFT's ``lookup`` rule) that gives every target of
    ``values`` whose value is not ``default`` its value: for each, the shortest dotted
    suffix of its name (``down_proj``, then ``mlp.down_proj``, ...) whose matches all
    share that value, so the order of the keys does not matter."""
    out: dict = {}
    covered: set = set()
    for module, value in sorted(values.items()):
        if value == default or module in covered:
            continue
        parts = module.split(".")
        keys = [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]
        keys.sort(key=lambda k: k.split(".")[0].isdigit())  # "layers.1.x" reads better than "1.x"
        for key in keys:
            hits = [t for t in values if lookup({key: True}, t, False)]
            if module in hits and all(values[t] == value for t in hits):
                out[key] = value
                covered.update(hits)
                break
        else:
            raise ValueError(f"model: cannot write {what}={value} for {module!r} in PEFT's format "
                             "(no pattern key selects it without other modules)")
    return out


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _export(layers: List[Tuple[str, FusedLinear]], name: str, kind: str, model: nn.Module) -> Tuple[dict, dict]:
    targets = [n for n, _ in layers]
    state: Dict[str, torch.Tensor] = {}

    def put(module: str, suffix: str, t: torch.Tensor) -> None:
        state[f"{PREFIX}{module}.{suffix}"] = t.detach().to("cpu").clone().contiguous()

    config: dict = {"target_modules": _target_modules(model, targets), "modules_to_save": None,
                    "inference_mode": True}
    if kind != "sparse":  # ShiraConfig has no bias field
        config["bias"] = "none"
    if kind == "lora":
        flags = {layer.use_rslora[name] for _, layer in layers}
        rs = flags.pop() if len(flags) == 1 else False
        drops = {layer.lora_dropout[name] for _, layer in layers}
        if len(drops) > 1:
            raise ValueError(f"adapter {name!r}: its layers use different lora_dropout {sorted(drops)}; "
                             "PEFT's config holds one")
        ranks, alphas = {}, {}
        for module, layer in layers:
            r, alpha, s = layer.r[name], layer.lora_alpha[name], layer.scaling[name]
            if layer.use_rslora[name] != rs or reference.lora_scaling(r, alpha, rs) != s:
                alpha = s * (math.sqrt(r) if rs else r)  # the alpha that gives this layer's scale
            ranks[module], alphas[module] = r, _number(alpha)
            put(module, "lora_A.weight", layer.lora_A[name])
            put(module, "lora_B.weight", layer.lora_B[name])
        r0, a0 = _most_common(ranks.values()), _most_common(alphas.values())
        config.update(
            peft_type="LORA", r=r0, lora_alpha=a0, lora_dropout=drops.pop(), use_rslora=rs,
            rank_pattern=_pattern_keys(ranks, r0, _lora_pattern, "r"),
            alpha_pattern=_pattern_keys(alphas, a0, _lora_pattern, "lora_alpha"),
            init_lora_weights=True, fan_in_fan_out=False, use_dora=False, lora_bias=False)
    elif kind == "c3a":
        blocks = {}
        for module, layer in layers:
            kernel = layer.c3a_kernel[name]
            blocks[module] = int(kernel.shape[2])
            put(module, "c3a_kernel", kernel)
        b0 = _most_common(blocks.values())
        config.update(peft_type="C3A", block_size=b0, init_weights=True,
                      block_size_pattern=_pattern_keys(blocks, b0, _c3a_pattern, "block_size"))
    else:
        rs = set()
        for module, layer in layers:
            values = layer.sparse_values[name]
            nnz, fan = values.numel(), layer.in_features + layer.out_features
            if nnz % fan:
                raise ValueError(f"adapter {name!r}: {module} has {nnz} nonzeros; PEFT's SHiRA format needs "
                                 f"r * (in_features + out_features) = r * {fan} of them")
            rs.add(nnz // fan)
            s = layer.sparse_scaling[name]
            put(module, "shira_weight", values if s == 1.0 else values * s)  # PEFT's scale is 1
            put(module, "shira_indices", layer.sparse_indices[name].to(torch.int32))
        if len(rs) != 1:
            raise ValueError(f"adapter {name!r}: its layers have nnz = r * (in + out) for different r {sorted(rs)}; "
                             "PEFT's SHiRA config holds one r")
        config.update(peft_type="SHIRA", r=rs.pop(), mask_type="random", random_seed=None, init_weights=True,
                      fan_in_fan_out=False)
    return config, state


def save_peft_adapter(model: nn.Module, path: str, adapter_name: str = "default", *,
                      safe_serialization: bool = True, task_type: Optional[str] = None,
                      base_model_name_or_path: Optional[str] = None) -> str:
    """Write adapter ``adapter_name`` of ``model`` to folder ``path`` in PEFT's format
    (``adapter_config.json`` + ``adapter_model.safetensors``, or ``.bin`` with
    ``safe_serialization=False``), loadable by ``PeftModel.from_pretrained(base_model, path)``
    with ``base_model`` the unpatched model. Returns ``path``.

    The adapter must be of one kind on every layer; per-layer ranks, alphas (scales)
    and block sizes go to rank_pattern / alpha_pattern / block_size_pattern. A SHiRA
    scale other than 1 is folded into the values. ``task_type`` and
    ``base_model_name_or_path`` default to those of the adapter's PEFT origin, if any.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = [(n, layer) for n, layer in fused_layers(model) if adapter_name in layer.adapter_names]
    if not layers:
        raise ValueError(f"adapter_name: no layer of the model has adapter {adapter_name!r}; "
                         f"it has {adapter_names(model)}")
    kinds = {"lora" if adapter_name in layer.lora_A else "c3a" if adapter_name in layer.c3a_kernel else "sparse"
             for _, layer in layers}
    if len(kinds) > 1:
        raise ValueError(f"adapter {adapter_name!r} is of several kinds {sorted(kinds)}; PEFT's format holds one")
    config, state = _export(layers, adapter_name, kinds.pop(), model)
    meta = dict((getattr(model, _META_ATTR, None) or {}).get(adapter_name, {}))
    if task_type is not None:
        meta["task_type"] = task_type
    if base_model_name_or_path is not None:
        meta["base_model_name_or_path"] = base_model_name_or_path
    config = {"task_type": None, "base_model_name_or_path": None, "revision": None, **meta, **config}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(state, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(path, BIN_NAME))
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return path
