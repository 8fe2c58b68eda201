"""Every loss term, pinned: the Switch balancing loss on hand-made routings (K = 1, 2, 3), each
layer's balancing loss and common.aux_loss against a reference written here, MoA's router
cross-entropy for both routing granularities against a plain F.cross_entropy on the right labels,
and train.py: the balancing loss and the router CE are added to the LM loss, once, with their
coefficients (train.py run as a process, so these tests read only its command line and metrics)."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import tasks
from common import aux_loss, load_balance_loss
from malora import MALoRAConfig, MALoRALinear
from moa import MoAConfig, MoALinear, moa_stages
from molora import MoLoRAConfig, MoLoRALinear
from mosld import MoSLDConfig, MoSLDLinear
from trainproc import run_train

# ----------------------------------------------------------------------------- balancing loss


@pytest.mark.parametrize("K", [1, 2, 3])
def test_balance_loss_is_1_when_uniform_and_E_over_K_when_collapsed(K):
    """E sum_e f_e P_e: uniform probabilities and picks spread evenly give 1; every token putting
    all its probability on the same K experts, and picking them, gives E / K."""
    E = 6
    uniform = torch.full((E, E), 1 / E)                                   # (N, E), N = E tokens
    spread = (torch.arange(E)[:, None] + torch.arange(K)) % E             # (N, K): each expert K times
    assert load_balance_loss(uniform, spread).item() == pytest.approx(1.0)
    collapsed = torch.zeros(E, E)
    collapsed[:, :K] = 1 / K
    same = torch.arange(K).expand(E, K)                                   # (N, K): experts 0..K-1
    assert load_balance_loss(collapsed, same).item() == pytest.approx(E / K)


def test_balance_loss_hand_example_with_two_slots():
    """E = 3, K = 2, two tokens. Picks {0, 1} and {1, 2}: f = (1, 2, 1) / 4 (a share of the
    N K = 4 picks); P = ((.5 + .1) / 2, (.3 + .6) / 2, (.2 + .3) / 2) = (.3, .45, .25);
    3 (.3 / 4 + .9 / 4 + .25 / 4) = 1.0875. Without the 1 / K it would be twice that."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    idx = torch.tensor([[0, 1], [1, 2]])
    assert load_balance_loss(probs, idx).item() == pytest.approx(1.0875)
    probs.requires_grad_()
    load_balance_loss(probs, idx).backward()                              # d/dP_e = E f_e, P = mean
    torch.testing.assert_close(probs.grad, 3 * torch.tensor([0.25, 0.5, 0.25]).expand(2, 3) / 2)


def switch_loss(x, W, K):
    """The layer's balancing loss from scratch: softmax(W x), its top K per token (torch.topk),
    f_e = share of the N K picks on e, P_e = mean probability of e; E sum_e f_e P_e."""
    probs = torch.softmax(x @ W.T, -1)                                    # (N, E)
    picks = F.one_hot(probs.topk(K, -1).indices, W.shape[0]).sum(1)       # (N, E), K ones a row
    f = picks.double().sum(0) / (x.shape[0] * K)                          # (E,)
    return W.shape[0] * (f * probs.mean(0)).sum()


LAYERS = {  # name: (layer factory, K)
    "molora": (lambda c: MoLoRALinear(nn.Linear(37, 53), MoLoRAConfig(
        num_experts=5, rank=3, top_k=3, aux_loss_coef=c)), 3),
    "molora-top1": (lambda c: MoLoRALinear(nn.Linear(37, 53), MoLoRAConfig(
        num_experts=5, rank=3, top_k=1, renormalize=False, aux_loss_coef=c)), 1),
    "mosld": (lambda c: MoSLDLinear(nn.Linear(37, 53), MoSLDConfig(
        num_experts=5, rank=3, top_k=2, aux_loss_coef=c)), 2),
    "malora": (lambda c: MALoRALinear(nn.Linear(37, 53), MALoRAConfig(
        num_experts=5, rank=3, shared_rank=7, top_k=3, aux_loss_coef=c)), 3),
}


@pytest.mark.parametrize("name", LAYERS)
def test_each_layer_keeps_the_switch_loss_of_its_last_forward(name):
    make, K = LAYERS[name]
    torch.manual_seed(0)
    layer = make(0.01).double()
    nn.init.normal_(layer.router.weight, std=0.5)                         # a routing far from uniform
    x = torch.randn(11, 37, dtype=torch.float64)
    layer(x)
    want = switch_loss(x, layer.router.weight, K)
    torch.testing.assert_close(layer.aux, want)
    g, = torch.autograd.grad(layer.aux, layer.router.weight)
    torch.testing.assert_close(g, torch.autograd.grad(want, layer.router.weight)[0])


def test_aux_loss_is_the_mean_over_layers_of_coefficient_times_loss():
    """common.aux_loss: layers without a balancing loss (soft routing, coefficient 0) do not count."""
    torch.manual_seed(0)
    model = nn.ModuleList([LAYERS["molora"][0](0.5), LAYERS["mosld"][0](0.25),
                           LAYERS["malora"][0](0.0),
                           MoLoRALinear(nn.Linear(37, 53), MoLoRAConfig(num_experts=5, rank=3))])
    for m in model:
        nn.init.normal_(m.router.weight, std=0.5)
    x = torch.randn(11, 37)
    for m in model:
        m(x)
    want = (0.5 * switch_loss(x, model[0].router.weight, 3)
            + 0.25 * switch_loss(x, model[1].router.weight, 2)) / 2
    torch.testing.assert_close(aux_loss(model), want.float())


