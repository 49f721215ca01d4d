"""Model level (issue 6): patch_model, PEFT adapters in and out (LoRA, C3A, SHiRA),
from_peft, refusals, torch.compile, and the Triton kernels serving a patched model.

A tiny randomly initialised Llama (no downloads) in float32 on CPU; PEFT models get
random nonzero adapter weights, so every comparison sees the adapters' effect.
"""
import copy
import json
import os

import pytest
import torch
from torch import nn

import fusedlora
from conftest import dispatched, rel_err
from fusedlora import FusedLinear
from fusedlora.patch import active_adapters, adapter_names, fused_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (a peft dependency)

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
TOL = 1e-5  # float32, relative Frobenius error of the logits


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def base_logits(base):
    return logits(base)


def fresh(model):
    return copy.deepcopy(model)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def make_peft(base, config, std=0.3, name=None, pm=None):
    """A PeftModel (or one more adapter on ``pm``) with random nonzero adapter weights."""
    if pm is None:
        pm = peft.get_peft_model(fresh(base), config)
        name = "default"
    else:
        pm.add_adapter(name, config)
    torch.manual_seed(len(name))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(f"{k}.{name}" in n for k in ("lora_A", "lora_B", "c3a_kernel", "shira_weight")):
                p.normal_(0, std)
    return pm.eval()


def snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def assert_untouched(model, snap):
    types, state = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())


def peft_layers(pm):
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}


# ------------------------------------------------------------------ patch_model
def test_patch_model_shares_parameters_keeps_outputs_and_is_idempotent(base, base_logits):
    model = fresh(base)
    q = model.model.layers[0].self_attn.q_proj
    calls = []
    q.register_forward_hook(lambda *a: calls.append("forward"))
    q.register_full_backward_hook(lambda *a: calls.append("backward"))
    assert fusedlora.patch_model(model) is model
    fused = dict(fused_layers(model))
    assert len(fused) == 14 and all(n.rsplit(".", 1)[-1] in LINEARS for n in fused)
    assert type(model.lm_head) is nn.Linear  # the output embedding is left alone unless asked for
    assert fused["model.layers.0.self_attn.q_proj"].weight is q.weight
    assert torch.equal(logits(model), base_logits) and calls == ["forward"]
    calls.clear()
    model(input_ids=torch.randint(0, 64, (1, 5))).logits.sum().backward()  # full backward hooks run too
    assert calls == ["forward", "backward"]
    model.zero_grad(set_to_none=True)
    before = {n: id(m) for n, m in model.named_modules()}
    fusedlora.patch_model(model)
    assert {n: id(m) for n, m in model.named_modules()} == before  # idempotent

    some = fusedlora.patch_model(fresh(base), ["q_proj", "layers.1.mlp.down_proj"])
    assert sorted(dict(fused_layers(some))) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                                "model.layers.1.self_attn.q_proj"]
    rx = fusedlora.patch_model(fresh(base), r".*\.(v_proj|lm_head)|lm_head")
    assert sorted(dict(fused_layers(rx))) == ["lm_head", "model.layers.0.self_attn.v_proj",
                                              "model.layers.1.self_attn.v_proj"]
    assert torch.equal(logits(rx), base_logits)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        fusedlora.patch_model(fresh(base), ["nope"])
    with pytest.raises(ValueError, match="regular expression"):
        fusedlora.patch_model(fresh(base), "(")

    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False))
    tied[2].weight = tied[0].weight
    fusedlora.patch_model(tied)
    assert isinstance(tied[1], FusedLinear) and type(tied[2]) is nn.Linear  # tied to the embedding


def test_set_adapter_helper(base):
    model = fusedlora.patch_model(fresh(base), ["q_proj", "v_proj"])
    for n, layer in fused_layers(model):
        layer.add_lora("a", r=2)
        if n.endswith("v_proj"):
            layer.add_lora("b", r=2)
    fusedlora.set_adapter(model, ["a", "b"])
    assert model.model.layers[0].self_attn.v_proj.active_adapters == ["a", "b"]
    assert model.model.layers[0].self_attn.q_proj.active_adapters == ["a"]
    with pytest.raises(ValueError, match=r"\['c'\]"):
        fusedlora.set_adapter(model, ["b", "c"])
    assert active_adapters(model) == ["a", "b"]  # unchanged by the refused call
    fusedlora.set_adapter(model, None)
    assert active_adapters(model) == [] and adapter_names(model) == ["a", "b"]


