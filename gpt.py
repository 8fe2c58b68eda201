"""A tiny GPT-2-style decoder, its checkpoints, and a reader for GPT-2 `model.safetensors` files.

Language Models are Unsupervised Multitask Learners (Radford et al., 2019); layout as in nanoGPT.

    h = wte[idx] + wpe[0..T)
    h = h + attn(ln_1(h));  h = h + mlp(ln_2(h))          (pre-LayerNorm, once per block)
    logits = ln_f(h) @ wte^T                              (tied LM head)

B batch  T time  D model dim  V vocab  H heads  (head size D/H)

Every projection is its own nn.Linear (attn.q, attn.k, attn.v, attn.o, mlp.up, mlp.down), so that
adapters can swap each one by name. GPT-2 fuses q|k|v into one Conv1D; load_pretrained splits it.
Not included: sampling, KV cache, hub downloads, untied LM heads (lm_head.weight is ignored), and
GPT-2's dropout rates (a loaded model gets GPTConfig's dropout, 0.0).
"""
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import atomic_write, first_line

FORMAT = "moe-lora-gpt"  # tag in every checkpoint written by save_checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 32         # V
    block_size: int = 32         # longest T, rows of wpe
    n_layer: int = 4
    n_head: int = 4              # H
    n_embd: int = 128            # D
    dropout: float = 0.0
    bias: bool = True            # biases in the Linears and LayerNorms (GPT-2 has them)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GPTConfig.{name}={v!r}: must be a positive int")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_head={self.n_head}: must divide n_embd ({self.n_embd})")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r}: must be in [0, 1)")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps={self.layer_norm_eps!r}: must be > 0")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        D = cfg.n_embd
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.q = nn.Linear(D, D, bias=cfg.bias)
        self.k = nn.Linear(D, D, bias=cfg.bias)
        self.v = nn.Linear(D, D, bias=cfg.bias)
        self.o = nn.Linear(D, D, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, D = x.shape
        H = self.n_head
        q, k, v = (lin(x).view(B, T, H, D // H).transpose(1, 2)  # 3 x (B, H, T, D/H)
                   for lin in (self.q, self.k, self.v))           # modules, so adapters apply
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, H, T, D/H)
        y = y.transpose(1, 2).reshape(B, T, D)                   # (B, T, D)
        return self.resid_drop(self.o(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.down = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):                                        # (B, T, D)
        h = F.gelu(self.up(x), approximate="tanh")               # (B, T, 4D), GPT-2's "gelu_new"
        return self.drop(self.down(h))                           # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):                                        # (B, T, D)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.reset_parameters()

    def reset_parameters(self):
        """nanoGPT init: weights N(0, 0.02), zero biases. The residual projections (o, down) get
        std 0.02 / sqrt(2 n_layer): 2 n_layer of them add into the residual stream (GPT-2 paper)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        for b in self.blocks:
            for lin in (b.attn.o, b.mlp.down):
                nn.init.normal_(lin.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    def forward(self, idx):                                      # (B, T) token ids
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"GPT: sequence length {T} > block_size ({self.cfg.block_size})")
        pos = torch.arange(T, device=idx.device)                 # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))             # (B, T, D)
        for block in self.blocks:
            x = block(x)                                         # (B, T, D)
        return F.linear(self.ln_f(x), self.wte.weight)           # (B, T, V), head tied to wte

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------- checkpoints

def save_checkpoint(model: GPT, path):
    """Write {"format", "config", "model"} to path atomically: a .tmp file in the same directory,
    then os.replace, so a crash never leaves a half-written checkpoint behind."""
    model = getattr(model, "_orig_mod", model)                  # unwrap torch.compile
    ckpt = {"format": FORMAT, "config": asdict(model.cfg), "model": model.state_dict()}
    atomic_write(os.fspath(path), lambda tmp: torch.save(ckpt, tmp))


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e)}"               # one line, whatever torch says


def _check(path, sd, shapes: dict):
    """Strict load: every expected tensor present with its shape, and nothing else."""
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: no state dict in file")
    for name, shape in shapes.items():
        if name not in sd:
            raise ValueError(f"{path}: missing tensor {name}")
        t = sd[name]
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        if got != tuple(shape):
            raise ValueError(f"{path}: shape mismatch for {name}: "
                             f"expected {tuple(shape)}, got {got}")
    extra = sorted(set(sd) - set(shapes))
    if extra:
        raise ValueError(f"{path}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")


def _read_checkpoint(path) -> GPT:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({_why(e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint or GPT-2 safetensors file")
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad config in checkpoint ({_why(e)})") from e
    _check(path, ckpt.get("model"), {k: v.shape for k, v in model.state_dict().items()})
    model.load_state_dict(ckpt["model"])
    return model


def _gpt2_config(path, sd) -> GPTConfig:
    """From config.json beside the file if there is one. Without it, sizes come from the tensor
    shapes and n_head = n_embd // 64 (GPT-2's head size; shapes cannot tell the head count)."""
    cfg_path = os.path.join(os.path.dirname(path), "config.json")
    try:
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                c = json.load(f)
            return GPTConfig(vocab_size=c["vocab_size"], block_size=c["n_positions"],
                             n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                             layer_norm_eps=c.get("layer_norm_epsilon", 1e-5))
        V, D = sd["wte.weight"].shape
        L = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("h.")), default=-1)
        return GPTConfig(vocab_size=V, block_size=sd["wpe.weight"].shape[0], n_layer=L,
                         n_head=max(D // 64, 1), n_embd=D)
    except (OSError, KeyError, TypeError, ValueError) as e:   # JSONDecodeError is a ValueError
        where = cfg_path if os.path.exists(cfg_path) else path
        raise ValueError(f"{where}: cannot read GPT-2 sizes ({_why(e)})") from e


def _gpt2_shapes(cfg: GPTConfig) -> dict:
    """Every tensor a GPT-2 file must hold. Conv1D weights are (in, out), nn.Linear's transposed."""
    V, P, D = cfg.vocab_size, cfg.block_size, cfg.n_embd
    s = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    for i in range(cfg.n_layer):
        for name, shape in [("ln_1", D), ("attn.c_attn", (D, 3 * D)), ("attn.c_proj", (D, D)),
                            ("ln_2", D), ("mlp.c_fc", (D, 4 * D)), ("mlp.c_proj", (4 * D, D))]:
            w = (shape,) if isinstance(shape, int) else shape
            s[f"h.{i}.{name}.weight"], s[f"h.{i}.{name}.bias"] = w, (w[-1],)
    return s


def _from_gpt2(sd: dict, n_layer: int) -> dict:
    """GPT-2 names -> ours: transpose Conv1D weights, split c_attn into q | k | v."""
    out = {k: sd[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}ln_1.{p}"], out[f"{b}ln_2.{p}"] = sd[f"{h}ln_1.{p}"], sd[f"{h}ln_2.{p}"]
        ws = sd[h + "attn.c_attn.weight"].t().chunk(3)           # 3 x (D, D), (out, in)
        bs = sd[h + "attn.c_attn.bias"].chunk(3)                 # 3 x (D,)
        for n, w, bias in zip("qkv", ws, bs):
            out[f"{b}attn.{n}.weight"], out[f"{b}attn.{n}.bias"] = w, bias
        for ours, theirs in [("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")]:
            out[f"{b}{ours}.weight"] = sd[f"{h}{theirs}.weight"].t()   # (in, out) -> (out, in)
            out[f"{b}{ours}.bias"] = sd[f"{h}{theirs}.bias"]
    return out


def _read_gpt2(path) -> GPT:
    from safetensors.torch import load_file
    try:
        raw = load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint or GPT-2 safetensors file "
                         f"({_why(e)})") from e
    ignored = (".attn.bias", ".attn.masked_bias", "lm_head.weight")  # mask buffers, tied head
    sd = {k.removeprefix("transformer."): v for k, v in raw.items() if not k.endswith(ignored)}
    cfg = _gpt2_config(path, sd)
    _check(path, sd, _gpt2_shapes(cfg))
    model = GPT(cfg)
    model.load_state_dict(_from_gpt2(sd, cfg.n_layer))
    return model


def load_pretrained(path) -> GPT:
    """A GPT from a save_checkpoint file, or from a GPT-2-layout model.safetensors (or the folder
    holding it). Bad input raises FileNotFoundError or a one-line ValueError naming the path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"                     # torch.save writes a zip archive
    return _read_checkpoint(path) if is_zip else _read_gpt2(path)
