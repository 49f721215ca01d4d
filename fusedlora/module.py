"""FusedLinear: a drop-in nn.Linear that runs its adapters fused into the base matmul."""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import c3a as c3a_ops
from . import ops, reference, routing
from . import sparse as sparse_ops
from .backend import record
from .derived import DerivedCache


class _BufferDict(nn.Module):
    """Named buffers (sparse adapters' indices): saved in the state_dict as
    ``sparse_indices.<name>`` and moved by ``.to(device)``, never trained."""

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self._buffers


# Names that the adapter containers (nn.ParameterDict, _BufferDict) already use as
# attributes: an adapter of such a name would be refused by them half-way through an
# add ("to", "update"), or would silently replace one ("training": then .eval() fails).
_RESERVED_NAMES = frozenset(dir(nn.ParameterDict())) | frozenset(dir(_BufferDict()))


class FusedLinear(nn.Linear):
    """``nn.Linear`` with LoRA, C3A and sparse-delta adapters, PEFT semantics, fused kernels.

    With no active adapter (or all merged) it is exactly ``nn.Linear``. The
    first adapter added becomes active; later ones wait for ``set_adapter``.
    Adapter names are unique across kinds.
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
        self.c3a_kernel = nn.ParameterDict()
        self.sparse_values = nn.ParameterDict()
        self.sparse_indices = _BufferDict()
        self.sparse_scaling: dict = {}
        self._sparse_layout = DerivedCache()  # name -> layout of its indices as they are
        self._sparse_saved: dict = {}   # name -> sparse.SavedEntries while merged
        self._sparse_flat = DerivedCache()    # name -> (rows, cols) of its nonzeros in W
        self._kind: dict = {}  # name -> "lora" | "c3a" | "sparse", in the order added
        self._active: List[str] = []
        self.merged_adapters: List[str] = []
        self._multi_pool = None   # routing.AdapterPool, built at the first adapter_ids forward
        self._multi_route = None  # set by fusedlora.use_adapters for the forwards in its scope
        self._last_routed = False  # the last forward that may build a graph ran in a use_adapters scope
        self._multi_cache = None  # routing._prepare's answer and what it depends on
        self._multi_struct = 0    # bumped by every add / delete of an adapter
        self._delta_rows = None   # weight_delta_rows' slot table and what it depends on
        # a traced forward reads the layouts eager code built last: forget them as soon as
        # load_state_dict or a device move may have changed the indices
        self.register_load_state_dict_post_hook(FusedLinear._drop_sparse_caches_hook)

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
        return list(self._kind)

    @property
    def active_adapters(self) -> List[str]:
        return list(self._active)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _check_name(self, name, must_exist: bool) -> str:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name: expected a non-empty string without '.', got {name!r}")
        if must_exist and name not in self._kind:
            raise ValueError(f"adapter name: unknown adapter {name!r}; this layer has {self.adapter_names}")
        if not must_exist and name in self._kind:
            raise ValueError(f"adapter name: {name!r} already exists; delete_adapter it first")
        if not must_exist and name in _RESERVED_NAMES:
            raise ValueError(f"adapter name: {name!r} is an attribute of the adapter containers "
                             "(nn.ParameterDict); choose another name")
        return name

    def add_lora(self, name: str, r: int, lora_alpha: Optional[float] = None, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                 dtype: Optional[torch.dtype] = None) -> None:
        """Add a LoRA adapter ``name``: A (r, in_features), B (out_features, r), as PEFT.
        ``dtype``: of A and B, default the weight's; float32 beside a 16-bit weight keeps the
        trained factors (and their optimizer updates) in float32, as PEFT's
        ``autocast_adapter_dtype`` does: each forward then casts them to the weight's dtype
        (r x (in + out) elements; the gradients reach the float32 parameters)."""
        self._check_name(name, must_exist=False)
        if dtype is not None and dtype not in ops._FLOAT_DTYPES:
            raise TypeError(f"dtype: expected None or one of {ops._FLOAT_DTYPES}, got {dtype!r}")
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        r = int(r)  # numpy and tensor-free integers too (a config's values)
        lora_alpha = ops.check_scalar("lora_alpha", r if lora_alpha is None else lora_alpha)
        lora_dropout = ops.check_scalar("lora_dropout", lora_dropout, 0.0, 1.0, high_open=True)
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights: expected True, False or 'gaussian', got {init_lora_weights!r}")
        kw = dict(device=self.weight.device, dtype=dtype or self.weight.dtype)
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
        self._added(name, "lora")

    def add_c3a(self, name: str, block_size: int, init_weights: Union[bool, str] = True) -> None:
        """Add a C3A adapter: ``c3a_kernel[name]`` of shape (out/b, in/b, b), float32, as PEFT."""
        self._check_name(name, must_exist=False)
        b = block_size
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b <= 0 or self.in_features % b or \
                self.out_features % b:
            raise ValueError(f"block_size: expected a positive int dividing in_features={self.in_features} and "
                             f"out_features={self.out_features}, got {block_size!r}")
        b = int(b)
        kernel = torch.empty(self.out_features // b, self.in_features // b, b, device=self.weight.device,
                             dtype=torch.float32)
        with torch.no_grad():
            c3a_ops.init_c3a_kernel(kernel, init_weights)
        self.c3a_kernel[name] = nn.Parameter(kernel)
        self._added(name, "c3a")

    def add_sparse(self, name: str, indices: torch.Tensor, values: Optional[torch.Tensor] = None,
                   scaling: float = 1.0) -> None:
        """Add a sparse-delta (SHiRA) adapter: W + scaling * S with S given by
        ``indices`` (2, nnz) and ``sparse_values[name]`` (zeros when ``values`` is None)."""
        self._check_name(name, must_exist=False)
        shape = tuple(self.weight.shape)
        rows, cols = sparse_ops.check_indices(indices, shape)
        nnz = rows.numel()
        if values is None:
            values = torch.zeros(nnz, device=self.weight.device, dtype=self.weight.dtype)
        elif not isinstance(values, torch.Tensor) or not values.is_floating_point() or tuple(values.shape) != (nnz,):
            raise ValueError(f"values: expected a floating tensor of shape ({nnz},), got "
                             f"{getattr(values, 'dtype', type(values).__name__)} {tuple(getattr(values, 'shape', ()))}")
        indices = torch.stack([rows, cols]).to(self.weight.device)
        scaling = ops.check_scalar("scaling", scaling)
        values = nn.Parameter(values.detach().clone().to(self.weight.device))
        self.sparse_values[name] = values
        self.sparse_indices[name] = indices
        self.sparse_scaling[name] = scaling
        self._added(name, "sparse")

    def _added(self, name: str, kind: str) -> None:
        self._kind[name] = kind
        self._multi_struct += 1
        routing.REGISTRY.id_for(name)  # ids in order of first addition, process-wide
        if len(self._kind) == 1:  # the layer's first adapter; later ones wait for set_adapter
            self._active = [name]

    def _layout(self, name: str):
        """The sparse adapter's tile layout, built again whenever its indices change
        (a device move, or load_state_dict copying new ones in place). A rebuild
        checks range and duplicates: the kernels index W with them."""
        indices = self.sparse_indices[name]
        if torch.compiler.is_compiling():
            # Dynamo cannot trace pointer checks or the validating sort: a traced
            # forward uses the layout eager calls built (or one of add_sparse's
            # already checked indices).
            layout = self._sparse_layout.latest(name)
            if layout is None or layout.device != indices.device:
                layout = sparse_ops.build_layout(indices, tuple(self.weight.shape), validate=False)
                self._sparse_layout.put_unchecked(name, layout)
            return layout
        return self._sparse_layout.get_or_build(
            name, (indices,), lambda: sparse_ops.build_layout(indices, tuple(self.weight.shape)))

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        for name in self.__dict__.get("_kind", {}):
            routing.REGISTRY.id_for(name)  # unpickled in another process: its names get ids there
        hooks = self._load_state_dict_post_hooks
        if not any(h is FusedLinear._drop_sparse_caches_hook for h in hooks.values()):  # pickled before it
            self.register_load_state_dict_post_hook(FusedLinear._drop_sparse_caches_hook)

    def _drop_sparse_caches(self) -> None:
        """Drop the sparse adapters' cached derivations (layouts, flat positions, routed row
        order, the delta rows' table) after load_state_dict or a device move. The next use builds
        them again (an eager forward or merge checks the indices then; a traced forward builds
        from the indices as they are): not here, where a model of many sparse layers would sort
        every adapter's nonzeros at each .to() or .half(), and to_empty's indices are unwritten
        memory until the load."""
        if torch.compiler.is_compiling():
            return
        for name, kind in self._kind.items():
            if kind != "sparse":
                continue
            # dropped, not checked: an inference tensor (a model loaded under inference_mode)
            # keeps no version counter, so an in-place load would pass every cache's check
            for cache in self._sparse_caches():
                cache.pop(name, None)
        self._delta_rows = None

    def _sparse_caches(self) -> tuple:
        """The caches of what is derived from a sparse adapter's indices, by adapter name."""
        pool = self._multi_pool
        return (self._sparse_layout, self._sparse_flat) + ((pool.sparse_order,) if pool is not None else ())

    @staticmethod
    def _drop_sparse_caches_hook(module, incompatible_keys) -> None:
        if isinstance(module, FusedLinear):  # patch_model shares hook tables with the nn.Linear it replaced
            module._drop_sparse_caches()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._drop_sparse_caches()
        return out

    def adapter_id(self, name: str) -> int:
        """The integer id of adapter ``name`` for ``adapter_ids`` / ``fusedlora.use_adapters``:
        process-wide (the same name has the same id in every layer) and stable while it exists."""
        self._check_name(name, must_exist=True)
        return routing.REGISTRY.id_for(name)

    def set_adapter(self, names: Union[str, Iterable[str], None]) -> None:
        """Activate one adapter, several (summed) or none (``None``: base layer only)."""
        if names is None:
            names = []
        elif isinstance(names, str):
            names = [names]
        elif not isinstance(names, Iterable):
            raise TypeError(f"names: expected an adapter name, a list of names or None, got {type(names).__name__}")
        names = list(names)
        for n in names:
            self._check_name(n, must_exist=True)
        if len(set(names)) != len(names):
            raise ValueError(f"names: duplicate adapter names in {names}")
        self._active = names

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (not while merged). If it was active, the other active ones
        stay; if none is left, the first remaining name in sorted order becomes active (PEFT)."""
        self._check_name(name, must_exist=True)
        if name in self.merged_adapters:
            raise ValueError(f"adapter name: {name!r} is merged into the weight; unmerge() first")
        for table in (self.lora_A, self.lora_B, self.scaling, self.r, self.lora_alpha, self.lora_dropout,
                      self.use_rslora, self.c3a_kernel, self.sparse_values, self.sparse_indices,
                      self.sparse_scaling, *self._sparse_caches()):
            if name in table:
                del table[name]
        del self._kind[name]
        self._multi_struct += 1
        if name in self._active:
            # PEFT's rule (BaseTunerLayer.delete_adapter): the other active adapters stay
            # active; if none is left, the first remaining adapter in sorted order (the same
            # on every layer) becomes active, with a warning.
            self._active = [n for n in self._active if n != name]
            if not self._active and self._kind:
                new = sorted(self._kind)[0]
                warnings.warn(f"Adapter {name} was active which is now deleted. Setting active adapter to {new}.",
                              stacklevel=2)
                self._active = [new]

    # ---------------------------------------------------------------- merge
    def _delta_weight(self, name: str) -> torch.Tensor:
        """The dense update of a LoRA or C3A adapter, in float32 or wider."""
        if self._kind[name] == "lora":
            return reference.lora_delta_weight(self.lora_A[name], self.lora_B[name], self.scaling[name])
        return reference.c3a_delta_weight(self.c3a_kernel[name], self.in_features, self.out_features,
                                          self.weight.dtype)

    @torch.no_grad()
    def _add_delta(self, name: str, sign: float) -> None:
        if self._kind[name] == "sparse":  # O(nnz) in place: no dense delta
            values, scaling = self.sparse_values[name], self.sparse_scaling[name]
            saved = self._sparse_saved.get(name)
            if saved is not None and not isinstance(saved.saved, torch.Tensor):
                saved = None  # saved by an older fusedlora (other fields): subtracted below
                del self._sparse_saved[name]
            if sign < 0 and saved is not None:
                exact = sparse_ops.unmerge_saved_(self.weight, saved, values, scaling)
                del self._sparse_saved[name]
                record("sparse.unmerge", "torch", "restore" if exact else "subtract")
            elif sign > 0:
                # The overwritten entries are kept (nnz of them), so that unmerging
                # restores W bit for bit: no drift over any number of switches.
                self._sparse_saved[name] = sparse_ops.merge_saving_(self.weight, *self._positions(name), values,
                                                                    scaling)
            else:  # merged before this layer kept entries (an older pickle): subtract
                sparse_ops.scatter_merge_(self.weight, self.sparse_indices[name], values, scaling, sign=-1,
                                          validate=False)
            return
        A, B = (self.lora_A[name], self.lora_B[name]) if self._kind[name] == "lora" else (None, None)
        if A is not None and A.dtype == B.dtype == self.weight.dtype and A.device == self.weight.device:
            # In place, fp32 accumulation, one rounding: no N x K temporaries.
            self.weight.addmm_(B, A, alpha=sign * self.scaling[name])
            return
        delta = sign * self._delta_weight(name)
        dt = torch.promote_types(delta.dtype, self.weight.dtype)  # a float64 W is not rounded to float32
        self.weight.copy_((self.weight.to(dt) + delta.to(self.weight.device, dt)).to(self.weight.dtype))

    def _positions(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of a sparse adapter's nonzeros in W, int64 on W's device, kept while
        its indices are unchanged: a switch then launches no index conversion."""
        idx = self.sparse_indices[name]
        device = self.weight.device

        def build():
            # checked again (range, duplicates) whenever the indices change, as the layout
            # is: load_state_dict copies unchecked ones in place, and a scatter with an
            # out-of-range column would write into the next row, a duplicate drop a value
            rows, cols = sparse_ops.check_indices(idx, tuple(self.weight.shape))
            # copies, never views of the buffer: a merge's saved positions must not move when
            # indices are loaded in place while it is merged (the unmerge restores those entries)
            return rows.to(device, torch.int64, copy=True), cols.to(device, torch.int64, copy=True)

        return self._sparse_flat.get_or_build(name, (idx,), build, extra=device)

    def merge(self, adapter_names: Optional[Iterable[str]] = None, *, safe_merge: bool = False) -> None:
        """Add s * B A of each adapter (default: the active ones; a name or a list of names,
        active or not, as PEFT) into the weight. Every name is checked before anything is
        merged. ``safe_merge=True`` (PEFT's) first checks that the merged weight would be
        finite and raises, leaving the weight as it is, for an adapter that would make it not."""
        if isinstance(adapter_names, bool):
            raise TypeError("adapter_names: expected a name, a list of names or None, got a bool; PEFT's first "
                            "positional argument is safe_merge: pass it by keyword (merge(safe_merge=True))")
        if adapter_names is None:
            names = self.active_adapters
        elif isinstance(adapter_names, str):
            names = [adapter_names]
        else:
            names = list(adapter_names)
        for n in names:
            self._check_name(n, must_exist=True)
        if self.weight.is_meta:
            raise ValueError("merge: the weight is on the meta device (no values to merge into); load or "
                             "materialise the weights first (to_empty + load_state_dict)")
        for n in names:
            if n not in self.merged_adapters:
                if safe_merge:
                    self._check_merge_finite(n)
                self._add_delta(n, 1.0)
                self.merged_adapters.append(n)

    @torch.no_grad()
    def _check_merge_finite(self, name: str) -> None:
        """PEFT's safe_merge check: W merged with adapter ``name`` (computed aside, rounded
        to W's dtype as merging rounds it) is finite everywhere."""
        W = self.weight
        if self._kind[name] == "sparse":
            _, merged = sparse_ops.merged_entries(W, *self._positions(name), self.sparse_values[name],
                                                  self.sparse_scaling[name])
            finite = bool(torch.isfinite(merged).all()) and bool(torch.isfinite(W).all())
        else:
            delta = self._delta_weight(name).to(W.device)
            finite = bool(torch.isfinite((W.to(delta.dtype) + delta).to(W.dtype)).all())
        if not finite:
            raise ValueError(f"merge: NaNs detected in the merged weights. The adapter {name!r} seems to be broken "
                             "(safe_merge: it was not merged; adapters merged before it stay merged, as in PEFT)")

    def unmerge(self) -> None:
        """Subtract every merged adapter again, last merged first (each one leaves the merged
        list once it is out of the weight: an error leaves the list true)."""
        while self.merged_adapters:
            self._add_delta(self.merged_adapters[-1], -1.0)
            self.merged_adapters.pop()

    def __getstate__(self):
        # Pickled (torch.save, deepcopy) without the caches that hold raw addresses and
        # tensors compared by identity (rebuilt on the first routed call), and without the
        # use_adapters scope it may be in (a copy made inside a scope is not routed by it).
        state = dict(super().__getstate__())
        state["_delta_rows"] = state["_multi_cache"] = state["_multi_route"] = None
        state["_last_routed"] = False
        return state

    def switch_merged(self, name: str) -> None:
        """Serve adapter ``name`` merged: unmerge what is merged, merge ``name``
        and make it the active adapter. Between sparse adapters this is an
        O(nnz) scatter on W, with no dense delta."""
        self._check_name(name, must_exist=True)
        self.unmerge()
        self.set_adapter(name)
        self.merge([name])

    # -------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, adapter_ids: Optional[torch.Tensor] = None,
                validate: bool = True) -> torch.Tensor:
        """``adapter_ids``: route each sample (ids of shape (x.shape[0],)) or row (x.shape[:-1])
        to its own adapter by ``adapter_id``; -1 = base only. Ids that name no adapter of this
        layer raise, unless ``validate=False`` (no check and no host sync, for CUDA-graph capture;
        such ids then act as -1). Without ids: the active adapters, or the ids of an enclosing
        ``fusedlora.use_adapters``."""
        if adapter_ids is not None:
            return routing.layer_forward(self, x, adapter_ids, validate=validate, strict=True)
        route = self._route_now(x)
        if route is not None and self._kind:
            return routing.layer_forward(self, x, route.ids, validate=False, strict=False, present=route.present,
                                         scope=route)
        names = [] if self.merged else self._active
        if not names:
            return F.linear(x, self.weight, self.bias)
        loras = [n for n in names if self._kind[n] == "lora"]
        others = [n for n in names if self._kind[n] != "lora"]
        if not others:
            return self._lora_forward(x, loras)
        # A C3A or sparse adapter rewrites W's tiles inside the base GEMM: the
        # first one runs fused; any further ones and the LoRA adapters beside
        # it add their (cheap, low-rank or rare) terms eagerly.
        y = self._fused_forward(x, others[0])
        for n in others[1:]:
            record(f"{self._kind[n]}.extra_adapter", "torch", "eager")
            if self._kind[n] == "c3a":  # PEFT's FFT delta in float32: w / K in 16 bits is subnormal
                y = y + reference.c3a_fft_delta(x, self.c3a_kernel[n]).to(y.dtype)
            else:
                dS = reference.sparse_delta_weight(self.sparse_indices[n], self.sparse_values[n],
                                                   self.sparse_scaling[n], tuple(self.weight.shape))
                y = y + F.linear(x, dS.to(x.dtype))
        for n in loras:
            record("lora.extra_adapter", "torch", "eager")
            y = y + self._lora_delta(x, n)
        return y

    def _route_now(self, x: torch.Tensor):
        """The use_adapters scope routing this forward, or None. A gradient checkpoint recomputes a
        forward during the backward; one that ran in a use_adapters scope, recomputed outside
        any (backward() after the scope exited), would route differently: refused, not guessed
        (the layer cannot tell which of its forwards a recomputation replays). Known when the
        layer's last forward that may build a graph (grad mode on, or an input requiring grad)
        was routed; evaluations under no_grad in between do not count. Not known for a
        reentrant checkpoint's inner layers fed by non-FusedLinear ops (their first pass runs
        under no_grad on inputs that do not require grad)."""
        route = self._multi_route
        if torch.compiler.is_compiling():
            return route
        if torch._C._current_graph_task_id() == -1:  # not inside a backward
            if torch.is_grad_enabled() or x.requires_grad:  # may build a graph (a reentrant checkpoint's
                self._last_routed = route is not None     # first pass runs under no_grad): not an evaluation
        elif route is None and getattr(self, "_last_routed", False):
            raise RuntimeError("use_adapters: a FusedLinear forward that ran in a use_adapters scope is recomputed "
                               "in backward (gradient checkpointing) outside any scope: call backward() inside the "
                               "scope, so that the recomputation routes by the same ids")
        return route

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self._kind[name] == "c3a":
            return c3a_ops.c3a_linear(x, self.weight, self.bias, self.c3a_kernel[name])
        return sparse_ops.sparse_linear(x, self.weight, self.bias, None, self.sparse_values[name],
                                        self.sparse_scaling[name], layout=self._layout(name))

    def factors(self, name: str):
        """(A, B) of LoRA adapter ``name`` in the weight's dtype, as the kernels read them: cast
        (differentiably) when the adapter is kept in another dtype (add_lora(dtype=...))."""
        A, B, dt = self.lora_A[name], self.lora_B[name], self.weight.dtype
        if ops.autocasting(self.weight.device):
            return A, B  # autocast casts them once, straight to its own dtype
        return (A if A.dtype == dt else A.to(dt)), (B if B.dtype == dt else B.to(dt))

    def _lora_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = self.lora_dropout[name] if self.training else 0.0
        A, B = self.factors(name)
        return self.scaling[name] * F.linear(F.linear(F.dropout(x, p, True), A), B)

    def _lora_forward(self, x: torch.Tensor, names: List[str]) -> torch.Tensor:
        p = [self.lora_dropout[n] if self.training else 0.0 for n in names]
        A, B = zip(*[self.factors(n) for n in names])
        if len(names) == 1:
            return ops.lora_linear(x, self.weight, self.bias, A[0], B[0], self.scaling[names[0]], p[0])
        if not any(p):
            # Several adapters without dropout are one adapter of rank sum(r):
            # stack them (scales folded into B) and run a single fused pass.
            B = torch.cat([b * self.scaling[n] for n, b in zip(names, B)], dim=1)
            return ops.lora_linear(x, self.weight, self.bias, torch.cat(A, dim=0), B, 1.0, 0.0)
        # Dropout draws an independent mask per adapter (as PEFT does): the
        # first adapter runs fused with the base GEMM, the others eagerly.
        y = ops.lora_linear(x, self.weight, self.bias, A[0], B[0], self.scaling[names[0]], p[0])
        for n in names[1:]:
            record("lora.extra_adapter", "torch", "eager")
            y = y + self._lora_delta(x, n)
        return y

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if not self._kind:
            return base

        def describe(n):
            if self._kind[n] == "lora":
                return f"{n}(lora r={self.r[n]}, s={self.scaling[n]:g})"
            if self._kind[n] == "c3a":
                return f"{n}(c3a b={self.c3a_kernel[n].shape[2]})"
            return f"{n}(sparse nnz={self.sparse_values[n].numel()}, s={self.sparse_scaling[n]:g})"

        ads = ", ".join(describe(n) for n in self.adapter_names)
        return f"{base}, adapters=[{ads}], active={self._active}, merged={self.merged_adapters}"
