"""C3A (circular-convolution adaptation, PEFT's C3A tuner) as a fused op.

    y = x W^T + b + x dW^T,  dW[m*b+s, n*b+t] = w[m, n, (t - s) mod b] / in_features

with ``c3a_kernel`` w of shape (out_features/b, in_features/b, b). This is the
convention of PEFT's ``C3ALinear`` (its forward is ``fft(ifft(x) * fft(w)).real / K``
per block pair, a circular cross-correlation; its ``get_delta_weight`` is the
dense matrix above). The Triton path folds dW into the base GEMM tile by
tile (kernels/c3a.py): no FFT and no dense delta.

Gradients are the exact gradients of that forward. (PEFT's own
``BlockCircularConvolution.backward`` returns, for x, the adjoint of a circular
*convolution*, i.e. w[(s - t) mod b] instead of w[(t - s) mod b]; its kernel
gradient is right. For b > 2 its x gradient therefore differs from autograd of
its own forward; fusedlora does not copy that.)
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .backend import cdiv, dispatch, interpreting, next_pow2, record, scoped_setting, select_backend
from .c3a_spectral import _spectral_delta_, _spectral_grads
from .ops import (autocast_inputs, bias_grad, check_linear_args, fused_op, pick, register_autograd, rows_of,
                  triton_dtype_ok, triton_serves)

_INIT_CHOICES = (True, False, "gaussian", "xavier_uniform", "kaiming_uniform")
# Reduction length rows * b of the kernel-gradient GEMM stays in int32.
_MAX_Q = 2**31 - 2**20


# ----------------------------------------------------------------- validation
def check_c3a_args(x, weight, bias, c3a_kernel) -> int:
    """Validate a C3A call before anything is launched; returns the block size b."""
    check_linear_args(x, weight, bias)
    N, K = weight.shape
    if K < 1:
        raise ValueError(f"weight: C3A needs in_features >= 1 (the delta is scaled by 1/in_features), "
                         f"got weight of shape {tuple(weight.shape)}")
    if not isinstance(c3a_kernel, torch.Tensor):
        raise TypeError(f"c3a_kernel: expected a torch.Tensor, got {type(c3a_kernel).__name__}")
    if c3a_kernel.dim() != 3:
        raise ValueError(f"c3a_kernel: expected a 3-D tensor (out_features/b, in_features/b, b), "
                         f"got shape {tuple(c3a_kernel.shape)}")
    if c3a_kernel.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"c3a_kernel: expected dtype torch.float32 (PEFT's) or x's dtype {x.dtype}, "
                        f"got {c3a_kernel.dtype}")
    if c3a_kernel.device != x.device:
        raise ValueError(f"c3a_kernel: device {c3a_kernel.device} does not match x's device {x.device}")
    b = int(c3a_kernel.shape[2])
    if b < 1:
        raise ValueError(f"c3a_kernel: block size b = c3a_kernel.shape[2] must be >= 1, "
                         f"got shape {tuple(c3a_kernel.shape)}")
    if K % b or N % b:
        raise ValueError(f"c3a_kernel: block size b={b} (c3a_kernel.shape[2]) must divide both "
                         f"in_features={K} and out_features={N}")
    if tuple(c3a_kernel.shape) != (N // b, K // b, b):
        raise ValueError(f"c3a_kernel: expected shape (out_features/b, in_features/b, b) = "
                         f"({N // b}, {K // b}, {b}) for weight {tuple(weight.shape)}, "
                         f"got {tuple(c3a_kernel.shape)}")
    return b


# ------------------------------------------------------------------- launcher
@functools.lru_cache(maxsize=None)
def _tuned(which: str):
    import triton

    from .kernels.c3a import c3a_kernel_grad_kernel, c3a_matmul_kernel
    from .launch import _GEMM_CONFIGS, _INTERPRET_TILE, autotuned

    configs = [triton.Config(dict(_INTERPRET_TILE))] if interpreting() else _GEMM_CONFIGS
    if which == "matmul":
        return autotuned(c3a_matmul_kernel, configs, ["M_BUCKET", "N", "K", "BS", "REDUCE_IN"])
    return autotuned(c3a_kernel_grad_kernel, configs, ["M_BUCKET", "N", "Q_BUCKET", "BS"])


def matmul_plan(M: int, N: int, K: int, device: torch.device, elem_bytes: int):
    """launch._small_plan for the C3A GEMM. In 16 bits the exact delta streams a second
    B-sized operand (the circulant tile) through shared memory: planned as for 4-byte
    operands, or a narrow plan (BLOCK_K 128, 3 stages) needs 311 KB, over an SM's 227 KB."""
    from .launch import _small_plan

    return _small_plan(M, N, K, device, 2 * elem_bytes if elem_bytes == 2 else elem_bytes)


