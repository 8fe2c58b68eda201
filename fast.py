"""The fast machinery behind common.py's reference path. Read common.py first: every function here
computes what a function there states plainly, and the tests check each against its reference.

    softmax, top_k    the router's softmax and top-k, quicker on CPU for small E
    TopKGate          common.gate for top-k routing, with its backward written out
    fold_router       W_g x formed in the same matmul as x A^T (one pass over x each way)
    dispatch_grouped  each expert on its routed tokens only (grouped GEMM): past the E / K crossover

Shape legend as in common.py. Not included: a Triton kernel; expert parallelism.
"""
import math

import torch

# ----------------------------------------------------------------------------- gating


def mix_dtype(x: torch.Tensor) -> torch.dtype:
    """Gates are mixed in float32 at least: bf16/fp16 -> float32, float32/float64 unchanged."""
    return torch.promote_types(x.dtype, torch.float32)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.softmax(-1), written out: ATen's CPU softmax is slow when the last dim is E ~ 8
    (README, Speed). The max is detached: a shift does not change softmax, so its gradient is 0."""
    e = (logits - logits.detach().amax(-1, keepdim=True)).exp()   # (N, E), largest term exp(0) = 1
    return e / e.sum(-1, keepdim=True)


def top_k(probs: torch.Tensor, k: int):
    """probs.topk(k, dim=-1) -> values (N, K), indices (N, K); among ties the lower index is kept.
    On CPU, k <= 2 runs as rounds of max, which cost less than ATen's CPU topk at small E."""
    if probs.device.type != "cpu" or k > 2:
        return probs.topk(k, dim=-1)
    top, idx = probs.max(-1, keepdim=True)                         # (N, 1), the largest
    if k == 2:
        top2, idx2 = probs.scatter(-1, idx, -math.inf).max(-1, keepdim=True)   # (N, 1), the next
        top, idx = torch.cat([top, top2], -1), torch.cat([idx, idx2], -1)      # (N, 2)
    return top, idx


class TopKGate(torch.autograd.Function):
    """common.gate for top-k routing (K < E): the same probs, gates and idx, with a backward of
    9 ops on (N, E) where autograd through gate() runs ~20 (on CPU each op on a tensor this small
    has a fixed cost that dominates).

    With S the kept set (fixed under a small change of the logits l), for one token:
      renormalised   g_i = p_i / sum_{j in S} p_j = softmax over S   -> dl = g*(u - <g, u>)
      not            g_i = p_i on S, 0 elsewhere                     -> dl = g*u - p <g, u>
      probs          p = softmax(l)                                  -> dl = p*(v - <p, v>)
    where u = dL/dg, v = dL/dp (from the balancing loss) and <a, b> sums over the E experts."""

    @staticmethod
    def forward(ctx, logits, k: int, renormalize: bool):
        probs = softmax(logits)                                    # (N, E)
        top, idx = top_k(probs, k)                                 # (N, K), (N, K)
        if renormalize:
            top = top / top.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, idx, top)      # (N, E)
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


def gate(logits: torch.Tensor, k: int, renormalize: bool = True):
    """common.gate(logits, k, renormalize), fast: TopKGate for top-k, the written-out softmax for
    soft routing (k == E: gates == probs, idx None)."""
    if k < logits.shape[-1]:
        return TopKGate.apply(logits, k, renormalize)
    probs = softmax(logits)                                        # (N, E)
    return probs, probs, None


def fold_router(x: torch.Tensor, A: torch.Tensor, weight: torch.Tensor):
    """x A^T and the router logits W_g x from one matmul of x with [A; W_g]: one pass over x
    forward and one dL/dx matmul backward instead of two each. x (N, I); A (E, r, I) or (r, I);
    weight (E, I). Returns xa (N, E*r) or (N, r), logits (N, E). Only for x in float32 or
    float64 (the logits must not be formed in bf16)."""
    W = A.reshape(-1, A.shape[-1])                                 # (E*r, I) or (r, I)
    z = x @ torch.cat([W, weight.to(x.dtype)]).T                   # (N, E*r + E)
    return z.split([W.shape[0], weight.shape[0]], dim=1)           # (N, E*r), (N, E)


# ----------------------------------------------------------------------------- grouped dispatch

# E / K from which dispatch_grouped beats dispatch_fused, per device type (README, Speed, has the
# measurement). Grouped does K/E of the matmul work but moves (N K, I) and (N K, O) rows about.
# Devices not listed (CUDA: not measured yet) always use dispatch_fused.
GROUPED_FROM_E_OVER_K = {"cpu": 16}


def grouped_pays(device_type: str, E: int, K: int) -> bool:
    """Whether top-K-of-E routing on this device type is past the measured crossover."""
    crossover = GROUPED_FROM_E_OVER_K.get(device_type)
    return K < E and crossover is not None and E >= crossover * K


