"""The benchmark harness runs end to end (tiny shapes, CPU): a smoke test, not a timing."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_writes_table_and_json(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fusedlora", "bench", "--smoke", "--paths", "lora",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fused" in run.stdout and "F.linear" in run.stdout or "base" in run.stdout
    (js,) = tmp_path.glob("*.json")
    data = json.loads(js.read_text())
    text = json.dumps(data)
    for impl in ("fused", "base", "eager", "compile", "peft"):
        assert f'"{impl}"' in text, impl
    assert list(tmp_path.glob("*.md"))