# ------------------------------------------------------------- PEFT round trips
LORA_CASES = {
    "patterns": dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LINEARS,
                     rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3}),
    "rslora_regex_bin": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=r".*\.(q_proj|v_proj|up_proj)"),
}
C3A_CONFIG = dict(block_size=16, target_modules=LINEARS,
                  block_size_pattern={"down_proj": 32, "layers.1.mlp.up_proj": 8})
SHIRA_CONFIG = dict(r=2, target_modules=LINEARS, random_seed=0)


def _round_trip(base, base_logits, pm, tmp_path, safe=True):
    ref = logits(pm)
    assert rel_err(ref, base_logits) > 1e-2  # the adapter matters
    pm.save_pretrained(tmp_path / "peft", safe_serialization=safe)
    model = fusedlora.patch_model(fresh(base))
    fusedlora.load_peft_adapter(model, tmp_path / "peft", "task")
    assert torch.equal(logits(model), base_logits)  # loaded, not active
    fusedlora.set_adapter(model, "task")
    assert rel_err(logits(model), ref) < TOL
    fusedlora.save_peft_adapter(model, tmp_path / "ours", "task")
    back = peft.PeftModel.from_pretrained(fresh(base), tmp_path / "ours").eval()
    assert rel_err(logits(back), ref) < TOL
    theirs, ours = (peft.get_peft_model_state_dict(m) for m in (pm, back))
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k].to(theirs[k].dtype)) for k in theirs)
    return model, back


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_round_trip(base, base_logits, tmp_path, case):
    pm = make_peft(base, peft.LoraConfig(**LORA_CASES[case]))
    model, back = _round_trip(base, base_logits, pm, tmp_path, safe=not case.endswith("bin"))
    theirs, again = peft_layers(pm), peft_layers(back)
    for n, layer in fused_layers(model):
        if "task" in layer.adapter_names:
            t = theirs[n]
            assert layer.r["task"] == t.r["default"] == again[n].r["default"]
            assert layer.scaling["task"] == pytest.approx(t.scaling["default"], rel=1e-12)
            assert again[n].scaling["default"] == pytest.approx(t.scaling["default"], rel=1e-12)
            assert layer.lora_dropout["task"] == LORA_CASES[case].get("lora_dropout", 0.0)
            assert not layer.lora_A["task"].requires_grad  # as PEFT: is_trainable=False
    assert len(theirs) == sum("task" in layer.adapter_names for _, layer in fused_layers(model))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    if case == "patterns":  # per-layer values as PEFT users write them
        assert cfg["r"] == 4 and cfg["rank_pattern"] == {"down_proj": 2, "layers.1.self_attn.q_proj": 6}
        assert cfg["lora_alpha"] == 8 and cfg["alpha_pattern"] == {"v_proj": 3} and cfg["lora_dropout"] == 0.1
    else:
        assert cfg["use_rslora"] and cfg["target_modules"] == ["q_proj", "up_proj", "v_proj"]


def test_c3a_round_trip(base, base_logits, tmp_path):
    pm = make_peft(base, peft.C3AConfig(**C3A_CONFIG), std=3.0)
    model, back = _round_trip(base, base_logits, pm, tmp_path)
    assert model.model.layers[1].mlp.up_proj.c3a_kernel["task"].shape == (8, 4, 8)
    assert model.model.layers[0].mlp.down_proj.c3a_kernel["task"].shape == (1, 2, 32)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "C3A" and cfg["block_size"] == 16
    assert cfg["block_size_pattern"] == {"down_proj": 32, "layers.1.mlp.up_proj": 8}


def test_shira_round_trip(base, base_logits, tmp_path):
    pm = make_peft(base, peft.ShiraConfig(**SHIRA_CONFIG), std=0.5)
    model, back = _round_trip(base, base_logits, pm, tmp_path)
    layer, theirs = model.model.layers[0].self_attn.k_proj, peft_layers(pm)["model.layers.0.self_attn.k_proj"]
    assert torch.equal(layer.sparse_indices["task"], theirs.shira_indices["default"].long())
    assert layer.sparse_values["task"].numel() == 2 * (32 + 32)


