"""The eager compositions hand their GEMMs to cuBLAS in layouts it runs at full speed.

cuBLAS picks its fast (TMA / 16-byte vector) kernels only when each operand's leading
dimension and base address are multiples of 16 bytes; otherwise it falls back to
narrow-alignment kernels (the H200 profile of 2026-11-28 showed the spectral C3A form's
DFT GEMM, whose basis had a leading dimension of 2F = b + 2, in a cutlass ``align2``
kernel: 60 us for 4.4 GFLOP). The shapes here are the production ones in miniature:
feature counts and block counts multiples of 8. Every matrix product of each composition
(forward and backward) is recorded on the aten level and checked.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fusedlora  # noqa: E402
from conftest import DEVICE  # noqa: E402
from fusedlora import FusedLinear  # noqa: E402
from fusedlora.sparse import random_indices  # noqa: E402

aten = torch.ops.aten
PRODUCTS = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default, aten.addmm_.default, aten.bmm.default, aten.baddbmm.default,
            aten.baddbmm_.default, aten.mm.out, aten.bmm.out, aten.addmm.out, aten.baddbmm.out}


def misaligned(t: torch.Tensor) -> str:
    """Why cuBLAS would not read ``t`` (a matrix or a batch of them) with 16-byte accesses, or ''."""
    step = max(1, 16 // t.element_size())
    rows, cols = t.shape[-2:]
    s_rows, s_cols = t.stride()[-2:]
    if t.data_ptr() % 16:
        return f"base address {t.data_ptr()} % 16 = {t.data_ptr() % 16}"
    if t.dim() == 3 and t.shape[0] > 1 and t.stride(0) % step:
        return f"batch stride {t.stride(0)} not a multiple of {step}"
    if s_cols == 1 or cols == 1:
        ld = s_rows if rows > 1 else None
    elif s_rows == 1 or rows == 1:
        ld = s_cols
    else:
        return f"neither dimension contiguous (strides {t.stride()})"
    if ld is not None and ld % step:
        return f"leading dimension {ld} not a multiple of {step} (shape {tuple(t.shape)}, strides {t.stride()})"
    return ""


class Products(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bad, self.count = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            self.count += 1
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.numel() > 0:
                    why = misaligned(a)
                    if why:
                        self.bad.append(f"{func}: operand {i}: {why}")
        if func.namespace == "fusedlora":  # a fused op's body: record the products inside it too
            with self:
                return OPDEFS[func._schema.name].direct(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


M, K, N, DT = 24, 256, 128, torch.bfloat16  # above 16 rows: the cuBLAS compositions


def _layer(kind: str) -> FusedLinear:
    torch.manual_seed(0)
    layer = FusedLinear(K, N, device=DEVICE, dtype=DT)
    if kind == "lora":
        layer.add_lora("a", r=16, lora_alpha=32, lora_dropout=0.1, init_lora_weights=False)
    elif kind == "c3a":
        layer.add_c3a("a", block_size=16, init_weights="gaussian")
    elif kind == "sparse":
        layer.add_sparse("a", random_indices((N, K), density=0.02, seed=0),
                         values=torch.randn(int(0.02 * N * K), device=DEVICE))
    return layer


def _step(layer: FusedLinear, ids=None):
    x = torch.randn(M, K, device=DEVICE, dtype=DT, requires_grad=True)
    with Products() as seen:
        y = layer(x) if ids is None else layer(x, adapter_ids=ids)
        y.backward(torch.randn_like(y))
    return seen


@pytest.mark.parametrize("kind,spectral", [("lora", False), ("c3a", False), ("c3a", True), ("sparse", False)])
def test_eager_compositions_give_cublas_aligned_operands(monkeypatch, kind, spectral):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    layer = _layer(kind)
    with fusedlora.c3a.use_spectral(16 if spectral else None):
        seen = _step(layer.train())
    assert seen.count >= 3, "no products recorded: the composition did not run"
    assert not seen.bad, "\n".join(seen.bad)


def test_routed_batch_gives_cublas_aligned_operands(monkeypatch):
    """A routed batch above 16 rows: F.linear's base GEMM (and dY W, dY^T X) on cuBLAS."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    layer = FusedLinear(K, N, device=DEVICE, dtype=torch.float32)
    for name, r in (("a", 8), ("b", 16)):
        layer.add_lora(name, r=r, init_lora_weights=False)
    ids = torch.tensor([layer.adapter_id("a"), -1, layer.adapter_id("b")] * (M // 3), device=DEVICE)
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    with Products() as seen:
        y = layer(x, adapter_ids=ids)
        y.backward(torch.randn_like(y))
    assert seen.count >= 2
    assert not seen.bad, "\n".join(seen.bad)


def test_the_check_catches_a_narrow_leading_dimension():
    basis = torch.randn(16, 18, dtype=DT)  # (b, 2F) as the spectral form's basis once was
    assert "leading dimension 18" in misaligned(basis.t())
    assert misaligned(basis.t().contiguous()) == ""
    assert "not a multiple" in misaligned(torch.randn(4, 12, dtype=DT)[:, :10].t())