def _cpu_grouped_mm() -> bool:
    """Whether this torch build runs torch._grouped_mm on CPU (torch 2.13's does; older builds
    have it for CUDA only, or not at all): one tiny call, once, at import."""
    try:
        a, W = torch.ones(2, 4), torch.ones(2, 4, 4)
        return torch._grouped_mm(a, W, offs=torch.tensor([1, 2], dtype=torch.int32)).shape == (2, 4)
    except (AttributeError, RuntimeError):                          # no op, or no CPU kernel
        return False


CPU_GROUPED_MM = _cpu_grouped_mm()


def has_grouped_mm(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether torch._grouped_mm has a kernel for x: bf16 on sm90+ GPUs; float32 and bf16 on CPU
    where the build has one (CPU_GROUPED_MM), bf16 only under torch.compile (its meta kernel
    refuses float32). Its rows must be 16-byte aligned, so r, I and O must be multiples of
    16 / itemsize (4 for float32, 8 for bf16). float64 never qualifies."""
    if x.is_cuda:
        ok = (hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
              and torch.cuda.get_device_capability(x.device) >= (9, 0))
    else:
        dtypes = (torch.bfloat16,) if torch.compiler.is_compiling() else (torch.float32, torch.bfloat16)
        ok = CPU_GROUPED_MM and x.device.type == "cpu" and x.dtype in dtypes
    return ok and all(n % (16 // x.element_size()) == 0 for n in (*A.shape[-2:], B.shape[1]))   # r, I, O


def per_expert_mm(a: torch.Tensor, W: torch.Tensor, ends: torch.Tensor, pad: int | None):
    """Each expert's block of rows of a times that expert's W[e]: (rows, k) x (E, k, n) -> (rows, n).
    pad None: block e ends at row ends[e], torch._grouped_mm. pad C: every block is C rows, one bmm."""
    if pad is None:
        return torch._grouped_mm(a, W, offs=ends.to(torch.int32))  # (rows, n)
    return torch.bmm(a.view(W.shape[0], pad, -1), W).flatten(0, 1)   # (E, C, k) @ (E, k, n) -> (E*C, n)


def dispatch_grouped(x, A, B, gates, scaling, act=None, idx=None, xa=None):
    """common.dispatch_fused's maths, but each expert runs only on the tokens routed to it.

    idx (N, K): the experts kept per token (required). The N*K (token, slot) pairs are sorted by
    expert, so each factor is one grouped GEMM and the matmul work is N K r (I + O) instead of
    N E r (I + O): the path for large E / K. xa, x A^T already formed, is used with a shared A.
    The GEMM is torch._grouped_mm where this build has one (has_grouped_mm: CUDA bf16 on sm90+,
    CPU float32/bf16): no host sync, so torch.compile(fullgraph=True) captures the path whole.
    Elsewhere (float64, unaligned sizes, older builds) every expert's block is padded to the
    largest block and one bmm does all of them: no loop, but the block size is read back to the
    host, so under torch.compile that fallback breaks the graph. Padding rows read token 0 with gate 0, so they add nothing, forward or backward.
    Gates mix in float32 as in dispatch_fused. Each token sums its K rows with index_add, whose
    atomic adds on CUDA may vary the last bit for K > 2.
    """
    if idx is None:
        raise ValueError("dispatch_grouped: needs idx (N, K), the experts each token keeps")
    (N, K), (E, O) = idx.shape, B.shape[:2]
    pairs = torch.arange(N * K, device=x.device)                  # (N*K,) (token, slot), token-major
    expert = idx.reshape(-1)                                       # (N*K,) expert of each pair
    sorted_expert, order = expert.sort(stable=True)                # (N*K,), pairs grouped by expert
    place = torch.empty_like(order).scatter_(0, order, pairs)      # (N*K,) where each pair went
    ends = torch.searchsorted(sorted_expert, torch.arange(E, device=x.device), right=True)  # (E,)
    if has_grouped_mm(x, A, B):
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
        h = (x @ A.T if xa is None else xa).index_select(0, token)    # (rows, r)
    else:
        h = per_expert_mm(x.index_select(0, token), A.transpose(1, 2), ends, pad)   # (rows, r)
    if act is not None:
        h = act(h)
    h = (h.to(mix_dtype(x)) * g[:, None]).to(x.dtype)             # (rows, r)
    y = per_expert_mm(h, B.transpose(1, 2), ends, pad)             # (rows, O)
    y = y.new_zeros(N, O, dtype=mix_dtype(x)).index_add(0, token, y.to(mix_dtype(x)))  # (N, O)
    return y.to(x.dtype)                                           # each token sums its K rows
