"""Bisect the fusedlora_C segfault on the device in one call (~2-3 min on 16 cores).

Builds variants of csrc/bindings.cpp (with a stub in place of lora_decode.cu, which
crashed the same way) in parallel with torch.utils.cpp_extension.load, then calls
each in its own subprocess under LD_PRELOAD=segv_bt.so (native backtrace on SIGSEGV,
as library+offset). Writes OUT/summary.txt, OUT/<variant>.log and the .so files of
the crashing variants (for addr2line / objdump where they come back).

usage: python device_bisect.py CSRC_DIR OUT_DIR
"""
import os, re, shutil, subprocess, sys, textwrap, time
from concurrent.futures import ThreadPoolExecutor

CSRC, OUT = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
HERE = os.path.dirname(os.path.abspath(__file__))
WORK = "/tmp/fl_bisect"
PY = sys.executable
os.makedirs(OUT, exist_ok=True)
shutil.rmtree(WORK, ignore_errors=True)
os.makedirs(WORK)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")

subprocess.run(["gcc", "-O1", "-g", "-fPIC", "-shared", "-o", f"{WORK}/segv_bt.so", f"{HERE}/segv_bt.c"], check=True)
ORIG = open(f"{CSRC}/bindings.cpp").read()
STUB = textwrap.dedent('''
    #include "fusedlora.h"
    namespace fusedlora {
    int lora_decode_k_split(int, int, int) { return 1; }
    cudaError_t lora_decode_forward(const LoraDecodeArgs&) { return cudaErrorNotSupported; }
    }
''')
# Probe entry points added at the end of the module: each isolates one step of the failing path.
PROBES = textwrap.dedent('''
    namespace {
    int64_t p_noop(const at::Tensor& x) { return 1; }
    int64_t p_dim(const at::Tensor& x) { return x.dim(); }
    int64_t p_dtype(const at::Tensor& x) { return static_cast<int64_t>(x.scalar_type()); }
    std::string p_shape(const at::Tensor& x) { return shape_of(x); }
    int64_t p_size0(const at::Tensor& x) { return x.size(0); }
    void p_throw(const at::Tensor& x) { throw py::value_error("p_throw"); }
    void p_value_check(const at::Tensor& x) { value_check(false, "p_value_check " + std::to_string(x.numel())); }
    int64_t p_six(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, const at::Tensor& a,
                  const at::Tensor& bb, double s) { return 6; }
    int64_t p_check_base(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
      return check_base(x, w, b).M;
    }
    }  // namespace
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
      m.def("p_noop", &p_noop); m.def("p_dim", &p_dim); m.def("p_dtype", &p_dtype); m.def("p_shape", &p_shape);
      m.def("p_size0", &p_size0); m.def("p_throw", &p_throw); m.def("p_value_check", &p_value_check);
      m.def("p_six", &p_six); m.def("p_check_base", &p_check_base);
''')


# The shape of the minimal load_inline extension that worked on the H200, with the QUICK probes.
MIN_SRC = textwrap.dedent('''
    #include <torch/extension.h>
    #include <sstream>
    namespace py = pybind11;
    std::string shape_of(const at::Tensor& t) { std::ostringstream s; s << t.sizes(); return s.str(); }
    int64_t p_noop(const at::Tensor& x) { return 1; }
    int64_t p_dim(const at::Tensor& x) { return x.dim(); }
    std::string p_shape(const at::Tensor& x) { return shape_of(x); }
    void p_throw(const at::Tensor& x) { throw py::value_error("p_throw"); }
    std::tuple<at::Tensor, at::Tensor> lora_decode(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                                                   const at::Tensor& a, const at::Tensor& bb, double s) {
      if (x.dim() != 2) throw py::value_error("x: expected a 2-D (rows, in_features) tensor, got shape " + shape_of(x));
      return {x, x};
    }
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
      m.def("p_noop", &p_noop); m.def("p_dim", &p_dim); m.def("p_shape", &p_shape); m.def("p_throw", &p_throw);
      m.def("lora_decode", &lora_decode, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"),
            py::arg("lora_B"), py::arg("scaling"));
    }
''')


def with_probes(src):
    return src.replace("PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n", PROBES, 1)


def ext_first(src):
    src = src.replace("#include <torch/extension.h>\n", "")
    return src.replace("#include <c10/cuda/CUDAGuard.h>", "#include <torch/extension.h>\n#include <c10/cuda/CUDAGuard.h>", 1)


