"""Compile the Triton kernels ahead of time for real GPU targets (sm_80, sm_90).

The interpreter runs the kernels' math but never compiles them; this runs the
whole Triton -> PTX -> cubin pipeline (ptxas ships with triton) on the CPU, so
a kernel that would not build on an A100/H100, or that lost its tensor-core
instructions, fails here without a GPU. The compiler must run in a process
without TRITON_INTERPRET (which replaces @triton.jit functions at import), so
the test runs this file as a script.
"""
import inspect
import json
import os
import subprocess
import sys

import pytest

_SCALARS = {"alpha": "fp32", "p": "fp32", "keep_scale": "fp32", "seed": "i64"}


def compile_variant(arch, dtype, out, consts, num_warps, num_stages):
    """Compile lora_matmul_kernel for arch with operands of dtype ('bf16', ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusedlora.kernels.lora import lora_matmul_kernel

    params = list(inspect.signature(lora_matmul_kernel.fn).parameters)
    sig = {}
    for name in params:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{out}" if name == "c_ptr" else ("*fp32" if name == "u_ptr" else f"*{dtype}")
        else:
            sig[name] = _SCALARS.get(name, "i32")
    src = ASTSource(lora_matmul_kernel, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def flags(**kw):
    import triton.language as tl

    base = dict(HAS_BIAS=False, HAS_LOWRANK=False, DROP_A=False, DROP_B=False, DROP_EPI=False,
                DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", SPLIT_K=1, BLOCK_M=128, BLOCK_N=128,
                BLOCK_K=64, BLOCK_R=16, GROUP_M=8)
    base.update(kw)
    return base


def variants():
    import triton.language as tl

    f16, f32 = dict(DOT_DTYPE=tl.float16), dict(DOT_DTYPE=tl.float32, INPUT_PRECISION="ieee")
    return {  # name: (arch, operand dtype, output dtype, constexprs, warps, stages, tensor-core op)
        # forward GEMM with bias and the rank-r epilogue, the largest autotune tile
        "sm90-bf16-forward": (90, "bf16", "bf16", flags(HAS_BIAS=True, HAS_LOWRANK=True, BLOCK_N=256),
                              8, 3, "wgmma"),
        # dX: rank-r epilogue with dropout
        "sm90-bf16-grad-x": (90, "bf16", "bf16", flags(HAS_LOWRANK=True, DROP_EPI=True), 8, 4, "wgmma"),
        # decode: split-K, fp32 atomics, rank-64 epilogue; 16-row tiles are below wgmma's 64
        "sm90-bf16-decode": (90, "bf16", "fp32", flags(HAS_BIAS=True, HAS_LOWRANK=True, SPLIT_K=5, BLOCK_M=16,
                                                     BLOCK_N=64, BLOCK_K=128, BLOCK_R=64, GROUP_M=1),
                             4, 3, "mma"),
        # shrink with dropout on x
        "sm90-fp16-shrink": (90, "fp16", "fp32", flags(**f16, DROP_A=True, SPLIT_K=4, BLOCK_M=64, BLOCK_N=16,
                                                     BLOCK_K=128, GROUP_M=1), 4, 3, "mma"),
        "sm80-fp16-forward": (80, "fp16", "fp16", flags(**f16, HAS_BIAS=True, HAS_LOWRANK=True), 8, 4, "mma.sync"),
        # fp32 without tf32: exact FMA path, no tensor cores
        "sm80-fp32-ieee-grad-A": (80, "fp32", "fp32", flags(**f32, DROP_B=True, SPLIT_K=3, BLOCK_M=16,
                                                          BLOCK_N=64, BLOCK_K=32, GROUP_M=1), 4, 3, None),
    }


def main() -> None:
    report = {}
    for name, (arch, dtype, out, consts, warps, stages, mma) in variants().items():
        kernel = compile_variant(arch, dtype, out, consts, warps, stages)
        ptx = kernel.asm["ptx"]
        report[name] = {"arch": arch, "cubin_bytes": len(kernel.asm["cubin"]), "shared": kernel.metadata.shared,
                        "expected_mma": mma, "has_mma": mma is None or mma in ptx}
    print(json.dumps(report))


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["sm90-bf16-forward", "sm90-bf16-grad-x", "sm90-bf16-decode", "sm90-fp16-shrink",
                                  "sm80-fp16-forward", "sm80-fp32-ieee-grad-A"])
def test_lora_kernel_compiles_for_gpu(compiled, name):
    k = compiled[name]
    assert k["cubin_bytes"] > 0
    assert k["has_mma"], f"{name}: no {k['expected_mma']} instruction in the PTX"
    assert k["shared"] <= (227 if k["arch"] == 90 else 163) * 1024, k


if __name__ == "__main__":
    main()
