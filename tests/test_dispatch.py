"""Tests for the dispatch paths of common.py: dispatch_grouped and dispatch_auto against the
naive loop (outputs and every gradient, float64, odd shapes), dispatch_fused under
torch.compile(fullgraph=True), bf16 inputs mixed in float32, and a smoke run of bench.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import fast
from common import dispatch_auto, dispatch_fused, dispatch_naive
from fast import dispatch_grouped

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def routed(N, I, O, E, K, r, shared=False, dtype=torch.float64, device="cpu", seed=0):
    """Inputs of one routed dispatch. The kept gate values `top` (N, K) are the leaf, and gates
    (N, E) are built from them as common.route does, so the gate gradient is the one a layer sees."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, I, generator=g, dtype=dtype)                        # (N, I)
    A = torch.randn(*(() if shared else (E,)), r, I, generator=g, dtype=dtype) / I ** 0.5
    B = torch.randn(E, O, r, generator=g, dtype=dtype) / r ** 0.5          # not zero: a zero B tests nothing
    probs = torch.rand(N, E, generator=g, dtype=torch.float64).softmax(-1)
    top, idx = probs.topk(K, dim=-1)                                       # (N, K), (N, K)
    dy = torch.randn(N, O, generator=g, dtype=dtype)                       # (N, O)
    leaves = [t.to(device).requires_grad_() for t in (x, A, B, top.to(dtype))]
    return leaves, idx.to(device), dy.to(device)


def out_and_grads(fn, x, A, B, top, idx, dy):
    gates = torch.zeros(top.shape[0], B.shape[0], dtype=top.dtype, device=top.device)
    y = fn(x, A, B, gates.scatter(-1, idx, top), idx)                      # (N, O)
    return [y, *torch.autograd.grad(y, [x, A, B, top], dy)]


def naive(x, A, B, gates, idx, act=None):
    return dispatch_naive(x, A, B, gates, 0.7, act)


def grouped(x, A, B, gates, idx, act=None):
    return dispatch_grouped(x, A, B, gates, 0.7, act, idx)


def fused(x, A, B, gates, idx, act=None):
    return dispatch_fused(x, A, B, gates, 0.7, act)


# ----------------------------------------------------------------------------- fast paths == naive


@pytest.mark.parametrize("path", [grouped, fused])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("act", [None, F.leaky_relu])
def test_fast_paths_match_naive(path, K, shared, act):
    (x, A, B, top), idx, dy = routed(N=11, I=37, O=53, E=5, K=K, r=3, shared=shared)
    ref = out_and_grads(lambda *a: naive(*a, act=act), x, A, B, top, idx, dy)
    out = out_and_grads(lambda *a: path(*a, act=act), x, A, B, top, idx, dy)
    for name, o, rf in zip(["y", "x", "A", "B", "gates"], out, ref):
        torch.testing.assert_close(o, rf, msg=lambda m: f"{name}: {m}")


def test_grouped_one_token_and_an_expert_with_no_tokens():
    (x, A, B, top), idx, dy = routed(N=1, I=8, O=6, E=4, K=2, r=2)        # two experts get nothing
    for o, rf in zip(out_and_grads(grouped, x, A, B, top, idx, dy),
                     out_and_grads(naive, x, A, B, top, idx, dy)):
        torch.testing.assert_close(o, rf)


def test_grouped_all_tokens_on_one_expert():
    (x, A, B, top), _, dy = routed(N=9, I=7, O=5, E=6, K=1, r=2)
    idx = torch.full((9, 1), 4)                                            # one block of 9, five empty
    for o, rf in zip(out_and_grads(grouped, x, A, B, top, idx, dy),
                     out_and_grads(naive, x, A, B, top, idx, dy)):
        torch.testing.assert_close(o, rf)


# ----------------------------------------------------------------------------- grouped_mm on CPU

needs_cpu_grouped_mm = pytest.mark.skipif(not fast.CPU_GROUPED_MM,
                                          reason="this torch build has no CPU torch._grouped_mm")


def grouped_mm_case(dtype, K=2, N=13):
    """Sizes aligned for torch._grouped_mm (r, I, O multiples of 8) but odd blocks: N=13 tokens."""
    leaves, idx, dy = routed(N=N, I=40, O=56, E=5, K=K, r=8, dtype=dtype)
    return leaves, idx, dy


