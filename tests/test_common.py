"""common.py: routing, balancing loss, dispatch, inject, adapter save/load, and the LoRA/MoLoRA
layers built on them. Fused paths are checked against the naive loop on outputs and gradients."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import fast
from common import (aux_loss, count_trainable, dispatch_fused, dispatch_naive, inject, load_adapter,
                    load_balance_loss, route, save_adapter)
from gpt import GPT, GPTConfig
from layer_checks import out_and_grads
from lora import LoRAConfig, LoRALinear, lora_num_params
from molora import MoLoRAConfig, MoLoRALinear, molora_num_params

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_paths_match(layer, x, dy, **tol):
    ref = out_and_grads(layer, layer.forward_naive, x, dy)
    out = out_and_grads(layer, layer.forward, x, dy)
    assert len(ref) == len(out) > 2
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, **tol)


# ----------------------------------------------------------------------------- routing


def test_topk_keeps_exactly_k_and_renormalises():
    torch.manual_seed(0)
    router = nn.Linear(16, 6, bias=False)
    x = torch.randn(50, 16)
    for K in range(1, 7):
        _, probs, gates, idx = route(x, router, K, renormalize=True)
        assert ((gates > 0).sum(-1) == K).all()                          # exactly K kept
        torch.testing.assert_close(gates.sum(-1), torch.ones(50))        # renormalised
        kept = probs.gather(-1, idx) if idx is not None else probs
        assert (kept.min(-1).values[:, None] >= probs.masked_fill(gates > 0, 0)).all()  # the top K


def test_topk_without_renormalisation_keeps_softmax_values():
    torch.manual_seed(0)
    router = nn.Linear(16, 5, bias=False)
    _, probs, gates, idx = route(torch.randn(9, 16), router, 2, renormalize=False)
    torch.testing.assert_close(gates.gather(-1, idx), probs.gather(-1, idx))
    assert (gates.sum(-1) < 1).all()                                     # the official MoLoRA code


@pytest.mark.parametrize("E,K", [(5, 1), (5, 2), (5, 3), (8, 2), (8, 7)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_fast_gate_matches_reference_values_and_gradients(E, K, renormalize):
    """fast.TopKGate (hand-written backward, CPU top-k by rounds of max) against gate() under autograd:
    the same probs, gates and idx, and the same dL/dlogits for a loss on gates and probs both
    (the balancing loss reaches the logits through probs), float64."""
    torch.manual_seed(E * 10 + K)
    logits = torch.randn(37, E, dtype=torch.float64) * 3
    wg, wp = torch.randn(37, E, dtype=torch.float64), torch.randn(37, E, dtype=torch.float64)
    results = []
    for fn in (common.gate, fast.TopKGate.apply):
        lg = logits.clone().requires_grad_()
        probs, gates, idx = fn(lg, K, renormalize)
        ((gates * wg).sum() + (probs * wp).sum()).backward()
        results.append((probs, gates, idx, lg.grad))
    for ref, out in zip(*results):
        torch.testing.assert_close(out, ref)
    assert torch.autograd.gradcheck(lambda lg: fast.TopKGate.apply(lg, K, renormalize)[:2],
                                    logits[:6].clone().requires_grad_())


def test_router_keeps_exactly_k_even_with_ties():
    """Top-k keeps K distinct experts when probabilities tie, the same ones in the Router and in
    gate(): all logits equal -> the K lowest indices (CPU, K <= 2), each with weight 1/K."""
    router = common.Router(4, 6, top_k=2)
    nn.init.zeros_(router.weight)                                          # every logit 0: all tie
    gates = router(torch.randn(5, 4))
    assert ((gates > 0).sum(-1) == 2).all()
    assert (router.idx == torch.tensor([0, 1])).all()
    torch.testing.assert_close(gates[:, :2], torch.full((5, 2), 0.5))
    _, ref_gates, ref_idx = common.gate(torch.zeros(5, 6), 2)
    assert torch.equal(ref_idx, router.idx) and torch.equal(ref_gates, gates)


def test_top_1_configs_refuse_a_renormalised_gate():
    """top_k=1 with renormalisation would make the one kept gate always 1: the router would get no
    gradient from the task. The configs say so, naming the field; MoSLD, which always
    renormalises, needs top_k >= 2 unless every layer has one expert."""
    from malora import MALoRAConfig
    from mosld import MoSLDConfig
    for cls in (MoLoRAConfig, MALoRAConfig):
        with pytest.raises(ValueError, match=f"{cls.__name__}.renormalize=True: must be False when top_k is 1"):
            cls(top_k=1)
        assert cls(top_k=1, renormalize=False).top_k == 1
    with pytest.raises(ValueError, match="MoSLDConfig.top_k=1: must be in 2..max"):
        MoSLDConfig(top_k=1)
    assert MoSLDConfig(num_experts=1, top_k=1).top_k == 1
    layer = MoLoRALinear(nn.Linear(8, 8), MoLoRAConfig(num_experts=4, rank=2, top_k=1, renormalize=False))
    nn.init.normal_(layer.lora_B)
    layer(torch.randn(5, 8)).square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0                    # Switch's gate carries it


def test_balance_loss_hand_example():
    # 2 tokens, E = 2, top-1. Token 0 -> expert 0, token 1 -> expert 0.
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    idx = torch.tensor([[0], [0]])
    # f = (1, 0), P = (0.625, 0.375): E * sum f*P = 2 * 0.625
    assert load_balance_loss(probs, idx).item() == pytest.approx(1.25)
    uniform = torch.full((4, 4), 0.25)
    assert load_balance_loss(uniform, torch.tensor([[0], [1], [2], [3]])).item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("act", [None, F.leaky_relu])
def test_dispatch_fused_matches_naive(shared, act):
    torch.manual_seed(0)
    N, I, O, E, r = 11, 37, 53, 5, 3
    x = torch.randn(N, I, dtype=torch.float64, requires_grad=True)
    A = torch.randn(*(() if shared else (E,)), r, I, dtype=torch.float64, requires_grad=True)
    B = torch.randn(E, O, r, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(N, E, dtype=torch.float64).requires_grad_()
    dy = torch.randn(N, O, dtype=torch.float64)
    results = []
    for fn in (dispatch_naive, dispatch_fused):
        y = fn(x, A, B, gates, 0.5, act)
        results.append([y, *torch.autograd.grad(y, [x, A, B, gates], dy)])
    for ref, out in zip(*results):
        torch.testing.assert_close(out, ref)


def test_dispatch_bf16_inputs_mix_in_float32():
    torch.manual_seed(0)
    x, A, B = torch.randn(64, 32), torch.randn(4, 8, 32) / 6, torch.randn(4, 16, 8) / 3
    gates = torch.rand(64, 4)
    ref = dispatch_naive(x.double(), A.double(), B.double(), gates.double(), 2.0)
    y = dispatch_fused(x.bfloat16(), A.bfloat16(), B.bfloat16(), gates, 2.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, atol=0.1, rtol=0.03)    # bf16 inputs, 3 roundings


def test_dispatch_fused_compiles_without_graph_break():
    torch._dynamo.reset()
    fn = torch.compile(dispatch_fused, fullgraph=True, backend="eager")   # raises on a graph break
    x, A, B, gates = torch.randn(6, 8), torch.randn(3, 2, 8), torch.randn(3, 5, 2), torch.rand(6, 3)
    torch.testing.assert_close(fn(x, A, B, gates, 1.5), dispatch_fused(x, A, B, gates, 1.5))


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, None])
def test_molora_fused_matches_naive(K):
    torch.manual_seed(0)
    I, O, E, r = 37, 53, 5, 4
    cfg = MoLoRAConfig(num_experts=E, rank=r, top_k=K, renormalize=K != 1)   # top-1: Switch's gate
    layer = MoLoRALinear(nn.Linear(I, O), cfg).double()
    nn.init.normal_(layer.lora_B)                         # B = 0 would make this test trivial
    x, dy = torch.randn(2, 7, I).double(), torch.randn(2, 7, O).double()
    assert_paths_match(layer, x, dy)


def test_molora_router_gets_gradient():
    torch.manual_seed(0)
    layer = MoLoRALinear(nn.Linear(8, 8), MoLoRAConfig(num_experts=3, rank=2, top_k=2))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8)
    (layer(x).square().sum() + aux_loss(layer)).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    _, probs, _, idx = route(x, layer.router, 2)          # the balancing loss of this very routing
    torch.testing.assert_close(layer.aux, load_balance_loss(probs, idx))


@pytest.mark.parametrize("make", [
    lambda base: LoRALinear(base, LoRAConfig(rank=3)),
    lambda base: MoLoRALinear(base, MoLoRAConfig(num_experts=4, rank=3)),
    lambda base: MoLoRALinear(base, MoLoRAConfig(num_experts=4, rank=3, top_k=2)),
])
def test_update_is_zero_after_reset(make):
    torch.manual_seed(0)
    base = nn.Linear(37, 53)
    layer = make(base)
    nn.init.normal_(layer.lora_B)
    layer.reset_parameters()
    x = torch.randn(9, 37)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_delta_weight_matches_forward():
    torch.manual_seed(0)
    base = nn.Linear(37, 53)
    lora = LoRALinear(base, LoRAConfig(rank=4)).double()
    nn.init.normal_(lora.lora_B)
    x = torch.randn(6, 37).double()
    torch.testing.assert_close(lora(x), lora.base(x) + x @ lora.delta_weight().T)
    molora = MoLoRALinear(nn.Linear(37, 53), MoLoRAConfig(num_experts=3, rank=2)).double()
    nn.init.normal_(molora.lora_B)
    gates = torch.softmax(x @ molora.router.weight.T, -1)          # soft routing, the MoLoRA code
    expected = molora.base(x) + sum(gates[:, e:e + 1] * (x @ molora.delta_weight(e).T) for e in range(3))
    torch.testing.assert_close(molora(x), expected)


def test_param_formulas_match_real_counts():
    base = nn.Linear(37, 53)
    cfg = MoLoRAConfig(num_experts=5, rank=3, top_k=2)
    assert count_trainable(MoLoRALinear(base, cfg)) == molora_num_params(37, 53, cfg)
    cfg = LoRAConfig(rank=6)
    assert count_trainable(LoRALinear(nn.Linear(37, 53), cfg)) == lora_num_params(37, 53, cfg)


@pytest.mark.parametrize("bad", [dict(rank=0), dict(num_experts=0), dict(top_k=0), dict(top_k=9),
                                 dict(dropout=1.0), dict(dropout=-0.1), dict(aux_loss_coef=-1)])
def test_molora_config_errors_name_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=f"MoLoRAConfig.{field}="):
        MoLoRAConfig(**bad)


@needs_cuda
def test_molora_cuda_compiled_matches_naive():
    torch.manual_seed(0)
    layer = MoLoRALinear(nn.Linear(64, 96), MoLoRAConfig(num_experts=5, rank=4, top_k=2)).cuda()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(128, 64, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer.forward_naive(x), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- inject, save, load


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16))


def test_inject_swaps_targets_and_freezes_the_rest():
    model = tiny_gpt()
    layers = inject(model, lambda lin, name: MoLoRALinear(lin, MoLoRAConfig(num_experts=3, rank=2)),
                    ("q", "v"))
    assert len(layers) == 4 and all(isinstance(m, MoLoRALinear) for m in layers)
    assert isinstance(model.blocks[0].attn.q, MoLoRALinear)
    assert isinstance(model.blocks[0].attn.k, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".base." not in n and ("lora_" in n or "router" in n) for n in trainable)
    assert count_trainable(model) == 4 * molora_num_params(16, 16, MoLoRAConfig(num_experts=3, rank=2))


def test_inject_targets_match_a_dotted_tail_of_the_name_as_peft():
    """"q" and "attn.q" name both blocks' q; the full name "blocks.1.attn.q" only that one."""
    def names(targets):
        model = tiny_gpt()
        inject(model, lambda lin, name: LoRALinear(lin, LoRAConfig(rank=2)), targets)
        return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert names(("q",)) == names(("attn.q",)) == ["blocks.0.attn.q", "blocks.1.attn.q"]
    assert names(("blocks.1.attn.q", "up")) == ["blocks.0.mlp.up", "blocks.1.attn.q", "blocks.1.mlp.up"]
    assert names(("ttn.q", "k")) == ["blocks.0.attn.k", "blocks.1.attn.k"]      # whole parts only


