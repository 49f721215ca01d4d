"""Adapter routing for FusedLinear: global adapter ids, the per-layer unified
LoRA pool, and the layer- and model-level entry points (``layer(x,
adapter_ids=...)``, ``use_adapters``). The fused ops they call live in
fusedlora.multi; docs/multi.md has the design note.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference, weight_delta_rows
from .backend import record, select_backend
from .derived import DerivedCache, optimizer_steps, outside_inference_mode, same_key, version
from .multi import _INT_DTYPES, _multi_forward, share_routing


# ------------------------------------------------------------------ global ids
class _Registry:
    """name -> process-wide integer id, assigned on first use, never reused."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ids: Dict[str, int] = {}

    def id_for(self, name: str) -> int:
        with self._lock:
            i = self._ids.get(name)
            if i is None:
                i = self._ids[name] = len(self._ids)
            return i

    def get(self, name: str) -> Optional[int]:
        return self._ids.get(name)

    def __len__(self) -> int:
        return len(self._ids)

    def names(self) -> Dict[int, str]:
        return {i: n for n, i in self._ids.items()}


REGISTRY = _Registry()


def _id_of(name: str) -> int:
    """The name's id, registered now if new (without the registry's lock where it is known:
    Dynamo cannot enter a lock, and every name of a layer is known from its add or unpickling)."""
    i = REGISTRY.get(name)
    return REGISTRY.id_for(name) if i is None else i


