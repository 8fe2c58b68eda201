"""What the mixture-of-LoRA methods share: routers, top-k, the balancing loss, the two dispatch
functions (naive loop and fused), injection into a model, and adapter save/load.

Shape legend, used in every file of this repo:

    B batch  T time  N tokens (B*T, flattened)  D model dim  I in-features  O out-features
    E experts  K experts kept per token (top-k)  r rank

Every expert update has the LoRA form  Delta_e x = B_e act(A_e x)  (act is the identity except in
MoDULA-Res), and a layer mixes them with per-token gates g (N, E):

    y = W0 x + scaling * sum_e g_e(x) * B_e act(A_e x)                       (METHODS.md 1(a))

A is either per expert (E, r, I) or shared by all experts (r, I) (MoSLD, MALoRA: METHODS.md 2(a),
3(a)); with a shared A, x A^T is computed once per token. `dispatch_naive` is the equation as a
loop, `dispatch_fused` the same maths as two matmuls with no loop over experts.

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

# ----------------------------------------------------------------------------- init helpers


def lora_uniform_(A: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init for a (..., r, I) down-projection: U(-1/sqrt(I), 1/sqrt(I)).
    (kaiming_uniform_(a=sqrt(5)) as PEFT uses, but with fan_in = I also for stacked (E, r, I).)"""
    bound = 1 / math.sqrt(A.shape[-1])
    return nn.init.uniform_(A, -bound, bound)


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


def check_types(cfg):
    """Every field of a config dataclass against its annotation (int, float, bool, str, tuple and
    unions such as int | None), before the range checks, so that `--cfg rank=2.5` or
    `renormalize=maybe` fails naming the field. `targets` must be a list of module names."""
    for f in dataclasses.fields(cfg):
        value, kinds = getattr(cfg, f.name), get_args(f.type) or (f.type,)
        check_field(type(cfg).__name__, f.name, value, any(_KINDS[k][0](value) for k in kinds),
                    " or ".join(_KINDS[k][1] for k in kinds))
    if hasattr(cfg, "targets"):
        check_field(type(cfg).__name__, "targets", cfg.targets,
                    len(cfg.targets) > 0 and all(isinstance(t, str) and t for t in cfg.targets),
                    'a non-empty list of linear names, e.g. ["q", "v"]')


def check_renormalize(cfg):
    """A config with top_k and renormalize: top-1 must keep Switch's probability, since one
    renormalised gate is always 1 and the router would learn only from the balancing loss."""
    check_field(type(cfg).__name__, "renormalize", cfg.renormalize,
                not (cfg.renormalize and cfg.top_k == 1 < cfg.num_experts),
                "False when top_k is 1: one renormalised gate is always 1, so the router would "
                "learn only from the balancing loss (Switch keeps the probability)")


# ----------------------------------------------------------------------------- routing


