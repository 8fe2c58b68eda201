"""LoRA: the single-adapter baseline every mixture is compared against.

LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022),
https://arxiv.org/abs/2106.09685

    y = W0 x + (alpha / r) * B A x,    A (r, I) random,  B (O, r) zero          (Eq. 3)

Names follow loralib and PEFT: lora_A, lora_B, scaling. `save_peft` / `load_peft` move these
layers to and from PEFT's adapter format (adapter_config.json, adapter_model.safetensors) without
importing peft; `read_peft` reads one into a state dict, as moa.from_loras takes them.
Not included: merging state machine, several adapters per layer, DoRA/rsLoRA variants (a PEFT file
that uses them is refused).
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from common import (AdaptedLinear, Conv1DLinear, as_linear, atomic_write, check_config, first_line,
                    inject, load_adapter_state, lora_uniform_)


@dataclass
class LoRAConfig:
    rank: int = 8             # r
    alpha: float = 16.0       # scaling = alpha / r
    dropout: float = 0.0      # on x, before A (PEFT's lora_dropout)
    targets: tuple = ("q", "k", "v", "o", "up", "down")   # same modules as MoLoRA by default

    def __post_init__(self):
        check_config(self)                    # types; rank >= 1, alpha > 0, dropout in [0, 1)


class LoRALinear(AdaptedLinear):
    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__(base)
        I, O, r = base.in_features, base.out_features, cfg.rank
        self.scaling = cfg.alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, I))
        self.lora_B = nn.Parameter(torch.empty(O, r))
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        lora_uniform_(self.lora_A)            # kaiming_uniform(a=sqrt(5)), as loralib and PEFT
        nn.init.zeros_(self.lora_B)           # B = 0 -> update = 0 -> output == base(x)

    def update(self, x, dispatch):
        """One adapter, no experts: both dispatch paths reduce to the same two matmuls."""
        return self.scaling * (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T   # (N, r) -> (N, O)

    def delta_weight(self) -> torch.Tensor:
        """Dense (O, I) update, for merging and tests; never called by forward."""
        return self.scaling * self.lora_B @ self.lora_A                              # (O, I)


def lora_num_params(I: int, O: int, cfg: LoRAConfig) -> int:
    """r (I + O) per adapted linear (Hu et al. §4.1)."""
    return cfg.rank * (I + O)


# ----------------------------------------------------------------------------- PEFT's format

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."      # PEFT's key: base_model.model.<module path>.lora_A.weight
# adapter_config.json fields read here, or that do not change the forward of the adapted modules
# (which modules are adapted is read from the weights' keys); every other field must be off.
_PEFT_FIELDS = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out",
                "bias", "init_lora_weights", "task_type", "auto_mapping", "peft_version",
                "base_model_name_or_path", "revision", "inference_mode", "exclude_modules",
                "layers_to_transform", "layers_pattern", "megatron_core", "qalora_group_size",
                "ensure_weight_tying"}


def save_peft(model: nn.Module, directory: str):
    """Write the model's LoRALinear layers as a PEFT LoRA: peft.PeftModel.from_pretrained(base,
    directory) then gives this model's logits. target_modules are the layers' own names (as inject
    matched them); fan_in_fan_out is set when a base is GPT-2's Conv1D. The weights keep their
    dtype. One r, lora_alpha and lora_dropout for all layers, as the file holds one."""
    from safetensors.torch import save_file
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    settings = {(m.lora_A.shape[0], m.scaling, m.dropout.p) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"save_peft: needs LoRALinear layers of one rank, scaling and dropout; "
                         f"the model has {len(layers)} layers with {sorted(settings) or 'none'}")
    (r, scaling, dropout), = settings
    config = {"peft_type": "LORA", "r": r, "lora_alpha": scaling * r, "lora_dropout": dropout,
              "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
              "fan_in_fan_out": any(isinstance(m.base, Conv1DLinear) for m in layers.values()),
              "bias": "none", "task_type": None, "inference_mode": True,
              "base_model_name_or_path": getattr(model, "name_or_path", None) or None}
    tensors = {f"{PEFT_PREFIX}{name}.{part}.weight": getattr(m, part).detach().cpu().contiguous()
               for name, m in layers.items() for part in ("lora_A", "lora_B")}
    os.makedirs(directory, exist_ok=True)                  # each file written whole, or not at all
    atomic_write(os.path.join(directory, PEFT_WEIGHTS),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(os.path.join(directory, PEFT_CONFIG),
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def _peft_config(path: str) -> dict:
    """adapter_config.json as a dict, refused unless it is a plain LoRA."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (a PEFT adapter directory holds "
                                f"{PEFT_CONFIG} and {PEFT_WEIGHTS})")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: not a PEFT LoRA config (peft_type {found!r}, expected 'LORA')")
    unsupported = [f"{k}={v!r}" for k, v in config.items()
                   if k not in _PEFT_FIELDS and v not in (None, False, {}, [], "")]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r} (LoRALinear trains no bias)")
    if config.get("init_lora_weights", True) not in (True, False, "gaussian"):   # pissa, olora...
        unsupported.append(f"init_lora_weights={config['init_lora_weights']!r} (it changes the base)")
    if unsupported:
        raise ValueError(f"{path}: PEFT features that LoRALinear does not implement: "
                         f"{', '.join(unsupported)}")
    return config


