"""PEFT's LoRA format on this project's GPT (no peft or transformers needed): lora.save_peft /
read_peft / load_peft round trips, every refused file with the problem named, and MoA built from
LoRA directories and taken apart again (moa.from_loras, moa.extract_domain). The same functions
against PEFT itself and transformers models: tests/test_hf.py."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common import count_trainable, inject
from gpt import GPT, GPTConfig
from lora import LoRAConfig, LoRALinear, load_peft, read_peft, save_peft
from moa import MoAConfig, MoALinear, extract_domain, from_loras

CFG = LoRAConfig(rank=3, alpha=5.0, targets=("q", "v"))


def tiny_gpt(n_embd=18):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=23, block_size=9, n_layer=2, n_head=2, n_embd=n_embd)
    return GPT(cfg).double().eval()


def ids():
    return torch.randint(0, 23, (3, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    out = model(ids())
    return out[0] if isinstance(out, tuple) else out


def lora_dir(path, seed=0, cfg=CFG):
    """A LoRA on tiny_gpt with random A and B, saved by save_peft; returns its logits."""
    model = tiny_gpt()
    torch.manual_seed(seed)
    for m in inject(model, lambda lin, name: LoRALinear(lin, cfg).double(), cfg.targets):
        torch.nn.init.normal_(m.lora_B)
    save_peft(model, str(path))
    return logits(model)


def test_save_then_load_peft_reproduces_the_logits(tmp_path):
    expected = lora_dir(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 3, 5.0)
    assert config["target_modules"] == ["q", "v"] and config["fan_in_fan_out"] is False
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.blocks.1.attn.v.lora_B.weight" in keys and len(keys) == 8
    model = tiny_gpt()
    assert not torch.allclose(logits(model), expected)
    layers = load_peft(model, str(tmp_path))
    assert len(layers) == 4 and all(m.lora_A.dtype == torch.float64 for m in layers)
    assert torch.equal(logits(model), expected)
    cfg, state = read_peft(str(tmp_path))
    assert (cfg.rank, cfg.alpha, cfg.targets) == (3, 5.0, ("q", "v"))
    assert state["blocks.0.attn.q.lora_A"].shape == (3, 18)


def edit_config(d, **changes):
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(d, edit):
    path = str(d / "adapter_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def rename(old, new):
    return lambda t: t.update({k.replace(old, new): t.pop(k) for k in list(t) if old in k})


BAD = {   # case: (break the directory, error type, what the message must name)
    "no directory": (lambda d: d / "nope", FileNotFoundError, "no such PEFT adapter directory"),
    "no config": (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError,
                  "adapter_config.json: no such file"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError,
                   "adapter_model.safetensors: no such file"),
    "corrupt json": (lambda d: (d / "adapter_config.json").write_text("{'r': 3"), ValueError,
                     "not valid JSON"),
    "not a LoRA": (lambda d: edit_config(d, peft_type="IA3"), ValueError, "peft_type 'IA3'"),
    "DoRA": (lambda d: edit_config(d, use_dora=True), ValueError, "use_dora=True"),
    "rsLoRA": (lambda d: edit_config(d, use_rslora=True), ValueError, "use_rslora=True"),
    "rank_pattern": (lambda d: edit_config(d, rank_pattern={"q": 2}), ValueError, "rank_pattern"),
    "bias": (lambda d: edit_config(d, bias="lora_only"), ValueError, "bias='lora_only'"),
    "PiSSA": (lambda d: edit_config(d, init_lora_weights="pissa"), ValueError, "changes the base"),
    "bad r": (lambda d: edit_config(d, r=0), ValueError, "LoRAConfig.rank=0"),
    "r not the tensors'": (lambda d: edit_config(d, r=2), ValueError, "r = 2, has"),
    "corrupt weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x07" * 40),
                        ValueError, "not a readable safetensors file"),
    "DoRA weights": (lambda d: edit_weights(d, lambda t: t.update(
        {"base_model.model.blocks.0.attn.q.lora_magnitude_vector": torch.ones(18)})),
        ValueError, "lora_magnitude_vector is not a LoRA weight"),
    "lone lora_A": (lambda d: edit_weights(d, lambda t: t.pop(
        "base_model.model.blocks.0.attn.q.lora_B.weight")), ValueError, "blocks.0.attn.q needs lora_A"),
    "module not found": (lambda d: edit_weights(d, rename("blocks.1.attn.v", "blocks.7.attn.v")),
                         ValueError, "adapts blocks.7.attn.v, which this model does not have"),
    "not a linear": (lambda d: edit_weights(d, rename("blocks.1.attn.v", "blocks.1.ln_1")),
                     ValueError, "blocks.1.ln_1, which is a LayerNorm"),
}


@pytest.mark.parametrize("case", BAD)
def test_load_peft_refuses_a_bad_directory_naming_the_problem(case, tmp_path):
    lora_dir(tmp_path)
    breaks, error, message = BAD[case]
    broken = breaks(tmp_path)
    directory = broken if isinstance(broken, Path) else tmp_path
    model = tiny_gpt()
    with pytest.raises(error, match=message):
        load_peft(model, str(directory))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())          # left untouched


def test_load_peft_refuses_another_models_shapes(tmp_path):
    lora_dir(tmp_path)
    with pytest.raises(ValueError, match=r"blocks.0.attn.q has \(I, O\) = \(18, 18\) in the adapter, "
                                         r"\(20, 20\) in this model"):
        load_peft(tiny_gpt(n_embd=20), str(tmp_path))


def test_save_peft_needs_one_rank_of_lora_layers(tmp_path):
    model = tiny_gpt()
    with pytest.raises(ValueError, match="0 layers"):
        save_peft(model, str(tmp_path))
    inject(model, lambda lin, name: LoRALinear(lin, LoRAConfig(rank=2 if ".0." in name else 3)), ("q",))
    with pytest.raises(ValueError, match="one rank, scaling and dropout"):
        save_peft(model, str(tmp_path))


def test_moa_from_lora_directories_and_one_domain_back(tmp_path):
    expected = [lora_dir(tmp_path / f"d{j}", seed=j) for j in range(3)]
    model = tiny_gpt()
    layers = from_loras(model, [read_peft(str(tmp_path / f"d{j}"), model) for j in range(3)],
                        MoAConfig(prompt_len=4, routing="token"))
    assert len(layers) == 4 and all(isinstance(m, MoALinear) for m in layers)
    assert layers[0].routing == "token" and layers[0].lora_A.shape == (3, 3, 18)
    assert count_trainable(model) == 4 * 3 * 18                               # routers only: E I each
    for j in range(3):
        for m in layers:
            m.active = j
        torch.testing.assert_close(logits(model), expected[j])    # gathered: other rounding
    extract_domain(model, 2, lambda base, name: LoRALinear(base, LoRAConfig(rank=3, alpha=5.0)))
    assert not any(isinstance(m, MoALinear) for m in model.modules())
    assert torch.equal(logits(model), expected[2])
    save_peft(model, str(tmp_path / "back"))
    fresh = tiny_gpt()
    load_peft(fresh, str(tmp_path / "back"))
    assert torch.equal(logits(fresh), expected[2])


def test_moa_refuses_loras_that_do_not_stack_and_a_factory_of_another_rank(tmp_path):
    lora_dir(tmp_path / "r3")
    lora_dir(tmp_path / "r2", cfg=LoRAConfig(rank=2, alpha=5.0, targets=("q", "v")))
    loras = [read_peft(str(tmp_path / d)) for d in ("r3", "r2")]
    with pytest.raises(ValueError, match=r"LoRA 1 \(rank 2, alpha 5.0, 8 tensors\) differs from LoRA 0"):
        from_loras(tiny_gpt(), loras)
    with pytest.raises(ValueError, match="at least one LoRA"):
        from_loras(tiny_gpt(), [])
    model = tiny_gpt()
    from_loras(model, loras[:1])
    with pytest.raises(ValueError, match="extract_domain.j=1: must be a domain in 0..0"):
        extract_domain(model, 1, lambda base, name: LoRALinear(base, LoRAConfig(rank=3, alpha=5.0)))
    with pytest.raises(ValueError, match="build it with the MoA's rank and alpha"):
        extract_domain(model, 0, lambda base, name: LoRALinear(base, LoRAConfig(rank=3, alpha=6.0)))
