"""What the mixture-of-LoRA methods share: routing, the dispatch of experts, the adapted-layer
base class, injection into a model, config checks, training stages and adapter save/load.

Shape legend, used in every file of this repo:

    B batch  T time  N tokens (B*T, flattened)  D model dim  I in-features  O out-features
    E experts  K experts kept per token (top-k)  r rank

Every expert update has the LoRA form  Delta_e x = B_e act(A_e x)  (act is the identity except in
MoDULA-Res), and a layer mixes them with per-token gates g (N, E) from a router:

    g(x) = TopK_K(softmax(W_g x))  (renormalised or not; K = E is soft routing)
    y    = W0 x + scaling * sum_e g_e(x) * B_e act(A_e x)

A is per expert (E, r, I) or shared by all experts (r, I) (MoSLD, MALoRA: x A^T once per token).
Read top to bottom: `gate` and `Router` state the routing, `dispatch_naive` the mixture as a loop,
`dispatch_fused` the same maths as two matmuls. fast.py holds quicker versions of these steps
(gating backward written out, CPU top-k, router folded into x A^T, grouped path for large E / K),
each tested against the plain one here.

Not included: expert parallelism, capacity factors and token dropping, quantised bases,
several adapters per layer.
"""
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
from fast import mix_dtype

# ----------------------------------------------------------------------------- routing


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W_g x: x (N, I), W_g (E, I) -> (N, E), in float32 at least (as the MoLoRA code)."""
    return F.linear(x.to(mix_dtype(x)), weight.to(mix_dtype(x)))          # (N, E)


def gate(logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """Router logits (N, E) -> probs (N, E), gates (N, E) that are zero outside the top K, and
    idx (N, K), the kept experts. K == E is soft routing: gates == probs and idx is None.
    Fixed shapes, no boolean masks: safe for torch.compile(fullgraph=True)."""
    probs = logits.softmax(-1)                                     # (N, E)
    if top_k == probs.shape[-1]:                                   # soft: every expert kept
        return probs, probs, None
    top, idx = fast.top_k(probs, top_k)                            # (N, K), (N, K), probs.topk(K)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)                      # the K kept weights sum to 1
    gates = torch.zeros_like(probs).scatter(-1, idx, top)          # (N, E), zero outside the top-k
    return probs, gates, idx


def route(x: torch.Tensor, router: nn.Module, top_k: int, renormalize: bool = True):
    """x (N, I) and anything with a .weight (E, I) -> logits (N, E) and gate(logits): probs (N, E),
    gates (N, E), idx (N, K) or None. Plain autograd: the reference for Router."""
    logits = router_logits(x, router.weight)                       # (N, E)
    return (logits, *gate(logits, top_k, renormalize))


def load_balance_loss(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch balancing loss, E * sum_e f_e * P_e (Fedus et al. 2021, Eq. 4).

    f_e: share of the (token, slot) picks that go to expert e.  P_e: mean router probability of e.
    1 when routing is uniform; E / K when every token puts all its mass on the same K experts.
    """
    N, E = probs.shape
    picks = torch.zeros_like(probs).scatter(-1, idx, 1.0)          # (N, E), K ones per row
    f = picks.mean(0) / idx.shape[-1]                              # (E,), sums to 1; no gradient
    P = probs.mean(0)                                              # (E,)
    return E * (f * P).sum()


class LastCall:
    """For a module that keeps tensors of its last call, with their autograd graph, in the
    attributes named by `last_call`: a copy (copy.deepcopy, pickle) gets None there and the
    weights as they are; deepcopy cannot copy a tensor that is inside a graph."""
    last_call: tuple = ()

    def __getstate__(self):
        return {**self.__dict__, **dict.fromkeys(self.last_call)}