def _c3a_matmul(a: Tensor, b: Tensor, w: Tensor, *, reduce_in: bool, in_features: int,
                out_dtype: torch.dtype, bias: Optional[Tensor] = None, tag: str) -> Tensor:
    """C = a @ (b + circ) + bias, circ the C3A delta laid out like b:
    b = W^T (reduce_in, forward) or b = W (dx)."""
    from .kernels.c3a import c3a_matmul_kernel
    from .launch import _input_precision, _pow2_at_least, _tl_dtype, bias_arg, gemm_output, launch_gemm

    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        c = torch.zeros((M, N), device=a.device, dtype=torch.float32)
        return (c + bias.float() if bias is not None else c).to(out_dtype)
    exact = a.dtype.itemsize == 2
    plan = matmul_plan(M, N, K, a.device, a.dtype.itemsize)
    c = gemm_output(M, N, plan, out_dtype, a.device)
    args = (
        a, b, c, bias_arg(bias, c), w,
        M, N, K, int(w.shape[2]), _pow2_at_least(M, 1),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        w.stride(0), w.stride(1), w.stride(2), 1.0 / in_features,
    )
    flags = dict(HAS_BIAS=bias is not None, REDUCE_IN=reduce_in, EXACT_DELTA=exact,
                 DOT_DTYPE=_tl_dtype(a.dtype), INPUT_PRECISION=_input_precision(a.dtype))
    launch_gemm(c3a_matmul_kernel, lambda: _tuned("matmul"), plan, M, N, args, flags, tag)
    return c if c.dtype == out_dtype else c.to(out_dtype)


