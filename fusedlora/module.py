"""FusedLinear: a drop-in nn.Linear that runs its adapters fused into the base matmul."""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, reference
from .backend import record


class FusedLinear(nn.Linear):
    """``nn.Linear`` with LoRA adapters, PEFT semantics, fused kernels.

    With no active adapter (or all merged) it is exactly ``nn.Linear``. The
    first adapter added becomes active; later ones wait for ``set_adapter``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapters()

    def _init_adapters(self) -> None:
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict = {}
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.lora_dropout: dict = {}
        self.use_rslora: dict = {}
        self._active: List[str] = []
        self.merged_adapters: List[str] = []

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FusedLinear":
        """Wrap ``linear``, sharing its weight and bias (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    # ------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    @property
    def active_adapters(self) -> List[str]:
        return list(self._active)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _check_name(self, name, must_exist: bool) -> str:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name: expected a non-empty string without '.', got {name!r}")
        if must_exist and name not in self.lora_A:
            raise ValueError(f"adapter name: unknown adapter {name!r}; this layer has {self.adapter_names}")
        if not must_exist and name in self.lora_A:
            raise ValueError(f"adapter name: {name!r} already exists; delete_adapter it first")
        return name

    def add_lora(self, name: str, r: int, lora_alpha: Optional[float] = None, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True) -> None:
        """Add a LoRA adapter ``name``: A (r, in_features), B (out_features, r), as PEFT."""
        self._check_name(name, must_exist=False)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        lora_alpha = ops.check_scalar("lora_alpha", r if lora_alpha is None else lora_alpha)
        lora_dropout = ops.check_scalar("lora_dropout", lora_dropout, 0.0, 1.0, high_open=True)
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights: expected True, False or 'gaussian', got {init_lora_weights!r}")
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        A = torch.empty(r, self.in_features, **kw)
        B = torch.empty(self.out_features, r, **kw)
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(A, std=1.0 / r)
                B.zero_()
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                if init_lora_weights:
                    B.zero_()
                else:  # PEFT leaves both as nn.Linear's default init
                    nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.r[name], self.lora_alpha[name], self.lora_dropout[name] = r, lora_alpha, lora_dropout
        self.use_rslora[name] = bool(use_rslora)
        self.scaling[name] = reference.lora_scaling(r, lora_alpha, use_rslora)
        if not self._active:
            self._active = [name]

    def set_adapter(self, names: Union[str, Iterable[str], None]) -> None:
        """Activate one adapter, several (summed) or none (``None``: base layer only)."""
        if names is None:
            names = []
        elif isinstance(names, str):
            names = [names]
        names = list(names)
        for n in names:
            self._check_name(n, must_exist=True)
        if len(set(names)) != len(names):
            raise ValueError(f"names: duplicate adapter names in {names}")
        self._active = names

    def delete_adapter(self, name: str) -> None:
        self._check_name(name, must_exist=True)
        if name in self.merged_adapters:
            raise ValueError(f"adapter name: {name!r} is merged into the weight; unmerge() first")
        for table in (self.lora_A, self.lora_B, self.scaling, self.r, self.lora_alpha,
                      self.lora_dropout, self.use_rslora):
            del table[name]
        self._active = [n for n in self._active if n != name]

    # ---------------------------------------------------------------- merge
    @torch.no_grad()
    def _add_delta(self, name: str, sign: float) -> None:
        delta = reference.lora_delta_weight(self.lora_A[name], self.lora_B[name], sign * self.scaling[name])
        self.weight.copy_((self.weight.to(delta.dtype) + delta.to(self.weight.device)).to(self.weight.dtype))

    def merge(self, adapter_names: Optional[Iterable[str]] = None) -> None:
        """Add s * B A of each adapter (default: the active ones) into the weight."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        for n in names:
            self._check_name(n, must_exist=True)
            if n not in self.merged_adapters:
                self._add_delta(n, 1.0)
                self.merged_adapters.append(n)

    def unmerge(self) -> None:
        """Subtract every merged adapter again, last merged first."""
        while self.merged_adapters:
            self._add_delta(self.merged_adapters.pop(), -1.0)

    # -------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = [] if self.merged else self._active
        if not names:
            return F.linear(x, self.weight, self.bias)
        p = [self.lora_dropout[n] if self.training else 0.0 for n in names]
        A = [self.lora_A[n] for n in names]
        if len(names) == 1:
            return ops.lora_linear(x, self.weight, self.bias, A[0], self.lora_B[names[0]],
                                   self.scaling[names[0]], p[0])
        if not any(p):
            # Several adapters without dropout are one adapter of rank sum(r):
            # stack them (scales folded into B) and run a single fused pass.
            B = torch.cat([self.lora_B[n] * self.scaling[n] for n in names], dim=1)
            return ops.lora_linear(x, self.weight, self.bias, torch.cat(A, dim=0), B, 1.0, 0.0)
        # Dropout draws an independent mask per adapter (as PEFT does): the
        # first adapter runs fused with the base GEMM, the others eagerly.
        y = ops.lora_linear(x, self.weight, self.bias, A[0], self.lora_B[names[0]], self.scaling[names[0]], p[0])
        for n, a, pn in zip(names[1:], A[1:], p[1:]):
            record("lora.extra_adapter", "torch", "eager")
            y = y + self.scaling[n] * F.linear(F.linear(F.dropout(x, pn, True), a), self.lora_B[n])
        return y

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if not self.lora_A:
            return base
        ads = ", ".join(f"{n}(r={self.r[n]}, s={self.scaling[n]:g})" for n in self.adapter_names)
        return f"{base}, adapters=[{ads}], active={self._active}, merged={self.merged_adapters}"