class Router(LastCall, nn.Module):
    """The router of every method here: a bias-free W_g (E, I), N(0, 0.02^2) as in the MoLoRA
    code; softmax in float32 at least; the top K, renormalised or not; top_k None is soft routing.

    `router(x)` (N, I) -> gates (N, E), as route(x, router, K)[2] (by fast.gate, whose top-k
    backward is written out). Keeps `idx` (N, K) and `balance_loss`, the Switch loss of the call
    (both None when soft: the original MoLoRA has no loss), and `gates` detached (expert usage;
    a layer that routes whole sequences sets it to the per-token gates it used).
    Opt-in, `router(x, fold=A, dispatch=d)`: when the experts read the same x and d takes x A^T
    (d.takes_xa: fused yes, loop and grouped no), W_g x rides in the x A^T matmul
    (fast.fold_router) and `xa` keeps x A^T for d; never for bf16/fp16 x. Else `xa` is None.
    """
    last_call = ("idx", "balance_loss", "xa", "gates")

    def __init__(self, in_features: int, num_experts: int, top_k: int | None = None,
                 renormalize: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))   # (E, I)
        self.top_k, self.renormalize = top_k or num_experts, renormalize
        self.idx = self.balance_loss = self.xa = self.gates = None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, fold: torch.Tensor | None = None, dispatch=None) -> torch.Tensor:
        E = self.weight.shape[0]
        self.xa = None
        takes_xa = getattr(dispatch, "takes_xa", None)             # None: the loop, the grouped path
        if fold is not None and takes_xa and x.dtype == mix_dtype(x) and takes_xa(x, E, self.top_k):
            self.xa, logits = fast.fold_router(x, fold, self.weight)      # (N, E*r), (N, E)
        else:
            logits = router_logits(x, self.weight)                     # (N, E)
        probs, gates, self.idx = fast.gate(logits, self.top_k, self.renormalize)   # = gate(...)
        self.balance_loss = None if self.idx is None else load_balance_loss(probs, self.idx)
        self.gates = gates.detach()
        return gates                                                   # (N, E)


# ----------------------------------------------------------------------------- dispatch
# Every dispatch takes (x, A, B, gates, scaling, act=None, idx=None, xa=None): x (N, I);
# A (E, r, I) per expert or (r, I) shared; B (E, O, r); gates (N, E); idx (N, K), the top-k
# experts, used only by the grouped path; xa, x A^T already formed by the Router's fold, which
# only a dispatch with `takes_xa` asks for.


def dispatch_naive(x, A, B, gates, scaling, act: Callable | None = None, idx=None, xa=None):
    """y = scaling * sum_e g_e * B_e act(A_e x), one expert at a time. The reference: every
    expert runs on every token; top-k shows up only as zero gates."""
    y = x.new_zeros(x.shape[0], B.shape[1], dtype=mix_dtype(x))    # (N, O)
    for e in range(B.shape[0]):
        A_e = A if A.dim() == 2 else A[e]                          # (r, I)
        h = x @ A_e.T                                              # (N, r)
        if act is not None:
            h = act(h)
        y = y + gates[:, e:e + 1] * (h @ B[e].T).to(y.dtype)       # (N, 1) * (N, O)
    return (scaling * y).to(x.dtype)


def dispatch_fused(x, A, B, gates, scaling, act: Callable | None = None, idx=None, xa=None):
    """Same maths as dispatch_naive with no loop over experts: (N, E*r) @ (E*r, O).

    The gated h is formed in float32 (the gates' dtype) and rounded once to x's dtype before the
    second matmul, so bf16 inputs lose nothing in the mixing. No .item(), no data-dependent
    shapes: torch.compile(fullgraph=True) captures it whole. `scaling` multiplies the (N, E) gates
    rather than the (N, O) output: the same product, fewer multiplies."""
    N, (E, O, r) = x.shape[0], B.shape
    if xa is None:
        xa = x @ A.reshape(-1, A.shape[-1]).T                      # (N, E*r) or (N, r): x A_e^T
    h = xa.view(N, -1, r)                                          # (N, E, r) or (N, 1, r)
    if act is not None:
        h = act(h)
    h = (h.to(mix_dtype(x)) * (scaling * gates)[..., None]).to(x.dtype)   # (N, E, r)
    B_cat = B.transpose(1, 2).reshape(E * r, O)                    # (E*r, O), rows e*r.. = B_e^T
    return h.reshape(N, E * r) @ B_cat                             # (N, O)


