"""Every method's forward equation, stated again here from the paper and checked against the layer.

The fused-vs-naive tests compare two paths that share each layer's `update`, so a bug in a method's
own maths passes both. Here each reference is written from the paper's equation alone: an einsum
over the layer's public parameters (lora_A, lora_B, shared_A, lora_P, universal_A, universal_B,
router.weight, base), with torch.softmax and a top-k mask of its own; nothing from common.py. Both
`forward` and `forward_naive` must equal it, on the output and on the gradient of x and of every
trainable parameter, in float64, on odd shapes, with every parameter moved off its init, in train
mode (dropout and DropConnect on, seeded) and in eval mode. Each scaling is the paper's own
(alpha / r, alpha / r-bar, alpha / r_j), spelled out from the config and never read from the layer.

Dropout and DropConnect masks: the reference draws M ~ Bernoulli(1 - p) from the same seeded
stream torch's dropout uses (the nonzeros of F.dropout(ones)) and applies M * v / (1 - p) itself.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRAConfig, LoRALinear
from malora import MALoRAConfig, MALoRALinear
from moa import MoAConfig, MoALinear
from modula import UNIVERSAL, MoDULAConfig, MoDULALinear
from molora import MoLoRAConfig, MoLoRALinear
from mosld import MoSLDConfig, MoSLDLinear

I, O = 37, 53                                         # odd in- and out-features
SEED = 5                                              # the dropout / DropConnect stream of a call


def moved(layer, seed=0):
    """float64, and every trainable parameter drawn again: nothing left at its init (B = 0 would
    hide the update, a router at N(0, 0.02^2) routes almost uniformly)."""
    torch.manual_seed(seed)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)
    return layer


def bernoulli_keep(shape, p, training):
    """M ~ Bernoulli(1 - p), entry-wise (all ones at eval or p = 0): the keep mask of the next
    torch dropout call on a tensor of this shape."""
    if not training or p == 0:
        return torch.ones(shape, dtype=torch.float64)
    return (F.dropout(torch.ones(shape, dtype=torch.float64), p, True) != 0).double()


def dropped(v, p, training):
    """Inverted dropout, written out: M * v / (1 - p) at training, v at eval."""
    return bernoulli_keep(v.shape, p, training) * v / (1 - p) if training else v


def frozen(layer, x):
    """W0 x + b, the frozen pretrained layer."""
    return x @ layer.base.weight.T + layer.base.bias


def softmax_gates(x, W):
    """g(x) = softmax(W_g x): (N, I), (E, I) -> (N, E)."""
    return torch.softmax(x @ W.T, dim=-1)


def top_k_gates(probs, K, renormalize=True):
    """TopK_K: the K largest probabilities of each row kept (the rest 0), renormalised to sum 1."""
    kth = probs.sort(dim=-1, descending=True).values[:, K - 1:K]          # (N, 1)
    kept = probs * (probs >= kth)                                         # (N, E)
    return kept / kept.sum(-1, keepdim=True) if renormalize else kept


def leaky_relu(u, slope):
    return torch.where(u > 0, u, slope * u)


def assert_matches(layer, reference, x, training):
    """forward and forward_naive equal reference(x) on the output and on every gradient, with the
    same dropout / DropConnect draws (seeded before each call)."""
    layer.train(training)
    params = [p for p in layer.parameters() if p.requires_grad]
    dy = torch.randn(*x.shape[:-1], layer.base.out_features, dtype=torch.float64)

    def out_and_grads(fn):
        xr = x.clone().requires_grad_()
        torch.manual_seed(SEED)
        y = fn(xr)
        return [y, *torch.autograd.grad(y, [xr, *params], dy, allow_unused=True)]

    want = out_and_grads(reference)
    names = ["y", "x", *[n for n, p in layer.named_parameters() if p.requires_grad]]
    for path in (layer.forward, layer.forward_naive):
        for name, a, b in zip(names, want, out_and_grads(path)):
            if a is None and b is None:                                   # unused by both
                continue
            a = torch.zeros_like(b) if a is None else a                   # unused: zero gradient
            b = torch.zeros_like(a) if b is None else b
            torch.testing.assert_close(b, a, msg=lambda m: f"{path.__name__}, {name}: {m}")


TRAIN_EVAL = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


# ----------------------------------------------------------------------------- LoRA


@TRAIN_EVAL
def test_lora(training):
    """y = W0 x + (alpha / r) B A dropout(x)   (Hu et al. Eq. 3)."""
    cfg = LoRAConfig(rank=3, alpha=5.0, dropout=0.3)
    layer = moved(LoRALinear(nn.Linear(I, O), cfg))
    assert layer.scaling == 5.0 / 3

    def reference(x):
        xd = dropped(x, cfg.dropout, training)
        return frozen(layer, x) + cfg.alpha / cfg.rank * torch.einsum(
            "...i,ri,or->...o", xd, layer.lora_A, layer.lora_B)

    assert_matches(layer, reference, torch.randn(2, 5, I, dtype=torch.float64), training)


# ----------------------------------------------------------------------------- MoLoRA


@TRAIN_EVAL
@pytest.mark.parametrize("E,K,renormalize,dropout", [
    (5, None, True, 0.3), (5, None, True, 0.0), (5, 3, True, 0.3), (5, 3, True, 0.0),
    (5, 2, False, 0.3), (16, 1, False, 0.0), (32, 2, True, 0.3)],
    ids=["soft", "soft-no-dropout", "top3", "top3-no-dropout", "top2-raw", "top1-of-16", "top2-of-32"])
def test_molora(training, E, K, renormalize, dropout):
    """g = softmax(W_g x) (soft) or TopK(softmax(W_g x)) (renormalised or not);
    y = W0 x + (alpha / r) sum_e g_e B_e A_e dropout(x); the router reads the clean x.
    E / K of 16 and more takes the grouped dispatch on CPU."""
    cfg = MoLoRAConfig(num_experts=E, rank=3, alpha=5.0, top_k=K, renormalize=renormalize,
                       dropout=dropout)
    layer = moved(MoLoRALinear(nn.Linear(I, O), cfg))
    assert layer.scaling == 5.0 / 3

    def reference(x):
        x = x.reshape(-1, I)                                              # (N, I)
        g = softmax_gates(x, layer.router.weight)                         # (N, E)
        if K is not None:
            g = top_k_gates(g, K, renormalize)
        xd = dropped(x, cfg.dropout, training)
        dy = torch.einsum("ne,eor,eri,ni->no", g, layer.lora_B, layer.lora_A, xd)
        return (frozen(layer, x) + cfg.alpha / cfg.rank * dy).view(2, 5, O)

    assert_matches(layer, reference, torch.randn(2, 5, I, dtype=torch.float64), training)


# ----------------------------------------------------------------------------- MoSLD


@TRAIN_EVAL
@pytest.mark.parametrize("drop_a,drop_b", [(0.3, 0.0), (0.0, 0.4)], ids=["dropconnect-A", "drop-B"])
def test_mosld(training, drop_a, drop_b):
    """g = renorm(TopK(softmax(W x))) (Eq. 1); A~ = M * A / (1 - p) at training, A at eval (Eq. 2);
    y = W0 x + (alpha / r) sum_e g_e B_e A~ x (Eq. 3), one mask for every token and expert.
    drop_b: the same DropConnect on B instead (Table 2's ablation)."""
    cfg = MoSLDConfig(num_experts=5, rank=3, alpha=5.0, top_k=3, drop_a=drop_a, drop_b=drop_b)
    layer = moved(MoSLDLinear(nn.Linear(I, O), cfg))
    assert layer.scaling == 5.0 / 3

    def reference(x):
        A = dropped(layer.shared_A, drop_a, training)                     # (r, I)  Eq. 2
        B = dropped(layer.lora_B, drop_b, training)                       # (E, O, r)
        g = top_k_gates(softmax_gates(x, layer.router.weight), 3)         # (N, E)  Eq. 1
        return frozen(layer, x) + cfg.alpha / cfg.rank * torch.einsum("ne,eor,ri,ni->no", g, B, A, x)

    assert_matches(layer, reference, torch.randn(9, I, dtype=torch.float64), training)


def test_mosld_layer_with_no_more_experts_than_k_routes_softly():
    """E_l <= K (e.g. the last block of (8, 6, 4, 2) with K = 2): every expert kept, softmax gates."""
    cfg = MoSLDConfig(num_experts=2, rank=3, alpha=5.0, top_k=2, drop_a=0.0)
    layer = moved(MoSLDLinear(nn.Linear(I, O), cfg))

    def reference(x):
        g = softmax_gates(x, layer.router.weight)
        return frozen(layer, x) + cfg.alpha / cfg.rank * torch.einsum(
            "ne,eor,ri,ni->no", g, layer.lora_B, layer.shared_A, x)

    assert_matches(layer, reference, torch.randn(9, I, dtype=torch.float64), False)
    assert layer.aux is None                                              # no balancing loss


# ----------------------------------------------------------------------------- MALoRA


@TRAIN_EVAL
@pytest.mark.parametrize("renormalize", [True, False])
def test_malora(training, renormalize):
    """G = TopK(softmax(W_g x)) (Eq. 4) on the clean x; z = S_A dropout(x) (Eq. 6);
    y = W0 x + (alpha / r-bar) sum_t G_t B_t P_t z (Eq. 7); beta only shapes the init."""
    cfg = MALoRAConfig(num_experts=5, rank=4, shared_rank=11, alpha=5.0, top_k=3, beta=1.7,
                       dropout=0.3, renormalize=renormalize)
    layer = moved(MALoRALinear(nn.Linear(I, O), cfg))
    assert layer.scaling == 5.0 / 4                                       # alpha / r-bar

    def reference(x):
        G = top_k_gates(softmax_gates(x, layer.router.weight), 3, renormalize)   # (N, E)
        z = dropped(x, cfg.dropout, training) @ layer.shared_A.T          # (N, S)  Eq. 6
        dy = torch.einsum("nt,tor,trs,ns->no", G, layer.lora_B, layer.lora_P, z)  # Eq. 7
        return frozen(layer, x) + cfg.alpha / cfg.rank * dy

    assert_matches(layer, reference, torch.randn(9, I, dtype=torch.float64), training)


# ----------------------------------------------------------------------------- MoDULA

MODULA = dict(num_domains=4, universal_rank=4, domain_rank=3, alpha=5.0, negative_slope=0.2,
              prompt_len=3)
C_U, C_D = 5.0 / 4, 5.0 / 3                          # c_j = alpha / r_j
ROUTER_INPUT = pytest.mark.parametrize("router_input", ["token", "prompt"])


def universal(layer, x):
    """c_* B_* A_* x."""
    return C_U * torch.einsum("...i,ri,or->...o", x, layer.universal_A, layer.universal_B)


def modula_gates(layer, x, router_input):
    """s = softmax(W_R x) per token (Eq. 5-8), or, routing by the prompt (our interpretation),
    softmax(W_R mean_{t < P} x_b[t]) for every token of sequence b. x (B, T, I) -> (B, T, E)."""
    if router_input == "token":
        return softmax_gates(x, layer.router.weight)
    pooled = x[:, :MODULA["prompt_len"]].mean(1, keepdim=True)           # (B, 1, I)
    return softmax_gates(pooled, layer.router.weight).expand(*x.shape[:-1], -1)


@TRAIN_EVAL
@ROUTER_INPUT
@pytest.mark.parametrize("active", [None, UNIVERSAL, 2], ids=["routed", "stage1", "stage2-domain2"])
def test_modula_flan(training, router_input, active):
    """Routed (Eq. 5-8): s over (*, 1..n), row 0 the universal expert;
    y = W0 x + s_* c_* B_* A_* x + sum_i s_i c_d B_i A_i x.
    Stage 1: y = W0 x + c_* B_* A_* x. Stage 2, domain i (Eq. 4): y = W0 x + c_d B_i A_i x."""
    cfg = MoDULAConfig(variant="flan", router_input=router_input, **MODULA)
    layer = moved(MoDULALinear(nn.Linear(I, O), cfg))
    layer.active = active
    assert (layer.scaling, layer.scaling_universal) == (C_D, C_U)
    assert layer.router.weight.shape == (5, I)                            # n + 1 rows

    def reference(x):
        if active == UNIVERSAL:
            return frozen(layer, x) + universal(layer, x)
        domain = torch.einsum("bti,eri,eor->bteo", x, layer.lora_A, layer.lora_B)    # (B, T, n, O)
        if active is not None:
            return frozen(layer, x) + C_D * domain[:, :, active]
        s = modula_gates(layer, x, router_input)                          # (B, T, n + 1)
        return (frozen(layer, x) + s[..., :1] * universal(layer, x)
                + C_D * torch.einsum("bte,bteo->bto", s[..., 1:], domain))

    assert_matches(layer, reference, torch.randn(2, 5, I, dtype=torch.float64), training)


@TRAIN_EVAL
@ROUTER_INPUT
@pytest.mark.parametrize("active", [None, UNIVERSAL, 2], ids=["routed", "stage1", "stage2-domain2"])
def test_modula_res(training, router_input, active):
    """h = c_* B_* A_* x, always on (Eq. 9); s over the n domains, from x (not h);
    y = W0 x + h + sum_i s_i c_d B_i LeakyReLU(A_i h), A_i (r_d, O) (Eq. 10-12).
    Stage 1: y = W0 x + h. Stage 2, domain i: y = W0 x + h + c_d B_i LeakyReLU(A_i h)."""
    cfg = MoDULAConfig(variant="res", router_input=router_input, **MODULA)
    layer = moved(MoDULALinear(nn.Linear(I, O), cfg))
    layer.active = active
    assert layer.router.weight.shape == (4, I) and layer.lora_A.shape == (4, 3, O)

    def reference(x):
        h = universal(layer, x)                                           # (B, T, O)
        if active == UNIVERSAL:
            return frozen(layer, x) + h
        u = leaky_relu(torch.einsum("bto,ero->bter", h, layer.lora_A), MODULA["negative_slope"])
        domain = torch.einsum("bter,eor->bteo", u, layer.lora_B)          # (B, T, n, O)
        if active is not None:
            return frozen(layer, x) + h + C_D * domain[:, :, active]
        s = modula_gates(layer, x, router_input)                          # (B, T, n): reads x, not h
        return frozen(layer, x) + h + C_D * torch.einsum("bte,bteo->bto", s, domain)

    assert_matches(layer, reference, torch.randn(2, 5, I, dtype=torch.float64), training)


# ----------------------------------------------------------------------------- MoA

B_, T_, P_, E_ = 3, 7, 4, 5                           # sequences, time, prompt positions, domains


def moa(routing, token_input="prefix"):
    cfg = MoAConfig(num_domains=E_, rank=3, alpha=5.0, routing=routing, prompt_len=P_,
                    token_input=token_input)
    layer = moved(MoALinear(nn.Linear(I, O), cfg))
    assert layer.scaling == 5.0 / 3
    return layer


def loras(layer, x):
    """(alpha / r) B_j A_j x for every domain j: (B, T, I) -> (B, T, E, O)."""
    return 5.0 / 3 * torch.einsum("bti,eri,eor->bteo", x, layer.lora_A, layer.lora_B)


@TRAIN_EVAL
def test_moa_sequence(training):
    """p_b = softmax(W_r mean_{t < P} x_b[t]); training: k_b = the gold domain, inference:
    k_b = argmax p_b; y_t = W0 x_t + (alpha / r) B_k A_k x_t for every token of sequence b.
    The gold labels differ from the argmax, so a layer that routes by argmax in training fails."""
    layer = moa("sequence")
    x = torch.randn(B_, T_, I, dtype=torch.float64)
    argmax = (x[:, :P_].mean(1) @ layer.router.weight.T).argmax(-1)       # (B,)
    layer.gold = (argmax + 1 + torch.arange(B_)) % E_
    assert not (layer.gold == argmax).any()
    k = layer.gold if training else argmax

    def reference(x):
        return frozen(layer, x) + loras(layer, x)[torch.arange(B_), :, k]  # (B, T, O)

    assert_matches(layer, reference, x, training)


@TRAIN_EVAL
@pytest.mark.parametrize("token_input", ["token", "prefix"])
def test_moa_token(training, token_input):
    """Token routing: p_t = softmax(W_r u_t), y_t = W0 x_t + (alpha / r) sum_j p_tj B_j A_j x_t,
    soft in training and at inference; u_t = x_t, or the causal prefix mean of x_0..x_t."""
    layer = moa("token", token_input)
    layer.gold = torch.tensor([0, 3, 1])                                  # only the CE reads it

    def reference(x):
        u = x if token_input == "token" else torch.stack([x[:, :t + 1].mean(1) for t in range(T_)], 1)
        p = torch.softmax(u @ layer.router.weight.T, -1)                  # (B, T, E)
        return frozen(layer, x) + torch.einsum("bte,bteo->bto", p, loras(layer, x))

    assert_matches(layer, reference, torch.randn(B_, T_, I, dtype=torch.float64), training)


@TRAIN_EVAL
def test_moa_stage1_uses_one_lora(training):
    """Stage 1, domain j: y = W0 x + (alpha / r) B_j A_j x for every sequence, no router."""
    layer = moa("sequence")
    layer.active = 3

    def reference(x):
        return frozen(layer, x) + loras(layer, x)[:, :, 3]

    assert_matches(layer, reference, torch.randn(B_, T_, I, dtype=torch.float64), training)
