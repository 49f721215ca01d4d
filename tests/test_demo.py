"""`python -m fusedlora demo` and `serve-demo` run quickly on the CPU (tiny sizes, in process),
and their verdicts are computed: a wrong result makes them say so and exit 1."""
import re

import torch

from fusedlora import FusedLinear, demo, serve_demo
from fusedlora.__main__ import main as cli

SERVE_ARGS = ["--requests", "5", "--prompt-len", "3", "--new-tokens", "2", "--adapters", "4", "--dim", "16",
              "--layers", "1", "--vocab", "32"]


def test_demo_checks_forward_and_gradients(monkeypatch, capsys):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")  # what the demo picks without a GPU
    assert cli(["demo", "--tokens", "4", "--dim", "16"]) == 0
    out = capsys.readouterr().out
    assert "lora.forward:triton:" in out and "14 parameters got gradients" in out
    fwd, grad = map(float, re.search(r"forward (\S+), gradients \(x and 14 parameters, worst\) (\S+) ", out).groups())
    assert 0 < fwd < 1e-5 and 0 < grad < 1e-5 and out.rstrip().endswith("OK")

    real = demo._reference_forward
    monkeypatch.setattr(demo, "_reference_forward", lambda model, x: real(model, x) * 1.001)
    assert demo.main(["--tokens", "4", "--dim", "16"]) == 1
    assert capsys.readouterr().out.rstrip().endswith("MISMATCH")


def test_serve_demo_runs_and_compares(monkeypatch, capsys):
    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    threads = torch.get_num_threads()
    assert serve_demo.main(SERVE_ARGS) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    err = float(re.search(r"batched vs merged first-step logits rel err (\S+),", out).group(1))
    assert err < 1e-4 and "greedy tokens agree 100%" in out
    if "peft vs fusedlora" in out:
        assert float(re.search(r"peft vs fusedlora first-step logits rel err (\S+)", out).group(1)) < 1e-4
    assert re.search(r"speed-up batched vs merge-per-request: [0-9.]+x over 10 tokens", out)
    assert "multi.forward:torch:grouped" in out

    real = FusedLinear.switch_merged

    def wrong_merge(self, name):  # a merged adapter at twice its scale: the check must notice
        real(self, name)
        self._add_delta(name, 1.0)

    monkeypatch.setattr(FusedLinear, "switch_merged", wrong_merge)
    assert serve_demo.main(SERVE_ARGS) == 1
    assert "MISMATCH" in capsys.readouterr().out