def dispatch_auto(x, A, B, gates, scaling, act: Callable | None = None, idx=None, xa=None):
    """dispatch_fused, or fast.dispatch_grouped when routing is top-k (idx given) and E / K is past
    the crossover measured for this device type (fast.GROUPED_FROM_E_OVER_K): every layer's
    forward. The grouped path compiles whole only with torch._grouped_mm (fast.has_grouped_mm)."""
    E, K = B.shape[0], idx.shape[1] if idx is not None else B.shape[0]
    if fast.grouped_pays(x.device.type, E, K):
        return fast.dispatch_grouped(x, A, B, gates, scaling, act, idx, xa)
    return dispatch_fused(x, A, B, gates, scaling, act, xa=xa)


dispatch_fused.takes_xa = lambda x, E, K: True                     # see Router's fold
dispatch_auto.takes_xa = lambda x, E, K: not fast.grouped_pays(x.device.type, E, K)

# fullgraph=True is safe: no branch on tensor values and no .item(). Lazy: compiles at first call.
dispatch_compiled = torch.compile(dispatch_fused, fullgraph=True, dynamic=False)
dispatch_compiled.takes_xa = dispatch_fused.takes_xa


# ----------------------------------------------------------------------------- adapted layers


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus an update. Subclasses define `update(x, dispatch) -> (N, O)`, the
    one place a method's maths lives.

    `forward` runs `update` with dispatch_auto, `forward_naive` with the loop: the paths share every
    line but the dispatch. `update` gets x as (N, I), or as (B, T, I) with `sequence_input` (MoA
    routes per sequence). A Router's balancing loss of the last forward is in `aux`.
    """
    sequence_input = False

    def __init__(self, base: nn.Linear, aux_loss_coef: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.aux_loss_coef = aux_loss_coef

    def _run(self, x, dispatch):
        seq = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 2 else x.view(1, 1, -1)   # (B, T, I)
        dy = self.update(seq if self.sequence_input else x.reshape(-1, x.shape[-1]), dispatch)
        return self.base(x) + dy.reshape(*x.shape[:-1], -1).to(x.dtype)

    @property
    def aux(self) -> torch.Tensor | None:
        """The Switch balancing loss of the last forward (None: no Router, or soft routing)."""
        router = getattr(self, "router", None)
        return router.balance_loss if isinstance(router, Router) else None

    def forward(self, x):
        return self._run(x, dispatch_auto)

    def forward_naive(self, x):
        return self._run(x, dispatch_naive)


def aux_loss(model: nn.Module) -> torch.Tensor | float:
    """Mean over the adapted layers that have one of aux_loss_coef * balancing loss (averaged, so
    the coefficient does not scale with depth); 0.0 when none has one (soft MoLoRA, LoRA)."""
    losses = [m.aux_loss_coef * m.aux for m in model.modules()
              if isinstance(m, AdaptedLinear) and m.aux is not None and m.aux_loss_coef > 0]
    return torch.stack(losses).mean() if losses else 0.0


# ----------------------------------------------------------------------------- injection


class Conv1DLinear(nn.Linear):
    """transformers' GPT-2 Conv1D (weight (I, O), y = x W + b) as the nn.Linear it equals, so that
    every adapted layer sees one kind of base. Its weight is the (O, I) transposed view of the
    Conv1D's and its bias the same Parameter: nothing is copied, a large base does not grow in
    memory. (The model's state dict then holds that weight as (O, I).)"""

    def __init__(self, conv: nn.Module):
        I, O = conv.weight.shape
        super().__init__(I, O, bias=False, device="meta")                        # allocates nothing
        self.weight = nn.Parameter(conv.weight.detach().T, requires_grad=False)   # (O, I), a view
        self.bias = conv.bias                                                     # (O,) or None


def as_linear(module: nn.Module) -> nn.Linear | None:
    """What inject adapts: an nn.Linear itself; a GPT-2 Conv1D, recognised without importing
    transformers by its class name, its weight (I, O) and bias (O), as a Conv1DLinear; else None."""
    if isinstance(module, nn.Linear):
        return module
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and (b is None or tuple(b.shape) == (w.shape[1],))):
        return Conv1DLinear(module)
    return None


