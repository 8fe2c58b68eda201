"""Property tests (hypothesis, a test extra): the fused dispatch equals the naive loop, outputs and
every gradient, over random shapes, expert counts, top-k and dtypes (float64 tight, float32 looser).

Two levels: MoLoRALinear.forward against forward_naive (routing, top-k, renormalisation included),
and common.dispatch_fused against common.dispatch_naive directly, with A per expert (E, r, I) or
shared (r, I) as MoSLD and MALoRA use it, with and without an activation between A and B.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dispatch_fused, dispatch_naive
from layer_checks import out_and_grads as out_and_grads_layer
from molora import MoLoRAConfig, MoLoRALinear

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# derandomize: CI sees the same examples every run; database=None: no .hypothesis/ in the repo
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-5)}
dims = st.integers(1, 24)                      # N, I, O: odd and tiny sizes hit the tail cases
dtypes = st.sampled_from([torch.float64, torch.float32])


def assert_same(ref, out, dtype):
    assert len(ref) == len(out)
    for i, (r, o) in enumerate(zip(ref, out)):
        torch.testing.assert_close(o, r, **TOL[dtype], msg=lambda m: f"item {i} (0 = output): {m}")


def out_and_grads(fn, inputs, dy):
    """fn(*inputs) and the gradient of <fn(*inputs), dy> for each input."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return [y, *torch.autograd.grad(y, inputs, dy)]


@SETTINGS
@given(N=dims, I=dims, O=dims, E=st.integers(1, 6), r=st.integers(1, 5), dtype=dtypes,
       renormalize=st.booleans(), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_molora_fused_matches_naive(N, I, O, E, r, dtype, renormalize, seed, data):
    K = data.draw(st.one_of(st.none(), st.integers(1, E)), label="top_k")   # None: soft routing
    renormalize = renormalize and not K == 1 < E                          # the config forbids it
    torch.manual_seed(seed)
    cfg = MoLoRAConfig(num_experts=E, rank=r, alpha=float(r), top_k=K, renormalize=renormalize)
    layer = MoLoRALinear(nn.Linear(I, O), cfg).to(dtype)
    nn.init.normal_(layer.lora_A, std=I ** -0.5)
    nn.init.normal_(layer.lora_B, std=r ** -0.5)   # B = 0 would compare zeros
    nn.init.normal_(layer.router.weight)           # routing far from uniform: top-k matters
    x, dy = torch.randn(N, I, dtype=dtype), torch.randn(N, O, dtype=dtype)
    assert_same(out_and_grads_layer(layer, layer.forward_naive, x, dy),
                out_and_grads_layer(layer, layer.forward, x, dy), dtype)


@SETTINGS
@given(N=dims, I=dims, O=dims, E=st.integers(1, 6), r=st.integers(1, 5), dtype=dtypes,
       shared=st.booleans(), act=st.sampled_from([None, "leaky_relu"]), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_dispatch_fused_matches_naive(N, I, O, E, r, dtype, shared, act, seed, data):
    K = data.draw(st.integers(1, E), label="kept experts per token")
    scaling = data.draw(st.floats(0.25, 4.0), label="scaling")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, I, generator=g, dtype=dtype)
    A = torch.randn(*(() if shared else (E,)), r, I, generator=g, dtype=dtype) * I ** -0.5   # (r, I) | (E, r, I)
    B = torch.randn(E, O, r, generator=g, dtype=dtype) * r ** -0.5                         # (E, O, r)
    probs = torch.rand(N, E, generator=g, dtype=dtype).softmax(-1)                          # (N, E)
    top, idx = probs.topk(K, dim=-1)                                                        # (N, K)
    gates = torch.zeros_like(probs).scatter(-1, idx, top)                                   # zero outside top-K
    dy = torch.randn(N, O, generator=g, dtype=dtype)
    f = None if act is None else (lambda h: F.leaky_relu(h, 0.1))
    ref = out_and_grads(lambda x, A, B, gates: dispatch_naive(x, A, B, gates, scaling, f), [x, A, B, gates], dy)
    out = out_and_grads(lambda x, A, B, gates: dispatch_fused(x, A, B, gates, scaling, f), [x, A, B, gates], dy)
    assert_same(ref, out, dtype)