def _decode_pair(x: Tensor, weight: Tensor, bias: Optional[Tensor], c3a_kernel: Tensor) -> Tensor:
    """y for 1..16 rows and blocks of 16 and more in two launches and no memset
    (kernels/c3a.py, decode): the circulant delta's products in fp32 beside W's split-K
    tiles, then one finishing kernel."""
    from .kernels.c3a import c3a_decode_finish_kernel, c3a_decode_kernel
    from .launch import _input_precision, _pow2_at_least, _tl_dtype, bias_arg, decode_plan

    M, K = x.shape
    N, b = weight.shape[0], int(c3a_kernel.shape[2])
    plan = decode_plan(x, N)
    split = plan["SPLIT_K"]
    block_b = 16 if interpreting() else min(32, _pow2_at_least(b))  # 64 x 64 gathers spill (255 registers)
    delta_k = 16 if interpreting() else 64
    i_chunks = cdiv(b, block_b)
    delta_tiles, n_tiles = (N // b) * i_chunks, cdiv(N, plan["BLOCK_N"])
    part = torch.empty((split, M, 2 * N), device=x.device, dtype=torch.float32)
    # 16-bit x is exact in tf32, w is not: 3xTF32 keeps the delta fp32-accurate
    delta_precision = "tf32x3" if x.dtype.itemsize == 2 else _input_precision(torch.float32)
    c3a_decode_kernel[((delta_tiles + n_tiles) * split,)](
        x, weight, c3a_kernel, part, M, N, K, b, i_chunks, 1.0 / K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *c3a_kernel.stride(),
        part.stride(0), part.stride(1), DOT_DTYPE=_tl_dtype(x.dtype), INPUT_PRECISION=_input_precision(x.dtype),
        DELTA_PRECISION=delta_precision, **plan, BLOCK_B=block_b, DELTA_BLOCK_K=delta_k)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    warps = {k: plan[k] for k in ("num_warps",) if k in plan}
    c3a_decode_finish_kernel[(n_tiles,)](
        part, bias_arg(bias, y), y, M, N, part.stride(0), part.stride(1),
        y.stride(0), y.stride(1), HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_M=plan["BLOCK_M"],
        BLOCK_N=plan["BLOCK_N"], **warps)
    record("c3a.forward", "triton", "decode")
    return y


def _grad_gemm(a: Tensor, xs: Tensor, b: int, alpha: float, out: Tensor, tag: str) -> None:
    """out (fp32, G x N) += alpha * sum_{r,s} a[r, g*b+s] xs[r, (c//b)*b + (s + c%b) mod b]."""
    from .kernels.c3a import c3a_kernel_grad_kernel
    from .launch import _input_precision, _pow2_at_least, _small_plan, _tl_dtype, launch_gemm

    rows = a.shape[0]
    G, N = out.shape
    Q = rows * b
    plan = _small_plan(G, N, Q, a.device, a.dtype.itemsize)
    split = plan["SPLIT_K"] if plan else 1
    c = out if split > 1 else torch.empty_like(out)
    args = (
        a, xs, c, G, N, Q, b, _pow2_at_least(G, 1), _pow2_at_least(Q, 1),
        a.stride(0), a.stride(1), xs.stride(0), xs.stride(1), c.stride(0), c.stride(1), float(alpha),
    )
    flags = dict(DOT_DTYPE=_tl_dtype(a.dtype), INPUT_PRECISION=_input_precision(a.dtype))
    launch_gemm(c3a_kernel_grad_kernel, lambda: _tuned("grad"), plan, G, N, args, flags, tag)
    if c is not out:
        out += c


def c3a_kernel_grad(grad_y: Tensor, x: Tensor, c3a_kernel: Tensor, tag: str = "c3a.grad_kernel") -> Tensor:
    """dw[m, n, u] = sum_{r, s} dy[r, m*b+s] x[r, n*b+(s+u) mod b] / K on the Triton
    kernel, for 2-D x and dy; no N x K intermediate."""
    nb_out, nb_in, b = c3a_kernel.shape
    M, K = x.shape
    N = grad_y.shape[1]
    # Rows of the GEMM are blocks: take the side with more of them. Swapped,
    # out[n, m*b + v] = sum_{r,t} x[r, n*b+t] dy[r, m*b+(t+v) mod b] = dw[m, n, (-v) mod b].
    swap = nb_in > nb_out
    a, xs, G, cols = (x, grad_y, nb_in, N) if swap else (grad_y, x, nb_out, K)
    out = torch.zeros((G, cols), device=x.device, dtype=torch.float32)
    chunk = max(1, _MAX_Q // b)
    for r0 in range(0, M, chunk):
        _grad_gemm(a[r0:r0 + chunk], xs[r0:r0 + chunk], b, 1.0 / K, out, tag)
    if swap:
        idx = (-torch.arange(b, device=x.device)) % b
        dw = out.view(nb_in, nb_out, b).permute(1, 0, 2)[:, :, idx]
    else:
        dw = out.view(nb_out, nb_in, b)
    return dw.to(c3a_kernel.dtype).contiguous()


# The eager composition's two forms. Up to FFT_ROWS rows, PEFT's FFT path (measured on
# the H200 at 1 row: 50 us vs 54 us for the fused kernel; the circulant is never formed).
# Above, the unscaled circulant C = K * dW is formed in x's dtype (one gather, N x K; its
# entries are O(w), so 16 bits keep the adapter, where w / K would not survive W's step) and
# cuBLAS does y = x W^T + b + (x C^T) / K in one addmm: two GEMMs of the base's shape,
# ~2x F.linear by the H200's GEMM time, against 6x for the FFT path there (M = 4096).
FFT_ROWS = 16
# A third form, at every row count, off until a GPU times it against the other two (bench c3a
# column "spectral"): the delta through the real DFT of each block, all as GEMMs, about
# (2b/N + 2/b) of the base's FLOPs and a pass over x- and y-sized intermediates, where the
# dense form pays a second GEMM of the base's shape (425 us against 196 for F.linear on the
# H200 at 4096 x 4096 x 4096, b = 128), and two more in the backward. In 16 bits its errors
# are ~1.7x the dense form's for y and dx and ~2x for the kernel gradient (the DFT bases are
# rounded too; bf16: 4e-3 against 2.3e-3), well inside the dtype's tolerance. The block size
# from which it serves, or None.
SPECTRAL_MIN_BLOCK: Optional[int] = None


def use_spectral(min_block: Optional[int] = 16):
    """The eager spectral form for block sizes from ``min_block`` (None: off) in this scope
    (process-wide); the benchmarks time it this way."""
    return scoped_setting(__name__, "SPECTRAL_MIN_BLOCK", min_block)


def _spectral(c3a_kernel: Tensor) -> bool:
    return SPECTRAL_MIN_BLOCK is not None and c3a_kernel.shape[2] >= SPECTRAL_MIN_BLOCK


def _circulant(c3a_kernel: Tensor, dtype: torch.dtype) -> Tensor:
    """The unscaled circulant C = K * dW (N x K) in ``dtype``: one Triton pass on CUDA (and
    under the interpreter), which writes C once; reference.c3a_circulant's gather,
    permute and copy elsewhere."""
    nb_out, nb_in, b = c3a_kernel.shape
    if not triton_serves(c3a_kernel.device, dtype):
        record("c3a.circulant", "torch", "gather")
        return reference.c3a_circulant(c3a_kernel, dtype)

    from .kernels.c3a import c3a_circulant_kernel

    N, K = nb_out * b, nb_in * b
    out = torch.empty(N, K, dtype=dtype, device=c3a_kernel.device)
    tile = (16, 16) if interpreting() else (32, 128)
    c3a_circulant_kernel[(cdiv(N, tile[0]), cdiv(K, tile[1]))](
        out, c3a_kernel, N, K, b, out.stride(0), out.stride(1), *c3a_kernel.stride(),
        BLOCK_N=tile[0], BLOCK_K=tile[1])
    record("c3a.circulant", "triton", "gather")
    return out


def _diagonal_sums(g: Tensor, c3a_kernel: Tensor) -> Tensor:
    """reference.c3a_diagonal_sums (the kernel gradient from G = dY^T X) in one Triton pass
    over G on CUDA (and under the interpreter) for blocks of 16 and more; the torch
    gathers, which copy G twice, below that (a program per block pair would be too small)."""
    nb_out, nb_in, b = c3a_kernel.shape
    if not (b >= 16 and triton_serves(g.device, g.dtype, c3a_kernel.dtype)):
        record("c3a.diagonal_sums", "torch", "gather")
        return reference.c3a_diagonal_sums(g, c3a_kernel)

    from .kernels.c3a import c3a_diagonal_sums_kernel

    out = torch.empty(c3a_kernel.shape, dtype=c3a_kernel.dtype, device=g.device)
    block_u = 16 if interpreting() else min(128, next_pow2(b))
    c3a_diagonal_sums_kernel[(nb_out * nb_in, cdiv(b, block_u))](
        g, out, b, nb_in, g.stride(0), g.stride(1), *out.stride(), 1.0 / g.shape[1],
        BLOCK_S=16 if interpreting() else 32, BLOCK_U=block_u)
    record("c3a.diagonal_sums", "triton", "rows")
    return out


def _dense_grads(grad_y: Tensor, x: Tensor, weight: Tensor, c3a_kernel: Tensor, needs: List[bool]) -> List[Tensor]:
    """cuBLAS for everything: dx = dY W + dY C / K; dY^T X (in x's dtype) gives dW and,
    summed along its circulant diagonals, the kernel gradient."""
    need_x, need_w, need_b, need_k = needs
    dx, dW, db, dk = (grad_y.new_empty(0) for _ in range(4))
    if need_x:
        dx = torch.addmm(grad_y @ weight, grad_y, _circulant(c3a_kernel, x.dtype), alpha=1.0 / x.shape[1])
    if need_w or need_k:
        g = grad_y.t() @ x
        if need_w:
            dW = g.to(weight.dtype)
        if need_k:
            dk = _diagonal_sums(g, c3a_kernel)
    if need_b:
        db = bias_grad(grad_y, x.dtype)
    return [dx, dW, db, dk]


def _fft_grads(grad_y: Tensor, x: Tensor, weight: Tensor, c3a_kernel: Tensor, needs: List[bool]) -> List[Tensor]:
    """Gradients of F.linear + PEFT's FFT delta: cuBLAS for the base terms, and for the
    delta the block-circulant identities in the frequency domain (a custom op's body
    records no autograd graph, so they are written out):
      dx_n = Re IFFT(sum_m FFT(dy_m) FFT(w_mn)) / K          (circular convolution)
      dw_mn = Re IFFT(sum_rows conj(FFT(dy_m)) FFT(x_n)) / K (circular correlation)"""
    need_x, need_w, need_b, need_k = needs
    nb_out, nb_in, b = c3a_kernel.shape
    K = x.shape[-1]
    dt = torch.promote_types(torch.promote_types(x.dtype, c3a_kernel.dtype), torch.float32)
    dx, dW, db, dk = (grad_y.new_empty(0) for _ in range(4))
    if x.shape[0] == 0:  # no rows: the delta's gradients are empty or zero (and no FFT of 0 rows)
        dx = x.new_empty(x.shape) if need_x else dx
        dk = torch.zeros_like(c3a_kernel) if need_k else dk
        need_x = need_k = False
    if need_x or need_k:
        gy = torch.fft.fft(grad_y.to(dt).reshape(-1, nb_out, b))
    if need_x:
        conv = torch.einsum("rmf,mnf->rnf", gy, torch.fft.fft(c3a_kernel.to(dt)))
        dx = ((grad_y @ weight).to(dt) + torch.fft.ifft(conv).real.reshape(-1, K) / K).to(x.dtype)
    if need_k:
        corr = torch.einsum("rmf,rnf->mnf", gy.conj(), torch.fft.fft(x.to(dt).reshape(-1, nb_in, b)))
        dk = (torch.fft.ifft(corr).real / K).to(c3a_kernel.dtype)
    if need_w:
        dW = (grad_y.t() @ x).to(weight.dtype)
    if need_b:
        db = bias_grad(grad_y, x.dtype)
    return [dx, dW, db, dk]


# ----------------------------------------------------------------- custom ops
@fused_op("fusedlora::c3a_linear")
def _c3a_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], c3a_kernel: Tensor) -> Tensor:
    """2-D x -> y = x (W + dW)^T + b."""
    return dispatch("c3a.forward", _c3a_forward_on, x, weight, bias, c3a_kernel)


