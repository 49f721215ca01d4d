"""What a decode call asks of the GPU, counted on the CPU: every decode pair is two Triton
launches and otherwise only allocations (no memset, no cast, no gather), the property its
speed in a CUDA graph rests on. The aten ops a call issues outside its kernels are caught
by a TorchDispatchMode; the launches by a hook on the interpreter's kernel runner."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from fusedlora import c3a, launch, multi, ops, sparse  # noqa: E402
from fusedlora.routing import pack_loras  # noqa: E402
from fusedlora.sparse import build_layout, random_indices  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's launches")
ALLOCATIONS = {"empty", "empty_strided"}


class GpuWork(TorchDispatchMode):
    """The aten ops issued outside kernels, and ``launch:<kernel>`` for each kernel run."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def launches(self):
        return [o for o in self.ops if o.startswith("launch:")]


@pytest.fixture
def work(monkeypatch):
    import triton.runtime.interpreter as interpreter

    recorders = []
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        if recorders:
            recorders[-1].ops.append("launch:" + self.fn.__name__)
        with _disable_current_modes():  # the interpreter's own tensor work is not the call's
            return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)

    def record(fn):
        fn()  # first call: caches (CSR order) are built outside the count
        with torch.no_grad(), GpuWork() as rec:
            recorders.append(rec)
            fn()
        return rec
    return record


def lora_call(dtype):
    x, W, b = torch.randn(3, 64, dtype=dtype), torch.randn(20, 64, dtype=dtype), torch.randn(20, dtype=dtype)
    A, B, seed = torch.randn(4, 64, dtype=dtype), torch.randn(20, 4, dtype=dtype), torch.zeros((), dtype=torch.int64)
    return lambda: ops._lora_forward_on("triton", x, W, b, A, B, 0.5, 0.0, seed)


def multi_call():
    As, Bs = [torch.randn(r, 64) for r in (3, 9)], [torch.randn(20, r) for r in (3, 9)]
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras(As, Bs, [1.0, 0.5])
    sl = multi._Slots(off, rank, scale, torch.zeros(2), False, 0)
    x, W = torch.randn(3, 64), torch.randn(20, 64)
    slots = torch.tensor([1, -1, 0], dtype=torch.int32)
    return lambda: multi._decode_pair(x, W, None, pool_A, pool_BT, slots, sl, rmax)


def sparse_call():
    idx = random_indices((20, 64), density=0.05, seed=2)
    _, rows, cols, perm = build_layout(idx, (20, 64), tile=16).tensors()
    x, W, b, values = torch.randn(3, 64), torch.randn(20, 64), torch.randn(20), torch.randn(idx.shape[1])
    return lambda: sparse._rows_decode(x, W, b, values, rows, cols, perm, 0.7)


def c3a_call():
    x, W, b, kernel = torch.randn(3, 64), torch.randn(32, 64), torch.randn(32), torch.randn(2, 4, 16)
    return lambda: c3a._decode_pair(x, W, b, kernel)


@pytest.mark.parametrize("path", ["lora-fp32", "lora-fp16", "multi", "sparse", "c3a"])
def test_a_decode_pair_is_two_launches_and_allocations(work, path):
    call = {"lora-fp32": lambda: lora_call(torch.float32), "lora-fp16": lambda: lora_call(torch.float16),
            "multi": multi_call, "sparse": sparse_call, "c3a": c3a_call}[path]()
    rec = work(call)
    assert len(rec.launches()) == 2, rec.ops
    assert set(rec.ops) - set(rec.launches()) <= ALLOCATIONS, rec.ops


def test_the_split_k_form_zeroes_and_casts(work):
    """What the pairs replace (launch.use_decode_pair(False), the bench's A/B column): zeroed
    fp32 outputs for the atomics, and a cast of y from fp32."""
    with launch.use_decode_pair(False):
        rec = work(lora_call(torch.float16))
    assert rec.ops.count("zeros") == 2 and "_to_copy" in rec.ops and len(rec.launches()) == 2, rec.ops
