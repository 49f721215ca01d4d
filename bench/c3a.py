"""C3A rows: fused ``fusedlora.c3a.c3a_linear`` against the ways people run C3A today.

Implementations, all timed on the same random input sets:
  fused    fusedlora.c3a.c3a_linear on the Triton kernels (use_backend("triton"): the circulant
           delta folded into the base GEMM)
  auto     the same call as users make it: fusedlora's default dispatch (backend.EAGER_WINS
           sends C3A to the eager composition on CUDA, except eager calls of 1..16 rows,
           which backend.HOST_WINS sends to Triton; the reference on the CPU)
  base     F.linear(x, W, b) alone: the floor the adapter's cost is measured from
  eager    PEFT's algorithm: F.linear plus the block-circular FFT path
           (fusedlora.reference.c3a_fft_delta: ifft(x) * fft(w), fft, real part, / K, in float32)
  compile  torch.compile of eager (static shapes)
  peft     peft.tuners.c3a.C3ALinear wrapping an nn.Linear (its own autograd Function)
  spectral auto with the eager spectral form on (fusedlora.c3a.SPECTRAL_MIN_BLOCK, off by
           default until this column says it wins): the real DFT of each block as GEMMs
           and per-frequency batched products, forward and backward, instead of the dense
           form's extra GEMMs of the base's shape (one forward, two backward)
  merged   forward only, a bound and not a fusedlora path: W + dW formed per call (the
           circulant kernel, one add in float32) and rounded to W's dtype, then one
           F.linear; what folding the delta into W would cost, had the 16-bit rounding
           not dropped an adapter below W's step (README, "C3A and sparse-delta kernels")
Variants: fwd; fwd+bwd with W frozen (grads of x and the kernel; the base: of x only).
The kernel is float32, as PEFT stores it; x, W and b are in the run's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusedlora import reference
from fusedlora.c3a import c3a_linear, init_c3a_kernel

from .harness import (frozen_linear, Options, Skip, adapter_case, base_thunk, compiled, elem_size, on_backend,
                      grad_thunk, matmul_flops, numel_bytes, random_maker)

PATH = "c3a"
VARIANTS = ("fwd", "fwd+bwd")
BLOCK_SIZES = (64, 128, 256)


def shapes(opts: Options):
    if opts.smoke:
        return [dict(M=16, K=64, N=64, b=16)]  # one shape: each row costs a torch.compile
    Ms = (1, 4096) if opts.quick else (1, 16, 4096)
    bs = (128,) if opts.quick else BLOCK_SIZES
    return [dict(M=m, K=4096, N=4096, b=b) for b in bs for m in Ms]


def work(s: dict, variant: str, elem: int):
    """(flops, minimal bytes) of the C3A layer and of the base layer alone.

    The delta costs no matmul FLOPs when folded into W's tiles; its minimal
    traffic is the float32 kernel, (N/b)(K/b)b = NK/b values. The backward
    adds dx = gy (W + dW) (an M x N x K GEMM) and the kernel gradient. The dense
    form pays another 2MNK for the latter, but the floor is what the spectral
    form (``spectral`` below) does: for each of the b/2 + 1 frequencies of a
    real DFT, a complex (N/b) x (K/b) product summed over the M rows, 8 real
    FLOPs per complex multiply-add (the DFTs themselves, O(M (N + K) log b), are
    left out). Counting 2MNK there would put the floor 1.5x too high."""
    M, K, N, b = s["M"], s["K"], s["N"], s["b"]
    kernel_bytes = 4.0 * N * K // b
    base_flops = matmul_flops((M, N, K))
    base_bytes = numel_bytes(elem, (M, K), (N, K), (N,), (M, N))
    flops, nbytes = base_flops, base_bytes + kernel_bytes
    if variant == "fwd":
        return (flops, nbytes), (base_flops, base_bytes)
    flops += matmul_flops((M, K, N)) + 8.0 * M * (N // b) * (K // b) * (b // 2 + 1)   # dx, d kernel
    nbytes += numel_bytes(elem, (M, N), (M, K)) + kernel_bytes   # read gy, write dx and d kernel
    base_flops += matmul_flops((M, K, N))                # dx = gy W only
    base_bytes += numel_bytes(elem, (M, N), (M, K))
    return (flops, nbytes), (base_flops, base_bytes)


def _inputs(s: dict, variant: str, device, dtype):
    M, K, N, b = s["M"], s["K"], s["N"], s["b"]

    rnd = random_maker(device, dtype)

    train = variant != "fwd"
    kernel = init_c3a_kernel(torch.empty(N // b, K // b, b, device=device, dtype=torch.float32), "gaussian")
    # PEFT's N(0, 1) kernel makes the delta (circulant / K) K^-1/2 of the base output, 1.6 % at
    # K = 4096: under the bf16 tolerance of the harness's cross-check, which could then not tell
    # a missing delta from a right one. Scaled by K^1/2 the delta is as large as x W^T; the
    # timing does not depend on the values.
    kernel.mul_(K ** 0.5)
    inp = {"x": rnd(M, K).requires_grad_(train), "W": rnd(N, K, std=K ** -0.5), "b": rnd(N, std=0.1),
           "kernel": kernel.requires_grad_(train)}  # PEFT's gaussian init, not its zeros
    if train:
        inp["gy"] = rnd(M, N)
    return inp


def eager(x, W, bias, kernel):
    """PEFT's C3A forward: the base layer plus the FFT path, added in x's dtype."""
    return F.linear(x, W, bias) + reference.c3a_fft_delta(x, kernel).to(x.dtype)


def _auto(i):
    return grad_thunk(lambda: c3a_linear(i["x"], i["W"], i["b"], i["kernel"]), i, [i["x"], i["kernel"]])


def _fused(i):
    return on_backend("triton", _auto(i))


def _eager(i, fn=None):
    fn = eager if fn is None else fn
    return grad_thunk(lambda: fn(i["x"], i["W"], i["b"], i["kernel"]), i, [i["x"], i["kernel"]])


def _spectral(i):
    """auto with the eager spectral form on (c3a.SPECTRAL_MIN_BLOCK): a candidate at every row
    count, forward and backward, not yet the default."""
    from fusedlora import c3a

    thunk = _auto(i)

    def run():
        with c3a.use_spectral():
            return thunk()
    return run


def _merged(i):
    if "gy" in i:
        raise Skip("forward only: a bound for the forward's second GEMM")
    from fusedlora.c3a import _circulant

    x, W, b, kernel = i["x"], i["W"], i["b"], i["kernel"].detach()
    K = W.shape[1]
    return lambda: F.linear(x, (_circulant(kernel, torch.float32).div_(K).add_(W)).to(W.dtype), b)


def _peft(i):
    try:
        from peft.tuners.c3a import C3AConfig, C3ALinear
    except Exception as e:  # any import failure means: no PEFT row here
        raise Skip(f"peft C3A not importable: {type(e).__name__}: {e}") from None
    W, b, kernel = i["W"], i["b"], i["kernel"]
    bs = kernel.shape[2]
    base = frozen_linear(W, b)
    layer = C3ALinear(base, "default", C3AConfig(block_size=bs, init_weights=True, target_modules=["base"]),
                      block_size=bs)
    # Share the case's kernel (no copy): every implementation sees the same data.
    pk = nn.Parameter(kernel.detach(), requires_grad=kernel.requires_grad)
    layer.c3a_kernel["default"] = pk
    thunk = grad_thunk(lambda: layer(i["x"]), i, [i["x"], pk])
    if "gy" in i:
        thunk = _known(thunk, "PEFT's BlockCircularConvolution.backward returns a wrong x gradient for the delta "
                              "(it fails torch.autograd.gradcheck in peft 0.21.2; the kernel gradient is right); "
                              "it does the same work")
    return thunk


def _known(thunk, reason: str):
    def run():
        return thunk()
    run.known_mismatch = reason
    return run


def cases(opts: Options):
    elem = elem_size(opts.dtype)
    for variant in VARIANTS:
        for s in shapes(opts):
            yield adapter_case(PATH, variant, s, opts, lambda s=s, v=variant: _inputs(s, v, opts.device, opts.dtype),
                               {"fused": _fused, "auto": _auto, "base": base_thunk, "eager": _eager,
                                "compile": compiled(eager, lambda fn, i: _eager(i, fn)), "peft": _peft,
                                "merged": _merged, "spectral": _spectral},
                               work(s, variant, elem))