def _eager_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], c3a_kernel: Tensor) -> Tensor:
    y = F.linear(x, weight, bias)
    if _spectral(c3a_kernel):
        record("c3a.forward", "eager", "spectral")
        return _spectral_delta_(y, x, c3a_kernel)
    if x.shape[0] > FFT_ROWS:
        record("c3a.forward", "eager", "dense")
        return torch.addmm(y, x, _circulant(c3a_kernel, x.dtype).t(), alpha=1.0 / x.shape[1])
    record("c3a.forward", "eager", "fft")
    return y + reference.c3a_fft_delta(x, c3a_kernel).to(x.dtype) if x.shape[0] else y  # no FFT of 0 rows


def _c3a_forward_on(backend: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], c3a_kernel: Tensor) -> Tensor:
    if backend == "torch":
        record("c3a.forward", "torch", "reference")
        return reference.c3a_linear(x, weight, bias, c3a_kernel)
    if backend == "eager":
        return _eager_forward(x, weight, bias, c3a_kernel)
    if backend == "cuda":
        from .cuda_ext import decode_serves, load

        if decode_serves(x, weight):  # else Triton, recorded below
            record("c3a.forward", "cuda", "decode")
            return load().c3a_decode(x, weight, bias, c3a_kernel.float())
    triton_dtype_ok(x)
    from .launch import decode_pair_serves

    # "triton-fused": the one-launch GEMM (backend.HOST_WINS' eager host path)
    if backend == "triton" and decode_pair_serves(x, weight, False) and c3a_kernel.shape[2] >= 16:
        return _decode_pair(x, weight, bias, c3a_kernel)
    return _c3a_matmul(x, weight.t(), c3a_kernel, reduce_in=True, in_features=weight.shape[1],
                       out_dtype=x.dtype, bias=bias, tag="c3a.forward")