def no_cuda_headers(src):
    src = src.replace("#include <c10/cuda/CUDAGuard.h>\n", "").replace("#include <c10/cuda/CUDAStream.h>\n", "")
    src = src.replace("const c10::cuda::CUDAGuard guard(x.device());", "")
    return src.replace("c10::cuda::getCurrentCUDAStream(x.device().index()).stream()", "nullptr")


def no_anon(src):
    src = src.replace("\nnamespace {\n", "\nnamespace fl_bind {\n").replace("}  // namespace\n", "}  // namespace fl_bind\nusing namespace fl_bind;\n")
    return src


def no_doc_attr(src):
    src = re.sub(r'\n\s*m\.doc\(\) = [^\n]*', "", src)
    return re.sub(r'\n\s*m\.attr\([^\n]*', "", src)


def cpu_only(src):
    src = no_cuda_headers(src)
    src = src.replace("cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index());", "sms = 1;")
    return src.replace("cudaGetErrorString(err)", "\"cuda error\"")


CPU_HEADER_SHIM = "typedef int cudaError_t; typedef void* cudaStream_t; enum { cudaSuccess = 0, cudaErrorNotSupported = 801 };"


def std_optional(src):
    return src.replace("c10::optional", "std::optional")


# name: (bindings source, extra cflags, with_cuda)
V = {
    "orig": (with_probes(ORIG), ["-O3"], True),
    "orig_O0": (with_probes(ORIG), ["-O0", "-g"], True),
    "orig_O2_g": (with_probes(ORIG), ["-O2", "-g"], True),
    "ext_first": (with_probes(ext_first(ORIG)), ["-O3"], True),
    "no_cuda_headers": (with_probes(no_cuda_headers(ORIG)), ["-O3"], True),
    "no_cuda_at_all": (with_probes(cpu_only(ORIG)), ["-O3"], False),
    "no_anon": (with_probes(no_anon(ORIG)), ["-O3"], True),
    "no_doc_attr": (with_probes(no_doc_attr(ORIG)), ["-O3"], True),
    "std_optional": (with_probes(std_optional(ORIG)), ["-O3"], True),
    "min_cpu": (MIN_SRC, ["-O3"], False),
    "min_cuda": (MIN_SRC, ["-O3"], True),
    "all_four": (with_probes(std_optional(no_doc_attr(no_anon(no_cuda_headers(ext_first(ORIG)))))), ["-O3"], True),
}


if os.environ.get("VARIANTS"):
    V = {k: v for k, v in V.items() if k in os.environ["VARIANTS"].split(",")}
FULL = ("orig", "orig_O0")  # every probe; the other variants get the QUICK ones
QUICK = ("p_noop", "p_dim", "p_shape", "p_throw", "bad_arg")


def build(name):
    src, cflags, with_cuda = V[name]
    d = f"{WORK}/{name}"
    os.makedirs(f"{d}/build")
    open(f"{d}/bindings.cpp", "w").write(src)
    open(f"{d}/stub.cpp", "w").write(STUB)
    header = open(f"{CSRC}/fusedlora.h").read()
    if not with_cuda:  # no CUDA include path: the two CUDA types the header uses, by hand
        header = header.replace("#include <cuda_runtime.h>", CPU_HEADER_SHIM)
    open(f"{d}/fusedlora.h", "w").write(header)
    code = (f"import torch\nfrom torch.utils.cpp_extension import load\n"
            f"m = load(name='fl_{name}', sources=[{d + '/bindings.cpp'!r}, {d + '/stub.cpp'!r}], build_directory={d + '/build'!r}, "
            f"extra_cflags={cflags!r}, with_cuda={with_cuda}, verbose=True)\nprint('SO', m.__file__)")
    t = time.time()
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    out = r.stdout + r.stderr
    so = re.search(r"^SO (.*)$", out, re.M)
    return name, (so.group(1) if r.returncode == 0 and so else None), time.time() - t, out


