"""Checks every adapted layer's tests share: fused vs naive on outputs and every gradient, one
graph under torch.compile, the zero update after reset_parameters(), and delta_weight against
the forward."""
import torch

from common import route


def out_and_grads(layer, fn, x, dy, seed=None):
    """Output and the gradients of x and of every trainable parameter (None where unused)."""
    if seed is not None:
        torch.manual_seed(seed)                       # the same dropout / DropConnect mask on both paths
    x = x.clone().requires_grad_()
    y = fn(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    return [y, *torch.autograd.grad(y, [x, *params], dy, allow_unused=True)]


def assert_paths_match(layer, x, dy, seed=None, names=None):
    """layer.forward (fused) equals layer.forward_naive (loop) on the output and every gradient."""
    ref = out_and_grads(layer, layer.forward_naive, x, dy, seed)
    out = out_and_grads(layer, layer.forward, x, dy, seed)
    names = names or [f"#{i}" for i in range(len(ref))]
    for name, a, b in zip(names, ref, out):
        if a is None:
            assert b is None, name
        else:
            torch.testing.assert_close(b, a, msg=lambda m: f"{name}: {m}")


def assert_compiles_whole(layer, x):
    """Routing, masks and dispatch trace as one graph (fullgraph raises on a break)."""
    torch._dynamo.reset()
    fn = torch.compile(layer, fullgraph=True, backend="eager")
    torch.manual_seed(2)
    y = fn(x)
    torch.manual_seed(2)
    torch.testing.assert_close(y, layer(x))


def assert_zero_update(layer, x):
    """After reset_parameters() both paths give exactly the frozen base's output."""
    layer.reset_parameters()
    torch.testing.assert_close(layer(x), layer.base(x))
    torch.testing.assert_close(layer.forward_naive(x), layer.base(x))


def assert_delta_weights_match_forward(layer, x):
    """With soft routing (layer in eval, routed over all E experts) the update is
    sum_e g_e(x) * delta_weight(e) x, the dense (O, I) update of each expert."""
    E = layer.lora_B.shape[0]
    gates = route(x, layer.router, E)[2]                                   # (N, E)
    dW = torch.stack([layer.delta_weight(e) for e in range(E)])            # (E, O, I)
    expect = torch.einsum("ne,eoi,ni->no", gates, dW, x)
    torch.testing.assert_close(layer(x) - layer.base(x), expect)