def test_save_refuses_what_peft_cannot_hold(base, tmp_path):
    from fusedlora.sparse import random_indices

    model = fusedlora.patch_model(fresh(base), ["q_proj"])
    for _, layer in fused_layers(model):
        layer.add_sparse("s", random_indices((32, 32), density=0.1, seed=0))
        layer.add_lora("l", r=2, lora_dropout=0.1 if layer is model.model.layers[0].self_attn.q_proj else 0.0)
    with pytest.raises(ValueError, match=r"r \* \(in_features \+ out_features\)"):
        fusedlora.save_peft_adapter(model, tmp_path, "s")
    with pytest.raises(ValueError, match="different lora_dropout"):
        fusedlora.save_peft_adapter(model, tmp_path, "l")
    with pytest.raises(ValueError, match="no layer of the model has adapter 'x'"):
        fusedlora.save_peft_adapter(model, tmp_path, "x")
    assert not os.listdir(tmp_path)


def test_save_names_targets_whose_names_end_other_modules(tmp_path):
    """A top-level q adapted beside an unadapted block.q: neither suffixes nor full names as a
    list select exactly q (a list entry matches any name ending in '.q'); the escaped regex does."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.block = nn.Linear(8, 8), Block()

        def forward(self, x):
            return self.block.q(self.q(x))

    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 8)
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, target_modules=r"q", init_lora_weights=False))
    model = fusedlora.from_peft(pm)
    fusedlora.save_peft_adapter(model, tmp_path, "default")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "q"
    back = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path).eval()
    assert rel_err(back(x), pm.eval()(x)) < 1e-6


# ------------------------------------------------------------------- from_peft
def test_from_peft_lora_two_adapters(base, tmp_path):
    pm = make_peft(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS))
    make_peft(base, peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"]),
              name="second", pm=pm)
    ref_default = logits(pm)
    pm.set_adapter("second")
    ref_second = logits(pm)
    pm.base_model.model.model.layers[0].self_attn.q_proj.set_scale("second", 0.5)  # a set_scale survives
    ref_scaled = logits(pm)
    model = fusedlora.from_peft(pm)
    assert type(model) is transformers.LlamaForCausalLM and not hasattr(model, "peft_config")
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    assert active_adapters(model) == ["second"]
    assert rel_err(logits(model), ref_scaled) < TOL
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A["second"].requires_grad and not q.lora_A["default"].requires_grad and not q.weight.requires_grad
    fusedlora.set_adapter(model, "default")
    assert rel_err(logits(model), ref_default) < TOL
    q.scaling["second"] *= 2  # back to its own scale: the adapter as PEFT had it before set_scale
    fusedlora.set_adapter(model, "second")
    assert rel_err(logits(model), ref_second) < TOL
    fusedlora.save_peft_adapter(model, tmp_path, "default")
    back = peft.PeftModel.from_pretrained(fresh(base), tmp_path).eval()
    assert rel_err(logits(back), ref_default) < TOL


@pytest.mark.parametrize("kind", ["c3a", "shira"])
def test_from_peft_c3a_shira(base, kind):
    config = peft.C3AConfig(**C3A_CONFIG) if kind == "c3a" else peft.ShiraConfig(**SHIRA_CONFIG)
    pm = make_peft(base, config, std=3.0 if kind == "c3a" else 0.5)
    ref = logits(pm)
    model = fusedlora.from_peft(pm)
    assert len(list(fused_layers(model))) == 14 and active_adapters(model) == ["default"]
    assert rel_err(logits(model), ref) < TOL


def test_from_peft_takes_a_live_pissa_model(base):
    """A live PeftModel already holds the base weight its PiSSA init rewrote: converted as it
    is (a saved one is refused at load, test_load_refuses_unsupported_lora_options)."""
    pm = make_peft(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    ref = logits(pm)
    assert rel_err(logits(fusedlora.from_peft(pm)), ref) < TOL


def test_from_peft_keeps_merged_state(base):
    pm = make_peft(base, peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    ref = logits(pm)
    w0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    pm.merge_adapter()
    model = fusedlora.from_peft(pm)
    q = model.model.layers[0].self_attn.q_proj
    assert q.merged_adapters == ["default"]
    assert rel_err(logits(model), ref) < TOL
    q.unmerge()
    assert rel_err(q.weight, w0) < 1e-6


# -------------------------------------------------------------------- refusals
def _saved(base, tmp_path, config, name="peft"):
    pm = make_peft(base, config)
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("config, match", [
    (dict(use_dora=True), "DoRA"),
    (dict(bias="all"), "bias='all'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(lora_bias=True), "lora_bias"),
    # PEFT reruns these inits on load and they rewrite the base weight (W - B0 A0)
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' rewrites the base weight"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora'"),
])
def test_load_refuses_unsupported_lora_options(base, tmp_path, config, match):
    path = _saved(base, tmp_path, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **config))
    for model in (fresh(base), fusedlora.patch_model(fresh(base))):
        snap = snapshot(model)
        with pytest.raises(ValueError, match=match):
            fusedlora.load_peft_adapter(model, path, "x")
        assert_untouched(model, snap)


def test_load_refuses_unknown_type_missing_files(base, tmp_path):
    path = _saved(base, tmp_path, peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]))
    model = fresh(base)
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        fusedlora.load_peft_adapter(model, path, "x")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        fusedlora.load_peft_adapter(model, tmp_path / "nowhere", "x")
    os.remove(path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(FileNotFoundError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        fusedlora.load_peft_adapter(model, path, "x")


def _edit(path, fn):
    st = path / "adapter_model.safetensors"
    state = load_file(st)
    fn(state)
    save_file(state, st)


@pytest.mark.parametrize("edit, match", [
    ("shape", r"layers\.1\.mlp\.down_proj: lora_A has shape \(2, 63\), expected \(r=2, in_features=64\)"),
    ("rank", r"o_proj: lora_A has shape \(2, 32\), expected \(r=3, in_features=32\)"),
    ("unmatched", r"match no layer of the model, e\.g\. \['model\.layers\.0\.self_attn\.nope'\]"),
    ("not_linear", "model.layers.0.mlp: is a LlamaMLP"),
    ("foreign", r"not LORA weights of a linear layer \(DoRA magnitudes\)"),
    ("missing_B", "lora_B.weight is missing"),
])
def test_load_refuses_bad_checkpoints_and_loads_nothing(base, tmp_path, edit, match):
    path = _saved(base, tmp_path, peft.LoraConfig(r=2, target_modules=LINEARS))
    p = "base_model.model.model."
    if edit == "shape":  # the last module: a loader going in order would have loaded the others
        _edit(path, lambda s: s.update({f"{p}layers.1.mlp.down_proj.lora_A.weight": torch.zeros(2, 63)}))
    elif edit == "rank":
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["rank_pattern"] = {"layers.1.self_attn.o_proj": 3}
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    elif edit == "unmatched":
        _edit(path, lambda s: s.update({f"{p}layers.0.self_attn.nope.lora_A.weight": torch.zeros(2, 32),
                                        f"{p}layers.0.self_attn.nope.lora_B.weight": torch.zeros(32, 2)}))
    elif edit == "not_linear":
        _edit(path, lambda s: s.update({f"{p}layers.0.mlp.lora_A.weight": torch.zeros(2, 32),
                                        f"{p}layers.0.mlp.lora_B.weight": torch.zeros(32, 2)}))
    elif edit == "foreign":
        _edit(path, lambda s: s.update({f"{p}layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}))
    else:
        _edit(path, lambda s: s.pop(f"{p}layers.1.self_attn.v_proj.lora_B.weight"))
    model = fresh(base)
    fusedlora.patch_model(model, ["q_proj", "k_proj"])  # the others would be patched by the load
    model.model.layers[0].self_attn.q_proj.add_lora("other", r=2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fusedlora.load_peft_adapter(model, path, "x")
    assert_untouched(model, snap)
    assert model.model.layers[0].self_attn.q_proj.active_adapters == ["other"]


def test_load_refuses_a_name_in_use_and_keeps_others_active(base, tmp_path):
    path = _saved(base, tmp_path, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model = fusedlora.patch_model(fresh(base))
    fusedlora.load_peft_adapter(model, path, "a")
    fusedlora.set_adapter(model, "a")
    fusedlora.load_peft_adapter(model, path, "b")
    assert active_adapters(model) == ["a"]
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter 'a'"):
        fusedlora.load_peft_adapter(model, path, "a")
    assert_untouched(model, snap)


def test_from_peft_refuses_and_changes_nothing(base):
    pm = make_peft(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True))
    snap, ref = snapshot(pm), logits(pm)
    with pytest.raises(ValueError, match="DoRA"):
        fusedlora.from_peft(pm)
    assert_untouched(pm, snap)
    assert torch.equal(logits(pm), ref)
    with pytest.raises(TypeError, match="expected a peft.PeftModel"):
        fusedlora.from_peft(fresh(base))
    with pytest.raises(ValueError, match="from_peft"):
        fusedlora.patch_model(pm)


# ------------------------------------------------- PEFT semantics, from review
def test_c3a_block_size_pattern_key_naming_the_whole_module(base, base_logits, tmp_path):
    """PEFT's C3A lookup falls back to ``block_size_pattern.get(full_name)``: a key that is the
    whole module name (no '.' before it to match ``.*\\.key$``) still sets that layer's block."""
    config = dict(block_size=16, target_modules=LINEARS, block_size_pattern={"model.layers.0.mlp.up_proj": 8})
    pm = make_peft(base, peft.C3AConfig(**config), std=3.0)
    model, _ = _round_trip(base, base_logits, pm, tmp_path)
    assert model.model.layers[0].mlp.up_proj.c3a_kernel["task"].shape == (8, 4, 8)
    assert model.model.layers[1].mlp.up_proj.c3a_kernel["task"].shape == (4, 2, 16)


