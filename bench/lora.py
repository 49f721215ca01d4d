"""LoRA rows: fused ``fusedlora.ops.lora_linear`` against the ways people run LoRA today.

Implementations, all timed on the same random input sets:
  fused    fusedlora.ops.lora_linear on the Triton kernels (use_backend("triton")): the shrink, then
           the base GEMM with the expand in its epilogue (the two-launch decode pair at 1..16 rows)
  auto     the same call under the default dispatch: on CUDA the eager composition above 16 rows
           (backend.EAGER_WINS) and for eager 1..16-row forwards (HOST_WINS), Triton in graphs at 1..16
  base     F.linear(x, W, b) alone: the floor the adapter's cost is measured from
  eager    x W^T + b + s (x A^T) B^T as three matmuls and an add
  compile  torch.compile of eager (static shapes)
  peft     peft.tuners.lora.Linear wrapping an nn.Linear
Variants: fwd; fwd+bwd with W frozen (grads of x, A, B; the base: of x only);
fwd+bwd frozen-A (A.requires_grad=False, as in LoRA-FA: grads of x, B).
"""
from __future__ import annotations

import inspect
import math

import torch.nn.functional as F
from torch import nn

from fusedlora import ops

from .harness import (frozen_linear, Options, Skip, adapter_case, base_thunk, compiled, elem_size, gemm_adapter_bytes,
                      gemm_adapter_flops, grad_thunk, matmul_flops, numel_bytes, on_backend, random_maker)

PATH = "lora"
SCALING = 2.0  # lora_alpha = 2 r, a common choice; any nonzero value times the same
VARIANTS = ("fwd", "fwd+bwd", "fwd+bwd frozen-A")


def shapes(opts: Options):
    if opts.smoke:
        return [dict(M=m, K=64, N=64, r=8) for m in (1, 16)]
    Ms = (1, 4096) if opts.quick else (1, 16, 128, 4096, 16384)
    rs = (16,) if opts.quick else (8, 16, 64)
    return [dict(M=m, K=k, N=n, r=r) for (k, n) in ((4096, 4096), (4096, 11008)) for r in rs for m in Ms]


def work(s: dict, variant: str, elem: int):
    """(flops, minimal bytes) of the adapter layer and of the base layer alone."""
    M, K, N, r = s["M"], s["K"], s["N"], s["r"]
    flops, nbytes = gemm_adapter_flops(M, K, N, r), gemm_adapter_bytes(M, K, N, r, elem)
    base_flops, base_bytes = gemm_adapter_flops(M, K, N), gemm_adapter_bytes(M, K, N, 0, elem)
    if variant == "fwd":
        return (flops, nbytes), (base_flops, base_bytes)
    grad_a = variant == "fwd+bwd"
    # backward: g = gy B (M,r); dx = gy W + g A; dB = gy^T u; dA = g^T x unless A is frozen
    flops += matmul_flops((M, r, N), (M, K, N), (M, K, r), (N, r, M)) + (matmul_flops((r, K, M)) if grad_a else 0)
    nbytes += numel_bytes(elem, (M, N), (M, K), (N, r)) + (numel_bytes(elem, (r, K)) if grad_a else 0)
    base_flops += matmul_flops((M, K, N))                    # dx = gy W only
    base_bytes += numel_bytes(elem, (M, N), (M, K))           # reads gy, writes dx
    return (flops, nbytes), (base_flops, base_bytes)


def _inputs(s: dict, variant: str, device, dtype):
    M, K, N, r = s["M"], s["K"], s["N"], s["r"]

    rnd = random_maker(device, dtype)

    train = variant != "fwd"
    inp = {"x": rnd(M, K).requires_grad_(train), "W": rnd(N, K, std=K ** -0.5), "b": rnd(N, std=0.1),
           "A": rnd(r, K, std=K ** -0.5).requires_grad_(variant == "fwd+bwd"),
           "B": rnd(N, r, std=r ** -0.5).requires_grad_(train)}  # B random, not PEFT's zeros
    if train:
        inp["gy"] = rnd(M, N)
    return inp


def eager(x, W, b, A, B, s: float):
    return F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)


def _auto(i):
    return grad_thunk(lambda: ops.lora_linear(i["x"], i["W"], i["b"], i["A"], i["B"], SCALING), i,
                      [i["x"], i["A"], i["B"]])


def _fused(i):
    return on_backend("triton", _auto(i))


def _eager(i, fn=None):
    fn = eager if fn is None else fn
    return grad_thunk(lambda: fn(i["x"], i["W"], i["b"], i["A"], i["B"], SCALING), i, [i["x"], i["A"], i["B"]])


def _peft(i):
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except Exception as e:  # any import failure means: no PEFT row here
        raise Skip(f"peft not importable: {type(e).__name__}: {e}") from None
    W, b, A, B = i["W"], i["b"], i["A"], i["B"]
    r = A.shape[0]
    base = frozen_linear(W, b)
    kw = dict(r=r, lora_alpha=SCALING * r, lora_dropout=0.0, init_lora_weights=False)
    if "config" in inspect.signature(PeftLinear.__init__).parameters:  # peft >= 0.18 wants the config too
        kw["config"] = LoraConfig(r=r, lora_alpha=SCALING * r, target_modules=["base"])
    layer = PeftLinear(base, "default", **kw)
    # Share the case's tensors (no copy) so every implementation sees the same data.
    pa = nn.Parameter(A.detach(), requires_grad=A.requires_grad)
    pb = nn.Parameter(B.detach(), requires_grad=B.requires_grad)
    layer.lora_A["default"].weight, layer.lora_B["default"].weight = pa, pb
    if not math.isclose(layer.scaling["default"], SCALING):
        raise Skip(f"peft scaling {layer.scaling['default']} != {SCALING}")
    return grad_thunk(lambda: layer(i["x"]), i, [i["x"], pa, pb])


def cases(opts: Options):
    elem = elem_size(opts.dtype)
    for variant in VARIANTS:
        for s in shapes(opts):
            yield adapter_case(PATH, variant, s, opts, lambda s=s, v=variant: _inputs(s, v, opts.device, opts.dtype),
                               {"fused": _fused, "auto": _auto, "base": base_thunk, "eager": _eager,
                                "compile": compiled(eager, lambda fn, i: _eager(i, fn)), "peft": _peft},
                               work(s, variant, elem))