def _mix_dtype(x: torch.Tensor) -> torch.dtype:
    """Gates are mixed in float32 at least: bf16/fp16 -> float32, float32/float64 unchanged."""
    return torch.promote_types(x.dtype, torch.float32)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, written out: ATen's CPU softmax is slow when that dim is E ~ 8
    (forward + backward at N=4096, E=8, one thread: 0.92 ms, against 0.34 ms for these four ops).
    The max is detached: softmax does not change under a shift, so its gradient would be zero."""
    e = (logits - logits.detach().amax(-1, keepdim=True)).exp()   # (N, E), largest term exp(0) = 1
    return e / e.sum(-1, keepdim=True)


def _top_k(probs: torch.Tensor, k: int):
    """probs.topk(k, dim=-1) -> values (N, K), indices (N, K). On CPU, k <= 2 runs as rounds of
    max, which keep the lower index among ties: ATen's CPU topk costs ~300 us at N=4096, E=8
    whatever k, one max ~40 us, two rounds ~150 us; from k = 3 topk is the cheaper."""
    if probs.device.type != "cpu" or k > 2:
        return probs.topk(k, dim=-1)
    top, idx = probs.max(-1, keepdim=True)                         # (N, 1), the largest
    if k == 2:
        top2, idx2 = probs.scatter(-1, idx, -math.inf).max(-1, keepdim=True)   # (N, 1), the next
        top, idx = torch.cat([top, top2], -1), torch.cat([idx, idx2], -1)      # (N, 2)
    return top, idx


def gate(logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """Router logits (N, E), at least float32 -> probs (N, E), gates (N, E) that are zero outside
    the top-k, and idx (N, K), the kept experts. With K == E the routing is soft: gates == probs
    and idx is None. Fixed shapes, no boolean masks: safe for torch.compile(fullgraph=True).
    The readable reference: Router runs top-k through _TopKGate, whose forward is this function
    and whose backward is written out; the tests check it against autograd through this one."""
    probs = _softmax(logits)                                       # (N, E)
    if top_k == probs.shape[-1]:                                   # soft routing: every expert kept
        return probs, probs, None
    top, idx = _top_k(probs, top_k)                                # (N, K), (N, K)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)                      # the K kept weights sum to 1 (Eq. 1)
    gates = torch.zeros_like(probs).scatter(-1, idx, top)          # (N, E), zero outside the top-k
    return probs, gates, idx


class _TopKGate(torch.autograd.Function):
    """gate() for top-k routing (K < E; METHODS.md 1(b), Eq. 1) with its backward written out:
    the same probs, gates and idx, the same gradients (tests/test_common.py), in 9 ops on (N, E)
    (two of them row sums) where autograd through gate() runs ~20. On CPU, where each op on a
    tensor this small costs 20-60 us, a MoLoRA layer's adapter cost fell by 6 % (README, Speed).

    With S the kept set (fixed under a small change of the logits l), for one token:
      renormalised   g_i = p_i / sum_{j in S} p_j = softmax over S   -> dl = g*(u - <g, u>)
      not            g_i = p_i on S, 0 elsewhere                     -> dl = g*u - p <g, u>
      probs          p = softmax(l)                                  -> dl = p*(v - <p, v>)
    where u = dL/dg, v = dL/dp (from the balancing loss) and <a, b> sums over the E experts."""

    @staticmethod
    def forward(ctx, logits, top_k: int, renormalize: bool):
        probs, gates, idx = gate(logits, top_k, renormalize)       # (N, E), (N, E), (N, K); no graph
        ctx.save_for_backward(probs, gates)
        ctx.renormalize = renormalize
        ctx.set_materialize_grads(False)                           # None: that output is unused
        return probs, gates, idx

    @staticmethod
    def backward(ctx, d_probs, d_gates, _):                        # (N, E) or None, each
        probs, gates = ctx.saved_tensors                           # (N, E), (N, E)
        d_logits = None                                            # (N, E) dL/dlogits
        if d_gates is not None:
            gu = gates * d_gates                                   # (N, E)
            d_logits = gu - (gates if ctx.renormalize else probs) * gu.sum(-1, keepdim=True)
        if d_probs is not None:                                    # the balancing loss's share
            pv = probs * d_probs                                   # (N, E)
            d_p = pv - probs * pv.sum(-1, keepdim=True)            # (N, E)
            d_logits = d_p if d_logits is None else d_logits + d_p
        return d_logits, None, None


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W_g x: x (N, I), W_g (E, I) -> (N, E), in float32 at least (the MoLoRA code)."""
    dt = _mix_dtype(x)
    return F.linear(x.to(dt), weight.to(dt))                       # (N, E)


def route(x: torch.Tensor, router: nn.Module, top_k: int, renormalize: bool = True):
    """Token routing: logits W_g x in (at least) float32, softmax over E, keep the top K
    (METHODS.md 1(b)). router: anything with a .weight (E, I) (nn.Linear, Router).
    Returns logits (N, E) and gate(logits): probs (N, E), gates (N, E), idx (N, K) or None."""
    logits = router_logits(x, router.weight)                       # (N, E)
    return (logits, *gate(logits, top_k, renormalize))