def inject(model: nn.Module, layer_factory: Callable[[nn.Linear, str], nn.Module],
           targets: tuple[str, ...]) -> list[nn.Module]:
    """Replace every nn.Linear or GPT-2 Conv1D (as_linear) named by `targets` by
    layer_factory(linear, full_name), freeze everything else, and return the new layers in model
    order. A target names a module as PEFT's target_modules do: by its own name ("q", "q_proj",
    "c_attn") or by a dotted tail of its full name, up to the whole name. The factory gets the full
    name (e.g. "blocks.3.attn.q") for per-layer configs (layer_config)."""
    model.requires_grad_(False)
    found = [(name, mod, linear) for name, mod in model.named_modules()
             if any(name == t or name.endswith(f".{t}") for t in targets)
             and (linear := as_linear(mod)) is not None]
    if not found:
        raise ValueError(f"inject: no nn.Linear or Conv1D named any of {list(targets)} in the model")
    layers = []
    for name, mod, linear in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = layer_factory(linear, name).train(mod.training)   # the model's train/eval mode
        setattr(parent, attr, layer)
        layers.append(layer)
    return layers


def layer_config(cfg, name: str, depth: int):
    """The config of the adapted linear `name` in a model of `depth` blocks: cfg.for_layer(3, depth)
    for "blocks.3.attn.q", "model.layers.3.self_attn.q_proj" (Llama) or "transformer.h.3.attn.c_attn"
    (GPT-2) when a method's settings vary with depth (MoSLD's experts per layer), else cfg itself.
    The block index is the first all-digit part of the name."""
    if not hasattr(cfg, "for_layer"):
        return cfg
    index = next((int(part) for part in name.split(".") if part.isdigit()), 0)
    return cfg.for_layer(index, depth)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- configs and init


def check_field(cls: str, name: str, value, ok: bool, allowed: str):
    """One message format for every config error: names the field, its value and what is allowed."""
    if not ok:
        raise ValueError(f"{cls}.{name}={value!r}: must be {allowed}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_KINDS = {int: (is_int, "an integer"), float: (is_real, "a finite number"),   # annotation: (test, name)
          bool: (lambda v: isinstance(v, bool), "true or false"),
          str: (lambda v: isinstance(v, str), "a string"),
          tuple: (lambda v: isinstance(v, tuple), "a list"),
          type(None): (lambda v: v is None, "null")}
_BOUND_KINDS = {"count": (lambda v: v >= 1, "an integer >= 1"), "positive": (lambda v: v > 0, "> 0"),
                "non-negative": (lambda v: v >= 0, ">= 0"), "p": (lambda v: 0 <= v < 1, "in [0, 1)")}
BOUNDS = {name: _BOUND_KINDS[kind] for kind, names in {   # field -> (test, allowed), in every config
    "count": ("num_experts", "num_domains", "rank", "universal_rank", "domain_rank", "prompt_len"),
    "positive": ("alpha", "beta", "router_lr_scale"), "non-negative": ("aux_loss_coef", "negative_slope"),
    "p": ("dropout", "drop_a", "drop_b")}.items() for name in names}


