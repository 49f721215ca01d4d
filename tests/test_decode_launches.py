"""What a decode call asks of the GPU: every decode pair is two Triton launches and
otherwise only allocations (no memset, no cast, no gather), the property its speed in a
CUDA graph rests on. On the CPU the aten ops a call issues outside its kernels are caught by
a TorchDispatchMode and the launches by a hook on the interpreter's kernel runner; on a GPU
(marked) the profiler counts the device's kernels and memsets."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from fusedlora import c3a, launch, multi, ops, sparse  # noqa: E402
from fusedlora.routing import pack_loras  # noqa: E402
from fusedlora.sparse import build_layout, random_indices  # noqa: E402

from conftest import DEVICE  # noqa: E402

interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's launches")
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


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def lora_call(dtype, K=64, N=20):
    x, W, b, A, B = rand(3, K, dtype=dtype), rand(N, K, dtype=dtype), rand(N, dtype=dtype), rand(4, K, dtype=dtype), \
        rand(N, 4, dtype=dtype)
    seed = None
    return lambda: ops._lora_forward_on("triton", x, W, b, A, B, 0.5, 0.0, seed)


def multi_call(dtype=torch.float32, K=64, N=20):
    As, Bs = [rand(r, K, dtype=dtype) for r in (3, 9)], [rand(N, r, dtype=dtype) for r in (3, 9)]
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras(As, Bs, [1.0, 0.5], device=DEVICE)
    sl = multi._Slots(off, rank, scale, torch.zeros(2, device=DEVICE), False, 0)
    x, W = rand(3, K, dtype=dtype), rand(N, K, dtype=dtype)
    slots = torch.tensor([1, -1, 0], dtype=torch.int32, device=DEVICE)
    return lambda: multi._decode_pair(x, W, None, pool_A, pool_BT, slots, sl, rmax)


def sparse_call(dtype=torch.float32, K=64, N=20):
    idx = random_indices((N, K), density=0.05, seed=2, device=DEVICE)
    _, rows, cols, perm = build_layout(idx, (N, K), tile=16).tensors()
    x, W, b, values = rand(3, K, dtype=dtype), rand(N, K, dtype=dtype), rand(N, dtype=dtype), rand(idx.shape[1])
    return lambda: sparse._rows_decode(x, W, b, values, rows, cols, perm, 0.7)


def c3a_call(dtype=torch.float32, K=64, N=32):
    x, W, b, kernel = rand(3, K, dtype=dtype), rand(N, K, dtype=dtype), rand(N, dtype=dtype), rand(N // 16, K // 16, 16)
    return lambda: c3a._decode_pair(x, W, b, kernel)


@interpreter_only
@pytest.mark.parametrize("path", ["lora-fp32", "lora-fp16", "multi", "sparse", "c3a"])
def test_a_decode_pair_is_two_launches_and_allocations(work, path):
    call = {"lora-fp32": lambda: lora_call(torch.float32), "lora-fp16": lambda: lora_call(torch.float16),
            "multi": multi_call, "sparse": sparse_call, "c3a": c3a_call}[path]()
    rec = work(call)
    assert len(rec.launches()) == 2, rec.ops
    assert set(rec.ops) - set(rec.launches()) <= ALLOCATIONS, rec.ops


@interpreter_only
def test_the_split_k_form_zeroes_and_casts(work):
    """What the pairs replace (launch.use_decode_pair(False), the bench's A/B column): zeroed
    fp32 outputs for the atomics, and a cast of y from fp32."""
    with launch.use_decode_pair(False):
        rec = work(lora_call(torch.float16))
    assert rec.ops.count("zeros") == 2 and "_to_copy" in rec.ops and len(rec.launches()) == 2, rec.ops


def gpu_work(call):
    """(kernel names, memset count) the device ran for one call, by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    call()  # compiles and autotunes outside the count
    torch.cuda.synchronize()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not events:
        pytest.skip("the profiler saw no device activity here (CUPTI)")
    memsets = [e.name for e in events if "memset" in e.name.lower()]
    return [e.name for e in events if e.name not in memsets], memsets


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["lora", "multi", "sparse", "c3a"])
def test_on_the_gpu_a_decode_pair_is_two_kernels(path):
    call = {"lora": lora_call, "multi": multi_call, "sparse": sparse_call, "c3a": c3a_call}[path]
    kernels, memsets = gpu_work(call(torch.bfloat16, K=1024, N=768))
    assert len(kernels) == 2 and not memsets, (kernels, memsets)
