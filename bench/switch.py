"""Switching adapters on a merged weight: sparse (SHiRA) scatter vs LoRA merge.

A server that keeps the active adapter merged into W (no adapter cost per
token) pays on every switch: unmerge the old adapter and merge the new one.
Each row times one such switch, back and forth between two adapters "a" and
"b" of the same kind, on a weight of N x K:

  sparse         fusedlora.sparse.scatter_switch_(W, old, new): two O(nnz) in-place
                 scatters (index_put_ with accumulate); it validates the indices each call
  sparse-module  FusedLinear.switch_merged between two sparse adapters (indices checked
                 once when added; the scatters skip validation)
  index_add      the same two scatters as W.view(-1).index_add_(0, rows * K + cols, values,
                 alpha=+-s), flat indices computed once: not a fusedlora API (yet), it shows
                 what an O(nnz) switch costs without index_put_'s overheads
  lora           W.addmm_(B_old, A_old, alpha=-s); W.addmm_(B_new, A_new, alpha=s): the
                 least a dense rank-r merge and unmerge can cost (in place, no delta tensor)
  lora-module    FusedLinear.switch_merged between two LoRA adapters (delta s B A in float32)
  peft-lora      PEFT LoRA layers on the same base: unmerge() one, merge() the other
  peft-shira     PEFT SHiRA layers on the same base: unmerge() one, merge() the other
                 (W += torch.sparse_coo_tensor)

The ratio X/sparse is how many times faster the sparse switch is than X; the
issue's goal is lora/sparse >= 10 on the GPU at 1% density and r = 16. The
work is small and memory-bound, so the full-size rows are cheap enough for a
CPU run (``--paths switch --device cpu``, float32), which also checks the claim
that loading SHiRA is 5x-16x faster than LoRA fusion on a CPU.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from fusedlora import FusedLinear
from fusedlora.sparse import scatter_switch_, shira_num_nonzeros

from .harness import frozen_linear, Case, Options, Skip, elem_size, matmul_flops, numel_bytes, random_maker
from .sparse import mask, peft_shira_layer

PATH = "switch"
# Full-size rows of this path are cheap on a CPU: run.py then allows --device cpu without --smoke.
CPU_FULL_SIZE = True
VARIANT = "switch"
R = 16
LORA_SCALING = 2.0   # lora_alpha = 2 r
SPARSE_SCALING = 1.0
DENSITIES = (0.005, 0.01, 0.02)


def shapes(opts: Options):
    if opts.smoke:
        return [dict(N=64, K=64, r=8, density=0.02, nnz=shira_num_nonzeros((64, 64), density=0.02))]
    ds = (0.01,) if opts.quick else DENSITIES
    return [dict(N=4096, K=4096, r=R, density=d, nnz=shira_num_nonzeros((4096, 4096), density=d)) for d in ds]


def dtypes(opts: Options):
    """The run's dtype; on the GPU also float32, as merged serving weights are often kept in it."""
    extra = [torch.float32] if opts.device.type == "cuda" and not opts.smoke and opts.dtype != torch.float32 else []
    return [opts.dtype] + extra


def work(s: dict, elem: int):
    """(flops, minimal bytes) of one switch (two scatters, or two rank-r updates).

    A scatter of nnz values reads and writes nnz entries of W and reads the
    values and their (row, col) as int64; a rank-r update reads and writes all
    of W and reads A and B, and costs 2 N K r FLOPs plus the N K adds."""
    N, K, r, nnz = s["N"], s["K"], s["r"], s["nnz"]
    sparse = (2 * 2.0 * nnz, 2 * nnz * (3.0 * elem + 16))
    lora = (2 * (matmul_flops((N, K, r)) + N * K), 2 * numel_bytes(elem, (N, K), (N, K), (r, K), (N, r)))
    return {"*": sparse, "lora": lora, "lora-module": lora, "peft-lora": lora}


def _inputs(s: dict, device, dtype, seed: int):
    N, K, r, d = s["N"], s["K"], s["r"], s["density"]

    rnd = random_maker(device, dtype)

    inp = {"W": rnd(N, K, std=K ** -0.5)}
    for name, k in (("a", 0), ("b", 1)):
        inp[f"idx_{name}"] = mask(N, K, d, 2 * seed + k).to(device)
        inp[f"val_{name}"] = rnd(inp[f"idx_{name}"].shape[1], std=K ** -0.5)
        inp[f"A_{name}"] = rnd(r, K, std=K ** -0.5)
        inp[f"B_{name}"] = rnd(N, r, std=r ** -0.5)  # random, not PEFT's zeros
    return inp


def _back_and_forth(to_b, to_a):
    """A thunk that switches a -> b on odd calls and b -> a on even ones."""
    state = itertools.cycle((to_b, to_a))
    return lambda: next(state)()


