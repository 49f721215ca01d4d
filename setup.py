"""fusedlora: fused LoRA / C3A / sparse-delta layers for PyTorch (Triton + CUDA C++).

The Triton kernels live in the top-level folder ``kernels/`` of the source
tree but install as ``fusedlora.kernels``: a top-level ``kernels`` module
belongs to another package.

The CUDA extension (``fusedlora._C``) is built from ``csrc/`` when it has
sources, torch has CUDA and nvcc is found; ``FUSEDLORA_BUILD_EXT=0`` skips it
and ``=1`` makes a failure to build it an error.
"""
import glob
import os
import shutil

from setuptools import setup


def _cuda_extension():
    want = os.environ.get("FUSEDLORA_BUILD_EXT", "auto").lower()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if want == "0" or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:  # build isolation hides torch: pip install --no-build-isolation
        if want == "1":
            raise RuntimeError("FUSEDLORA_BUILD_EXT=1 needs torch importable at build time") from e
        return [], {}
    has_nvcc = bool(os.environ.get("CUDA_HOME") or shutil.which("nvcc"))
    if torch.version.cuda is None or not has_nvcc:
        if want == "1":
            raise RuntimeError("FUSEDLORA_BUILD_EXT=1 needs the CUDA build of torch and nvcc")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # libstdc++ shared, as torch uses it (why: fusedlora/cuda_ext.py, LINK_FLAGS)
    ext = CUDAExtension("fusedlora._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
                        extra_link_args=["-l:libstdc++.so.6"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="fusedlora",
    version="0.1.0",
    description="Fused low-rank adapter layers (LoRA, C3A, sparse delta, multi-adapter) for PyTorch",
    packages=["fusedlora", "fusedlora.kernels"],
    package_dir={"fusedlora": "fusedlora", "fusedlora.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'", "ninja"],
    extras_require={"test": ["pytest>=7", "peft>=0.13"], "bench": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