def test_lora_on_lm_head_loads_the_base_weight_peft_saves_beside_it(base, base_logits, tmp_path):
    """A LoRA on lm_head: PEFT's save_embedding_layers="auto" writes lm_head.base_layer.weight too.
    Equal to the model's, it is skipped; different (a changed base), it is refused, nothing loaded."""
    pm = make_peft(base, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    pm.save_pretrained(tmp_path / "peft")
    key = "base_model.model.lm_head.base_layer.weight"
    assert key in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    _round_trip(base, base_logits, pm, tmp_path)
    assert peft_layers(pm).keys() >= {"lm_head"}

    _edit(tmp_path / "peft", lambda s: s[key].add_(1.0))
    model = fusedlora.patch_model(fresh(base))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"base-model weight\(s\) saved with the adapter .* differ .*lm_head"):
        fusedlora.load_peft_adapter(model, tmp_path / "peft", "x")
    assert_untouched(model, snap)


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_refusals_name_the_option_and_its_value(base, tmp_path):
    gpt2 = _tiny_gpt2()
    pm = make_peft(gpt2, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    pm.save_pretrained(tmp_path / "gpt2")
    model = fresh(gpt2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn: is a Conv1D.*fan_in_fan_out=True"):
        fusedlora.load_peft_adapter(model, tmp_path / "gpt2", "x")
    assert_untouched(model, snap)
    for config, match in ((dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\]"),
                          (dict(trainable_token_indices=[1, 2]), r"trainable_token_indices=\[1, 2\]")):
        path = _saved(base, tmp_path, peft.LoraConfig(r=2, target_modules=["q_proj"], **config), name=str(config))
        with pytest.raises(ValueError, match=match):
            fusedlora.load_peft_adapter(fresh(base), path, "x")


def test_patch_model_refuses_quantized_weights_and_reads_all_linear_as_peft(base):
    for weight in (torch.zeros(4, 4, dtype=torch.int8), torch.zeros(4, 4).to(torch.float8_e4m3fn)):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        model[1].weight = nn.Parameter(weight, requires_grad=False)
        with pytest.raises(ValueError, match=rf"^1: its weight is a Tensor of dtype {weight.dtype}"):
            fusedlora.patch_model(model)
        assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear  # all or nothing
    upper = fusedlora.patch_model(fresh(base), "ALL-LINEAR")  # PEFT lower-cases "all-linear"
    assert sorted(dict(fused_layers(upper))) == sorted(dict(fused_layers(fusedlora.patch_model(fresh(base)))))


def test_load_is_all_or_nothing_when_a_layer_fails_half_way(base, tmp_path, monkeypatch):
    """A failure while adding (after every check passed) undoes the layers already done."""
    path = _saved(base, tmp_path, peft.LoraConfig(r=2, target_modules=LINEARS))
    model = fresh(base)
    fusedlora.patch_model(model, ["q_proj", "k_proj"])
    model.model.layers[0].self_attn.q_proj.add_lora("other", r=2)
    snap = snapshot(model)
    calls, add_lora = [], FusedLinear.add_lora

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 9:
            raise RuntimeError("out of memory (simulated)")
        return add_lora(self, *a, **k)

    monkeypatch.setattr(FusedLinear, "add_lora", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        fusedlora.load_peft_adapter(model, path, "x")
    assert len(calls) == 9
    assert_untouched(model, snap)
    assert model.model.layers[0].self_attn.q_proj.active_adapters == ["other"] and adapter_names(model) == ["other"]

    # checks that used to fail only while adding: a NaN alpha, a module shared under two names
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"layers.1.self_attn.v_proj": float("nan")}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lora_alpha of model\.layers\.1\.self_attn\.v_proj must be a finite"):
        fusedlora.load_peft_adapter(model, path, "x")
    shared = nn.Sequential(nn.Linear(4, 4))
    shared.add_module("again", shared[0])
    p = tmp_path / "shared"
    p.mkdir()
    (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "target_modules": ["0"]}))
    save_file({f"base_model.model.{n}.lora_{ab}.weight": torch.ones(shape)
               for n in ("0", "again") for ab, shape in (("A", (1, 4)), ("B", (4, 1)))}, p / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="again: is the same layer as 0"):
        fusedlora.load_peft_adapter(shared, p, "x")
    assert type(shared[0]) is nn.Linear