def assert_close_to_float64_loop(out, leaves, idx, dy, tol):
    """out: y and the gradients of x, A, B, top from the low-precision path; the reference is the
    float64 loop on the same (rounded) inputs."""
    ref = out_and_grads(naive, *(t.detach().double().requires_grad_() for t in leaves), idx, dy.double())
    for name, o, rf in zip(["y", "x", "A", "B", "gates"], out, ref):
        torch.testing.assert_close(o.double(), rf, rtol=tol, atol=tol * rf.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


@needs_cpu_grouped_mm
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_grouped_mm_branch_on_cpu_matches_naive(dtype, tol, K):
    """The torch._grouped_mm branch (offs layout, blocks back to back) runs on CPU for float32 and
    bf16: outputs and every gradient against the float64 loop."""
    leaves, idx, dy = grouped_mm_case(dtype, K=K)
    assert fast.has_grouped_mm(leaves[0], leaves[1], leaves[2])          # the branch under test
    assert_close_to_float64_loop(out_and_grads(grouped, *leaves, idx, dy), leaves, idx, dy, tol)


@needs_cpu_grouped_mm
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("blocks", ["empty experts", "one expert", "one token"])
def test_grouped_mm_odd_blocks_on_cpu(dtype, tol, blocks):
    """Empty blocks (offs repeats an end), every pair in one block, and a single token."""
    leaves, idx, dy = grouped_mm_case(dtype, K=2)
    if blocks == "empty experts":
        idx = torch.tensor([[0, 3], [3, 0]] * 6 + [[0, 3]])               # experts 1, 2, 4 get nothing
    elif blocks == "one expert":
        leaves, idx, dy = grouped_mm_case(dtype, K=1)
        idx = torch.full((13, 1), 4)
    else:
        leaves, idx, dy = grouped_mm_case(dtype, K=2, N=1)
    assert_close_to_float64_loop(out_and_grads(grouped, *leaves, idx, dy), leaves, idx, dy, tol)


@needs_cpu_grouped_mm
def test_grouped_mm_backward_takes_a_broadcast_gradient():
    """y.sum() hands the backward a gradient with stride 0, which torch._grouped_mm's CPU backward
    refuses; the path must never pass it one (index_add's backward gathers a dense one)."""
    (x, A, B, top), idx, _ = grouped_mm_case(torch.float32)
    gates = torch.zeros(13, 5).scatter(-1, idx, top)
    dispatch_grouped(x, A, B, gates, 0.7, idx=idx).sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (x, A, B, top))


@needs_cpu_grouped_mm
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_mm_path_compiles_on_cpu(dtype):
    """bf16: torch._grouped_mm needs no host sync (the padded fallback reads its block size back),
    so the grouped path traces as one graph, forward and backward. float32: the op's meta kernel
    is bf16-only, so under compile the path takes the padded fallback, with a graph break."""
    torch._dynamo.reset()
    fn = torch.compile(dispatch_grouped, fullgraph=dtype == torch.bfloat16, backend="aot_eager")
    leaves, idx, dy = grouped_mm_case(dtype)
    compiled = lambda x, A, B, g, i: fn(x, A, B, g, 0.7, idx=i)          # noqa: E731
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for o, rf in zip(out_and_grads(compiled, *leaves, idx, dy), out_and_grads(grouped, *leaves, idx, dy)):
        torch.testing.assert_close(o, rf, **tol)


def test_grouped_mm_needs_16_byte_rows():
    """float32 rows must be multiples of 4 elements, bf16 of 8: r = 6 qualifies in neither."""
    (x, A, B, _), _, _ = routed(N=5, I=40, O=56, E=5, K=2, r=6, dtype=torch.float32)
    assert not fast.has_grouped_mm(x, A, B)
    assert fast.has_grouped_mm(x, A[..., :4, :], B[..., :4]) == fast.CPU_GROUPED_MM   # r = 4
    assert not fast.has_grouped_mm(x.bfloat16(), A[..., :4, :].bfloat16(), B[..., :4].bfloat16())