def adapter_id(name: str) -> int:
    """The process-wide id of adapter ``name`` (assigned now if the name is new)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name: expected a non-empty string, got {name!r}")
    return REGISTRY.id_for(name)


def pack_loras(As: List[Optional[Tensor]], Bs: List[Optional[Tensor]], scalings: List[float], device=None):
    """Pool arguments of ``multi_lora_linear`` for slots 0..S-1 (a None A is a slot of rank 0):
    (pool_A, pool_BT, slot_off, slot_rank, slot_scale, max_rank); differentiable in As and Bs."""
    if not len(As) == len(Bs) == len(scalings):
        raise ValueError(f"As, Bs, scalings: expected one entry per slot each, got {len(As)}, {len(Bs)} and "
                         f"{len(scalings)}")
    ref = next((a for a in As if a is not None), None)
    if ref is None:
        raise ValueError("As: expected at least one adapter (a tensor of shape (r, in_features)), got only None")
    device = ref.device if device is None else device
    offs, ranks, off = [], [], 0
    for s, (A, B) in enumerate(zip(As, Bs)):
        if (A is None) != (B is None) or (A is not None and (A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]
                                                             or A.shape[1] != ref.shape[1])):
            raise ValueError(f"As[{s}], Bs[{s}]: expected A (r, {ref.shape[1]}) and B (out_features, r) of one rank "
                             f"(or both None), got {None if A is None else tuple(A.shape)} and "
                             f"{None if B is None else tuple(B.shape)}")
        r = 0 if A is None else A.shape[0]
        offs.append(off)
        ranks.append(r)
        off += r
    pool_A = torch.cat([A for A in As if A is not None])
    pool_BT = torch.cat([B.t() for B in Bs if B is not None])
    return (pool_A, pool_BT, torch.tensor(offs, dtype=torch.int32, device=device),
            torch.tensor(ranks, dtype=torch.int32, device=device),
            torch.tensor([float(s) for s in scalings], dtype=torch.float32, device=device), max(ranks))


# --------------------------------------------------------------------- pool
@dataclass
class _Entry:
    off: int
    rank: int
    key: tuple
    # the parameters as last copied (detached: their storage stays alive, so a `p.data = new`
    # cannot hand the old address back to the key) and whether both were frozen then
    held: tuple = ()
    frozen: bool = False


@dataclass
class Tables:
    """Device tables of one layer's adapters (slot = position in the layer's adapter order)."""

    id_to_slot: Tensor   # int32 (max id + 2,): index id -> slot; -1 for others' ids and the last entry,
                         # which id -1 (negative indexing) and ids clamped from above land on
    slot_off: Tensor     # int32 (S,)
    slot_rank: Tensor    # int32 (S,); 0 for C3A / sparse slots
    slot_scale: Tensor   # float32 (S,)
    slot_drop: Tensor    # float32 (S,): lora_dropout (applied in training mode only)
    max_rank: int
    max_drop: float
    names: Tuple[str, ...]
    kinds: Tuple[str, ...]
    slot_ids: Tuple[int, ...]  # the global id of each slot: what id_to_slot maps (layers sharing it share row slots)


def _param_key(A: Tensor, B: Tensor) -> tuple:
    # The parameters themselves (compared by identity: a replaced parameter is
    # a new object), their storage (``p.data = t`` keeps the object and its
    # version), their in-place version counters (inference tensors have none: a
    # fresh object, equal to nothing, so that they are copied every sync) and the
    # optimizer steps so far (a fused step bumps no version).
    return (A, version(A, object()), A.data_ptr(), B, version(B, object()), B.data_ptr(), optimizer_steps())


class AdapterPool:
    """A layer's LoRA adapters in one growable pool (see the module docstring)."""

    def __init__(self):
        self.A: Optional[Tensor] = None     # (capacity, in_features)
        self.BT: Optional[Tensor] = None    # (capacity, out_features)
        self.used = 0                       # rows handed out (live + dead)
        self.dead = 0                       # rows of deleted adapters not reclaimed yet
        self.entries: Dict[str, _Entry] = {}
        self.layout_version = 0
        self.copied_rows = 0                # rows written since creation (tests check amortisation)
        self.sparse_order = DerivedCache()  # sparse adapters' nonzeros sorted by output row
        self._cast: Optional[tuple] = None  # (what it was cast from, A, BT) in another dtype

    def __setstate__(self, state) -> None:
        self.__dict__.update(AdapterPool().__dict__)  # what an older pickle lacks
        self.__dict__.update(state)
        if not isinstance(self.sparse_order, DerivedCache):  # pickled before it was one: a plain dict
            self.sparse_order = DerivedCache()

    # ---- rows
    def _reset(self, K: int, N: int, device, dtype) -> None:
        self.A = torch.empty((0, K), device=device, dtype=dtype)
        self.BT = torch.empty((0, N), device=device, dtype=dtype)
        self.used = self.dead = 0
        self.entries.clear()
        self.layout_version += 1

    def _grow(self, need: int) -> None:
        cap = self.A.shape[0]
        if self.used + need <= cap:
            return
        new_cap = max(self.used + need, 2 * cap, 16)
        for attr in ("A", "BT"):
            old = getattr(self, attr)
            buf = old.new_zeros((new_cap, old.shape[1]))
            buf[:self.used] = old[:self.used]
            setattr(self, attr, buf)

    def _compact(self) -> None:
        """Move live rows to the front, in order: O(live rows), paid for by the dead ones."""
        pos = 0
        for e in sorted(self.entries.values(), key=lambda e: e.off):
            if e.off != pos:
                self.A[pos:pos + e.rank] = self.A[e.off:e.off + e.rank].clone()
                self.BT[pos:pos + e.rank] = self.BT[e.off:e.off + e.rank].clone()
                e.off = pos
            pos += e.rank
        self.used, self.dead = pos, 0
        self.layout_version += 1

    def _free(self, name: str) -> None:
        e = self.entries.pop(name)
        self.dead += e.rank
        if e.off + e.rank == self.used:  # the last block: just give the rows back
            self.used -= e.rank
            self.dead -= e.rank
        if self.dead > self.used - self.dead:
            self._compact()
        self.layout_version += 1

    @torch.no_grad()
    def _write(self, name: str, A: Tensor, B: Tensor, key: tuple) -> None:
        r = A.shape[0]
        e = self.entries.get(name)
        if e is not None and e.rank != r:
            self._free(name)
            e = None
        if e is None:
            self._grow(r)
            e = self.entries[name] = _Entry(self.used, r, ())
            self.used += r
            self.layout_version += 1
        self.A[e.off:e.off + r] = A
        self.BT[e.off:e.off + r] = B.t()
        e.key, e.held = key, (A, B)
        self.copied_rows += r

    def sync(self, layer) -> None:
        """Bring the pool up to date with the layer's LoRA parameters (copies only what changed)."""
        W = layer.weight
        if self.A is None or self.A.device != W.device or self.A.dtype != W.dtype or \
                self.A.shape[1] != W.shape[1] or self.BT.shape[1] != W.shape[0]:
            self._reset(W.shape[1], W.shape[0], W.device, W.dtype)
        kinds = layer._kind
        for name in [n for n in self.entries if kinds.get(n) != "lora"]:
            self._free(name)
        for name, kind in kinds.items():
            if kind != "lora":
                continue
            A, B = layer.lora_A[name], layer.lora_B[name]
            e = self.entries.get(name)
            key = _param_key(A, B)
            frozen = not (A.requires_grad or B.requires_grad)
            if e is None or not same_key(e.key, key):
                _check_poolable(layer, name, A, B)
                if e is not None and same_key(e.key[:-1], key[:-1]) and frozen and e.frozen:
                    # only an optimizer step moved the key, and the adapter was frozen already
                    # when last copied (no optimizer steps frozen parameters): no write, so a
                    # graph that saved the pool for its backward stays valid. One frozen since
                    # (train, freeze, serve) may have been stepped before: copied again
                    e.key = key
                    continue
                self._write(name, A.detach(), B.detach(), key)
                self.entries[name].frozen = frozen

    def cast(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """The live rows of A and BT in ``dtype`` (a float32 model's pool under autocast), cast
        once and kept until the pool's rows change (a sync's copy bumps their versions)."""
        key = (dtype, self.used, self.A.data_ptr(), version(self.A, object()), self.BT.data_ptr(),
               version(self.BT, object()))
        if self._cast is None or not same_key(self._cast[0], key):
            with outside_inference_mode():
                self._cast = (key, self.A[:self.used].to(dtype), self.BT[:self.used].to(dtype))
        return self._cast[1], self._cast[2]

    # ---- tables
    def tables(self, layer, pooled: bool) -> Tables:
        """Device tables for the pool (pooled) or for the torch.cat of the parameters in layer order."""
        kinds = layer._kind
        names = tuple(kinds)
        ranks = tuple(layer.r[n] if kinds[n] == "lora" else 0 for n in names)
        scales = tuple(float(layer.scaling[n]) if kinds[n] == "lora" else 0.0 for n in names)
        drops = tuple(float(layer.lora_dropout[n]) if kinds[n] == "lora" else 0.0 for n in names)
        if pooled:
            offs = tuple(self.entries[n].off if kinds[n] == "lora" else 0 for n in names)
        else:
            offs, o = [], 0
            for r in ranks:
                offs.append(o)
                o += r
            offs = tuple(offs)
        ids = tuple(_id_of(n) for n in names)
        key = (names, tuple(kinds.values()), ranks, scales, drops, offs, ids, layer.weight.device)
        t = _TABLES.get(key)
        if t is None:
            t = _build_tables(names, tuple(kinds.values()), ranks, scales, drops, offs, ids, layer.weight.device)
            if len(_TABLES) >= 256:
                _TABLES.clear()
            _TABLES[key] = t
        return t


# Tables by content, shared by the layers that hold the same adapters at the same pool rows
# (a model's layers mostly do): a routed batch's per-row plan derived from them and from the
# shared row slots is then built once per forward pass (multi.shared_plan). Never written in place.
_TABLES: Dict[tuple, "Tables"] = {}


def layer_tables(layer) -> Tables:
    """Tables for the torch.cat of the layer's parameters in layer order, built without any
    cache (the torch.compile path: every value is a constant of the graph)."""
    kinds = layer._kind
    names = tuple(kinds)
    ranks = tuple(layer.r[n] if kinds[n] == "lora" else 0 for n in names)
    scales = tuple(float(layer.scaling[n]) if kinds[n] == "lora" else 0.0 for n in names)
    drops = tuple(float(layer.lora_dropout[n]) if kinds[n] == "lora" else 0.0 for n in names)
    offs, o = [], 0
    for r in ranks:
        offs.append(o)
        o += r
    ids = tuple(_id_of(n) for n in names)
    return _build_tables(names, tuple(kinds.values()), ranks, scales, drops, tuple(offs), ids, layer.weight.device)


def _build_tables(names, kinds, ranks, scales, drops, offs, ids, device) -> Tables:
    table = [-1] * (max(ids, default=-1) + 2)
    for slot, i in enumerate(ids):
        table[i] = slot
    i32 = dict(dtype=torch.int32, device=device)
    return Tables(torch.tensor(table, **i32), torch.tensor(list(offs), **i32), torch.tensor(list(ranks), **i32),
                  torch.tensor(list(scales), dtype=torch.float32, device=device),
                  torch.tensor(list(drops), dtype=torch.float32, device=device), max(ranks, default=0),
                  max(drops, default=0.0), tuple(names), tuple(kinds), tuple(ids))


def _check_poolable(layer, name: str, A: Tensor, B: Tensor) -> None:
    """The pool holds adapters in the weight's dtype (one kept in another float dtype,
    add_lora(dtype=...), is cast as it is pooled); on another device they cannot be pooled.
    Their shapes must be the layer's record of them: the tables are sized by ``layer.r``."""
    W = layer.weight
    r = layer.r[name]
    if tuple(A.shape) != (r, W.shape[1]) or tuple(B.shape) != (W.shape[0], r):
        raise ValueError(f"lora_A[{name!r}], lora_B[{name!r}]: expected shapes ({r}, {W.shape[1]}) and "
                         f"({W.shape[0]}, {r}) (rank {r} as added), got {tuple(A.shape)} and {tuple(B.shape)}; "
                         "replace an adapter by delete_adapter + add_lora")
    for pname, t in ((f"lora_A[{name!r}]", A), (f"lora_B[{name!r}]", B)):
        if t.device != W.device or not t.is_floating_point():
            raise TypeError(f"{pname}: a {t.dtype} tensor on {t.device}; the multi-adapter path pools floating "
                            f"adapters on the weight's device ({W.device})")


# ------------------------------------------------------------ layer forward
def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def ids_per_row(ids, x: Tensor) -> Tensor:
    """Check ``ids`` against x and return one id per row of x.reshape(-1, K), in ids' dtype
    (a view where it can be)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"adapter_ids: expected an integer torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in _INT_DTYPES:
        raise TypeError(f"adapter_ids: expected an integer dtype (int64, int32, int16, int8 or uint8), got {ids.dtype}")
    if ids.device != x.device:
        raise ValueError(f"adapter_ids: device {ids.device} does not match x's device {x.device}")
    lead = tuple(x.shape[:-1])
    if tuple(ids.shape) == lead:
        rows = ids.reshape(-1)
    elif x.dim() >= 2 and ids.dim() == 1 and ids.shape[0] == x.shape[0]:
        rows = ids.reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead).reshape(-1)
    else:
        per_sample = f"one id per sample (shape ({x.shape[0]},)) or " if x.dim() > 1 else ""
        raise ValueError(f"adapter_ids: expected {per_sample}one id per row (shape {lead}) of x of shape "
                         f"{tuple(x.shape)}, got {tuple(ids.shape)}")
    return rows


def _bad_ids_error(layer, row_ids: Tensor, row_slot: Tensor, tables: Tables) -> ValueError:
    bad = sorted(set(row_ids[(row_slot < 0) & (row_ids != -1)].tolist()))
    known = REGISTRY.names()
    described = [f"{i} ({known[i]!r}, not in this layer)" if i in known else str(i) for i in bad[:8]]
    have = {n: REGISTRY.id_for(n) for n in tables.names}
    return ValueError(f"adapter_ids: {', '.join(described)}{' ...' if len(bad) > 8 else ''} name no adapter of "
                      f"this layer; its adapters are {have} (use -1 for the base layer, layer.adapter_id(name) "
                      "for an id)")


def _fingerprint(layer, params) -> tuple:
    """What the cached pool and tables of a layer depend on, read at C speed where it can:
    adapter adds/deletes (the layer's counter), parameter identity (a replaced parameter),
    storage (``p.data = t``), in-place versions (copy_, load_state_dict, optimizer steps),
    optimizer steps (fused ones bump no version), scalings, requires_grad, grad mode, the
    weight's dtype and device."""
    W = layer.weight
    grad = torch.is_grad_enabled()
    return (layer._multi_struct, grad, W.dtype, W.device, optimizer_steps(),
            tuple(map(id, layer.lora_A._parameters.values())), tuple(map(id, layer.lora_B._parameters.values())),
            tuple(layer.scaling.values()), tuple(layer.lora_dropout.values()),
            tuple([version(p, object()) for p in params]), tuple([p.data_ptr() for p in params]),
            # requires_grad only matters with grad mode on (inference skips reading it)
            tuple([p.requires_grad for p in params]) if grad else None)


def _prepare(layer, compiling: bool):
    """(tables, pool_A, pool_BT, LoRA names): pool_A/pool_BT are the synchronised pool, or
    None when the call must build the differentiable torch.cat of the parameters instead.
    Eager calls reuse the previous answer while the layer's fingerprint is unchanged, so a
    serving loop pays O(adapters) C-speed checks per call, not a Python resync."""
    kinds = layer._kind
    if compiling:
        return layer_tables(layer), None, None, [n for n in kinds if kinds[n] == "lora"]
    cached = layer._multi_cache
    if cached is not None and _fingerprint(layer, cached[0]) == cached[1]:
        return cached[2]
    loras = [n for n in kinds if kinds[n] == "lora"]
    params = [p for n in loras for p in (layer.lora_A[n], layer.lora_B[n])]
    differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if layer._multi_pool is None:
        layer._multi_pool = AdapterPool()
    pool = layer._multi_pool
    with outside_inference_mode():  # the pool and tables serve later calls outside inference mode too
        if loras and not differentiable:
            pool.sync(layer)
        tables = pool.tables(layer, pooled=bool(loras) and not differentiable)
        if loras and not differentiable:
            answer = (tables, pool.A[:pool.used], pool.BT[:pool.used], loras)
        else:
            answer = (tables, None, None, loras)
    # the detached params hold their storage: an address in the fingerprint cannot come back
    # to another tensor (p.data = new, twice) while the answer is cached
    layer._multi_cache = (params, _fingerprint(layer, params), answer, [p.detach() for p in params])
    return answer


def layer_forward(layer, x: Tensor, ids: Tensor, validate: bool = True, strict: bool = True,
                  present: Optional[frozenset] = None, scope: Optional["_Route"] = None) -> Tensor:
    """FusedLinear's forward with per-row adapters (FusedLinear.forward(x, adapter_ids=...) calls this).

    ``strict``: an id that names no adapter of this layer is an error (when
    validating); otherwise (use_adapters) it serves that row with the base.
    ``present`` (global ids of the batch, known to use_adapters) narrows the
    C3A / sparse deltas to the adapters in the batch. ``scope``: the use_adapters
    scope whose ids these are (its layers share their row slots within a forward pass).
    """
    from .ops import autocast_inputs, check_linear_args, rows_of

    if layer.merged:
        raise ValueError(f"adapter_ids: adapters {layer.merged_adapters} are merged into the weight; unmerge() "
                         "before routing rows to adapters")
    # under torch.autocast: x, W and b as F.linear would see them (the pools follow below);
    # checked after the casts, as a 16-bit x from the layer before meets float32 W here
    x, W, b = autocast_inputs(x, layer.weight, layer.bias)
    check_linear_args(x, W, b)
    row_ids = ids_per_row(ids, x)
    kinds = layer._kind
    compiling = _compiling()
    tables, pool_A, pool_BT, loras = _prepare(layer, compiling)
    differentiable = pool_A is None
    row_slot = scope.row_slot(x, tables) if scope is not None else None
    if row_slot is None:
        row_ids = row_ids.long()
        table = tables.id_to_slot
        row_slot = table[row_ids.clamp(-1, table.shape[0] - 1)]  # two launches, int32 out: decode pays per launch
        if scope is not None:
            scope.keep(x, tables, row_slot)

    counts = None
    if validate and x.device.type != "meta":  # meta tensors hold no ids to check: shapes only
        bad = (row_slot < 0) & (row_ids != -1) if strict else None
        if compiling:
            if bad is not None:
                torch._assert_async(~bad.any(), "adapter_ids: an id names no adapter of this layer")
        else:
            others = [s for s, k in enumerate(tables.kinds) if k != "lora"]
            flags = torch.stack([bad.any()]) if bad is not None else row_slot.new_zeros(1, dtype=torch.bool)
            if others:
                counts = torch.bincount((row_slot + 1).long(), minlength=len(kinds) + 1)[1:]
                host = torch.cat([flags.long(), counts]).tolist()
                counts = host[1:]
            else:
                host = flags.long().tolist()
            if host[0]:
                raise _bad_ids_error(layer, row_ids, row_slot, tables)

    lead = x.shape[:-1]
    x2 = rows_of(x)
    if loras:
        if differentiable:
            for n in loras:
                _check_poolable(layer, n, layer.lora_A[n], layer.lora_B[n])
            factors = [layer.factors(n) for n in loras]  # in W's dtype, differentiably
            pool_A = torch.cat([A for A, _ in factors])
            pool_BT = torch.cat([B.t() for _, B in factors])
        from .ops import draw_seed, pick

        p_max = tables.max_drop if layer.training else 0.0
        if pool_A.dtype != x2.dtype:  # autocast cast x (the pools are in W's dtype otherwise)
            if differentiable:  # the torch.cat of the parameters, made for this call
                pool_A, pool_BT = pool_A.to(x2.dtype), pool_BT.to(x2.dtype)
            else:  # the synchronised pool: cast once, not at every call of a serving loop
                pool_A, pool_BT = layer._multi_pool.cast(x2.dtype)
        op = pick(_multi_forward, x2, W, b, pool_A, pool_BT)
        y, _ = op(x2, W, b, pool_A, pool_BT, row_slot,
                  tables.slot_off, tables.slot_rank, tables.slot_scale, tables.slot_drop, tables.max_rank,
                  p_max > 0, draw_seed(p_max))
    else:
        y = F.linear(x2, W, b)
        record("multi.base", "torch", "linear")
    # C3A and sparse rows. For inference on decode-sized batches: every such row's delta in
    # one launch (weight_delta_rows; skipped when validation counted no such row; y is
    # fresh and in no graph). Otherwise each adapter's delta, added to its rows only,
    # differentiably: when the validation sync brought the rows per slot to the host, the
    # rows of a slot are a slice of one device sort (no further sync); the torch backend
    # selects them with nonzero (syncs are fine there); else (validate=False, CUDA graphs,
    # torch.compile) the delta is computed for all rows and masked: no host sync.
    with_rows = [k for k, c in zip(tables.kinds, counts or tables.kinds) if k != "lora" and (counts is None or c)]
    if with_rows and not compiling and not y.requires_grad and \
            weight_delta_rows.serves(layer, x2, tables.names, tables.kinds) and \
            weight_delta_rows.add_rows_(layer, y, x2, row_slot, tables.names, tables.kinds, with_rows):
        return y.reshape(*lead, layer.out_features)
    sorted_rows = counts is not None  # counted only by an eager validation
    gather = sorted_rows or (not compiling and select_backend(x.device) == "torch" and not x.is_meta)
    order = None
    for slot, (name, kind) in enumerate(zip(tables.names, tables.kinds)):
        if kind == "lora" or x2.shape[0] == 0:  # no rows: no delta (and no FFT of 0 rows)
            continue
        if counts is not None and counts[slot] == 0:
            continue
        if present is not None and REGISTRY.get(name) not in present:
            continue
        if gather:
            if sorted_rows:
                if order is None:  # base rows (slot -1) first, then slot 0, 1, ...
                    order = torch.argsort(row_slot, stable=True)
                    first = row_slot.shape[0] - sum(counts)
                start = first + sum(counts[:slot])
                rows = order[start:start + counts[slot]]
            else:
                rows = torch.nonzero(row_slot == slot).squeeze(1)
                if rows.numel() == 0:
                    continue
            delta = _kind_delta(layer, name, kind, x2.index_select(0, rows))
            y = y.index_add(0, rows, delta.to(y.dtype))
            record(f"multi.{kind}_delta", "torch", "sorted" if sorted_rows else "gathered")
        else:
            delta = _kind_delta(layer, name, kind, x2)
            mask = (row_slot == slot)[:, None]
            y = (y.to(delta.dtype) + torch.where(mask, delta, torch.zeros((), dtype=delta.dtype, device=y.device))
                 ).to(x2.dtype)
            record(f"multi.{kind}_delta", "torch", "masked")
    return y.reshape(*lead, layer.out_features)


def _kind_delta(layer, name: str, kind: str, x2: Tensor) -> Tensor:
    if kind == "c3a":
        return reference.c3a_fft_delta(x2, layer.c3a_kernel[name])
    return _sparse_delta(layer, name, x2)


def _sparse_delta(layer, name: str, x2: Tensor) -> Tensor:
    """scaling * x S^T for all rows (M x N, float32 or wider), as a weighted embedding_bag over
    the nonzeros sorted by output row: O(M * nnz) work, O(M * N) memory. The row order is
    cached per adapter in eager mode (keyed by the indices buffer and its version)."""
    indices = layer.sparse_indices[name]
    values = layer.sparse_values[name]
    N = layer.out_features
    pool = None if _compiling() else layer._multi_pool

    def build():
        rows, cols = indices[0].long(), indices[1].long()
        order = torch.argsort(rows * layer.in_features + cols)
        offsets = torch.searchsorted(rows[order], torch.arange(N, device=rows.device))
        return order, cols[order], offsets

    # kept per adapter while its indices are unchanged (the same tensor, address and version)
    order, cols, offsets = build() if pool is None else pool.sparse_order.get_or_build(name, (indices,), build)
    dt = torch.promote_types(x2.dtype, torch.float32)
    w = values[order].to(dt) * layer.sparse_scaling[name]
    out = F.embedding_bag(cols, x2.to(dt).t(), offsets, mode="sum", per_sample_weights=w)  # (N, M)
    return out.t()


# ---------------------------------------------------------------- use_adapters
class _Route:
    """The ids of a use_adapters scope, as its FusedLinears read them (``route.ids``,
    ``route.present``). ``present``: the global ids of the batch (narrows the C3A /
    sparse deltas to the adapters in it), or None when not validated. The ids were
    checked at entry; if they are then changed in place (a serving loop reusing its
    ids buffer: the tensor's version moves), the first forward that sees it checks them
    again (one sync per change, not per layer), so that neither the check nor the
    narrowing goes stale. Inference tensors keep no version: changes to them in place
    are not seen (use a normal tensor, or validate=False)."""

    def __init__(self, ids: Tensor, validate: bool, layers: list):
        self.ids, self.validate, self._layers = ids, validate, layers
        # meta ids hold no values to check: shapes only
        self._present = _check_model_ids(layers, ids) if validate and not ids.is_meta else None
        self._version = version(ids)
        self._rows: Dict[tuple, Tensor] = {}  # this forward pass's row slots, by _rows_key
        self._in_pass = 0  # forwards of the scope's model under way (its hooks count them)

    # Row slots shared by the layers of one forward pass of the scope's model: a model's
    # layers mostly hold the same adapters in the same order, so the first layer's id -> slot
    # lookup, and the sort of its rows (multi.routing_of), serve them all instead of ~15 small
    # launches per layer. Only inside a forward of the model given to use_adapters (hooks
    # mark its start and end), so ids changed between calls are always looked up afresh,
    # inference tensors and writes through .data included; a submodule called on its own
    # computes its own.
    def begin_pass(self) -> None:
        if not self._in_pass:
            self._rows.clear()
        self._in_pass += 1  # the model may call itself: the pass is the outermost call

    def end_pass(self) -> None:
        self._in_pass = max(self._in_pass - 1, 0)
        if not self._in_pass:
            self._rows.clear()

    def _rows_key(self, x: Tensor, tables: Tables):
        if not self._in_pass or _compiling() or x.is_meta or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None  # outside a pass, traced or captured: every layer computes its own (in the graph)
        slot_ids = getattr(tables, "slot_ids", None)  # None: Tables unpickled from an older version
        if slot_ids is None:
            return None
        return (tuple(x.shape[:-1]), x.device, slot_ids, version(self.ids), torch.is_inference_mode_enabled())

    def row_slot(self, x: Tensor, tables: Tables) -> Optional[Tensor]:
        """The row slots computed by another layer of this pass, or None."""
        key = self._rows_key(x, tables)
        return self._rows.get(key) if key is not None else None

    def keep(self, x: Tensor, tables: Tables, row_slot: Tensor) -> None:
        key = self._rows_key(x, tables)
        if key is not None:
            self._rows[key] = row_slot
            share_routing(row_slot)

    @property
    def present(self) -> Optional[frozenset]:
        if self._present is None or _compiling() or version(self.ids) == self._version:
            return self._present
        self._present = _check_model_ids(self._layers, self.ids)
        self._version = version(self.ids)
        return self._present


def _check_model_ids(layers, ids: Tensor) -> frozenset:
    """The ids of the batch (one sync); raise if one is neither -1 nor an adapter of some layer."""
    known = {REGISTRY.id_for(n) for m in layers for n in m._kind}
    present = frozenset(int(i) for i in torch.unique(ids).tolist())
    bad = sorted(i for i in present if i != -1 and i not in known)
    if bad:
        names = REGISTRY.names()
        described = [f"{i} ({names[i]!r})" if i in names else str(i) for i in bad[:8]]
        have = {n: REGISTRY.id_for(n) for n in sorted({n for m in layers for n in m._kind})}
        raise ValueError(f"ids: {', '.join(described)} name no adapter of any FusedLinear in the model; "
                         f"its adapters are {have} (-1 = base)")
    return present


def adapter_ids(names, device=None) -> Tensor:
    """PEFT's mixed-batch ``adapter_names`` (one name per sample, ``"__base__"``
    for the base model) as the id tensor that ``use_adapters`` takes."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names: expected a list of adapter names, got {names!r}")
    ids = []
    for n in names:
        i = -1 if n == "__base__" else REGISTRY.get(n)
        if i is None:
            raise ValueError(f"names: no adapter named {n!r} was ever added; known: {sorted(REGISTRY.names().values())}")
        ids.append(i)
    return torch.tensor(ids, dtype=torch.int64, device=device)


@contextlib.contextmanager
def use_adapters(model: torch.nn.Module, ids: Tensor, validate: bool = True):
    """Route every FusedLinear inside ``model`` by ``ids`` for the forwards in this scope.

    ``ids``: one global adapter id per sample (x.shape[0] of every layer's
    input) or per row; -1 = base only. Works with an unmodified model (the
    ids never pass through forward signatures). With ``validate`` the ids are
    checked here (one host sync, and again if ``ids`` is changed in place
    within the scope): each must be -1 or name an adapter of
    some FusedLinear of the model. A layer that lacks a row's adapter serves
    that row with its base weights, as PEFT does for layers outside
    ``target_modules``. ``validate=False``: no check and no sync (CUDA-graph
    capture); unknown ids act as -1.
    """
    from .module import FusedLinear

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(ids, torch.Tensor) or ids.dtype not in _INT_DTYPES:
        raise TypeError(f"ids: expected an integer torch.Tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    layers = [m for m in model.modules() if isinstance(m, FusedLinear)]
    route_ = _Route(ids, validate, layers)
    saved = [(m, m._multi_route) for m in layers]
    for m in layers:
        m._multi_route = route_
    _pass_hooks(model)
    model.__dict__["_fusedlora_routed_layers"] = layers  # cleared by the next plain training pass
    outer = model.__dict__.get("_fusedlora_route")
    model.__dict__["_fusedlora_route"] = route_
    try:
        yield model
    finally:
        model.__dict__["_fusedlora_route"] = outer
        for m, prev in saved:
            m._multi_route = prev


def _pass_hooks(model: torch.nn.Module) -> None:
    """A forward pre-hook and an always-called forward hook on ``model`` that mark a pass of
    its current use_adapters scope: registered once per model and kept (a new pair per scope
    would make a compiled model recompile at every scope)."""
    hooks = model.__dict__.get("_fusedlora_pass_hooks")
    if hooks is None or hooks[0].id not in model._forward_pre_hooks or hooks[1].id not in model._forward_hooks:
        if hooks is not None:  # a user cleared one of them (model._forward_hooks.clear()): a fresh pair
            for h in hooks:
                h.remove()
        model.__dict__["_fusedlora_pass_hooks"] = (model.register_forward_pre_hook(_begin_pass),
                                                   model.register_forward_hook(_end_pass, always_call=True))


def _begin_pass(model, *_) -> None:
    if _compiling():
        return
    route_ = model.__dict__.get("_fusedlora_route")
    if route_ is not None:
        route_.begin_pass()
    elif torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
        # a training pass of the model outside any scope: its layers' checkpoints recompute this
        # pass's forwards, not the routed ones before it, so the layers' "last forward was
        # routed" is stale (a reentrant checkpoint's inner layers run their first pass under
        # no_grad and would not reset it themselves)
        for layer in model.__dict__.pop("_fusedlora_routed_layers", ()):
            layer._last_routed = False


def _end_pass(model, *_) -> None:
    route_ = None if _compiling() else model.__dict__.get("_fusedlora_route")
    if route_ is not None:
        route_.end_pass()
