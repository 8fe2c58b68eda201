"""Tests for gpt.py: shapes, causality, the tied head, checkpoints, GPT-2 safetensors loading."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt import GPT, GPTConfig, load_pretrained, save_checkpoint  # noqa: E402

SMALL = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**SMALL, **kw})
    model = GPT(cfg).eval()
    for p in model.parameters():                  # zero biases and unit LayerNorms would hide
        p.data += 0.05 * torch.randn_like(p)      # a swapped weight/bias in the loaders
    return model


def tokens(model, B=3, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(model.cfg.vocab_size, (B, T), generator=g)


def to_gpt2(model, prefix=""):
    """Our state dict under Hugging Face GPT-2 names: Conv1D weights are (in, out), qkv fused."""
    sd, out = model.state_dict(), {}
    for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        out[prefix + k] = sd[k]
    for i in range(model.cfg.n_layer):
        b, h = f"blocks.{i}.", f"{prefix}h.{i}."
        for p in ("weight", "bias"):
            out[f"{h}ln_1.{p}"], out[f"{h}ln_2.{p}"] = sd[f"{b}ln_1.{p}"], sd[f"{b}ln_2.{p}"]
        out[h + "attn.c_attn.weight"] = torch.cat([sd[f"{b}attn.{n}.weight"] for n in "qkv"]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[f"{b}attn.{n}.bias"] for n in "qkv"])
        for ours, theirs in [("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")]:
            out[f"{h}{theirs}.weight"] = sd[f"{b}{ours}.weight"].t()
            out[f"{h}{theirs}.bias"] = sd[f"{b}{ours}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def write_gpt2(model, folder, prefix="", config=True, extra=None, drop=None):
    sd = {**to_gpt2(model, prefix), **(extra or {})}
    sd.pop(drop, None)
    save_file(sd, folder / "model.safetensors")
    if config:
        c = model.cfg
        (folder / "config.json").write_text(json.dumps(dict(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
            n_embd=c.n_embd, layer_norm_epsilon=c.layer_norm_eps)))
    return folder / "model.safetensors"


# ---------------------------------------------------------------------------- model

def test_forward_shape():
    model = make()
    assert model(tokens(model)).shape == (3, 11, 37)
    assert model(tokens(model, T=16)).shape == (3, 16, 37)          # T = block_size is allowed


def test_causal():
    model = make()
    idx = tokens(model)
    idx2 = idx.clone()
    idx2[:, 7] = (idx2[:, 7] + 1) % model.cfg.vocab_size
    a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :7], b[:, :7])                  # the past ignores the future
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_tied_head():
    model = make()
    assert not any("lm_head" in k for k in model.state_dict())
    assert sum(p.shape == (37, 32) for p in model.parameters()) == 1  # one (V, D) matrix: wte
    hidden = {}
    model.ln_f.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    logits = model(tokens(model))
    torch.testing.assert_close(logits, hidden["h"] @ model.wte.weight.T)


def test_too_long_raises():
    model = make()
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(model, T=17))


def test_init_residual_std():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8))
    assert abs(model.blocks[0].attn.q.weight.std().item() - 0.02) < 2e-3
    assert abs(model.blocks[0].mlp.down.weight.std().item() - 0.02 / 4) < 5e-4  # 1/sqrt(2*8)
    assert model.blocks[0].attn.o.bias.abs().sum() == 0


@pytest.mark.parametrize("kw,field", [(dict(n_head=3), "n_head"), (dict(n_layer=0), "n_layer"),
                                      (dict(dropout=1.0), "dropout"),
                                      (dict(vocab_size=2.5), "vocab_size")])
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}="):
        GPTConfig(**kw)


# ---------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(tmp_path):
    model = make(bias=False, dropout=0.1).eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]                      # no .tmp left behind
    loaded = load_pretrained(path).eval()
    assert loaded.cfg == model.cfg
    idx = tokens(model)
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_gpt2_safetensors_round_trip(tmp_path, prefix):
    model = make()
    buffers = {f"{prefix}h.0.attn.bias": torch.ones(1, 1, 16, 16),   # ignored by the loader
               "lm_head.weight": torch.zeros(37, 32)}
    path = write_gpt2(model, tmp_path, prefix, extra=buffers)
    loaded = load_pretrained(path).eval()
    assert loaded.cfg == model.cfg
    idx = tokens(model)
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    from_folder = load_pretrained(tmp_path).eval()                      # the folder works too
    torch.testing.assert_close(from_folder(idx), model(idx))


def test_gpt2_without_config_json(tmp_path):
    model = make(n_embd=128, n_head=2)           # n_head = n_embd // 64 when there is no config
    loaded = load_pretrained(write_gpt2(model, tmp_path, config=False)).eval()
    assert loaded.cfg == model.cfg
    idx = tokens(model)
    torch.testing.assert_close(loaded(idx), model(idx))


def test_matches_transformers_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=50, n_positions=32,
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    with torch.no_grad():                               # move LayerNorms and biases off 1 and 0
        for p in ref.parameters():
            p += 0.05 * torch.randn_like(p)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model = load_pretrained(tmp_path / "model.safetensors").eval()
    idx = torch.randint(50, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                               # float64: float32 rounding once gave 1.8e-5
        expected = ref.double()(idx).logits
        torch.testing.assert_close(model.double()(idx), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained(tmp_path / "nope.pt")


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(os.urandom(100))
    with pytest.raises(ValueError, match="junk.pt: not a moe-lora-gpt checkpoint"):
        load_pretrained(path)


@pytest.mark.parametrize("kind", ["checkpoint", "safetensors"])
def test_truncated_file(tmp_path, kind):
    model = make()
    if kind == "checkpoint":
        path = tmp_path / "ckpt.pt"
        save_checkpoint(model, path)
    else:
        path = write_gpt2(model, tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        load_pretrained(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_tensor(tmp_path):
    path = write_gpt2(make(), tmp_path, drop="h.1.attn.c_attn.weight")
    with pytest.raises(ValueError, match=r"missing tensor h\.1\.attn\.c_attn\.weight"):
        load_pretrained(path)


def test_shape_mismatch_and_unexpected(tmp_path):
    model = make()
    path = write_gpt2(model, tmp_path, extra={"h.0.mlp.c_fc.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"shape mismatch for h\.0\.mlp\.c_fc\.bias"):
        load_pretrained(path)
    path = write_gpt2(model, tmp_path, extra={"h.0.attn.extra": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"unexpected tensor h\.0\.attn\.extra"):
        load_pretrained(path)


def test_foreign_torch_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a moe-lora-gpt checkpoint"):
        load_pretrained(path)