def test_inject_without_match_raises():
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D named"):
        inject(tiny_gpt(), lambda lin, name: lin, ("nope",))


def test_saved_adapter_reloads_to_identical_outputs(tmp_path):
    cfg = MoLoRAConfig(num_experts=3, rank=2, top_k=2)
    model = tiny_gpt()
    inject(model, lambda lin, name: MoLoRALinear(lin, cfg), cfg.targets)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p)
    idx = torch.randint(0, 20, (2, 8))
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(model, path, {"method": "molora"})
    fresh = tiny_gpt()
    inject(fresh, lambda lin, name: MoLoRALinear(lin, cfg), cfg.targets)
    assert load_adapter(fresh, path) == {"method": "molora"}
    torch.testing.assert_close(fresh(idx), model(idx), rtol=0, atol=0)


def test_adapter_errors(tmp_path):
    model = tiny_gpt()
    inject(model, lambda lin, name: LoRALinear(lin, LoRAConfig(rank=2)), ("q",))
    with pytest.raises(FileNotFoundError):
        load_adapter(model, str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match="not a readable adapter"):
        load_adapter(model, str(bad))
    other = tiny_gpt()
    inject(other, lambda lin, name: LoRALinear(lin, LoRAConfig(rank=3)), ("q",))
    path = str(tmp_path / "r3.safetensors")
    save_adapter(other, path, {})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter(model, path)