def test_router_folds_only_for_a_dispatch_that_takes_xa(monkeypatch):
    """The fold forms x A^T only for a dispatch that uses it: fused yes, auto below the crossover
    yes and past it no, the loop and the grouped path never (xa None). The folded x A^T is x A^T."""
    (x, A, _, _), _, _ = routed(N=6, I=10, O=9, E=8, K=1, r=2)
    router = common.Router(10, 8, 2).double()
    for dispatch, folds in [(dispatch_fused, True), (dispatch_auto, True), (dispatch_naive, False),
                            (dispatch_grouped, False), (None, False)]:
        router(x, fold=A, dispatch=dispatch)
        assert (router.xa is not None) == folds, dispatch
    monkeypatch.setitem(fast.GROUPED_FROM_E_OVER_K, "cpu", 2)              # E / K = 4: past it
    router(x, fold=A, dispatch=dispatch_auto)
    assert router.xa is None
    router(x, fold=A, dispatch=dispatch_fused)
    torch.testing.assert_close(router.xa, x @ A.reshape(-1, 10).T)


def test_float64_and_unaligned_sizes_take_the_padded_fallback():
    """The padded bmm stays the path where torch._grouped_mm has no kernel; the float64 tests
    above run it."""
    (x, A, B, _), _, _ = routed(N=5, I=40, O=56, E=5, K=2, r=8)              # float64
    assert not fast.has_grouped_mm(x, A, B)
    (x, A, B, _), _, _ = routed(N=5, I=37, O=53, E=5, K=2, r=3, dtype=torch.float32)
    assert not fast.has_grouped_mm(x, A, B)


# ----------------------------------------------------------------------------- dispatch_auto


@pytest.mark.parametrize("E,K,expect", [(8, 1, "grouped"), (4, 2, "fused"), (5, 5, "fused")])
def test_auto_picks_by_the_crossover(monkeypatch, E, K, expect):
    monkeypatch.setitem(fast.GROUPED_FROM_E_OVER_K, "cpu", 8)               # pin it for the test
    calls = []
    monkeypatch.setattr(fast, "dispatch_grouped",
                        lambda *a, **k: calls.append("grouped") or dispatch_grouped(*a, **k))
    monkeypatch.setattr(common, "dispatch_fused",
                        lambda *a, **k: calls.append("fused") or dispatch_fused(*a, **k))
    (x, A, B, top), idx, dy = routed(N=6, I=10, O=9, E=E, K=K, r=2)
    out = out_and_grads(lambda x, A, B, g, i: dispatch_auto(x, A, B, g, 0.7, idx=i), x, A, B, top, idx, dy)
    assert calls == [expect]
    for o, rf in zip(out, out_and_grads(naive, x, A, B, top, idx, dy)):
        torch.testing.assert_close(o, rf)


def test_auto_without_idx_is_fused():
    (x, A, B, top), idx, _ = routed(N=6, I=10, O=9, E=64, K=1, r=2)
    gates = torch.zeros(6, 64, dtype=top.dtype).scatter(-1, idx, top)
    torch.testing.assert_close(dispatch_auto(x, A, B, gates, 0.7), dispatch_fused(x, A, B, gates, 0.7))


# ----------------------------------------------------------------------------- a Router as the gates


def with_router(dispatch):
    """A layer's two lines: gates from the Router (W_g x folded into the x A^T matmul where
    that pays), then the dispatch with the Router's idx and x A^T."""
    def layer(x, A, B, router, scaling):
        gates = router(x, fold=A, dispatch=dispatch)                       # (N, E)
        return dispatch(x, A, B, gates, scaling, idx=router.idx, xa=router.xa)
    return layer


def router_out_and_grads(dispatch, x, A, B, router, dy):
    """y, the balancing loss and the gradients of y + balancing loss for x, A, B and W_g."""
    y = dispatch(x, A, B, router, 0.7)                                     # (N, O)
    aux = [] if router.balance_loss is None else [router.balance_loss]
    grads = torch.autograd.grad([y, *aux], [x, A, B, router.weight], [dy, *map(torch.ones_like, aux)])
    return [y, *aux, *grads]