def test_from_peft_refuses_what_runs_on_the_base_layer_alone(base):
    """A hook or a replaced forward (accelerate's) on the linear PEFT wrapped runs in PEFT's
    forward; converting silently dropped them. Refused, nothing changed; a hook on the PEFT
    layer itself moves to the FusedLinear."""
    for how in ("hook", "forward"):
        model = fresh(base)
        q = model.model.layers[0].self_attn.q_proj
        if how == "hook":
            q.register_forward_hook(lambda *a: None)
        else:
            q.forward = lambda x, _f=q.forward: _f(x)
        pm = make_peft(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
        snap = snapshot(pm)
        match = "has hooks" if how == "hook" else "replaced forward"
        with pytest.raises(ValueError, match=rf"model\.layers\.0\.self_attn\.q_proj\.base_layer: .*{match}"):
            fusedlora.from_peft(pm)
        assert_untouched(pm, snap)
    pm = make_peft(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    calls = []
    pm.base_model.model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    logits(fusedlora.from_peft(pm))
    assert calls == [1]


# --------------------------------------------------------- compile and kernels
def _mixed_model(base, stacked=False):
    """Patched tiny Llama with LoRA (attention), C3A (gate, up) and sparse (down) adapters,
    all active; ``stacked`` adds an active LoRA beside the C3A and sparse ones."""
    from fusedlora.sparse import random_indices

    model = fusedlora.patch_model(fresh(base))
    torch.manual_seed(3)
    for n, layer in fused_layers(model):
        if n.endswith(("gate_proj", "up_proj")):
            layer.add_c3a("c3a", block_size=16, init_weights="gaussian")
        elif n.endswith("down_proj"):
            layer.add_sparse("sparse", random_indices(tuple(layer.weight.shape), density=0.05, seed=1),
                             torch.randn(round(0.05 * layer.weight.numel())))
        if stacked or n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            layer.add_lora("lora", r=4, lora_dropout=0.1, init_lora_weights=False)
    fusedlora.set_adapter(model, ["c3a", "sparse", "lora"])
    return model


def _compile_train_and_eval(model):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager_eval = logits(model)  # also builds the sparse layouts outside the trace
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    model.train()
    out = compiled(input_ids=IDS, labels=IDS, use_cache=False)
    out.loss.backward()
    mlp = model.model.layers[1].mlp
    assert model.model.layers[1].self_attn.q_proj.lora_B["lora"].grad is not None
    assert mlp.up_proj.c3a_kernel["c3a"].grad is not None and mlp.down_proj.sparse_values["sparse"].grad is not None
    model.eval()
    with torch.no_grad():
        y = compiled(input_ids=IDS, use_cache=False).logits
    assert rel_err(y, eager_eval) < TOL
    assert counter.frame_count == 2  # one graph per mode (fullgraph: a break would have raised)


def test_torch_compile_fullgraph_patched_model(base):
    _compile_train_and_eval(_mixed_model(base))


def test_torch_compile_fullgraph_stacked_adapter_kinds(base):
    _compile_train_and_eval(_mixed_model(base, stacked=True))


def test_triton_kernels_serve_a_patched_model(base, triton_backend, monkeypatch):
    model = _mixed_model(base).eval()
    ids = IDS[:1, :5]
    y = logits(model, ids)
    assert {k.split(":")[0] for k in dispatched() if ":triton:" in k} >= {"lora.forward", "c3a.forward",
                                                                       "sparse.forward"}
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    assert rel_err(y, logits(model, ids)) < TOL


def test_from_peft_mixed_batch_adapter_names_via_ids(base):
    """PEFT's mixed batch (``adapter_names=``, "__base__" for the base) equals use_adapters with adapter_ids."""
    pm = make_peft(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS))
    make_peft(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]), name="second", pm=pm)
    ids3 = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(2))
    names = ["second", "__base__", "default"]
    with torch.no_grad():
        ref = pm(input_ids=ids3, adapter_names=names).logits
    model = fusedlora.from_peft(pm)
    with fusedlora.use_adapters(model, fusedlora.adapter_ids(names)):
        got = logits(model, ids3)
    assert rel_err(got, ref) < TOL
    for row, name in enumerate(names):  # and row by row equal to the single-adapter model
        if name == "__base__":
            fusedlora.set_adapter(model, None)
        else:
            fusedlora.set_adapter(model, name)
        assert rel_err(got[row], logits(model, ids3[row:row + 1])[0]) < TOL
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        fusedlora.adapter_ids(["nope"])