@_c3a_forward.register_fake
def _(x, weight, bias, c3a_kernel):
    return x.new_empty((x.shape[0], weight.shape[0]))


@fused_op("fusedlora::c3a_linear_backward")
def _c3a_backward(grad_y: Tensor, x: Tensor, weight: Tensor, c3a_kernel: Tensor,
                  needs: List[bool]) -> List[Tensor]:
    """(dx, dW, db, dw); an empty tensor stands for a gradient not asked for."""
    need_x, need_w, need_b, need_k = needs
    backend = select_backend(x.device, "c3a.backward", x.shape[0])
    if backend == "torch":
        grads = reference.c3a_linear_grads(grad_y, x, weight, c3a_kernel)
        record("c3a.backward", "torch", "reference")
        return [g.to(t.dtype) if n else grad_y.new_empty(0)
                for g, t, n in zip(grads, (x, weight, grad_y, c3a_kernel), needs)]
    if backend == "eager":
        form = "spectral" if _spectral(c3a_kernel) else "fft" if x.shape[0] <= FFT_ROWS else "dense"
        record("c3a.backward", "eager", form)
        grads = {"fft": _fft_grads, "spectral": _spectral_grads, "dense": _dense_grads}[form]
        return grads(grad_y, x, weight, c3a_kernel, needs)
    triton_dtype_ok(x)
    from .launch import matmul

    dt = x.dtype
    # A distinct empty tensor per slot: outputs of a custom op may not alias each other.
    dx, dW, db, dk = (grad_y.new_empty(0) for _ in range(4))
    if need_x:
        dx = _c3a_matmul(grad_y, weight, c3a_kernel, reduce_in=False, in_features=weight.shape[1],
                         out_dtype=dt, tag="c3a.grad_x")
    if need_w:
        dW = matmul(grad_y.t(), x, out_dtype=weight.dtype, dot_dtype=dt, tag="c3a.grad_weight")
    if need_b:
        db = bias_grad(grad_y, dt)
    if need_k:
        dk = c3a_kernel_grad(grad_y, x, c3a_kernel)
    return [dx, dW, db, dk]