def load_balance_loss(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch balancing loss, E * sum_e f_e * P_e (Fedus et al. 2021, Eq. 4; METHODS.md 2(b)).

    f_e: share of the (token, slot) picks that go to expert e.  P_e: mean router probability of e.
    Equals 1 when routing is perfectly uniform; at most E / K, when every token puts all its
    probability on the same K experts (E with top-1).
    """
    N, E = probs.shape
    picks = torch.zeros_like(probs).scatter(-1, idx, 1.0)          # (N, E), K ones per row
    f = picks.mean(0) / idx.shape[-1]                              # (E,), sums to 1; no gradient
    P = probs.mean(0)                                              # (E,), probs >= float32 (gate)
    return E * (f * P).sum()


class Router(nn.Module):
    """The router of every method here (METHODS.md 1(b)): a bias-free W_g (E, I), N(0, 0.02^2) as
    in the MoLoRA code; softmax in float32 at least; the top K (renormalised); K = E (top_k None)
    is soft routing (MoDULA's; MoA reads its W_g x for the router CE). `router(x)` (N, I) -> gates
    (N, E). A dispatch handed the Router instead of gates may compute W_g x inside its own matmul
    (dispatch_fused).

    Each call keeps, for its layer: `idx` (N, K) (None when soft) and `balance_loss`, the Switch
    loss of the call (None when soft: the original MoLoRA has none).
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int | None = None,
                 renormalize: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))   # (E, I)
        self.top_k, self.renormalize = top_k or num_experts, renormalize
        self.idx = self.balance_loss = None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(router_logits(x, self.weight))           # (N, E)

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (N, E), at least float32 -> gates (N, E); keeps idx and balance_loss.
        Top-k routing runs through _TopKGate, soft routing through gate()."""
        fn = _TopKGate.apply if self.top_k < logits.shape[-1] else gate
        probs, gates, self.idx = fn(logits, self.top_k, self.renormalize)   # (N, E), (N, E), (N, K)
        self.balance_loss = None if self.idx is None else load_balance_loss(probs, self.idx)
        return gates


def resolve_gates(gates, x: torch.Tensor) -> tuple:
    """A dispatch's `gates` argument, a tensor (N, E) or a Router, -> (gates (N, E), idx (N, K) or
    None: None for a tensor, which carries no top-k indices)."""
    if isinstance(gates, Router):
        return gates(x), gates.idx
    return gates, None


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss, mean_n logsumexp(logits_n)^2 (Zoph et al. 2022, ST-MoE Eq. 5)."""
    return logits.float().logsumexp(-1).square().mean()


# ----------------------------------------------------------------------------- dispatch


def _expert_inputs(x: torch.Tensor, A: torch.Tensor, router: Router | None = None):
    """x A_e^T for every expert: (N, E, r) from per-expert A (E, r, I), or (N, 1, r) from shared A,
    as one plain mm on the (E*r, I) view of A (einsum's bookkeeping costs ~4% of a layer on CPU).

    With a router whose logits may be formed in x's dtype (float32 or float64; bf16 logits would
    not be float32), its W_g (E, I) rides along in the same mm: one pass over x forward and one
    dL/dx matmul backward instead of two each (with the written-out softmax, MoLoRA's layer went
    from 1.71x to 1.56x a rank-E*r LoRA in bench.py on CPU; what remains is the router's small
    element-wise ops). Returns (h, router logits (N, E) or None)."""
    r, I = A.shape[-2:]
    W = A.reshape(-1, I)                                           # (E*r, I) or (r, I)
    fold = router is not None and x.dtype == _mix_dtype(x)
    if fold:
        W = torch.cat([W, router.weight.to(x.dtype)])             # (E*r + E, I)
    z = x @ W.T                                                    # (N, E*r [+ E])
    n = A.numel() // I                                             # E*r or r columns of x A^T
    h, logits = z.split([n, z.shape[1] - n], dim=1) if fold else (z, None)   # (N, n), (N, E)
    return h.view(x.shape[0], -1, r), logits                       # (N, E, r) or (N, 1, r)


def dispatch_naive(x, A, B, gates, scaling, act: Callable | None = None, idx=None):
    """y = scaling * sum_e g_e * B_e act(A_e x), one expert at a time. The reference.

    x (N, I); A (E, r, I) per expert or (r, I) shared; B (E, O, r); gates (N, E), or a Router
    that computes them from x. Every expert runs on every token; top-k shows up only as zero gates.
    Every dispatch takes these arguments; idx (N, K), the top-k experts of tensor gates, is used
    only by the grouped path (dispatch_grouped, dispatch_auto).
    """
    gates = resolve_gates(gates, x)[0]                             # (N, E)
    y = x.new_zeros(x.shape[0], B.shape[1], dtype=_mix_dtype(x))   # (N, O)
    for e in range(B.shape[0]):
        A_e = A if A.dim() == 2 else A[e]                          # (r, I)
        h = x @ A_e.T                                              # (N, r)
        if act is not None:
            h = act(h)
        y = y + gates[:, e:e + 1] * (h @ B[e].T).to(y.dtype)       # (N, 1) * (N, O)
    return (scaling * y).to(x.dtype)