def test_written_out_softmax_equals_torch_softmax():
    """common's softmax (written out for speed on CPU) against torch's: values and gradients, with
    logits large enough to overflow exp() unless the max is subtracted."""
    logits = (torch.randn(13, 7, dtype=torch.float64) * 300).requires_grad_()
    dy = torch.randn(13, 7, dtype=torch.float64)
    ours, ref = fast.softmax(logits), torch.softmax(logits, -1)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(*(torch.autograd.grad(p, logits, dy)[0] for p in (ours, ref)))


def test_deepcopy_after_a_training_forward():
    """A model copies after a training forward and backward (a snapshot, an EMA): layers and routers
    keep their last call's tensors, with their graphs, and a copy takes the weights only."""
    import copy
    from moa import MoAConfig, MoALinear
    from modula import MoDULAConfig, MoDULALinear
    makers = [lambda lin, name: MoLoRALinear(lin, MoLoRAConfig(num_experts=4, rank=2, top_k=2)),
              lambda lin, name: MoALinear(lin, MoAConfig(num_domains=3, rank=2, prompt_len=2)),
              lambda lin, name: MoDULALinear(lin, MoDULAConfig(num_domains=3, prompt_len=2))]
    for make in makers:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=32))
        layers = inject(model, make, ("q", "v"))
        for layer in layers:                              # every update away from 0
            for p in layer.parameters():
                if p.requires_grad:
                    nn.init.normal_(p, std=0.1)
        x = torch.randint(0, 32, (2, 8))
        model.train()
        (model(x).float().pow(2).mean() + aux_loss(model)).backward()
        twin = copy.deepcopy(model)
        model.eval(), twin.eval()
        torch.testing.assert_close(twin(x), model(x))
