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


# --- C3A (circular-convolution adaptation, PEFT's C3A tuner) ---------------
def _c3a_blocks(c3a_kernel, in_features: int, out_features: int):
    nb_out, nb_in, b = c3a_kernel.shape
    if nb_out * b != out_features or nb_in * b != in_features:
        raise ValueError(f"c3a_kernel: shape {tuple(c3a_kernel.shape)} does not tile "
                         f"(out_features, in_features)=({out_features}, {in_features})")
    return nb_out, nb_in, b


def c3a_circulant(c3a_kernel, dtype) -> torch.Tensor:
    """C[m*b+s, n*b+t] = w[m, n, (t - s) mod b] in ``dtype``, unscaled (K * dW)."""
    nb_out, nb_in, b = c3a_kernel.shape
    ar = torch.arange(b, device=c3a_kernel.device)
    blocks = c3a_kernel.to(dtype)[:, :, (ar[None, :] - ar[:, None]) % b]    # (m, n, s, t)
    return blocks.permute(0, 2, 1, 3).reshape(nb_out * b, nb_in * b)


def c3a_delta_weight(c3a_kernel, in_features: int, out_features: int, dtype=torch.float32) -> torch.Tensor:
    """The dense update that merging adds to W, as PEFT's ``get_delta_weight``:
    dW[m*b+s, n*b+t] = w[m, n, (t - s) mod b] / in_features, in float32, or wider when
    the kernel or ``dtype`` (a float64 layer's) is."""
    _c3a_blocks(c3a_kernel, in_features, out_features)
    dt = torch.promote_types(torch.promote_types(c3a_kernel.dtype, dtype), torch.float32)
    return c3a_circulant(c3a_kernel, dt) / in_features


def c3a_linear(x, weight, bias, c3a_kernel) -> torch.Tensor:
    """y = x W^T + b + x dW^T in x's dtype, the delta's product apart in float32 or wider,
    as PEFT's C3A layer adds its delta to the base output (a 16-bit W + dW would round
    most of dW away: its entries are w / in_features)."""
    dW = c3a_delta_weight(c3a_kernel, weight.shape[1], weight.shape[0], x.dtype)
    y = F.linear(x, weight, bias)
    return (y.to(dW.dtype) + F.linear(x.to(dW.dtype), dW)).to(y.dtype)


def c3a_kernel_grad(grad_y, x, c3a_kernel) -> torch.Tensor:
    """dL/dw[m, n, u] = sum_rows sum_s dy[., m*b+s] x[., n*b+(s+u) mod b] / K, for 2-D x."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return c3a_diagonal_sums(grad_y.to(dt).t() @ x.to(dt), c3a_kernel)


def c3a_diagonal_sums(g, c3a_kernel) -> torch.Tensor:
    """The kernel gradient from G = dY^T X (N x K): dw[m, n, u] = sum_s G[m*b+s, n*b+(s+u) mod b] / K,
    in float32 or wider, cast to the kernel's dtype."""
    nb_out, nb_in, b = c3a_kernel.shape
    K = g.shape[1]
    g = g.to(torch.promote_types(g.dtype, torch.float32)).reshape(nb_out, b, nb_in, b).permute(0, 2, 1, 3)
    ar = torch.arange(b, device=g.device)
    idx = (ar[:, None] + ar[None, :]) % b                # idx[s, u] = (s + u) mod b; g is (m, n, s, t)
    diag = torch.gather(g, 3, idx.expand(nb_out, nb_in, b, b))   # (m, n, s, u)
    return (diag.sum(2) / K).to(c3a_kernel.dtype)


def c3a_linear_grads(grad_y, x, weight, c3a_kernel):
    """Closed-form gradients of ``c3a_linear`` for 2-D x: (dx, dW, db, dw); dx's delta
    product apart, as in the forward."""
    dW_c3a = c3a_delta_weight(c3a_kernel, weight.shape[1], weight.shape[0], grad_y.dtype)
    dx = ((grad_y @ weight).to(dW_c3a.dtype) + grad_y.to(dW_c3a.dtype) @ dW_c3a).to(grad_y.dtype)
    dW = grad_y.t() @ x
    db = grad_y.sum(0)
    return dx, dW, db, c3a_kernel_grad(grad_y, x, c3a_kernel)