@pytest.mark.parametrize("path,K", [(p, K) for p in ("fused", "grouped", "auto") for K in (1, 3, 5)
                                    if (p, K) != ("grouped", 5)])        # soft: nothing to group
@pytest.mark.parametrize("shared", [False, True])
def test_router_in_the_dispatch_matches_naive(monkeypatch, path, K, shared):
    """With the Router's fold, the fused path gets W_g x formed inside the x A^T matmul; grouped
    takes idx from the Router; auto picks one. Outputs, balancing loss and every gradient, W_g's included."""
    monkeypatch.setitem(fast.GROUPED_FROM_E_OVER_K, "cpu", 2)          # auto: K=1 grouped, else fused
    (x, A, B, _), _, dy = routed(N=11, I=37, O=53, E=5, K=1, r=3, shared=shared)
    torch.manual_seed(0)
    router = common.Router(37, 5, K).double()
    paths = {"fused": dispatch_fused, "auto": dispatch_auto,
             "grouped": dispatch_grouped}
    ref = router_out_and_grads(with_router(dispatch_naive), x, A, B, router, dy)
    out = router_out_and_grads(with_router(paths[path]), x, A, B, router, dy)
    assert len(out) == len(ref) == (5 if K == 5 else 6)                  # soft: no balancing loss
    for o, rf in zip(out, ref):
        torch.testing.assert_close(o, rf)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_gating_matches_autograd_through_gate(K, renormalize):
    """End to end: the fused path fed by a Router (gating by fast.TopKGate's hand-written
    backward) against the naive loop handed gates from gate() + load_balance_loss under plain
    autograd. Output, balancing loss and the gradients of x, A, B and W_g."""
    (x, A, B, _), _, dy = routed(N=11, I=37, O=53, E=5, K=1, r=3)
    torch.manual_seed(0)
    router = common.Router(37, 5, K, renormalize).double()
    out = router_out_and_grads(with_router(dispatch_fused), x, A, B, router, dy)

    def reference(x, A, B, router, scaling):
        probs, gates, idx = common.gate(common.router_logits(x, router.weight), K, renormalize)
        router.balance_loss = common.load_balance_loss(probs, idx)     # what Router keeps
        return dispatch_naive(x, A, B, gates, scaling)
    ref = router_out_and_grads(reference, x, A, B, router, dy)
    for o, rf in zip(out, ref):
        torch.testing.assert_close(o, rf)


@pytest.mark.parametrize("method", ["malora", "molora-dropout"])
def test_layers_that_route_before_the_dispatch_reach_the_grouped_path(monkeypatch, method):
    """MALoRA (the router reads x, the experts S_A x) and MoLoRA with dropout (the experts read
    dropout(x)) route before the dispatch and hand it the Router's idx, so past the crossover their
    forward runs grouped, and still matches the loop, outputs and every gradient."""
    import torch.nn as nn
    from layer_checks import assert_paths_match
    from malora import MALoRAConfig, MALoRALinear
    from molora import MoLoRAConfig, MoLoRALinear
    monkeypatch.setitem(fast.GROUPED_FROM_E_OVER_K, "cpu", 4)           # E / K = 8 is past it
    calls = []
    monkeypatch.setattr(fast, "dispatch_grouped",
                        lambda *a, **k: calls.append("grouped") or dispatch_grouped(*a, **k))
    torch.manual_seed(0)
    top1 = dict(num_experts=8, top_k=1, renormalize=False, rank=4)
    layer = (MALoRALinear(nn.Linear(37, 53), MALoRAConfig(shared_rank=9, **top1)) if method == "malora"
             else MoLoRALinear(nn.Linear(37, 53), MoLoRAConfig(dropout=0.1, **top1)))
    layer = layer.double()
    nn.init.normal_(layer.lora_B)
    x, dy = torch.randn(11, 37, dtype=torch.float64), torch.randn(11, 53, dtype=torch.float64)
    assert_paths_match(layer, x, dy, seed=3)
    assert calls == ["grouped"]