# ----------------------------------------------------------------------------- MoA router CE

B_, T_, P_, I_, E_ = 3, 7, 4, 37, 5


@pytest.mark.parametrize("routing", ["sequence", "token", "token-prefix"])
def test_moa_router_ce_is_cross_entropy_on_the_gold_domains(routing):
    """Sequence: CE(W_r mean_{t < P} x_b[t], k_b) over the B sequences. Token: CE(W_r u_bt, k_b)
    over the B T tokens, each labelled with its own sequence's domain; u_bt = x_bt, or the mean
    of x_b0..x_bt (token_input="prefix")."""
    torch.manual_seed(0)
    token_input = "prefix" if routing == "token-prefix" else "token"
    cfg = MoAConfig(num_domains=E_, routing=routing.split("-")[0], prompt_len=P_, token_input=token_input)
    layer = MoALinear(nn.Linear(I_, 53), cfg)
    layer = layer.double().train()
    nn.init.normal_(layer.router.weight, std=0.5)
    layer.gold = torch.tensor([4, 0, 2])
    x = torch.randn(B_, T_, I_, dtype=torch.float64)
    layer(x)
    W = layer.router.weight
    if routing == "sequence":
        want = F.cross_entropy(x[:, :P_].mean(1) @ W.T, layer.gold)
    else:
        labels = layer.gold[:, None].expand(B_, T_).reshape(-1)          # (B T,) row b*T + t -> k_b
        u = x if token_input == "token" else torch.stack([x[:, :t + 1].mean(1) for t in range(T_)], 1)
        want = F.cross_entropy(u.reshape(-1, I_) @ W.T, labels)
    torch.testing.assert_close(layer.router_loss(), want)


def test_moa_router_stage_adds_lambda_times_the_mean_ce_over_layers():
    torch.manual_seed(0)
    cfg = MoAConfig(num_domains=E_, prompt_len=P_, router_loss_coef=2.5)
    layers = [MoALinear(nn.Linear(I_, 53), cfg).double().train() for _ in range(2)]
    stage = moa_stages(cfg, ("add1", "neg", "mul3", "subst", "addpos"), tasks.GENERAL)[-1]
    assert stage.name == "router"
    gold = torch.tensor([1, 3, 0])
    stage.on_batch(layers, gold)                                          # the batch's domains
    xs = [torch.randn(B_, T_, I_, dtype=torch.float64) for _ in layers]
    for m, x in zip(layers, xs):
        nn.init.normal_(m.router.weight, std=0.5)
        m(x)
    ces = [F.cross_entropy(x[:, :P_].mean(1) @ m.router.weight.T, gold) for m, x in zip(layers, xs)]
    torch.testing.assert_close(stage.extra_loss(layers), 2.5 * (ces[0] + ces[1]) / 2)


# ----------------------------------------------------------------------------- train.py

TINY = ["--steps", "1", "--pretrain-steps", "2", "--n-layer", "1", "--n-embd", "32",
        "--batch-size", "8", "--digits", "2", "--eval-examples", "4"]
RUNS = {**{f"aux{c}": ["--method", "molora", "--variant", "top2", "--cfg", f"aux_loss_coef={c}"]
           for c in (0, 1, 3)},
        **{f"ce{c}": ["--method", "moa", "--cfg", f"router_loss_coef={c}"] for c in (1, 3)}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One step of each run in RUNS, from the same seed and base model (the first run pretrains it,
    the others reuse it): name -> (the loss of its last logged step, its adapter tensors)."""
    tmp = tmp_path_factory.mktemp("losses")
    procs = run_train(tmp, {name: [*args, *TINY, "--out", tmp / name] for name, args in RUNS.items()},
                      parallel=1)                                        # one at a time: one base
    out = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, proc.stderr[-2000:]
        stage = json.loads((tmp / name / "metrics.json").read_text())["stages"][-1]
        out[name] = (stage["final_loss"], stage["stage"], load_file(tmp / name / "adapter.safetensors"))
    return out


def test_train_py_adds_the_balancing_loss_once_with_its_coefficient(runs):
    """One step from the same seed: B = 0, so the LM loss is the base model's whatever the
    coefficient c, and the logged loss is LM + c * aux. The difference is linear in c, and its slope,
    the mean over the six layers of the Switch loss of a near-uniform router (N(0, 0.02^2)), lies
    just above 1. With B = 0 only the balancing loss moves the routers: c = 0 and c = 3 differ."""
    loss = {c: runs[f"aux{c}"][0] for c in (0, 1, 3)}
    slope = loss[1] - loss[0]
    assert 1.0 <= slope < 1.1, loss
    assert loss[3] - loss[0] == pytest.approx(3 * slope, rel=1e-4), loss
    routers = {c: [t for k, t in runs[f"aux{c}"][2].items() if k.endswith("router.weight")] for c in (0, 3)}
    assert len(routers[0]) == 6
    assert all(not torch.equal(a, b) for a, b in zip(routers[0], routers[3]))


def test_train_py_adds_the_router_ce_with_its_coefficient(runs):
    """MoA's router stage, its first step: with gold routing the LM loss does not depend on the
    router, so runs with lambda = 1 and 3 log losses that differ by 2 CE, and the CE of a
    near-uniform router over the five domains is close to ln 5."""
    (l1, stage1, _), (l3, stage3, _) = runs["ce1"], runs["ce3"]
    assert stage1 == stage3 == "router"
    assert (l3 - l1) / 2 == pytest.approx(math.log(5), rel=0.05), (l1, l3)
