"""``python -m fusedlora {info,demo,bench} [args]``."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

USAGE = """usage: python -m fusedlora COMMAND [args]

commands:
  info    print fusedlora.backend_info() as JSON
  demo    run the demo (python -m fusedlora demo --help)
  bench   run the microbenchmarks of the source tree's bench/ (python -m fusedlora bench --help)
  serve-demo  batched generation, every request its own adapter (python -m fusedlora serve-demo --help)
"""


def _info(argv) -> int:
    import fusedlora

    print(json.dumps(fusedlora.backend_info(), indent=2, default=str))
    return 0


def _demo(argv) -> int:
    try:
        demo = importlib.import_module("fusedlora.demo")
    except ModuleNotFoundError as e:
        if e.name != "fusedlora.demo":
            raise
        print("fusedlora: this version has no fusedlora/demo.py", file=sys.stderr)
        return 2
    return demo.main(argv) or 0


def _bench(argv) -> int:
    # bench/ is not part of the installed package: it sits next to it in the
    # source tree, which an editable install points at.
    root = Path(__file__).resolve().parent.parent
    run_py = root / "bench" / "run.py"
    if not run_py.is_file():
        print(f"fusedlora: no bench/run.py next to the package (looked in {root}); the benchmarks need "
              "the source tree: clone the repository and `pip install -e .`", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    run = importlib.import_module("bench.run")
    if Path(run.__file__).resolve() != run_py:  # another top-level `bench` shadowed ours
        print(f"fusedlora: imported bench.run from {run.__file__}, expected {run_py}", file=sys.stderr)
        return 2
    return run.main(argv) or 0


def _serve_demo(argv) -> int:
    from . import serve_demo

    return serve_demo.main(argv) or 0


COMMANDS = {"info": _info, "demo": _demo, "bench": _bench, "serve-demo": _serve_demo}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"fusedlora: unknown command {argv[0]!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