def check_config(cfg):
    """Every field of a config dataclass against its annotation (int, float, bool, str, tuple and
    unions such as int | None), then against BOUNDS, so that `--cfg rank=2.5`, `rank=0` or
    `renormalize=maybe` fails naming the field. `targets` must be a list of module names.
    Method-specific rules stay in the config's own __post_init__, after this."""
    cls = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        value, kinds = getattr(cfg, f.name), get_args(f.type) or (f.type,)
        check_field(cls, f.name, value, any(_KINDS[k][0](value) for k in kinds),
                    " or ".join(_KINDS[k][1] for k in kinds))
        if f.name in BOUNDS and is_real(value):                    # a tuple (MoSLD's E_l) is checked there
            test, allowed = BOUNDS[f.name]
            check_field(cls, f.name, value, test(value), allowed)
    if hasattr(cfg, "targets"):
        check_field(cls, "targets", cfg.targets,
                    len(cfg.targets) > 0 and all(isinstance(t, str) and t for t in cfg.targets),
                    'a non-empty list of module names, e.g. ["q", "v"]')


def check_renormalize(cfg):
    """A config with top_k and renormalize: top-1 must keep Switch's probability, since one
    renormalised gate is always 1 and the router would learn only from the balancing loss."""
    check_field(type(cfg).__name__, "renormalize", cfg.renormalize,
                not (cfg.renormalize and cfg.top_k == 1 < cfg.num_experts),
                "False when top_k is 1: one renormalised gate is always 1, so the router would "
                "learn only from the balancing loss (Switch keeps the probability)")


