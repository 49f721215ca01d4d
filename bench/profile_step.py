"""Host time against device time of one training step per adapter path:
``python -m bench.profile_step [rows]`` (as a module, so that a checkout
without an editable install imports fusedlora from the working tree).

The H200 run of 2026-11-27 timed C3A and sparse forward+backward at 4096 rows at ~2 ms
for fusedlora's default path, against ~0.4 ms for F.linear forward+backward, while the
GEMMs they launch add up to well under that: this separates the two. For each path it
times back-to-back eager calls (wall, synchronised at the end) and profiles one call with
torch.profiler, printing the sum of the GPU kernels' time and the five longest kernels.
Needs CUDA; bf16, 4096 x 4096.
"""
from __future__ import annotations

import sys
import time

import torch

from fusedlora import FusedLinear
from fusedlora.c3a import c3a_linear, init_c3a_kernel, use_spectral
from fusedlora.ops import lora_linear
from fusedlora.sparse import build_layout, random_indices, sparse_linear


def _spectral(step):
    with use_spectral():
        return step()


def cases(M: int):
    dev, dt, K, N = "cuda", torch.bfloat16, 4096, 4096
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    W = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
    gy = torch.randn(M, N, device=dev, dtype=dt)
    yield "linear", lambda: torch.autograd.grad(torch.nn.functional.linear(x, W), [x], gy)
    kernel = init_c3a_kernel(torch.empty(N // 128, K // 128, 128, device=dev), "kaiming_uniform").requires_grad_()
    c3a_step = lambda: torch.autograd.grad(c3a_linear(x, W, None, kernel), [x, kernel], gy)  # noqa: E731
    yield "c3a b128", c3a_step
    yield "c3a spect", lambda: _spectral(c3a_step)  # the candidate form (c3a.SPECTRAL_MIN_BLOCK)
    idx = random_indices((N, K), density=0.01, seed=0).to(dev)
    layout = build_layout(idx, (N, K), device=dev)
    values = (torch.randn(idx.shape[1], device=dev, dtype=dt) * 0.01).requires_grad_()
    yield "sparse 1%", lambda: torch.autograd.grad(sparse_linear(x, W, None, None, values, layout=layout), [x, values], gy)
    # LoRA r16 (the multi bench's 'single' row took 2.07 ms forward+backward on 2026-11-27
    # against 0.39 ms for the frozen base) and the 8-adapter routed layer, forward+backward
    # and forward alone (its 4096-row forward took 2.3x one adapter's on 2026-11-28)
    A = (torch.randn(16, K, device=dev, dtype=dt) / K ** 0.5).requires_grad_()
    B = (torch.randn(N, 16, device=dev, dtype=dt) * 0.01).requires_grad_()
    yield "lora r16", lambda: torch.autograd.grad(lora_linear(x, W, None, A, B, 2.0), [x, A, B], gy)
    layer = FusedLinear(K, N, bias=False, device=dev, dtype=dt)
    layer.weight.requires_grad_(False)
    for a in range(8):
        layer.add_lora(f"profile_{a}", r=16, init_lora_weights=False)  # random A and B: never time zeros
    ids = torch.tensor([layer.adapter_id(f"profile_{a}") for a in torch.randint(0, 8, (M,)).tolist()], device=dev)
    params = [p for p in layer.parameters() if p.requires_grad]
    yield "multi 8x16", lambda: torch.autograd.grad(layer(x, adapter_ids=ids, validate=False), [x, *params], gy)
    yield "multi fwd", torch.no_grad()(lambda: layer(x, adapter_ids=ids, validate=False))


def main(M: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        sys.exit("bench/profile_step.py needs a CUDA device")
    for name, step in cases(M):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 20 * 1e6
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        device_us = sum(e.self_device_time_total for e in kernels)
        print(f"{name:10s} rows={M}: {wall:8.1f} us a step (eager, back to back), {device_us:8.1f} us of kernels")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:5]:
            print(f"    {e.self_device_time_total:8.1f} us  x{e.count:<3d} {e.key[:90]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