def c3a_fft_delta(x, c3a_kernel) -> torch.Tensor:
    """PEFT's FFT algorithm (BlockCircularConvolution / K) for the adapter output
    x dW^T, in float32 (float64 when x or the kernel is): for cross-checking."""
    nb_out, nb_in, b = c3a_kernel.shape
    dt = torch.promote_types(torch.promote_types(x.dtype, c3a_kernel.dtype), torch.float32)
    xb = x.to(dt).reshape(*x.shape[:-1], nb_in, b)
    z = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(xb), torch.fft.fft(c3a_kernel.to(dt)))
    y = torch.fft.fft(z).real
    return y.reshape(*y.shape[:-2], nb_out * b) / x.shape[-1]


# --- sparse delta (SHiRA)
def sparse_delta_weight(indices: torch.Tensor, values: torch.Tensor, scaling: float, shape) -> torch.Tensor:
    """Dense scaling * S of ``shape`` (out_features, in_features), S[indices[0][i], indices[1][i]] = values[i];
    repeated pairs add up, as PEFT's sparse_coo_tensor does. In values' dtype."""
    delta = torch.zeros(tuple(shape), device=values.device, dtype=values.dtype)
    delta.index_put_((indices[0].long(), indices[1].long()), values * scaling, accumulate=True)
    return delta


def sparse_linear(x, weight, bias, indices, values, scaling: float) -> torch.Tensor:
    """y = x (W + scaling * S)^T + b, as PEFT's SHiRA Linear computes it."""
    delta = sparse_delta_weight(indices, values, scaling, weight.shape)
    return F.linear(x, weight + delta.to(weight.dtype), bias)


def sparse_linear_grads(grad_y, x, weight, indices, values, scaling: float):
    """Closed-form gradients of ``sparse_linear`` for 2-D x: (dx, dW, d_bias, d_values).

    d_values[i] = scaling * sum_m grad_y[m, row_i] * x[m, col_i], at the nonzeros only.
    """
    rows, cols = indices[0].long(), indices[1].long()
    delta = sparse_delta_weight(indices, values, scaling, weight.shape)
    dx = grad_y @ (weight + delta.to(weight.dtype))
    dW = grad_y.t() @ x
    db = grad_y.sum(0)
    dvals = scaling * (grad_y[:, rows] * x[:, cols]).sum(0)
    return dx, dW, db, dvals.to(values.dtype)


# --- multi-adapter (batched serving: every row its own adapter)
def multi_lora_linear(x, weight, bias, row_adapter, lora_As, lora_Bs, scalings) -> torch.Tensor:
    """y[m] = x[m] W^T + b + s_a (x[m] A_a^T) B_a^T with a = row_adapter[m]; rows of -1 (or of
    an adapter given as A = None) get the base only. Every adapter is applied to all rows and
    masked: the plain oracle, not a fast path."""
    y = F.linear(x, weight, bias)
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    for a, (A, B, s) in enumerate(zip(lora_As, lora_Bs, scalings)):
        if A is None:
            continue
        rows = (row_adapter == a).unsqueeze(-1)
        y = y + torch.where(rows, s * F.linear(F.linear(x, A), B), zero)
    return y


def multi_lora_linear_grads(grad_y, x, weight, row_adapter, lora_As, lora_Bs, scalings):
    """Closed-form gradients of ``multi_lora_linear`` for 2-D x: (dx, dW, db, [dA_a], [dB_a])
    (None for an adapter given as None)."""
    dx = grad_y @ weight
    dW = grad_y.t() @ x
    db = grad_y.sum(0)
    dAs, dBs = [], []
    for a, (A, B, s) in enumerate(zip(lora_As, lora_Bs, scalings)):
        if A is None:
            dAs.append(None)
            dBs.append(None)
            continue
        gy = grad_y * (row_adapter == a).to(grad_y.dtype).unsqueeze(1)   # rows of adapter a only
        g = s * (gy @ B)
        dx = dx + g @ A
        dAs.append(g.t() @ x)
        dBs.append(gy.t() @ (s * (x @ A.t())))
    return dx, dW, db, dAs, dBs
