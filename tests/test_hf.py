"""The methods in transformers models, and LoRA adapters to and from PEFT.

Two tiny random models built from configs (no hub): a Llama with grouped-query attention, so that
q_proj (24 -> 24) and v_proj (24 -> 12) differ in O, and GPT-2, whose c_attn / c_proj are Conv1D
modules with weight (I, O). float64 throughout. The PEFT tests skip without peft.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from common import (Conv1DLinear, adapter_meta, adapter_state_dict, aux_loss, base_hash,  # noqa: E402
                    count_trainable, inject, layer_config, load_adapter, save_adapter)
from lora import LoRAConfig, LoRALinear, load_peft, lora_num_params, read_peft, save_peft  # noqa: E402
from malora import MALoRAConfig, MALoRALinear, malora_num_params  # noqa: E402
from moa import MoAConfig, MoALinear, extract_domain, from_loras, merge, moa_num_params  # noqa: E402
from molora import MoLoRAConfig, MoLoRALinear, molora_num_params  # noqa: E402
from mosld import MoSLDConfig, MoSLDLinear, mosld_num_params  # noqa: E402

V, T = 53, 9                                              # odd vocabulary and sequence length


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=40,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=24, n_layer=2, n_head=4, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


MODELS = {"llama": (llama, ("q_proj", "v_proj")),             # 2 per block
          "gpt2": (gpt2, ("c_attn", "c_proj"))}               # 3 per block: attn's and mlp's c_proj
METHODS = {   # name: (layer class, config for the targets, the method's parameter formula)
    "lora": (LoRALinear, lambda t: LoRAConfig(rank=3, alpha=5.0, targets=t), lora_num_params),
    "molora": (MoLoRALinear, lambda t: MoLoRAConfig(num_experts=4, rank=2, top_k=2, targets=t),
               molora_num_params),
    "mosld": (MoSLDLinear, lambda t: MoSLDConfig(num_experts=(4, 2), rank=2, targets=t),
              mosld_num_params),
    "malora": (MALoRALinear, lambda t: MALoRAConfig(num_experts=4, rank=2, shared_rank=5, alpha=4.0,
                                                    targets=t), malora_num_params),
}


def token_ids(seed=1):
    return torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(seed))


def in_out(module):
    """(I, O) of a target, read from the module itself: nn.Linear's fields, Conv1D's nx and nf."""
    return (module.nx, module.nf) if hasattr(module, "nf") else (module.in_features, module.out_features)


def adapt(make, method, targets, seed=0):
    layer_cls, make_cfg, _ = METHODS[method]
    model, cfg = make(), make_cfg(targets)
    depth = model.config.num_hidden_layers
    torch.manual_seed(seed)
    layers = inject(model, lambda lin, name: layer_cls(lin, layer_config(cfg, name, depth)).double(),
                    cfg.targets)
    return model, layers


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", MODELS)
def test_method_in_a_transformers_model(arch, method, tmp_path):
    make, targets = MODELS[arch]
    _, make_cfg, num_params = METHODS[method]
    cfg, ids = make_cfg(targets), token_ids()
    base = make()
    base_logits = base(ids).logits
    sizes = {n: in_out(m) for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in targets}
    model, layers = adapt(make, method, targets)
    assert len(layers) == len(sizes) == {"llama": 4, "gpt2": 6}[arch]
    assert torch.equal(model(ids).logits, base_logits)                        # update 0 at init

    depth = model.config.num_hidden_layers
    assert count_trainable(model) == sum(num_params(I, O, layer_config(cfg, n, depth))
                                         for n, (I, O) in sizes.items())

    model.train()
    loss = model(ids, labels=ids).loss
    routed = [m.aux_loss_coef * m.aux for m in layers if m.aux is not None]
    assert (len(routed) > 0) == (method != "lora")                            # MoSLD: block 0 only
    expected_aux = torch.stack(routed).mean() if routed else 0.0
    torch.testing.assert_close(aux_loss(model), expected_aux)
    (loss + aux_loss(model)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapter_state_dict(model))                        # adapters, nothing else

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        opt.zero_grad()
        (model(ids, labels=ids).loss + aux_loss(model)).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert model(ids, labels=ids).loss < base(ids, labels=ids).loss

    path = str(tmp_path / "adapter.safetensors")
    save_adapter(model, path, {"method": method})
    fresh, _ = adapt(make, method, targets, seed=1)                           # other random init
    load_adapter(fresh, path)
    assert torch.equal(fresh.eval()(ids).logits, model(ids).logits)


def test_conv1d_base_is_a_view_of_the_conv1d_weight():
    """GPT-2's Conv1D becomes a Conv1DLinear over the same memory: nothing of the base is copied."""
    model = gpt2()
    conv = model.transformer.h[1].attn.c_attn
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    inject(model, lambda lin, name: LoRALinear(lin, LoRAConfig(rank=2)).double(), ("c_attn",))
    base = model.transformer.h[1].attn.c_attn.base
    assert isinstance(base, Conv1DLinear) and base.weight.shape == (conv.nf, conv.nx) == (72, 24)
    assert base.weight.data_ptr() == conv.weight.data_ptr() and base.bias is conv.bias
    torch.testing.assert_close(base(x), conv(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", MODELS)
def test_base_hash_and_mode_survive_inject(arch):
    """The frozen base hashes the same before and after inject (GPT-2's Conv1D weight in its own
    (I, O) layout), so an adapter's base check holds on transformers models; the new layers take
    the model's eval mode."""
    make, targets = MODELS[arch]
    model = make()
    before = base_hash(model)
    layers = inject(model, lambda lin, name: LoRALinear(lin, LoRAConfig(rank=2)).double(), targets)
    assert base_hash(model) == before
    assert not any(layer.training for layer in layers)


@pytest.mark.parametrize("name", ["model.layers.{}.self_attn.q_proj", "transformer.h.{}.attn.c_attn"])
def test_per_depth_config_reads_the_block_of_a_transformers_name(name):
    cfg = MoSLDConfig(num_experts=(4, 2))
    assert [layer_config(cfg, name.format(i), 2).num_experts for i in (0, 1)] == [4, 2]


def test_readme_own_model_code_runs(tmp_path, monkeypatch):
    """The code block of README's "Use a method in your own model", read from README.md and run."""
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme) as f:
        section = f.read().split("## Use a method in your own model\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    env = {}
    exec(compile(code, readme, "exec"), env)
    model = env["model"]
    assert [m.lora_B.shape[0] for m in model.modules() if isinstance(m, MoSLDLinear)] == [4, 4, 2, 2]
    saved = load_file(str(tmp_path / "mosld-adapter.safetensors"))
    assert saved.keys() == adapter_state_dict(model).keys()
    assert all(saved[k].abs().sum() > 0 for k in saved if k.endswith("lora_B"))  # the step moved B
    assert adapter_meta(str(tmp_path / "mosld-adapter.safetensors"))["method"] == "mosld"


# ----------------------------------------------------------------------------- PEFT


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def peft_lora(peft, make, targets, seed, r=3, alpha=5):
    """A PEFT LoRA with random A and B (init_lora_weights=False), as trained ones are."""
    base = make()
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                          fan_in_fan_out=make is gpt2)
    return peft.get_peft_model(base, cfg).eval()


@pytest.mark.parametrize("arch", MODELS)
def test_save_peft_gives_peft_the_same_logits(arch, peft, tmp_path):
    make, targets = MODELS[arch]
    model, layers = adapt(make, "lora", targets)
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_()                                 # B = 0 would make the test trivial
    ids = token_ids()
    ours = model(ids).logits
    assert not torch.allclose(ours, make()(ids).logits)
    save_peft(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (3, 5.0, sorted(targets))
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()(ids).logits
    torch.testing.assert_close(theirs, ours)


@pytest.mark.parametrize("arch", MODELS)
def test_load_peft_gives_peft_logits(arch, peft, tmp_path):
    make, targets = MODELS[arch]
    theirs = peft_lora(peft, make, targets, seed=3)
    ids = token_ids()
    expected = theirs(input_ids=ids).logits
    theirs.save_pretrained(str(tmp_path))
    model = make()
    layers = load_peft(model, str(tmp_path))
    assert len(layers) == {"llama": 4, "gpt2": 6}[arch]
    assert all(isinstance(m, LoRALinear) for m in layers)
    assert all(m.lora_A.dtype == torch.float64 for m in layers)
    torch.testing.assert_close(model(ids).logits, expected)


@pytest.mark.parametrize("arch", MODELS)
def test_moa_from_peft_loras_then_one_domain_back_to_peft(arch, peft, tmp_path):
    """Two PEFT LoRAs become a MoA whose routers alone train; gold routing gives each sequence its
    domain's PEFT logits, and so does merge; extract_domain turns domain 1 back into a LoRA that
    PEFT loads."""
    make, targets = MODELS[arch]
    ids, expected = token_ids(), []
    for j in range(2):
        theirs = peft_lora(peft, make, targets, seed=10 + j, r=2, alpha=4)
        expected.append(theirs(input_ids=ids).logits)
        theirs.save_pretrained(str(tmp_path / f"domain{j}"))
    model = make()
    loras = [read_peft(str(tmp_path / f"domain{j}"), model) for j in range(2)]
    layers = from_loras(model, loras, MoAConfig(prompt_len=4))
    cfg = MoAConfig(num_domains=2, rank=2, alpha=4.0)
    assert count_trainable(model) == sum(moa_num_params(m.base.in_features, m.base.out_features, cfg,
                                                        "router") for m in layers)
    assert all(n.endswith(".router.weight") for n, p in model.named_parameters() if p.requires_grad)

    model.train()
    gold = torch.tensor([1, 0, 1])
    for m in layers:
        m.gold = gold
    routed = model(ids).logits
    for b, j in enumerate(gold.tolist()):
        torch.testing.assert_close(routed[b], expected[j][b])

    model.eval()
    merged = make()
    from_loras(merged, loras)
    merge(merged, 0)                                           # GPT-2: W0 is a Conv1DLinear view
    assert not any(isinstance(m, MoALinear) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, expected[0])
    extract_domain(model, 1, lambda base, name: LoRALinear(base, LoRAConfig(rank=2, alpha=4.0)))
    torch.testing.assert_close(model(ids).logits, expected[1])
    save_peft(model, str(tmp_path / "back"))
    back = peft.PeftModel.from_pretrained(make(), str(tmp_path / "back")).eval()
    torch.testing.assert_close(back(ids).logits, expected[1])
