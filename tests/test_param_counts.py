"""The papers' parameter counts at LLaMA-2-7B shapes (d_model 4096, d_ff 11008, 32 layers), from
each method's formula and from real layers built on the meta device (nothing is allocated).
Expected values: MoSLD Table 5 (corrected, docs/interpretations.md) and MALoRA Tables 1, 3, 8."""
import pytest
import torch
import torch.nn as nn

from common import count_trainable, inject, layer_config
from lora import LoRAConfig, LoRALinear, lora_num_params
from malora import MALORA_SMALL, MALoRAConfig, MALoRALinear, malora_num_params
from molora import MoLoRAConfig, MoLoRALinear, molora_num_params
from mosld import MoSLDConfig, MoSLDLinear, mosld_num_params

DEPTH, D, F = 32, 4096, 11008
SHAPES = {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D),     # (I, O) of each projection
          "gate": (D, F), "up": (D, F), "down": (F, D)}
MALORA_TARGETS = ("q", "k", "v", "up", "down", "gate")           # all but o (Tables 8-9)


def llama_meta():
    """The linears of LLaMA-2-7B, named blocks.<l>.<q|k|v|o|gate|up|down>, on the meta device."""
    with torch.device("meta"):
        return nn.ModuleDict({"blocks": nn.ModuleList(
            nn.ModuleDict({n: nn.Linear(I, O, bias=False) for n, (I, O) in SHAPES.items()})
            for _ in range(DEPTH))})


def real_count(layer_cls, cfg, targets):
    """Trainable parameters after injecting meta layers, per-layer configs as train.py builds them."""
    model = llama_meta()
    with torch.device("meta"):
        layers = inject(model, lambda lin, name: layer_cls(lin, layer_config(cfg, name, DEPTH)), targets)
    assert len(layers) == DEPTH * len(targets) and layers[0].base.weight.is_meta
    return count_trainable(model)


def formula_count(num_params, cfg, targets):
    return sum(num_params(*SHAPES[t], layer_config(cfg, f"blocks.{l}.{t}", DEPTH))
               for l in range(DEPTH) for t in targets)


class MoLA:
    """MoLoRA (per-expert A and B) with MoSLD's expert counts by depth: Table 5's MoLA row."""
    def for_layer(self, index, depth):
        E = MoSLDConfig().for_layer(index, depth).num_experts
        return MoLoRAConfig(num_experts=E, rank=8, top_k=2)


CASES = {  # name: (layer, formula, config, targets, expected count, digits of the quoted value)
    "MoLoRA r=8": (MoLoRALinear, molora_num_params, MoLoRAConfig(rank=8, top_k=2),
                   MALORA_TARGETS, 151.2e6, 1),
    "MoLoRA r=12": (MoLoRALinear, molora_num_params, MoLoRAConfig(rank=12, top_k=2),
                    MALORA_TARGETS, 222.8e6, 1),
    "MALoRA r=12 d=32": (MALoRALinear, malora_num_params, MALoRAConfig(),
                         MALORA_TARGETS, 158.9e6, 1),
    "MALoRA-Small r=8 d=22": (MALoRALinear, malora_num_params, MALoRAConfig(**MALORA_SMALL),
                              MALORA_TARGETS, 109.1e6, 1),
    "LoRA r=64": (LoRALinear, lora_num_params, LoRAConfig(rank=64), MALORA_TARGETS, 143.1e6, 1),
    "MoSLD q,v": (MoSLDLinear, mosld_num_params, MoSLDConfig(), ("q", "v"), 13.894e6, 3),
    "MoLA q,v": (MoLoRALinear, molora_num_params, MoLA(), ("q", "v"), 22.282e6, 3),
    "LoRA r=8 q,v": (LoRALinear, lora_num_params, LoRAConfig(rank=8), ("q", "v"), 4.194e6, 3),
}


@pytest.mark.parametrize("case", CASES)
def test_count_matches_paper_and_real_layers(case):
    layer_cls, num_params, cfg, targets, expected, digits = CASES[case]
    n = formula_count(num_params, cfg, targets)
    assert round(n / 1e6, digits) == round(expected / 1e6, digits), f"{case}: formula gives {n:,}"
    assert real_count(layer_cls, cfg, targets) == n


def test_mosld_uses_160_experts_per_projection():
    cfg = MoSLDConfig()
    assert sum(cfg.for_layer(l, DEPTH).num_experts for l in range(DEPTH)) == 160      # Table 5


def test_malora_saving_against_molora():
    """'30 % to 48 % fewer parameters' (MALoRA abstract): -29 % vs MoLoRA r=12, -28 % Small vs r=8."""
    count = {c: formula_count(*CASES[c][1:4]) for c in CASES}
    assert round(1 - count["MALoRA r=12 d=32"] / count["MoLoRA r=12"], 2) == 0.29
    assert round(1 - count["MALoRA-Small r=8 d=22"] / count["MoLoRA r=8"], 2) == 0.28
