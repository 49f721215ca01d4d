"""Run the microbenchmarks: ``python bench/run.py [--paths lora] [--quick|--smoke] [--out DIR]``.

A path is a module of bench/ with a ``cases(opts)`` generator: adding
bench/c3a.py makes ``--paths c3a`` work, and ``--paths all`` (the default)
picks it up, without touching this file.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(BENCH_DIR.parent))

import torch  # noqa: E402

from bench import harness  # noqa: E402

_NOT_PATHS = {"harness", "run"}


def discover_paths() -> list:
    names = [m.name for m in pkgutil.iter_modules([str(BENCH_DIR)])
             if m.name not in _NOT_PATHS and not m.name.startswith("_")]
    return [n for n in sorted(names) if hasattr(importlib.import_module(f"bench.{n}"), "cases")]


def _fail(msg: str):
    print(f"bench: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def load_path(name: str):
    try:
        mod = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"bench.{name}":
            raise
        _fail(f"unknown path {name!r}; available: {', '.join(discover_paths())}")
    if not hasattr(mod, "cases"):
        _fail(f"bench/{name}.py defines no cases(opts)")
    return mod


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench", description="fusedlora microbenchmarks (see docs/benchmarks.md)")
    p.add_argument("--paths", default="all", help="comma list of adapter paths, e.g. lora (default: all found)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few representative shapes")
    size.add_argument("--smoke", action="store_true", help="tiny float32 shapes: checks the harness, on CPU in seconds")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="folder for <date>_<device>.json/.md")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if args.device == "cpu" and not args.smoke:
        p.error("full-size shapes on CPU would take hours; use --smoke (or run on a GPU)")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    names = discover_paths() if args.paths == "all" else [n.strip() for n in args.paths.split(",") if n.strip()]
    mods = [load_path(n) for n in names]
    device = torch.device(args.device)
    opts = harness.Options(device=device, dtype=torch.float32 if args.smoke else torch.bfloat16,
                           quick=args.quick, smoke=args.smoke)
    torch.manual_seed(0)
    env = harness.environment(device)
    ceilings = harness.measure_ceilings(device, opts.dtype, small=args.smoke)
    rows, t0 = [], time.perf_counter()
    for mod in mods:
        for case in mod.cases(opts):
            new = harness.run_case(case, ceilings)
            rows += new
            done = ", ".join(f"{r['impl']} {r['median_ms'] * 1e3:.1f}us" if r["status"] == "ok" else f"{r['impl']} {r['status']}"
                             for r in new)
            print(f"[{time.perf_counter() - t0:6.1f}s] {case.path} {case.variant} {case.shape}: {done}",
                  file=sys.stderr, flush=True)
    md = harness.markdown(rows, env, ceilings)
    print(md)
    options = {"paths": names, "quick": args.quick, "smoke": args.smoke, "device": args.device,
               "dtype": str(opts.dtype).replace("torch.", ""),
               "rotate_below_bytes": harness.ROTATE_BELOW_BYTES, "rotating_sets": harness.N_ROTATING_SETS}
    for path in harness.write_results(args.out, env, ceilings, options, rows, md):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