def _check_fits(model: nn.Module, name: str, A: torch.Tensor, B: torch.Tensor, where: str):
    """ValueError unless `name` is an nn.Linear or Conv1D of model, I = A's columns, O = B's rows."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where}: adapts {name}, which this model does not have") from None
    linear = as_linear(module)
    if linear is None:
        raise ValueError(f"{where}: adapts {name}, which is a {type(module).__name__} in this model, "
                         f"not an nn.Linear or Conv1D")
    if (A.shape[1], B.shape[0]) != (linear.in_features, linear.out_features):
        raise ValueError(f"{where}: {name} has (I, O) = {(A.shape[1], B.shape[0])} in the adapter, "
                         f"{(linear.in_features, linear.out_features)} in this model")


def read_peft(directory: str, model: nn.Module | None = None) -> tuple[LoRAConfig, dict]:
    """A PEFT LoRA directory -> (LoRAConfig, state), state {"<module path>.lora_A": (r, I),
    "<module path>.lora_B": (O, r)}, the names of common.adapter_state_dict for LoRALinear layers;
    the config's targets are the adapted modules' own names. With `model`, also checks that every
    adapted module is an nn.Linear or Conv1D of the model with those shapes. Raises
    FileNotFoundError or ValueError with one line naming the problem."""
    from safetensors.torch import load_file
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such PEFT adapter directory")
    config = _peft_config(os.path.join(directory, PEFT_CONFIG))
    path = os.path.join(directory, PEFT_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (PEFT's older adapter_model.bin is not read)")
    try:
        saved = load_file(path)
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(e)})") from e
    state = {}
    for key, t in saved.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).removesuffix(".weight").rpartition(".")
        if not (key.startswith(PEFT_PREFIX) and key.endswith(".weight") and module
                and part in ("lora_A", "lora_B")):
            raise ValueError(f"{path}: {key} is not a LoRA weight of a linear layer (DoRA, embedding "
                             f"LoRAs, modules_to_save and LoRA biases are not supported)")
        state[f"{module}.{part}"] = t
    modules = sorted({k.rpartition(".")[0] for k in state})
    if not modules:
        raise ValueError(f"{path}: holds no LoRA weights")
    try:
        cfg = LoRAConfig(rank=config.get("r"), alpha=config.get("lora_alpha"),
                         dropout=config.get("lora_dropout", 0.0),
                         targets=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})))
    except ValueError as e:
        raise ValueError(f"{os.path.join(directory, PEFT_CONFIG)}: {e}") from e
    for m in modules:
        A, B = state.get(f"{m}.lora_A"), state.get(f"{m}.lora_B")
        if (A is None or B is None or A.dim() != 2 or B.dim() != 2
                or (A.shape[0], B.shape[1]) != (cfg.rank, cfg.rank)):
            raise ValueError(f"{path}: {m} needs lora_A (r, I) and lora_B (O, r), r = {cfg.rank}, "
                             f"has {None if A is None else tuple(A.shape)} and "
                             f"{None if B is None else tuple(B.shape)}")
        if model is not None:
            _check_fits(model, m, A, B, path)
    return cfg, state


def load_peft(model: nn.Module, directory: str) -> list[LoRALinear]:
    """Inject LoRALinear layers where a PEFT LoRA has adapters (by full module name) and load its
    weights, in the base layers' dtype and device: the model then gives PEFT's logits. Returns the
    layers. Every check runs before the model is changed (read_peft)."""
    cfg, state = read_peft(directory, model)
    modules = tuple(sorted({k.rpartition(".")[0] for k in state}))
    layers = inject(model, lambda linear, name: LoRALinear(linear, cfg).to(linear.weight), modules)
    load_adapter_state(model, state, directory)
    return layers
