"""Multi-adapter rows: a batch of T tokens spread over A LoRA adapters, each row its own adapter.

Implementations, all timed on the same random input sets (x, W, b and A
adapters of the row's ranks; B random, not PEFT's zeros):
  multi    FusedLinear(x, adapter_ids=ids, validate=False) under the default dispatch (pool
           built and synchronised in setup, as a serving loop would have it): above 16 rows
           (multi.CUBLAS_BASE_ROWS) F.linear, then the SGMV/BGMV terms added into its output
  fused    the same with the base GEMM fused at every row count (multi.use_fused_base): the
           adapters' terms in the epilogue of fusedlora's Triton GEMM
  single   fusedlora.ops.lora_linear with ONE adapter of the batch's mean rank for every
           row: the roofline of this problem (what a batch of one adapter costs)
  base     F.linear(x, W, b) alone
  delta    F.linear, then fusedlora.add_multi_lora_ into its output: the delta-only form for a
           base computed elsewhere (quantized GEMMs), inference only
  scoped   multi's layer and LAYERS-1 copies of it, each on x, in one use_adapters pass: the
           time per layer of a model's forward, where the layers share one routing (the first
           layer's id -> slot lookup and sort); inference only
  gather   the eager gather + bmm baseline: adapters padded to the largest rank and
           stacked, A[ids] and B[ids] gathered per row, two bmm (skipped above 4 GiB)
  peft     peft.tuners.lora.Linear with the A adapters, mixed batch (adapter_names=):
           PEFT's Python loop over the adapters of the batch (forward only)
Variants:
  fwd <ranks>  forward; ranks "mixed" cycles {8, 16, 64} over the adapters, "r16" is all
               rank 16 (the issue's decode goal: T=64, A=64, distinct), "r8"/"r64"/"r8+64"
               check that time follows the actual ranks, not the largest
  fwd+bwd      forward and backward, gradients of x and of every adapter (multi-tenant
               fine-tuning; PEFT's mixed batch has no training mode)
Distributions of the ids: uniform (random), zipf (p(a) ~ 1/(a+1)), distinct (row i uses
adapter i mod A: consecutive rows always differ).
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from fusedlora import FusedLinear, add_multi_lora_, multi, ops

from .harness import frozen_linear, Case, Options, Skip, base_thunk, elem_size, grad_thunk, matmul_flops, numel_bytes

PATH = "multi"
SCALING = 2.0      # lora_alpha = 2 r
RANKS = {"mixed": (8, 16, 64), "r16": (16,), "r8": (8,), "r64": (64,), "r8+64": (8, 64)}
DISTS = ("uniform", "zipf", "distinct")
GATHER_LIMIT = 4 * 2**30


def shapes(opts: Options):
    """(variant, shape) pairs."""
    if opts.smoke:
        return [("fwd mixed", dict(T=t, A=2, K=64, N=64, dist="uniform")) for t in (1, 16)] + \
               [("fwd+bwd", dict(T=16, A=2, K=64, N=64, dist="uniform"))]
    K = N = 4096
    out = []
    Ts, As, dists = ((64, 4096), (8, 64), ("uniform",)) if opts.quick else ((1, 16, 64, 256, 4096), (1, 8, 64), DISTS)
    for t in Ts:
        for a in As:
            for d in (dists if a > 1 else ("uniform",)):   # one adapter: every distribution is the same
                out.append(("fwd mixed", dict(T=t, A=a, K=K, N=N, dist=d)))
    out.append(("fwd r16", dict(T=64, A=64, K=K, N=N, dist="distinct")))      # decode goal
    out.append(("fwd r16", dict(T=4096, A=8, K=K, N=N, dist="uniform")))      # prefill goal
    for v in ("fwd r8", "fwd r64", "fwd r8+64"):  # the goal: time follows the actual ranks
        for t in ((4096,) if opts.quick else (64, 4096)):
            out.append((v, dict(T=t, A=8, K=K, N=N, dist="uniform")))
    for t in ((4096,) if opts.quick else (256, 4096)):
        out.append(("fwd+bwd", dict(T=t, A=8, K=K, N=N, dist="uniform")))
    return out


def _ranks(variant: str, A: int):
    key = variant.split(" ", 1)[1] if " " in variant else "mixed"
    cycle = RANKS[key]
    return [cycle[i % len(cycle)] for i in range(A)]


def _ids(T: int, A: int, dist: str, gen: torch.Generator) -> torch.Tensor:
    if dist == "distinct":
        return torch.arange(T) % A
    if dist == "zipf":
        p = 1.0 / torch.arange(1, A + 1, dtype=torch.float64)
        return torch.multinomial(p / p.sum(), T, replacement=True, generator=gen)
    return torch.randint(0, A, (T,), generator=gen)


def work(s: dict, ranks, slot_of_row, train: bool, elem: int):
    """(flops, minimal bytes): the base GEMM plus each row's own rank (forward), x, W, b, y
    and the adapters that have rows read once; backward adds dx = gy W + g A and the adapter
    gradients (gy and the adapters read again, dx and the gradients written)."""
    T, K, N = s["T"], s["K"], s["N"]
    row_r = sum(ranks[a] for a in slot_of_row)
    used = sorted(set(slot_of_row))
    ad_elems = sum(ranks[a] * (K + N) for a in used)
    flops = matmul_flops((T, N, K)) + 2.0 * row_r * (K + N)
    nbytes = numel_bytes(elem, (T, K), (N, K), (N,), (T, N)) + elem * ad_elems + 8 * T
    if train:  # gy read and dx written once, each adapter's gradient written once
        flops += matmul_flops((T, K, N)) + 2 * 2.0 * row_r * (K + N)
        nbytes += numel_bytes(elem, (T, N), (T, K)) + elem * ad_elems
    return flops, nbytes


def single_rank(ranks, slot_of_row) -> int:
    """The rank of `single`'s one adapter: the rows' mean rank."""
    return max(1, round(sum(ranks[a] for a in slot_of_row) / max(1, len(slot_of_row))))


def single_work(s: dict, r: int, train: bool, elem: int):
    """(flops, minimal bytes) of `single`: one rank-r adapter for every row (its own roofline,
    not the multi-adapter problem's: one adapter's bytes)."""
    return work(s, [r], [0] * s["T"], train, elem)


def _inputs(s: dict, variant: str, device, dtype, seed: int):
    T, A, K, N = s["T"], s["A"], s["K"], s["N"]
    gen = torch.Generator().manual_seed(seed)
    train = variant == "fwd+bwd"

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    ranks = _ranks(variant, A)
    slots = _ids(T, A, s["dist"], gen)
    inp = {"x": rnd(T, K).requires_grad_(train), "W": rnd(N, K, std=K ** -0.5), "b": rnd(N, std=0.1),
           "adapters": {"A": [rnd(r, K, std=K ** -0.5) for r in ranks], "B": [rnd(N, r, std=r ** -0.5) for r in ranks],
                        "slots": slots.tolist(), "ranks": ranks, "seed": seed}}
    if train:
        inp["gy"] = rnd(T, N)
    return inp


def _names(i):
    return [f"bench_{a}" for a in range(len(i["adapters"]["ranks"]))]


def _multi(i):
    W, b, ad = i["W"], i["b"], i["adapters"]
    N, K = W.shape
    layer = FusedLinear.from_linear(frozen_linear(W, b))
    names = _names(i)
    train = "gy" in i
    for n, A, B in zip(names, ad["A"], ad["B"]):
        r = A.shape[0]
        layer.add_lora(n, r=r, lora_alpha=SCALING * r)
        layer.lora_A[n] = nn.Parameter(A, requires_grad=train)
        layer.lora_B[n] = nn.Parameter(B, requires_grad=train)
    layer.eval()
    ids = torch.tensor([layer.adapter_id(names[a]) for a in ad["slots"]], device=W.device)
    # the gradients in gather's order (x, every A, every B): the row's check compares them
    wrt = [i["x"]] + [layer.lora_A[n] for n in names] + [layer.lora_B[n] for n in names]
    if not train:
        with torch.no_grad():
            layer(i["x"], adapter_ids=ids, validate=False)   # builds the pool outside the timing
        thunk = torch.no_grad()(lambda: layer(i["x"], adapter_ids=ids, validate=False))
        thunk.layer, thunk.ids = layer, ids  # for _scoped
        return thunk
    return grad_thunk(lambda: layer(i["x"], adapter_ids=ids, validate=False), i, wrt)


def _fused(i):
    thunk = _multi(i)

    def run():
        with multi.use_fused_base(True):
            return thunk()
    return run


LAYERS = 4


def _scoped(i):
    """A forward pass of LAYERS layers under use_adapters (each on x, so that every layer does
    the work of multi's), timed per layer."""
    import copy

    from fusedlora import use_adapters

    if "gy" in i:
        raise Skip("timed for inference (training shares the routing the same way)")
    single_layer = _multi(i)
    layer, ids = single_layer.layer, single_layer.ids
    model = nn.ModuleList([layer] + [copy.deepcopy(layer) for _ in range(LAYERS - 1)])

    @torch.no_grad()
    def fwd():
        with use_adapters(model, ids, validate=False):
            for m in model:
                y = m(i["x"])
        return y

    fwd()  # the copies' pools, outside the timing
    fwd.calls = LAYERS
    return fwd


def _delta(i):
    """F.linear, then fusedlora.add_multi_lora_ into its output: the delta-only form a serving
    engine with its own (quantized) base GEMM would call (inference only)."""
    if "gy" in i:
        raise Skip("add_multi_lora_ is inference-only")
    from fusedlora.routing import pack_loras

    ad = i["adapters"]
    pool_A, pool_BT, off, rank, scale, r_max = pack_loras(ad["A"], ad["B"], [SCALING] * len(ad["A"]))
    slots = torch.tensor(ad["slots"], dtype=torch.int32, device=i["x"].device)

    @torch.no_grad()
    def fwd():
        y = F.linear(i["x"], i["W"], i["b"])
        return add_multi_lora_(y, i["x"], slots, pool_A, pool_BT, off, rank, scale, r_max, validate=False)

    return fwd


def _single(i):
    r = single_rank(i["adapters"]["ranks"], i["adapters"]["slots"])
    K, N = i["W"].shape[1], i["W"].shape[0]
    A = i["adapters"]["A"][0].new_empty(r, K).normal_(std=K ** -0.5).requires_grad_("gy" in i)
    B = i["adapters"]["B"][0].new_empty(N, r).normal_(std=r ** -0.5).requires_grad_("gy" in i)
    return grad_thunk(lambda: ops.lora_linear(i["x"], i["W"], i["b"], A, B, SCALING), i, [i["x"], A, B])


def _gather(i):
    ad = i["adapters"]
    T, K = i["x"].shape
    N = i["W"].shape[0]
    rmax = max(ad["ranks"])
    if T * rmax * (K + N) * i["x"].element_size() > GATHER_LIMIT:
        raise Skip(f"gathered adapters would take {T * rmax * (K + N) * i['x'].element_size() / 2**30:.1f} GiB")
    train = "gy" in i
    As = [a.detach().requires_grad_(train) for a in ad["A"]]
    Bs = [b.detach().requires_grad_(train) for b in ad["B"]]
    idx = torch.tensor(ad["slots"], device=i["x"].device)
    scale = torch.full((len(As),), SCALING, device=i["x"].device, dtype=i["x"].dtype)

    def stacked():
        return (torch.stack([F.pad(a, (0, 0, 0, rmax - a.shape[0])) for a in As]),    # (A, rmax, K)
                torch.stack([F.pad(b, (0, rmax - b.shape[1])) for b in Bs]))          # (A, N, rmax)

    # a server keeps its adapters stacked: stacked once, outside the timing; a training step
    # stacks the parameters at every call, as autograd must see them
    ready = None if train else stacked()

    def fwd():
        A_st, B_st = stacked() if ready is None else ready
        u = torch.bmm(A_st[idx], i["x"][:, :, None])                                 # (T, rmax, 1)
        d = torch.bmm(B_st[idx], u)[:, :, 0] * scale[idx, None]
        return F.linear(i["x"], i["W"], i["b"]) + d

    return grad_thunk(fwd, i, [i["x"], *As, *Bs])


def _peft(i):
    if "gy" in i:
        raise Skip("PEFT's mixed batch (adapter_names) is inference-only")
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except Exception as e:
        raise Skip(f"peft not importable: {type(e).__name__}: {e}") from None
    W, b, ad = i["W"], i["b"], i["adapters"]
    N, K = W.shape
    base = frozen_linear(W, b)
    names = _names(i)
    layer = None
    for n, A, B in zip(names, ad["A"], ad["B"]):
        r = A.shape[0]
        if layer is None:
            kw = dict(r=r, lora_alpha=SCALING * r, lora_dropout=0.0, init_lora_weights=False)
            if "config" in inspect.signature(PeftLinear.__init__).parameters:
                kw["config"] = LoraConfig(r=r, lora_alpha=SCALING * r, target_modules=["base"])
            layer = PeftLinear(base, n, **kw)
        else:
            kw = dict(r=r, lora_alpha=SCALING * r, lora_dropout=0.0, init_lora_weights=False)
            if "config" in inspect.signature(layer.update_layer).parameters:
                kw["config"] = LoraConfig(r=r, lora_alpha=SCALING * r, target_modules=["base"])
            layer.update_layer(n, **kw)
        layer.lora_A[n].weight = nn.Parameter(A, requires_grad=False)
        layer.lora_B[n].weight = nn.Parameter(B, requires_grad=False)
        if not math.isclose(layer.scaling[n], SCALING):
            raise Skip(f"peft scaling {layer.scaling[n]} != {SCALING}")
    layer.eval()
    row_names = [names[a] for a in ad["slots"]]
    thunk = torch.no_grad()(lambda: layer(i["x"], adapter_names=row_names))
    thunk.no_graph = "PEFT's mixed batch builds index tensors from Python lists: not capturable"
    return thunk


def cases(opts: Options):
    elem = elem_size(opts.dtype)
    seeds = iter(range(10**9))
    for variant, s in shapes(opts):
        probe = _inputs(dict(s, K=1, N=1), variant, "cpu", torch.float32, 0)["adapters"]
        flops, nbytes = work(s, probe["ranks"], probe["slots"], variant == "fwd+bwd", elem)
        single = single_work(s, single_rank(probe["ranks"], probe["slots"]), variant == "fwd+bwd", elem)
        base = (matmul_flops((s["T"], s["N"], s["K"])),
                numel_bytes(elem, (s["T"], s["K"]), (s["N"], s["K"]), (s["N"],), (s["T"], s["N"])))
        if variant == "fwd+bwd":  # base_thunk also takes dx = gy W (W frozen): gy read, dx written
            base = (2 * base[0], base[1] + numel_bytes(elem, (s["T"], s["N"]), (s["T"], s["K"])))
        # every implementation that computes the layer's own function is checked against gather
        # (single runs one adapter of the mean rank: another function; PEFT has no backward)
        check = (("gather", "multi", "fused", "scoped", "delta", "peft") if variant != "fwd+bwd"
                 else ("gather", "multi", "fused"))
        yield Case(path=PATH, variant=variant, shape=s, dtype=opts.dtype, device=opts.device,
                   make_inputs=lambda s=s, v=variant: _inputs(s, v, opts.device, opts.dtype, next(seeds)),
                   impls={"multi": _multi, "fused": _fused, "scoped": _scoped, "single": _single, "base": base_thunk, "delta": _delta,
                          "gather": _gather, "peft": _peft},
                   work={"*": (flops, nbytes), "base": base, "single": single}, ref="single",
                   roof_impls=("multi", "single"),
                   check=check,
                   # prefill too: graph replays give the kernels' time apart from the host's
                   # (the 2026-11-28 H200 host took ~100 us a Triton launch)
                   graph=True if variant != "fwd+bwd" and opts.device.type == "cuda" else None)