def test_trainable_lora_of_a_16bit_model_keeps_float32_factors_as_peft(base, tmp_path):
    """PEFT keeps LoRA factors in float32 beside a 16-bit base (autocast_adapter_dtype): a
    trainable load does the same (an optimizer step below the 16-bit step survives),
    an inference load keeps the weight's dtype, and from_peft keeps PEFT's own dtype; the
    16-bit forwards match PEFT's within 16-bit tolerance."""
    path = _saved(base, tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    half = fresh(base).half()
    train = fusedlora.load_peft_adapter(fresh(half), path, "t", is_trainable=True)
    infer = fusedlora.load_peft_adapter(fresh(half), path, "t")
    layer = train.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.float16 and layer.lora_A["t"].dtype == torch.float32
    assert infer.model.layers[0].self_attn.q_proj.lora_A["t"].dtype == torch.float16
    pm = peft.PeftModel.from_pretrained(fresh(half), path)
    ref = logits(pm).double()
    for model in (train, infer):
        fusedlora.set_adapter(model, "t")
        assert rel_err(logits(model), ref) < 1e-2
    pm_layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert pm_layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's default
    converted = fusedlora.from_peft(pm)
    assert converted.model.layers[0].self_attn.q_proj.lora_A["default"].dtype == pm_layer.lora_A["default"].weight.dtype


def test_trainable_shira_of_a_16bit_model_keeps_float32_values_as_peft(base, tmp_path):
    """SHiRA values as LoRA's factors: float32 beside a 16-bit base when loaded trainable (an
    AdamW step of 1e-4 moved 3 of 256 bf16 values, all of PEFT's float32 ones), the weight's
    dtype for inference, and PEFT's own dtype through from_peft."""
    path = _saved(base, tmp_path, peft.ShiraConfig(**SHIRA_CONFIG))
    half = fresh(base).to(torch.bfloat16)
    train = fusedlora.load_peft_adapter(fresh(half), path, "t", is_trainable=True)
    infer = fusedlora.load_peft_adapter(fresh(half), path, "t")
    assert train.model.layers[0].self_attn.q_proj.sparse_values["t"].dtype == torch.float32
    assert infer.model.layers[0].self_attn.q_proj.sparse_values["t"].dtype == torch.bfloat16
    fusedlora.set_adapter(train, "t")
    values = [p for n, p in train.named_parameters() if "sparse_values" in n]
    for p in train.parameters():
        p.requires_grad_(any(p is v for v in values))
    before = [v.detach().clone() for v in values]
    ids = torch.randint(0, 64, (2, 8))
    train(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW(values, lr=1e-4, weight_decay=0.0).step()
    assert all(bool((v.detach() != b).all()) for v, b in zip(values, before))
    pm = peft.PeftModel.from_pretrained(fresh(half), path, is_trainable=True)
    pm_dtype = pm.base_model.model.model.layers[0].self_attn.q_proj.shira_weight["default"].dtype
    converted = fusedlora.from_peft(pm)
    assert converted.model.layers[0].self_attn.q_proj.sparse_values["default"].dtype == pm_dtype
