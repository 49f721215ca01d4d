"""Plain-PyTorch math of every fused path: the single oracle of the tests and
the CPU fallback (``FUSEDLORA_BACKEND=torch``). Runs in any floating dtype,
float64 included; nothing here is fused or clever on purpose.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return float(lora_alpha) / (r ** 0.5 if use_rslora else r)


def apply_dropout(x: torch.Tensor, keep_mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """Inverted dropout with a given keep-mask (1 kept, 0 dropped) of x's shape."""
    if keep_mask is None or p == 0.0:
        return x
    return x * keep_mask.to(x.dtype) / (1.0 - p)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float,
                keep_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """y = x W^T + b + s * (drop(x) A^T) B^T, as PEFT's LoRA Linear computes it."""
    base = F.linear(x, weight, bias)
    xd = apply_dropout(x, keep_mask, dropout_p)
    return base + scaling * F.linear(F.linear(xd, lora_A), lora_B)


def lora_linear_grads(grad_y, x, weight, lora_A, lora_B, scaling: float,
                      keep_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0):
    """Closed-form gradients of ``lora_linear`` for 2-D x: (dx, dW, db, dA, dB).

    The torch backend's backward; tests check it against autograd of ``lora_linear``.
    """
    xd = apply_dropout(x, keep_mask, dropout_p)
    g = scaling * (grad_y @ lora_B)                     # (M, r)
    dx = grad_y @ weight + apply_dropout(g @ lora_A, keep_mask, dropout_p)
    dW = grad_y.t() @ x
    db = grad_y.sum(0)
    dA = g.t() @ xd
    dB = grad_y.t() @ (scaling * (xd @ lora_A.t()))
    return dx, dW, db, dA, dB


def lora_delta_weight(lora_A, lora_B, scaling: float) -> torch.Tensor:
    """The dense update s * B A that merging adds to W (in float32 or wider)."""
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    return scaling * (lora_B.to(dtype) @ lora_A.to(dtype))