def dispatch_fused(x, A, B, gates, scaling, act: Callable | None = None, idx=None):
    """Same maths as dispatch_naive with no loop over experts: (N, E*r) @ (E*r, O).

    The gate product is formed in float32 (gates come from a float32 softmax) and rounded once to
    the compute dtype before the second matmul, so bf16/fp16 inputs lose nothing in the mixing.
    No .item(), no data-dependent shapes: torch.compile(fullgraph=True) captures it whole.
    `scaling` multiplies the (N, E) gates rather than the (N, O) output: the same product, and one
    pass over N*O numbers fewer each way. Handed a Router, it forms the router logits in the
    matmul that forms x A^T (_expert_inputs), then gates them.
    """
    N, (E, O, r) = x.shape[0], B.shape
    router = gates if isinstance(gates, Router) else None
    h, logits = _expert_inputs(x, A, router)                       # (N, E, r) or (N, 1, r); (N, E)
    gates = router.gate(logits) if logits is not None else resolve_gates(gates, x)[0]   # (N, E)
    if act is not None:
        h = act(h)
    h = (h.to(_mix_dtype(x)) * (scaling * gates)[..., None]).to(x.dtype)   # (N, E, r)
    B_cat = B.transpose(1, 2).reshape(E * r, O)                    # (E*r, O), rows e*r..e*r+r-1 = B_e^T
    return h.reshape(N, E * r) @ B_cat                             # (N, O)