def test_router_logits_stay_float32_for_bf16_inputs():
    """bf16 x: the router's W_g x is not folded into the bf16 matmul, so the gates are the float32
    ones of route(); the result is bit-equal to handing those gates over."""
    (x, A, B, _), _, _ = routed(N=64, I=32, O=48, E=6, K=2, r=8, dtype=torch.float32)
    x, A, B = (t.detach().bfloat16() for t in (x, A, B))
    router = common.Router(32, 6, 2).bfloat16()
    gates = common.route(x, router, 2)[2]                                  # (N, E) float32
    assert gates.dtype == torch.float32
    assert torch.equal(with_router(dispatch_fused)(x, A, B, router, 0.7), dispatch_fused(x, A, B, gates, 0.7))


# ----------------------------------------------------------------------------- compile


@pytest.mark.parametrize("shared", [False, True])
def test_fused_compiles_whole_forward_and_backward(shared):
    """fullgraph=True raises on any graph break; aot_eager traces the backward as well, fast."""
    torch._dynamo.reset()
    fn = torch.compile(dispatch_fused, fullgraph=True, backend="aot_eager")
    (x, A, B, top), idx, dy = routed(N=7, I=12, O=10, E=4, K=2, r=3, shared=shared, dtype=torch.float32)
    wrap = lambda f: lambda x, A, B, g, i: f(x, A, B, g, 0.7)             # noqa: E731
    for o, rf in zip(out_and_grads(wrap(fn), x, A, B, top, idx, dy),
                     out_and_grads(wrap(dispatch_fused), x, A, B, top, idx, dy)):
        torch.testing.assert_close(o, rf)


@pytest.mark.parametrize("K", [2, 4])
def test_fused_with_a_router_compiles_whole(K):
    """The router folded into the matmul, top-k, balancing loss: still one graph, same numbers."""
    torch._dynamo.reset()
    fn = torch.compile(with_router(dispatch_fused), fullgraph=True, backend="aot_eager")
    (x, A, B, _), _, dy = routed(N=7, I=12, O=10, E=4, K=1, r=3, dtype=torch.float32)
    torch.manual_seed(0)
    router = common.Router(12, 4, K)
    for o, rf in zip(router_out_and_grads(fn, x, A, B, router, dy),
                     router_out_and_grads(with_router(dispatch_fused), x, A, B, router, dy)):
        torch.testing.assert_close(o, rf)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_compiles_with_inductor_on_cuda(dtype):
    torch._dynamo.reset()
    fn = torch.compile(dispatch_fused, fullgraph=True)                     # inductor, Triton kernels
    (x, A, B, top), idx, dy = routed(N=256, I=64, O=96, E=8, K=2, r=8, dtype=dtype, device="cuda")
    wrap = lambda f: lambda x, A, B, g, i: f(x, A, B, g, 0.7)             # noqa: E731
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for o, rf in zip(out_and_grads(wrap(fn), x, A, B, top, idx, dy),
                     out_and_grads(wrap(dispatch_fused), x, A, B, top, idx, dy)):
        torch.testing.assert_close(o, rf, **tol)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_with_a_router_compiles_with_inductor_on_cuda(dtype):
    """The top-k Router's hand-written backward (fast.TopKGate) traced by inductor: one graph,
    the numbers of eager, balancing loss and W_g's gradient included."""
    torch._dynamo.reset()
    fn = torch.compile(with_router(dispatch_fused), fullgraph=True)
    (x, A, B, _), _, dy = routed(N=256, I=64, O=96, E=8, K=1, r=8, dtype=dtype, device="cuda")
    torch.manual_seed(0)
    router = common.Router(64, 8, 2).cuda()
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for o, rf in zip(router_out_and_grads(fn, x, A, B, router, dy),
                     router_out_and_grads(with_router(dispatch_fused), x, A, B, router, dy)):
        torch.testing.assert_close(o, rf.to(o.dtype), **tol)


@needs_cuda
def test_grouped_on_cuda_bf16_matches_naive():
    """bf16 with I, O, r multiples of 8: torch._grouped_mm on sm90+, the padded bmm elsewhere."""
    (x, A, B, top), idx, dy = routed(N=300, I=64, O=96, E=8, K=2, r=8, dtype=torch.bfloat16, device="cuda")
    ref = out_and_grads(naive, *(t.detach().double().requires_grad_() for t in (x, A, B, top)),
                        idx, dy.double())
    for o, rf in zip(out_and_grads(grouped, x, A, B, top, idx, dy), ref):
        torch.testing.assert_close(o.double(), rf, rtol=3e-2, atol=3e-2 * rf.abs().max().item())


