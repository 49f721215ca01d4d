"""Where the host time of an eager decode call goes: ``python bench/host_overhead.py [rows]``.

On the H200 a FusedLinear decode call with one rank-16 LoRA adapter took 300-600 us
without CUDA graphs against 20 us of GPU time (bench/results/2026-11-27_h200): the host,
not the kernels. This times back-to-back eager calls of F.linear, the layer (LoRA, C3A,
sparse, multi-adapter) and fusedlora.ops.lora_linear, then profiles the LoRA layer's call
with cProfile (own time per function). A few seconds on a GPU; on a CPU it profiles the
reference path (FUSEDLORA_BACKEND=torch), which shows the Python layers without Triton.
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F

import fusedlora
from fusedlora import FusedLinear
from fusedlora.sparse import random_indices


def per_call_us(fn, n: int = 200) -> float:
    for _ in range(20):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n * 1e6


def main(rows: int = 1) -> None:
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    K = N = 4096 if cuda else 256
    torch.manual_seed(0)
    x = torch.randn(rows, K, device=device, dtype=dtype)
    layers = {}
    for kind in ("lora", "c3a", "sparse", "multi"):
        layer = FusedLinear(K, N, device=device, dtype=dtype).eval()
        if kind in ("lora", "multi"):
            for a in range(8 if kind == "multi" else 1):
                layer.add_lora(f"{kind}{a}", r=16, lora_alpha=32, init_lora_weights=False)  # no zeros
        elif kind == "c3a":
            layer.add_c3a("c", block_size=64, init_weights="gaussian")
        else:
            idx = random_indices((N, K), density=0.01, seed=0)
            layer.add_sparse("s", idx, torch.randn(idx.shape[1], device=device) * 0.01)
        layers[kind] = layer
    multi = layers["multi"]
    ids = torch.tensor([multi.adapter_id(f"multi{i % 8}") for i in range(rows)], device=device)
    A, B = layers["lora"].lora_A["lora0"], layers["lora"].lora_B["lora0"]
    W, b = layers["lora"].weight, layers["lora"].bias
    with torch.no_grad():
        print(f"{fusedlora.backend_info()['device']}, {rows} row(s), {K}x{N} {str(dtype)[6:]}: us per eager call")
        print(f"  F.linear              {per_call_us(lambda: F.linear(x, W, b)):8.1f}")
        print(f"  ops.lora_linear       {per_call_us(lambda: fusedlora.ops.lora_linear(x, W, b, A, B, 2.0)):8.1f}")
        for kind, layer in layers.items():
            call = (lambda l=layer: l(x, adapter_ids=ids, validate=False)) if kind == "multi" else (lambda l=layer: l(x))
            print(f"  FusedLinear {kind:10s}{per_call_us(call):8.1f}")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            layers["lora"](x)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    print("dispatch:", sorted(fusedlora.backend_info()["dispatch"]))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