def _has_grouped_mm(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """torch._grouped_mm has a fast kernel for bf16 on sm90+ GPUs; it needs 16-byte aligned rows,
    so r, I and O must be multiples of 8."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and all(n % 8 == 0 for n in (*A.shape[-2:], B.shape[1])))    # r, I, O


def _per_expert_mm(a: torch.Tensor, W: torch.Tensor, ends: torch.Tensor, pad: int | None):
    """Each expert's block of rows of a times that expert's W[e]: (rows, k) x (E, k, n) -> (rows, n).
    pad None: block e ends at row ends[e], torch._grouped_mm. pad C: every block is C rows, one bmm."""
    if pad is None:
        return torch._grouped_mm(a, W, offs=ends.to(torch.int32))  # (rows, n)
    return torch.bmm(a.view(W.shape[0], pad, -1), W).flatten(0, 1)   # (E, C, k) @ (E, k, n) -> (E*C, n)


def dispatch_grouped(x, A, B, gates, scaling, act: Callable | None = None, idx=None):
    """Same maths as dispatch_fused, but each expert runs only on the tokens routed to it.

    idx (N, K): the experts kept per token, needed with tensor gates (a layer that routes before
    the dispatch passes its Router's idx); a Router as the gates gives them itself. The N*K
    (token, slot) pairs are sorted by expert, so each factor is one grouped GEMM and the matmul
    work is N K r (I + O) instead of N E r (I + O): the path for large E / K.
    The GEMM is torch._grouped_mm where this build has a fast one (CUDA, bf16, sm90+). Elsewhere
    every expert's block is padded to the largest block and one bmm does all of them: no loop,
    but the block size is read back to the host, so under torch.compile the fallback breaks the
    graph. Padding rows read token 0 with gate 0, so they add nothing, forward or backward.
    Gates mix in float32 as in dispatch_fused. Each token sums its K rows with index_add, whose
    atomic adds on CUDA may vary the last bit for K > 2.
    """
    if isinstance(gates, Router):
        gates, idx = resolve_gates(gates, x)                       # (N, E), (N, K)
    elif idx is None:
        raise ValueError("dispatch_grouped: tensor gates need idx (N, K), the experts each token keeps")
    (N, K), (E, O, r) = idx.shape, B.shape
    pairs = torch.arange(N * K, device=x.device)                  # (N*K,) (token, slot), token-major
    expert = idx.reshape(-1)                                       # (N*K,) expert of each pair
    sorted_expert, order = expert.sort(stable=True)                # (N*K,), pairs grouped by expert
    place = torch.empty_like(order).scatter_(0, order, pairs)      # (N*K,) where each pair went
    ends = torch.searchsorted(sorted_expert, torch.arange(E, device=x.device), right=True)  # (E,)
    if _has_grouped_mm(x, A, B):
        pad, row, rows = None, place, N * K                        # blocks back to back
    else:
        counts = ends.diff(prepend=ends.new_zeros(1))              # (E,) pairs per expert
        pad = int(counts.max())                                    # C, the largest block (host sync)
        row = expert * pad + place - (ends - counts)[expert]       # (N*K,) row in the (E*C) layout
        rows = E * pad
    token = pairs.new_zeros(rows).index_copy(0, row, pairs // K)   # (rows,) token of each row
    g = (scaling * gates).gather(1, idx).reshape(-1)               # (N*K,) gate of each pair
    g = g.new_zeros(rows).index_copy(0, row, g)                    # (rows,) 0 on padding rows
    if A.dim() == 2:                                               # shared input side: once per token
        h = (x @ A.T).index_select(0, token)                       # (rows, r)
    else:
        h = _per_expert_mm(x.index_select(0, token), A.transpose(1, 2), ends, pad)   # (rows, r)
    if act is not None:
        h = act(h)
    h = (h.to(_mix_dtype(x)) * g[:, None]).to(x.dtype)            # (rows, r)
    y = _per_expert_mm(h, B.transpose(1, 2), ends, pad)            # (rows, O)
    y = y.new_zeros(N, O, dtype=_mix_dtype(x)).index_add(0, token, y.to(_mix_dtype(x)))  # (N, O)
    return y.to(x.dtype)                                           # each token sums its K rows


# E / K from which dispatch_grouped beats dispatch_fused. bench.py, forward + backward of one
# MoLoRA layer, N=4096, r=8, float32, 2-core Xeon; grouped adapter cost / fused adapter cost:
#                  one thread (--clock cpu)        two threads, wall clock, quiet machine
#                  E/K=8   E/K=16  E/K=32          E/K=8   E/K=16  E/K=32
#   K=2, D=256     1.17    0.78    0.55            1.21    1.20    0.68
#   K=2, D=1024    1.04    0.77    0.48            1.16    0.77    0.52
#   K=1, D=256     1.10    0.85    0.54            1.07    0.92    0.85
# Grouped does K/E of the matmul work but moves (N K, I) and (N K, O) rows about, so the crossover
# sits near E/K = 16 whatever D. Devices not listed (CUDA: not measured yet) use dispatch_fused.
GROUPED_FROM_E_OVER_K = {"cpu": 16}


def dispatch_auto(x, A, B, gates, scaling, act: Callable | None = None, idx=None):
    """dispatch_fused, or dispatch_grouped when routing is top-k (gates a top-k Router, or a tensor
    with its idx (N, K)) and E / K is at least the crossover measured for this device type
    (GROUPED_FROM_E_OVER_K). The path every routed layer's forward takes. On CPU the grouped
    path reads a block size back to the host, so torch.compile(fullgraph=True) of a layer holds
    only below the crossover; train.py --compile does not ask for fullgraph."""
    E = B.shape[0]
    K = gates.top_k if isinstance(gates, Router) else idx.shape[1] if idx is not None else E
    crossover = GROUPED_FROM_E_OVER_K.get(x.device.type)
    if K < E and crossover is not None and E >= crossover * K:
        return dispatch_grouped(x, A, B, gates, scaling, act, idx)
    return dispatch_fused(x, A, B, gates, scaling, act)


def dispatch_gathered(x, A, B, idx, scaling):
    """One expert per sequence (MoA, METHODS.md 5(a)): y_b = scaling * B_k A_k x_b, k = idx[b].

    x (B, T, I); A (E, r, I); B (E, O, r); idx (B,). Gathers each sequence's A and B and applies
    them with batched matmuls: one LoRA's work per token whatever E is (dispatch_fused with one-hot
    gates does E times that), plus a copy of B r (I + O) weights shared by the T tokens of a
    sequence. No loop over sequences; torch.compile-friendly. Reference: dispatch_naive with
    one-hot gates.
    """
    h = torch.einsum("bti,bri->btr", x, A[idx])                    # (B, T, r)
    return scaling * torch.einsum("btr,bor->bto", h, B[idx])       # (B, T, O)


# fullgraph=True is safe: no branch on tensor values and no .item(), so dispatch is one graph.
# Compiling is lazy: nothing happens until the first call, on the device of its inputs.
dispatch_compiled = torch.compile(dispatch_fused, fullgraph=True, dynamic=False)


# ----------------------------------------------------------------------------- adapted layers


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus an update. Subclasses define `update(x, dispatch) -> (N, O)`.

    `forward` runs `update` with dispatch_auto (dispatch_fused; dispatch_grouped from the measured
    E / K crossover), `forward_naive` with the loop, so the paths share every line except the
    dispatch, and a test comparing them compares only that.
    A layer whose `router` is a Router has the balancing loss of its last forward in `aux`, for
    `aux_loss(model)` to collect.
    """

    def __init__(self, base: nn.Linear, aux_loss_coef: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.aux_loss_coef = aux_loss_coef

    def _run(self, x, dispatch):
        x2 = x.reshape(-1, x.shape[-1])                            # (N, I)
        dy = self.update(x2, dispatch)                             # (N, O)
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
    """Mean over adapted layers that keep one of aux_loss_coef * that layer's balancing loss
    (METHODS.md 2(b), 3(b)). 0.0 when no layer has one (soft MoLoRA, LoRA)."""
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
    found = [(name, linear) for name, mod in model.named_modules()
             if any(name == t or name.endswith(f".{t}") for t in targets)
             and (linear := as_linear(mod)) is not None]
    if not found:
        raise ValueError(f"inject: no nn.Linear or Conv1D named any of {list(targets)} in the model")
    layers = []
    for name, linear in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = layer_factory(linear, name)
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


# ----------------------------------------------------------------------------- training stages


@dataclass
class Stage:
    """One stage of a method's training schedule, run by train.py in order.

    Single-stage methods need none (train.py trains every adapter parameter on the task mixture).
    Staged methods (MoDULA, MoA) return a list of these from their `stages(...)` function.
    """
    name: str                                        # shown in the progress bar and metrics.json
    tasks: tuple                                     # the data mixture (task names, tasks.py)
    params: Callable[[list], list]                   # layers -> the parameters this stage trains
    setup: Callable[[list], None] | None = None      # layers -> None, e.g. switch a forward mode
    on_batch: Callable | None = None                 # (layers, domain_ids (B,)) -> None, per batch;
                                                     # ids index the run's domains, -1 = general task
    extra_loss: Callable[[list], torch.Tensor] | None = None   # layers -> loss added to the LM loss
    steps_frac: float = 1.0                          # share of --steps this stage runs


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
    mean of the old rows (METHODS.md 4(c)). The old experts and rows are copied bit for bit."""
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
    """sha256 of the frozen base model: the name (as before inject), shape, dtype and bytes of every
    state-dict tensor outside the adapters, in name order. The same before and after inject and on
    any device; an adapter records it so that it is never loaded onto another base."""
    adapted = [f"{n}." if n else "" for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        prefix = next((a for a in adapted if name.startswith(a)), None)
        if prefix is not None:                                 # inside an adapted layer:
            if not name.startswith(prefix + "base."):          # the adapter itself, skip
                continue
            name = prefix + name[len(prefix) + len("base."):]  # its frozen base, pre-inject name
        h.update(f"{name} {tuple(t.shape)} {t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_adapter(model: nn.Module, path: str, meta: dict):
    """Adapter weights as safetensors, with `meta` (method, config, targets...) in the header.
    Written to a temporary file and renamed, so a crash never leaves a half-written adapter.
    With "base_sha256": base_hash(model) and "layer" (the class name) in meta, load_adapter
    refuses to load it onto another base model or into another method's layers."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp"
    save_file(adapter_state_dict(model), tmp, metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


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
        why = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable adapter file ({why})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a readable adapter file (its meta is not a JSON object)")
    return meta, saved


def adapter_meta(path: str) -> dict:
    """The meta of a save_adapter file, without reading its tensors."""
    return _read_adapter(path, tensors=False)[0]


def load_adapter_state(model: nn.Module, saved: dict, where: str):
    """Copy adapter tensors (names as adapter_state_dict) into an injected model. Every name and
    shape is checked before the first copy, so a mismatch leaves the model untouched."""
    own = dict(model.named_parameters())
    expected = adapter_state_dict(model)
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
