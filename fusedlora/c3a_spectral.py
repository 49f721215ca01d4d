"""C3A's spectral form (fusedlora.c3a.use_spectral): the block-circulant delta and its
gradients through the real DFT of each length-b block, all as GEMMs on x's own layout.

    forward   Y_m = sum_n conj(W_mn) X_n            (circular cross-correlation)
    dx        DX_n = sum_m W_mn DY_m                 (circular convolution)
    dw_mn     IDFT(sum_rows conj(DY_m) X_n) / K      (circular correlation)

with W_mn = DFT(w_mn), X_n the DFT of x's n-th block. The blocks' spectra come from one GEMM
(D^T times the blocks, transposed: frequency-major, no permuted copies), the per-frequency
products are batched GEMMs over the b // 2 + 1 frequencies, and the inverse DFT is one
addmm_ into y's (or dx's) blocks. The bases are unitary and 1/K rides inside the products,
so 16-bit intermediates stay at the scale of x and y.
"""
from __future__ import annotations

import functools
import math
from typing import List, Tuple

import torch
from torch import Tensor

from .ops import bias_grad


@functools.lru_cache(maxsize=None)
def _real_dft(b: int, dtype: torch.dtype, device: torch.device):
    """(D^T (2F, b), D_inv (2F, b)) with F = b // 2 + 1 frequencies, ordered (re, im) x f, the
    unitary real DFT: for a real row v of length b, v @ D = [Re V | Im V] / sqrt(b) with
    V = DFT(v), and (v @ D) @ D_inv = v (Hermitian frequencies counted twice). Unitary, so a
    block's spectrum is no larger than the block: 16-bit intermediates do not overflow where
    the plain DFT's sums of b terms could. Both are stored (2F, b), row-major: a leading
    dimension of b. D stored (b, 2F) and read transposed had 2F = b + 2, which is not a
    multiple of 16 bytes: cuBLAS ran the blocks' DFT in a narrow-alignment kernel (cutlass
    align2 on the H200, 60 us for 4.4 GFLOP at 4096 rows, b = 128)."""
    f = torch.arange(b // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * torch.arange(b, dtype=torch.float64)[:, None] * f[None, :] / b  # (b, F)
    D_t = torch.cat([torch.cos(angle.t()), -torch.sin(angle.t())]) / math.sqrt(b)
    twice = torch.full_like(f, 2.0)
    twice[0] = 1.0
    if b % 2 == 0:
        twice[-1] = 1.0  # the Nyquist frequency is its own mirror
    D_inv = torch.cat([twice[:, None] * torch.cos(angle.t()), -twice[:, None] * torch.sin(angle.t())]) / math.sqrt(b)
    return D_t.to(device, dtype), D_inv.to(device, dtype)


def _blocks_dft(v: Tensor, nb: int, b: int) -> Tensor:
    """[Re | Im] of the unitary DFT of each length-b block of v's rows (M, nb * b),
    frequency-major: (2, F, M, nb), one GEMM on v's own layout (D^T times the blocks^T)."""
    D_t, _ = _real_dft(b, v.dtype, v.device)
    return (D_t @ v.reshape(v.shape[0] * nb, b).t()).view(2, b // 2 + 1, v.shape[0], nb)


def _add_blocks_idft_(out: Tensor, spectra: Tensor) -> Tensor:
    """out (M, nb * b), contiguous, += the unitary inverse DFT of each block's spectrum
    (2, F, M, nb), in place: one addmm_ on out's blocks."""
    b = out.shape[1] // spectra.shape[3]
    _, D_inv = _real_dft(b, out.dtype, out.device)
    out.view(-1, b).addmm_(spectra.reshape(spectra.shape[0] * spectra.shape[1], -1).t(), D_inv)
    return out


def _kernel_spectrum(c3a_kernel: Tensor, dtype: torch.dtype, scale: float) -> Tuple[Tensor, Tensor]:
    """Re and Im of scale * W_mn, W_mn = DFT(w_mn), as (F, nb_in, nb_out) each, in ``dtype``;
    formed at every call from the kernel as it is (no cache: a fused optimizer's step, a
    write through .data or a CUDA graph's replay would never tell one it is stale)."""
    wide = torch.promote_types(torch.promote_types(c3a_kernel.dtype, dtype), torch.float32)
    w = torch.view_as_real(torch.fft.rfft(c3a_kernel.detach().to(wide), dim=-1))  # (nb_out, nb_in, F, 2)
    w = torch.mul(w.permute(3, 2, 1, 0), scale).to(dtype, memory_format=torch.contiguous_format)  # one copy
    return w[0], w[1]


def _spectral_delta_(y: Tensor, x: Tensor, c3a_kernel: Tensor) -> Tensor:
    """y += x dW^T through the real DFT of each length-b block: the forward's cross-correlation
    is Y_m = sum_n conj(W_mn) X_n per frequency, four batched products over the frequencies;
    no permuted copies, y updated in place. With the unitary bases the blocks' spectra stay at
    x's scale, and 1/K rides on the kernel's (formed in float32), so the products stay at y's."""
    nb_out, nb_in, b = c3a_kernel.shape
    z = _blocks_dft(x, nb_in, b)
    w_re, w_im = _kernel_spectrum(c3a_kernel, x.dtype, 1.0 / x.shape[1])
    out = x.new_empty((2, b // 2 + 1, x.shape[0], nb_out))
    torch.bmm(z[0], w_re, out=out[0]).baddbmm_(z[1], w_im)                # Re(conj(W) X)
    torch.bmm(z[1], w_re, out=out[1]).baddbmm_(z[0], w_im, alpha=-1)      # Im(conj(W) X)
    return _add_blocks_idft_(y, out)


def _spectral_grads(grad_y: Tensor, x: Tensor, weight: Tensor, c3a_kernel: Tensor,
                    needs: List[bool]) -> List[Tensor]:
    """The spectral form's gradients: cuBLAS for the base terms, and per frequency
      dx_n: DX_n = sum_m W_mn DY_m                 (circular convolution)
      dw_mn = IDFT(sum_rows conj(DY_m) X_n) / K    (circular correlation)
    as batched products on the blocks' spectra, where the dense form pays two more GEMMs
    of the base's shape (dY C and dY^T X). 1/K is applied inside the products (alpha), so
    16-bit sums over the rows stay at the gradient's scale."""
    need_x, need_w, need_b, need_k = needs
    nb_out, nb_in, b = c3a_kernel.shape
    K = x.shape[1]
    dx, dW, db, dk = (grad_y.new_empty(0) for _ in range(4))
    zy = _blocks_dft(grad_y, nb_out, b) if (need_x or need_k) else None
    if need_x:
        w_re, w_im = (w.transpose(1, 2) for w in _kernel_spectrum(c3a_kernel, x.dtype, 1.0 / K))
        out = x.new_empty((2, b // 2 + 1, x.shape[0], nb_in))
        torch.bmm(zy[0], w_re, out=out[0]).baddbmm_(zy[1], w_im, alpha=-1)   # Re(W DY)
        torch.bmm(zy[0], w_im, out=out[1]).baddbmm_(zy[1], w_re)             # Im(W DY)
        dx = _add_blocks_idft_(grad_y @ weight, out)
    if need_k:
        zx = _blocks_dft(x, nb_in, b)
        yt = zy.transpose(2, 3)                                               # (2, F, nb_out, M)
        empty = x.new_empty((b // 2 + 1, nb_out, nb_in))
        re = torch.baddbmm(empty, yt[0], zx[0], beta=0, alpha=1.0 / K).baddbmm_(yt[1], zx[1], alpha=1.0 / K)
        im = torch.baddbmm(empty, yt[0], zx[1], beta=0, alpha=1.0 / K).baddbmm_(yt[1], zx[0], alpha=-1.0 / K)
        acc = torch.promote_types(torch.promote_types(x.dtype, c3a_kernel.dtype), torch.float32)
        spectrum = torch.complex(re.to(acc), im.to(acc)).permute(1, 2, 0)    # (nb_out, nb_in, F) of DW / (b K)
        dk = (torch.fft.irfft(spectrum, n=b, dim=-1) * b).to(c3a_kernel.dtype)
    if need_w:
        dW = (grad_y.t() @ x).to(weight.dtype)
    if need_b:
        db = bias_grad(grad_y, x.dtype)
    return [dx, dW, db, dk]