# ----------------------------------------------------------------------------- bf16 mixing


def bf16(t):
    return t.to(torch.bfloat16).double()


def test_fused_bf16_mixes_gates_in_float32():
    """With bf16 x, A, B and float32 gates, dispatch_fused rounds to bf16 exactly three times:
    h = x A^T (the matmul's output), the gated h * g (formed in float32, rounded once) and y.
    The emulation below does those three roundings on float64 maths. Stated tolerance: every
    element within one bf16 step (2^-7 relative) of it and at most 1% not bit-equal (float32
    accumulation can send a rounding the other way). Mixing in bf16 (g rounded to bf16 first)
    differs in about 45% of the elements here, by up to several times |y|."""
    (x, A, B, top), idx, _ = routed(N=64, I=32, O=48, E=6, K=3, r=4, dtype=torch.float32)
    x, A, B = (t.detach().bfloat16() for t in (x, A, B))
    gates = torch.zeros(64, 6).scatter(-1, idx, top.detach() / 3)          # (N, E) float32
    y = dispatch_fused(x, A, B, gates, 0.7)
    assert y.dtype == torch.bfloat16
    h = bf16(torch.einsum("ni,eri->ner", x.double(), A.double()))         # (N, E, r)
    hg = bf16(h * (0.7 * gates.double())[..., None])                      # (N, E, r), one rounding
    ref = bf16(torch.einsum("ner,eor->no", hg, B.double()))                # (N, O)
    rel = (y.double() - ref).abs() / ref.abs().clamp_min(1e-30)
    assert rel.max().item() <= 2 ** -7, rel.max().item()
    assert (y.double() != ref).float().mean().item() <= 0.01


@pytest.mark.parametrize("path", [dispatch_fused, "grouped"])
def test_bf16_inputs_close_to_float64(path):
    """Against float64 maths on the same (bf16-rounded) inputs: within 2^-6 of the largest |y|."""
    (x, A, B, top), idx, _ = routed(N=64, I=32, O=48, E=6, K=2, r=8, dtype=torch.float32)
    x, A, B = (t.detach().bfloat16() for t in (x, A, B))
    gates = torch.zeros(64, 6).scatter(-1, idx, top.detach())
    y = (dispatch_fused(x, A, B, gates, 0.7) if path is dispatch_fused
         else dispatch_grouped(x, A, B, gates, 0.7, idx=idx))
    ref = dispatch_naive(x.double(), A.double(), B.double(), gates.double(), 0.7)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2 ** -6 * ref.abs().max().item())


# ----------------------------------------------------------------------------- bench.py


def test_bench_smoke_json():
    """bench.py runs every row on tiny sizes and prints one JSON document; no timing is checked."""
    cmd = [sys.executable, "bench.py", "--tokens", "64", "--dim", "16", "--experts", "4",
           "--rank", "2", "--repeats", "1", "--warmup", "0", "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    rows = {(row["method"], row["variant"]) for row in doc["layer"][0]["rows"]}
    assert {("base", "frozen base"), ("base", "single LoRA r=8"), ("base", "router"),
            ("molora", "fused"), ("molora", "naive dense"), ("molora", "naive sparse"),
            ("molora", "grouped")} <= rows
    gflop = {(row["method"], row["variant"]): row["adapter_gflop"] for row in doc["layer"][0]["rows"]}
    assert 0 < gflop[("molora", "grouped")] < gflop[("molora", "fused")]   # K=2 of E=4 experts
    assert "fused/single_lora" in doc["layer"][0]["ratios"]["molora"]
    saved = {(row["method"], row["variant"]): row["adapter_saved_mib"] * 2 ** 20 for row in doc["layer"][0]["rows"]}
    assert saved[("base", "single LoRA r=8")] == 64 * 8 * 4        # x A^T (N, E r) in float32, nothing else
    assert 0 < saved[("molora", "fused")] < saved[("molora", "naive dense")]   # no per-expert copies