CALLS = {
    "p_noop": "m.p_noop(torch.randn(8))",
    "p_dim": "m.p_dim(torch.randn(8))",
    "p_dtype": "m.p_dtype(torch.randn(8))",
    "p_size0": "m.p_size0(torch.randn(8))",
    "p_shape": "m.p_shape(torch.randn(8))",
    "p_throw": "m.p_throw(torch.randn(8))",
    "p_value_check": "m.p_value_check(torch.randn(8))",
    "p_six": "m.p_six(torch.randn(8), torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0)",
    "p_check_base": "m.p_check_base(torch.randn(2, 8), torch.randn(6, 8), None)",
    "bad_arg": "m.lora_decode(torch.randn(8), torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0)",
}


def call(job):
    name, so, probe = job
    code = (f"import torch, importlib.util as u\ns = u.spec_from_file_location('fl_{name}', {so!r}); m = u.module_from_spec(s); "
            f"s.loader.exec_module(m)\ntry:\n    print('RESULT', repr({CALLS[probe]}))\nexcept Exception as e:\n"
            f"    print('RAISED', type(e).__name__, str(e)[:120])\n")
    env = {**os.environ, "LD_PRELOAD": f"{WORK}/segv_bt.so"}
    r = subprocess.run([PY, "-X", "faulthandler", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    return name, probe, r.returncode, r.stdout + r.stderr


def note(line: str) -> None:
    """Summary lines go to OUT/summary.txt as they come: a run stopped by its timeout
    still leaves what it found."""
    summary.append(line)
    with open(f"{OUT}/summary.txt", "a") as f:
        f.write(line + "\n")


summary: list = []
t0 = time.time()
with ThreadPoolExecutor(len(V)) as ex:
    built = list(ex.map(build, V))
note(f"python {sys.version.split()[0]}; built in {time.time() - t0:.0f}s")
subprocess.run("(g++ --version | head -1; nvcc --version | tail -1; %s -c 'import sys, torch; print(torch.__version__, sys.version, "
               "sys.getdlopenflags())'; env | grep -E 'PATH|FLAGS|CUDA|TORCH|PYTHON|LD_|CPATH|INCLUDE' | sort; "
               "echo | g++ -dM -E -x c++ - | grep -E 'FORTIFY|GLIBCXX|_GNU_SOURCE|CET|PIE'; g++ -v -x c++ -E /dev/null 2>&1 | "
               "grep -E 'cc1plus|COLLECT_GCC_OPTIONS|^ /'; echo 'int f(){return 0;}' > /tmp/x.cpp; g++ -### -shared -fPIC /tmp/x.cpp -o /tmp/x.so 2>&1 | grep collect2; ld --version | head -1) > %s/toolchain.txt 2>&1" % (PY, OUT), shell=True)
jobs = []
for name, so, dt, out in built:
    open(f"{OUT}/{name}.build.log", "w").write(out[-20000:])
    note(f"build {name}: {'ok' if so else 'FAILED'} {dt:.0f}s")
    if so:
        jobs += [(name, so, p) for p in CALLS if name in FULL or p in QUICK]
crashed = set()
with ThreadPoolExecutor(8) as ex:
    results = ex.map(call, jobs)
    for name, probe, rc, out in results:
        last = [l for l in out.splitlines() if l.startswith(("RESULT", "RAISED"))]
        note(f"{name:16s} {probe:14s} rc={rc:4d} {last[0] if last else ''}")
        with open(f"{OUT}/{name}.log", "a") as f:
            f.write(f"==== {probe} rc={rc}\n{out[-6000:]}\n")
        if rc != 0:
            crashed.add(name)
for name, so, _, _ in built:
    if so and (name in crashed or name == "orig_O2_g"):
        shutil.copy(so, f"{OUT}/{name}.so")
orig = dict((b[0], b[1]) for b in built).get("orig")
if orig:
    subprocess.run(f"readelf -d {orig} > {OUT}/orig.readelf-d.txt 2>&1; nm -D --defined-only {orig} | c++filt > {OUT}/orig.exports.txt", shell=True)
    maps = ("import torch, importlib.util as u\ns = u.spec_from_file_location('fl_orig', %r); m = u.module_from_spec(s); "
            "s.loader.exec_module(m)\nprint(''.join(sorted({l.split()[-1] + chr(10) for l in open('/proc/self/maps') if '.so' in l})))" % orig)
    r = subprocess.run([PY, "-c", maps], capture_output=True, text=True)
    open(f"{OUT}/orig.maps.txt", "w").write(r.stdout + r.stderr)
print("\n".join(summary))
