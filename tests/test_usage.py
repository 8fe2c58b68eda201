"""expert_usage (trainutil.py): the mean gate of each expert over each task's tokens, on hand-made
routers whose gates are known, for a per-token Router, MoA's sequence routing (which does not
call its Router module) and MoDULA's prompt routing; and its record in train.py's metrics.json."""
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moa import MoAConfig, MoALinear  # noqa: E402
from modula import MoDULAConfig, MoDULALinear  # noqa: E402
from molora import MoLoRAConfig, MoLoRALinear  # noqa: E402
from test_train import TINY  # noqa: E402
from trainproc import train_in  # noqa: E402
from trainutil import expert_usage  # noqa: E402

V, E = 5, 3                                          # tokens 0..4; token v routes to expert v % 3


class Tiny(nn.Module):
    """One-hot embedding, then one adapted linear: the router of `layer` reads the token itself."""

    def __init__(self, layer):
        super().__init__()
        self.embed = nn.Embedding(V, V).requires_grad_(False)
        self.embed.weight.data = torch.eye(V, dtype=torch.float64)
        self.layer = layer

    def forward(self, x):                            # (B, T) -> (B, T, O)
        return self.layer(self.embed(x))


def one_hot_router(router, scale=60.0):
    """W_g[e, v] = scale when v % E == e: softmax(W_g x) is one-hot to 1e-26 in float64."""
    with torch.no_grad():
        router.weight.zero_()
        for v in range(V):
            router.weight[v % E, v] = scale


def test_token_routing_hand_made():
    layer = MoLoRALinear(nn.Linear(V, 4), MoLoRAConfig(num_experts=E, rank=2)).double()
    one_hot_router(layer.router)
    model = Tiny(layer)
    x = torch.tensor([[0, 0, 1, 3],                  # task 0: experts 0 0 1 0
                      [2, 2, 2, 2],                  # task 2: expert 2 throughout
                      [1, 2, 4, 4]])                 # task 2: experts 1 2 1 1
    usage = expert_usage(model, x, torch.tensor([0, 2, 2]), ["a", "b", "c"])
    assert list(usage) == ["layer"] and list(usage["layer"]) == ["a", "c"]   # b has no sequence
    torch.testing.assert_close(torch.tensor(usage["layer"]["a"]), torch.tensor([0.75, 0.25, 0.0]))
    torch.testing.assert_close(torch.tensor(usage["layer"]["c"]), torch.tensor([0.0, 0.375, 0.625]))


def test_moa_sequence_routing_is_the_one_hot_of_each_sequence_lora():
    """MoA routes a sequence by its pooled prompt, without calling its Router module; its usage is
    the share of each task's sequences sent to each LoRA."""
    layer = MoALinear(nn.Linear(V, 4), MoAConfig(num_domains=E, rank=2, prompt_len=1)).double()
    one_hot_router(layer.router)
    x = torch.tensor([[0, 1, 2], [3, 2, 2], [1, 0, 0], [4, 4, 4]])   # first tokens -> LoRAs 0 0 1 1
    usage = expert_usage(Tiny(layer), x, torch.tensor([0, 0, 1, 1]), ["a", "b"])["layer"]
    assert usage == {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0]}
    usage = expert_usage(Tiny(layer), x, torch.tensor([0, 1, 0, 1]), ["a", "b"])["layer"]
    assert usage == {"a": [0.5, 0.5, 0.0], "b": [0.5, 0.5, 0.0]}


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_modula_prompt_routing_and_single_expert_stages(variant):
    """Prompt routing gives every token the gates of its sequence's pooled prompt; in a
    single-expert stage the layer does not route and is left out (no stale gates)."""
    n = E - (variant == "flan")                      # Flan's router has n + 1 rows, universal first
    layer = MoDULALinear(nn.Linear(V, V), MoDULAConfig(variant=variant, num_domains=n,
                                                         prompt_len=2)).double()
    one_hot_router(layer.router)
    x = torch.tensor([[0, 1, 2, 2, 2], [2, 2, 0, 0, 0]])   # prompts (0, 1) and (2, 2)
    usage = expert_usage(Tiny(layer), x, torch.tensor([0, 1]), ["a", "b"])["layer"]
    torch.testing.assert_close(torch.tensor(usage["a"]), torch.tensor([0.5, 0.5, 0.0]),
                               atol=1e-12, rtol=0)   # softmax of (30, 30, 0) on every token
    torch.testing.assert_close(torch.tensor(usage["b"]), torch.tensor([0.0, 0.0, 1.0]),
                               atol=1e-12, rtol=0)
    layer.active = 0                                 # stage 2: expert 0 alone, no router call
    assert expert_usage(Tiny(layer), x, torch.tensor([0, 1]), ["a", "b"]) == {}


@pytest.mark.parametrize("method", ["molora", "modula"])
def test_train_py_records_expert_usage(tmp_path, capsys, method):
    m = train_in(tmp_path, "--method", method, *TINY)
    usage = m["expert_usage"]
    assert len(usage) == 6                           # q k v o up down of the one block
    for per_task in usage.values():
        assert list(per_task) == ["copy", "add1", "subst", "neg", "mul3", "addpos"]
        for gates in per_task.values():
            assert sum(gates) == pytest.approx(1.0)
    assert "expert usage" in capsys.readouterr().out
    if method == "modula":                           # Res: the domain experts, in task order
        assert m["expert_names"] == m["tasks"]
        assert m["stages"][-1]["lr"] == pytest.approx(10 * m["stages"][0]["lr"])   # router_lr_scale


def test_moa_token_routing_reads_the_prefix_mean():
    """routing="token", token_input="prefix": token t's gates come from the mean of x[0..t]."""
    torch.manual_seed(0)
    cfg = MoAConfig(num_domains=E, rank=2, routing="token")
    layer = MoALinear(nn.Linear(7, 4), cfg).double()
    x = torch.randn(2, 5, 7, dtype=torch.float64)
    layer(x)
    prefix = torch.stack([x[:, :t + 1].mean(1) for t in range(5)], 1)             # (B, T, I)
    expected = torch.softmax(prefix @ layer.router.weight.T, -1).reshape(-1, E)    # (N, E)
    torch.testing.assert_close(layer.router.gates, expected)
    own = MoALinear(nn.Linear(7, 4), MoAConfig(num_domains=E, rank=2, routing="token",
                                               token_input="token")).double()
    own.load_state_dict(layer.state_dict())
    own(x)
    torch.testing.assert_close(own.router.gates, torch.softmax(x @ layer.router.weight.T, -1).reshape(-1, E))