def lora_uniform_(A: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init for a (..., r, I) down-projection: U(-1/sqrt(I), 1/sqrt(I)).
    (kaiming_uniform_(a=sqrt(5)) as PEFT uses, but with fan_in = I also for stacked (E, r, I).)"""
    bound = 1 / math.sqrt(A.shape[-1])
    return nn.init.uniform_(A, -bound, bound)


# ----------------------------------------------------------------------------- training stages


@dataclass
class Stage:
    """One stage of a method's training schedule, run by train.py in order. Single-stage methods
    need none; staged methods (MoDULA, MoA) return a list of these from their `stages(...)`."""
    name: str                                        # shown in the progress bar and metrics.json
    tasks: tuple                                     # the data mixture (task names, tasks.py)
    params: Callable[[list], list]                   # layers -> the parameters this stage trains
    setup: Callable[[list], None] | None = None      # layers -> None, e.g. switch a forward mode
    on_batch: Callable | None = None                 # (layers, domain_ids (B,)) -> None, per batch;
                                                     # ids index the run's domains, -1 = general task
    extra_loss: Callable[[list], torch.Tensor] | None = None   # layers -> loss added to the LM loss
    steps_frac: float = 1.0                          # share of --steps this stage runs
    lr_scale: float = 1.0                            # its peak lr is lr_scale * --lr


def stage_mode(active) -> Callable[[list], None]:
    """A Stage.setup that sets `layer.active = active` on every layer: which experts the stage's
    forward uses (MoDULA, MoA: None = routed, an index = that domain expert alone)."""
    def setup(layers):
        for layer in layers:
            layer.active = active
    return setup


def append_expert(layer: nn.Module):
    """Grow a layer with stacked experts (lora_A (E, r, .), lora_B (E, O, r), router (E', I)) by
    one expert: A new from lora_uniform_, B = 0 (its update starts at 0), and one router row, the
    mean of the old rows (our reading of MoDULA §4.4, which does not say how the router
    grows). The old experts and rows are copied bit for bit."""
    A, B, W = layer.lora_A.detach(), layer.lora_B.detach(), layer.router.weight.detach()
    layer.lora_A = nn.Parameter(torch.cat([A, lora_uniform_(A.new_empty(1, *A.shape[1:]))]))
    layer.lora_B = nn.Parameter(torch.cat([B, B.new_zeros(1, *B.shape[1:])]))
    old = layer.router
    layer.router = Router(W.shape[1], W.shape[0] + 1, old.top_k if old.top_k < W.shape[0] else None,
                          old.renormalize).to(W)
    with torch.no_grad():
        layer.router.weight.copy_(torch.cat([W, W.mean(0, keepdim=True)]))    # (E'+1, I)


# ----------------------------------------------------------------------------- save / load


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: every parameter of an AdaptedLinear except its frozen base."""
    return {f"{name}.{p_name}": p.detach().cpu().contiguous()
            for name, mod in model.named_modules() if isinstance(mod, AdaptedLinear)
            for p_name, p in mod.named_parameters() if not p_name.startswith("base.")}


def base_hash(model: nn.Module) -> str:
    """sha256 of the frozen base: name (as before inject), shape, dtype and bytes of every tensor
    outside the adapters. The same before and after inject and on any device; an adapter records
    it, so that it is never loaded onto another base."""
    adapted = {f"{n}." if n else "": m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        prefix = next((a for a in adapted if name.startswith(a)), None)
        if prefix is not None:                                 # inside an adapted layer:
            if not name.startswith(prefix + "base."):          # the adapter itself, skip
                continue
            name = prefix + name[len(prefix) + len("base."):]  # its frozen base, pre-inject name
            if isinstance(adapted[prefix].base, Conv1DLinear) and name.endswith(".weight"):
                t = t.T                                        # GPT-2's own (I, O) layout
        h.update(f"{name} {tuple(t.shape)} {t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def first_line(e: Exception) -> str:
    """An exception's message cut to its first line (torch and safetensors write several)."""
    return (str(e).strip().splitlines() or [""])[0]


def atomic_write(path: str, write: Callable[[str], None]):
    """write(tmp) to path.tmp, then os.replace it onto path: a crash at any moment leaves either
    the old file or the whole new one, never half of one. A failed write leaves no .tmp behind."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model: nn.Module, path: str, meta: dict):
    """Adapter weights as safetensors, with `meta` (method, config, targets...) in the header,
    written atomically. With "base_sha256": base_hash(model) and "layer" (the class name) in meta,
    load_adapter refuses to load it onto another base model or into another method's layers."""
    from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file(adapter_state_dict(model), tmp,
                                             metadata={"meta": json.dumps(meta)}))


def _read_adapter(path: str, tensors: bool = True):
    """(meta, {name: tensor}) from a save_adapter file; only the header when tensors=False."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such adapter file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            saved = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise ValueError(f"{path}: not a readable adapter file ({first_line(e)})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a readable adapter file (its meta is not a JSON object)")
    return meta, saved


def adapter_meta(path: str) -> dict:
    """The meta of a save_adapter file, without reading its tensors."""
    return _read_adapter(path, tensors=False)[0]


def load_adapter_state(model: nn.Module, saved: dict, where: str):
    """Copy adapter tensors (names as adapter_state_dict) into an injected model. Every name and
    shape is checked before the first copy, so a mismatch leaves the model untouched."""
    own, expected = dict(model.named_parameters()), adapter_state_dict(model)
    missing, unexpected = expected.keys() - saved.keys(), saved.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"{where}: adapter does not fit this model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    for k, t in saved.items():
        if own[k].shape != t.shape:
            raise ValueError(f"{where}: shape mismatch for {k}: file {tuple(t.shape)}, "
                             f"model {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, t in saved.items():
            own[k].copy_(t)


def load_adapter(model: nn.Module, path: str) -> dict:
    """Load weights saved by save_adapter into an already-injected model; returns its meta.
    Checks the meta's "layer" and "base_sha256" when it has them, then every name and shape.
    Raises FileNotFoundError / ValueError with one line naming the problem."""
    meta, saved = _read_adapter(path)
    layers = sorted({type(m).__name__ for m in model.modules() if isinstance(m, AdaptedLinear)})
    if "layer" in meta and layers != [meta["layer"]]:
        raise ValueError(f"{path}: adapter holds {meta['layer']} layers (method "
                         f"{meta.get('method')!r}), this model has {', '.join(layers) or 'none'}")
    have = base_hash(model) if "base_sha256" in meta else None
    if have is not None and meta["base_sha256"] != have:
        raise ValueError(f"{path}: adapter was trained on another base model (sha256 "
                         f"{meta['base_sha256'][:12]}..., this one {have[:12]}...; "
                         f"its base: {meta.get('base', 'unknown')})")
    load_adapter_state(model, saved, path)
    return meta
