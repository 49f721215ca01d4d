"""Sweep the Triton decode plan on a GPU: ``python bench/decode_plans.py [--out FILE.json]``.

The H200 run timed the fused LoRA decode (M = 1..16, rank 16, bf16) at 36-41% of the HBM
roof at 4096 x 4096 against 56% for F.linear (bench/results/2026-11-27_h200). The plan is
fusedlora.launch.DECODE_TILE / DECODE_BLOCK_K / PROGRAMS_PER_SM (split-K aims for that
many programs per SM; above one, partials go through a zeroed fp32 buffer, atomics and a
cast). This times ops.lora_linear under each combination of BLOCK_N, BLOCK_K and
programs per SM, from CUDA-graph replays over rotating weights (harness.time_graph), next
to F.linear, prints a table with the best plan per shape and writes it as JSON. Put the
winner into launch.py if it wins at every shape; about a minute on an H100/H200.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import harness  # noqa: E402

import fusedlora  # noqa: E402
from fusedlora import launch  # noqa: E402

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (1, 4096, 11008), (16, 4096, 11008)]
BLOCK_N, BLOCK_K, PER_SM = (32, 64, 128), (64, 128, 256), (1, 2, 4)
RANK = 16


def sets(M: int, K: int, N: int, device) -> list:
    rnd = harness.random_maker(device, torch.bfloat16)
    return [dict(x=rnd(M, K), W=rnd(N, K, std=K ** -0.5), b=rnd(N), A=rnd(RANK, K, std=K ** -0.5),
                 B=rnd(N, RANK, std=RANK ** -0.5)) for _ in range(harness.N_ROTATING_SETS)]


def graph_us(thunks, device) -> float:
    for t in thunks:
        t()
    return harness.time_graph(thunks, device)["median_ms"] * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_plans: needs a CUDA device (it times kernels)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    saved = (dict(launch.DECODE_TILE), dict(launch.DECODE_BLOCK_K), launch.PROGRAMS_PER_SM)
    rows = []
    with torch.no_grad(), fusedlora.use_backend("triton"):
        for M, K, N in SHAPES:
            data = sets(M, K, N, device)
            base = graph_us([lambda d=d: F.linear(d["x"], d["W"], d["b"]) for d in data], device)
            for bn, bk, per_sm in itertools.product(BLOCK_N, BLOCK_K, PER_SM):
                launch.DECODE_TILE["BLOCK_N"], launch.DECODE_BLOCK_K[2], launch.PROGRAMS_PER_SM = bn, bk, per_sm
                thunks = [lambda d=d: fusedlora.ops.lora_linear(d["x"], d["W"], d["b"], d["A"], d["B"], 2.0)
                          for d in data]
                try:
                    us = graph_us(thunks, device)
                except Exception as e:  # a tile that does not compile or fit: say so, go on
                    us, err = None, f"{type(e).__name__}: {str(e)[:120]}"
                else:
                    err = None
                rows.append(dict(M=M, K=K, N=N, BLOCK_N=bn, BLOCK_K=bk, programs_per_sm=per_sm, us=us,
                                 base_us=base, error=err))
                print(f"M={M:2d} {K}x{N} BLOCK_N={bn:3d} BLOCK_K={bk:3d} per_sm={per_sm}: "
                      + (f"{us:7.1f} us ({us / base:.2f}x F.linear {base:.1f} us)" if us else err), flush=True)
    launch.DECODE_TILE.update(saved[0])
    launch.DECODE_BLOCK_K.update(saved[1])
    launch.PROGRAMS_PER_SM = saved[2]
    print("\nbest per shape (current plan: BLOCK_N=%d BLOCK_K=%d per_sm=%d):" % (
        saved[0]["BLOCK_N"], saved[1][2], saved[2]))
    for M, K, N in SHAPES:
        ok = [r for r in rows if (r["M"], r["K"], r["N"]) == (M, K, N) and r["us"]]
        if ok:
            best = min(ok, key=lambda r: r["us"])
            print(f"  M={M:2d} {K}x{N}: BLOCK_N={best['BLOCK_N']} BLOCK_K={best['BLOCK_K']} "
                  f"per_sm={best['programs_per_sm']} {best['us']:.1f} us ({best['us'] / best['base_us']:.2f}x F.linear)")
    if args.out:
        args.out.write_text(json.dumps({"env": harness.environment(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
