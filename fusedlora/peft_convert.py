"""A live PeftModel (LoRA, C3A, SHiRA layers) converted to FusedLinear layers in place:

    model = fusedlora.from_peft(peft_model)

Every adapter of every PEFT layer becomes an adapter of the same name on the FusedLinear
that replaces it (the base weight and bias are shared; the adapter weights are copied into
new parameters: build optimizers after converting); the checks of ``fusedlora.peft_io`` run
first, so a model that cannot be converted is left as it was.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn

from .patch import _HOOK_TABLES, check_replaceable, replace_module, to_fused
from .peft_io import _add, _check_layer_spec, _remember, _Spec, check_config


def _peft_kind(m: nn.Module) -> Optional[str]:
    from peft.tuners import c3a, lora, shira

    if type(m) is lora.layer.Linear:
        return "lora"
    if type(m) is c3a.layer.C3ALinear:
        return "c3a"
    if type(m) is shira.layer.Linear:
        return "sparse"
    return None


def _specs_from_layer(module: str, m: nn.Module, kind: str) -> Tuple[List[Tuple[str, _Spec]], List[str]]:
    """(adapter name, spec) for each adapter of PEFT layer ``m``, and what is wrong."""
    out, errors = [], []
    if kind == "lora":
        for n in m.lora_A:
            if m.use_dora.get(n) or getattr(m, "lora_variant", {}).get(n) is not None:
                errors.append(f"{module}: adapter {n!r} is DoRA / a LoRA variant, which is not supported yet")
                continue
            if m.lora_bias.get(n):
                errors.append(f"{module}: adapter {n!r} has a LoRA bias (lora_bias=True), not supported")
                continue
            A, B = m.lora_A[n], m.lora_B[n]
            if type(A) is not nn.Linear or type(B) is not nn.Linear:
                errors.append(f"{module}: adapter {n!r} has lora_A/lora_B of type {type(A).__name__}")
                continue
            drop = m.lora_dropout[n]
            p = drop.p if isinstance(drop, nn.Dropout) else 0.0
            out.append((n, _Spec(module, "lora", {"A": A.weight.detach(), "B": B.weight.detach()}, r=m.r[n],
                                 alpha=float(m.lora_alpha[n]), dropout=float(p),
                                 rslora=bool(m.use_rslora.get(n, False)), scaling=float(m.scaling[n]),
                                 trainable={"A": A.weight.requires_grad, "B": B.weight.requires_grad})))
    elif kind == "c3a":
        for n, k in m.c3a_kernel.items():
            out.append((n, _Spec(module, "c3a", {"kernel": k.detach()}, block_size=int(k.shape[2]),
                                 trainable={"kernel": k.requires_grad})))
    else:
        for n, v in m.shira_weight.items():
            if n not in m.shira_indices:
                errors.append(f"{module}: SHiRA adapter {n!r} has no indices")
                continue
            out.append((n, _Spec(module, "sparse", {"values": v.detach(), "indices": m.shira_indices[n]},
                                 scaling=float(m.scaling[n]), trainable={"values": v.requires_grad})))
    return out, errors


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Convert a live ``PeftModel`` with LoRA, C3A or SHiRA adapters to FusedLinear layers
    in place and return its base model (the PeftModel wrapper must not be used after).

    Every adapter is kept, with its weights (LoRA factors and SHiRA values in PEFT's dtype,
    float32 beside a 16-bit base by default; C3A kernels stay float32), scale (``set_scale`` changes too), dropout, trainability, each
    layer's active adapters and merged state, and the hooks of each PEFT layer. Refused
    before anything changes: PEFT layers other than LoRA / C3A / SHiRA on a plain
    ``nn.Linear``, DoRA and other LoRA variants, LoRA biases, modules_to_save / trainable
    tokens, disabled adapters, base layers with hooks or a replaced forward (accelerate's).
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as e:  # pragma: no cover - peft is a test dependency
        raise ImportError("fusedlora.from_peft needs peft installed") from e
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(peft_model, nn.Module) or not isinstance(configs, dict) \
            or not callable(getattr(peft_model, "get_base_model", None)):
        raise TypeError(f"peft_model: expected a peft.PeftModel, got {type(peft_model).__name__}")
    for n, cfg in configs.items():
        check_config(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg, f"adapter {n!r}", live=True)
    base = peft_model.get_base_model()

    errors: List[str] = []
    plan = []  # (name, peft layer, base linear, [(adapter, spec)])
    inside = ()  # name prefixes of the tuner layers seen: their children are theirs to handle
    for module, m in base.named_modules():
        if inside and module.startswith(inside):
            continue
        if not isinstance(m, BaseTunerLayer):
            if type(m).__module__.split(".")[0] == "peft" and m is not base:
                errors.append(f"{module}: PEFT module {type(m).__name__} is not supported")
            continue
        inside += (module + ".",)
        kind = _peft_kind(m)
        linear = m.get_base_layer() if kind else None
        if kind is None or type(linear) is not nn.Linear or m.base_layer is not linear:
            errors.append(f"{module}: {type(m).__module__}.{type(m).__name__} over "
                          f"{type(getattr(m, 'base_layer', None)).__name__} is not supported "
                          "(LoRA / C3A / SHiRA on a plain nn.Linear only)")
            continue
        if m.disable_adapters:
            errors.append(f"{module}: adapters are disabled (inside disable_adapter()?); enable them first")
            continue
        try:
            check_replaceable(module, m)
            check_replaceable(f"{module}.base_layer", linear)  # e.g. accelerate's hook, which PEFT runs
        except ValueError as e:
            errors.append(str(e))
            continue
        hooked = [t.strip("_") for t in _HOOK_TABLES if getattr(linear, t, None)]
        if hooked:  # PEFT runs them on the base path alone; the FusedLinear replacing both has no such point
            errors.append(f"{module}.base_layer: has hooks ({', '.join(hooked)}) that would no longer run once the "
                          "PEFT layer and its base layer become one FusedLinear; remove them, or register them on "
                          f"{module} itself, first")
            continue
        specs, errs = _specs_from_layer(module, m, kind)
        errors += errs
        for n, spec in specs:
            problem = _check_layer_spec(spec, linear)
            if problem:
                errors.append(f"{module}: adapter {n!r}: {problem}")
            elif not n or "." in n:
                errors.append(f"{module}: adapter name {n!r} cannot be a FusedLinear adapter name (no '.')")
        plan.append((module, m, linear, specs))
    if errors:
        shown = errors[:8] + ([f"... and {len(errors) - 8} more"] if len(errors) > 8 else [])
        raise ValueError("from_peft: cannot convert this model, nothing was changed:\n  " + "\n  ".join(shown))

    # Build every FusedLinear first (nothing in the model changes yet) ...
    built = []
    for module, m, linear, specs in plan:
        fused = to_fused(linear, hooks_from=m)  # hooks set on the PEFT layer move to its replacement
        for n, spec in specs:  # LoRA factors and SHiRA values keep PEFT's dtype (float32 beside a 16-bit base)
            kept = {"lora": "A", "sparse": "values"}.get(spec.kind)
            _add(fused, n, spec, True, spec.tensors[kept].dtype if kept else None)
        fused.set_adapter([n for n in m.active_adapters if n in fused.adapter_names])
        fused.train(m.training)
        built.append((m, fused, list(m.merged_adapters)))
    # ... then swap them in; merged adapters are unmerged in PEFT and merged again here.
    for m, fused, merged in built:
        if merged:
            m.unmerge()
            fused.merge(merged)
        replace_module(base, m, fused)
    if getattr(base, "peft_config", None) is configs:
        del base.peft_config
    for n, cfg in configs.items():
        _remember(base, n, cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    return base