@_c3a_backward.register_fake
def _(grad_y, x, weight, c3a_kernel, needs):
    shapes = [x, weight, weight[:, 0], c3a_kernel]
    return [t.new_empty(t.shape) if n else grad_y.new_empty(0) for t, n in zip(shapes, needs)]


def _c3a_setup_context(ctx, inputs, output):
    x, weight, bias, c3a_kernel = inputs
    ctx.save_for_backward(x, weight, c3a_kernel)


def _c3a_autograd(ctx, grad_y):
    x, weight, c3a_kernel = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[3]]
    backward = pick(_c3a_backward, grad_y, x, weight, c3a_kernel)
    grads = backward(grad_y, x, weight, c3a_kernel, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


register_autograd(_c3a_forward, _c3a_autograd, _c3a_setup_context)


def c3a_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], c3a_kernel: Tensor) -> Tensor:
    """y = x W^T + b + x dW^T with PEFT's C3A delta, fused; x of shape (..., in_features).

    ``c3a_kernel`` has shape (out_features/b, in_features/b, b), dtype float32
    (PEFT's) or x's. Differentiable in every tensor argument. Under ``torch.autocast``, x,
    W and b are cast to the autocast dtype as ``F.linear``'s are; the kernel keeps its own.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_c3a_args(x, weight, bias, c3a_kernel)
    lead = x.shape[:-1]
    op = pick(_c3a_forward, x, weight, bias, c3a_kernel)
    y = op(rows_of(x), weight, bias, c3a_kernel)
    return y.reshape(*lead, weight.shape[0])


@torch.no_grad()
def init_c3a_kernel(tensor: Tensor, init_weights: Union[bool, str] = True) -> Tensor:
    """PEFT's ``reset_c3a_parameters`` in place on a (out/b, in/b, b) kernel; returns it.

    True: zeros (the adapter starts as the identity); "gaussian": N(0, 1);
    "xavier_uniform" or False: U(-a, a), a = sqrt(6 / (in + out));
    "kaiming_uniform": U(-a, a), a = sqrt(1 / in).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 3:
        raise ValueError(f"tensor: expected a 3-D c3a_kernel (out/b, in/b, b), got shape {tuple(tensor.shape)}")
    if not any(init_weights is c or (isinstance(c, str) and init_weights == c) for c in _INIT_CHOICES):
        raise ValueError(f"init_weights: expected one of {_INIT_CHOICES}, got {init_weights!r}")
    b = tensor.shape[2]
    fan_out, fan_in = tensor.shape[0] * b, tensor.shape[1] * b
    if init_weights is True:
        return tensor.zero_()
    if init_weights == "gaussian":
        return tensor.normal_()
    if init_weights == "kaiming_uniform":
        a = math.sqrt(1.0 / float(fan_in))
    else:  # "xavier_uniform" or False
        a = math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out))
    return tensor.uniform_(-a, a)