def _sparse(i):
    a = (i["idx_a"], i["val_a"], SPARSE_SCALING)
    b = (i["idx_b"], i["val_b"], SPARSE_SCALING)
    W = i["W"]
    return _back_and_forth(lambda: scatter_switch_(W, a, b), lambda: scatter_switch_(W, b, a))


def _index_add(i):
    W, s = i["W"], SPARSE_SCALING
    if not W.is_contiguous():
        raise Skip("W is not contiguous: no flat view")
    K = W.shape[1]
    flat = {n: i[f"idx_{n}"][0] * K + i[f"idx_{n}"][1] for n in ("a", "b")}  # once per adapter, as a layout
    Wf = W.view(-1)

    def switch(old, new):
        Wf.index_add_(0, flat[old], i[f"val_{old}"], alpha=-s)
        Wf.index_add_(0, flat[new], i[f"val_{new}"], alpha=s)

    return _back_and_forth(lambda: switch("a", "b"), lambda: switch("b", "a"))


def _lora(i):
    W, s = i["W"], LORA_SCALING

    def switch(old, new):
        W.addmm_(i[f"B_{old}"], i[f"A_{old}"], alpha=-s)
        W.addmm_(i[f"B_{new}"], i[f"A_{new}"], alpha=s)

    return _back_and_forth(lambda: switch("a", "b"), lambda: switch("b", "a"))


def _module(i, kind: str):
    """A FusedLinear sharing W, with adapters a and b of ``kind``, "a" merged."""
    N, K = i["W"].shape
    layer = FusedLinear.from_linear(frozen_linear(i["W"]))
    for name in ("a", "b"):
        if kind == "lora":
            r = i[f"A_{name}"].shape[0]
            layer.add_lora(name, r=r, lora_alpha=LORA_SCALING * r)
            with torch.no_grad():
                layer.lora_A[name].copy_(i[f"A_{name}"])
                layer.lora_B[name].copy_(i[f"B_{name}"])
        else:
            layer.add_sparse(name, i[f"idx_{name}"], i[f"val_{name}"], scaling=SPARSE_SCALING)
    layer.switch_merged("a")
    return _back_and_forth(lambda: layer.switch_merged("b"), lambda: layer.switch_merged("a"))


def _peft_lora(i):
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except Exception as e:
        raise Skip(f"peft not importable: {type(e).__name__}: {e}") from None
    import inspect

    N, K = i["W"].shape
    base = frozen_linear(i["W"])
    layers = {}
    for name in ("a", "b"):
        r = i[f"A_{name}"].shape[0]
        kw = dict(r=r, lora_alpha=LORA_SCALING * r, lora_dropout=0.0, init_lora_weights=False)
        if "config" in inspect.signature(PeftLinear.__init__).parameters:  # peft >= 0.18 wants the config too
            kw["config"] = LoraConfig(r=r, lora_alpha=LORA_SCALING * r, target_modules=["base"])
        layer = PeftLinear(base, name, **kw)
        if not math.isclose(layer.scaling[name], LORA_SCALING):
            raise Skip(f"peft scaling {layer.scaling[name]} != {LORA_SCALING}")
        layer.lora_A[name].weight = nn.Parameter(i[f"A_{name}"], requires_grad=False)
        layer.lora_B[name].weight = nn.Parameter(i[f"B_{name}"], requires_grad=False)
        layers[name] = layer
    return _peft_switcher(layers)


def _peft_shira(i):
    layers = {}
    for name in ("a", "b"):
        layers[name], _ = peft_shira_layer(i["W"], None, i[f"idx_{name}"], i[f"val_{name}"], SPARSE_SCALING)
    return _peft_switcher(layers)


def _peft_switcher(layers):
    """Two PEFT layers over one base weight: unmerge one, merge the other (PEFT's
    merge and unmerge update base.weight.data in place)."""
    layers["a"].merge()

    def switch(old, new):
        layers[old].unmerge()
        layers[new].merge()

    return _back_and_forth(lambda: switch("a", "b"), lambda: switch("b", "a"))


def cases(opts: Options):
    # On the CPU a rank-16 merge of 4096 x 4096 takes tens of ms: give each
    # implementation a couple of seconds of samples instead of 100 ms.
    timing = {"rep_ms": 2000} if opts.device.type == "cpu" and not opts.smoke else None
    for dtype in dtypes(opts):
        for s in shapes(opts):
            seeds = itertools.count()
            yield Case(path=PATH, variant=VARIANT, shape=s, dtype=dtype, device=opts.device,
                       make_inputs=lambda s=s, dtype=dtype, seeds=seeds: _inputs(s, opts.device, dtype, next(seeds)),
                       impls={"sparse": _sparse, "sparse-module": lambda i: _module(i, "sparse"),
                              "index_add": _index_add,
                              "lora": _lora, "lora-module": lambda i: _module(i, "lora"),
                              "peft-lora": _peft_lora, "peft-shira": _peft_shira},
                       work=work(s, elem_size(dtype)), ref="sparse", roof_impls=("sparse", "lora"),
                       timing=timing)
