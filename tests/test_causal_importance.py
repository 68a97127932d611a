"""The hard sigmoids' exact forward/backward (docs/concepts.md#hard-sigmoids) and the three CI function types."""
from __future__ import annotations

import pytest
import torch

from decomp_hooks import causal_importance
from decomp_hooks.causal_importance import (
    PerComponentMLP, SharedMLP, VectorMLP, lower_leaky_hard_sigmoid, make_ci_fn, upper_leaky_hard_sigmoid,
)

Z = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0])


def grad_of(fn, z, upstream):
    z = z.clone().requires_grad_(True)
    fn(z).backward(upstream)
    return z.grad


def test_lower_leaky_forward_clamps():
    torch.testing.assert_close(lower_leaky_hard_sigmoid(Z), torch.tensor([0, 0, 0, 0.3, 1, 1, 1.0]))


def test_lower_leaky_backward_is_one_sided():
    neg = grad_of(lower_leaky_hard_sigmoid, Z, -torch.ones_like(Z))   # loss wants g up: leak below 0
    pos = grad_of(lower_leaky_hard_sigmoid, Z, torch.ones_like(Z))    # loss wants g down: no leak below 0
    torch.testing.assert_close(neg, torch.tensor([-0.01, -0.01, -0.01, -1, -1, 0, 0]))
    torch.testing.assert_close(pos, torch.tensor([0, 0, 0, 1, 1, 0, 0.0]))


def test_upper_leaky_forward_and_backward():
    torch.testing.assert_close(upper_leaky_hard_sigmoid(Z), torch.tensor([0, 0, 0, 0.3, 1, 1.005, 1.02]))
    torch.testing.assert_close(grad_of(upper_leaky_hard_sigmoid, Z, torch.ones_like(Z)),
                               torch.tensor([0, 0, 1, 1, 1, 0.01, 0.01]))


@pytest.mark.parametrize("cls,takes_inner", [(PerComponentMLP, True), (VectorMLP, False), (SharedMLP, False)])
@pytest.mark.parametrize("hidden", [[8], [8, 4]])
def test_ci_function_shapes(cls, takes_inner, hidden):
    torch.manual_seed(0)
    fn = cls(6, 5, hidden)
    x = torch.randn(2, 3, 5 if takes_inner else 6)
    assert fn(x).shape == (2, 3, 5) and fn.takes_inner_acts is takes_inner


def test_per_component_mlp_is_independent_per_component():
    """Changing component 0's input must not move component 1's output (the paper's per-component CI)."""
    torch.manual_seed(0)
    fn = PerComponentMLP(6, 3, [8])
    h = torch.randn(4, 3)
    h2 = h.clone()
    h2[:, 0] += 5
    out, out2 = fn(h), fn(h2)
    torch.testing.assert_close(out[:, 1:], out2[:, 1:])
    assert not torch.allclose(out[:, 0], out2[:, 0])


def test_per_component_mlp_formula():
    torch.manual_seed(0)
    fn = PerComponentMLP(6, 2, [3])
    h = torch.randn(5, 2)
    w1, b1 = fn.weights[0][:, 0, :], fn.biases[0]
    expected = (torch.nn.functional.gelu(h[..., None] * w1 + b1) * fn.w_out).sum(-1) + fn.b_out
    torch.testing.assert_close(fn(h), expected)


def _value_and_grads(fn, h):
    out = fn(h)
    return (out, *torch.autograd.grad((out.sin() * 3).sum(), [h, *fn.parameters()]))


@pytest.mark.parametrize("real_compile", [False, True])
def test_fused_per_component_mlp_matches_autograd(real_compile):
    """The compiled path's hand-written backward (∂h from the forward's slope, the parameter sums over positions in a
    [C, positions] layout) gives autograd's gradients for h and every parameter, over several leading (position)
    dims; with real_compile the torch.compile'd kernels are checked too, else the same functions in float64."""
    torch.manual_seed(0)
    dtype = torch.float32 if real_compile else torch.float64
    plain = PerComponentMLP(6, 4, [5]).to(dtype)
    fused = PerComponentMLP(6, 4, [5]).to(dtype)
    fused.load_state_dict(plain.state_dict())
    if real_compile:
        fused.compile()
    else:
        fused.kernels = causal_importance._MLP1Kernels(compiled=False)
    h = torch.randn(3, 7, 4, dtype=dtype, requires_grad=True)
    tol = {"rtol": 1e-5, "atol": 1e-5} if real_compile else {"rtol": 1e-12, "atol": 1e-12}
    for a, b in zip(_value_and_grads(plain, h), _value_and_grads(fused, h)):
        torch.testing.assert_close(b, a, **tol)


def test_fused_mlp_takes_bf16_inner_acts_as_under_autocast():
    """Under bf16 autocast the inner acts arrive in bf16 while the MLP's parameters stay fp32: the compiled path
    computes in fp32, returns ∂h in bf16 and fp32 parameter gradients, equal to the plain MLP's on the same input."""
    torch.manual_seed(0)
    plain, fused = PerComponentMLP(6, 4, [5]), PerComponentMLP(6, 4, [5])
    fused.load_state_dict(plain.state_dict())
    fused.compile()
    h = torch.randn(3, 7, 4).to(torch.bfloat16).requires_grad_(True)
    h32 = h.detach().float().requires_grad_(True)
    got, want = _value_and_grads(fused, h), _value_and_grads(plain, h32)
    assert got[1].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[2:])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2)


def test_fused_sigmoid_pair_matches_the_two_sigmoids():
    """LeakyHardPair: same values, and the gradient to z from both outputs (one-sided leak included) as the pair of
    separate sigmoids, on every region of z and both signs of the upstream gradients."""
    from decomp_hooks.causal_importance import LeakyHardPair

    torch.manual_seed(0)
    z = torch.cat([Z, torch.randn(200) * 2])
    d_lower, d_upper = torch.randn_like(z), torch.randn_like(z)
    pair = LeakyHardPair()
    zs = [z.clone().requires_grad_(True) for _ in range(2)]
    fused = pair(zs[0])
    plain = (lower_leaky_hard_sigmoid(zs[1]), upper_leaky_hard_sigmoid(zs[1]))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    for outs, zz in ((fused, zs[0]), (plain, zs[1])):
        ((outs[0] * d_lower).sum() + (outs[1] * d_upper).sum()).backward()
    torch.testing.assert_close(zs[0].grad, zs[1].grad)
    only_lower = z.clone().requires_grad_(True)
    pair(only_lower)[0].backward(d_lower)
    torch.testing.assert_close(only_lower.grad, grad_of(lower_leaky_hard_sigmoid, z, d_lower))


def test_fused_mlp_importances_match_mlp_then_sigmoids():
    """The compiled MLP + both sigmoids in one kernel forward: the values and gradients (to h and every parameter) of
    the plain MLP followed by the two leaky-hard sigmoids, and the same values without gradients (evaluation)."""
    torch.manual_seed(0)
    plain, fused = PerComponentMLP(6, 4, [5]), PerComponentMLP(6, 4, [5])
    fused.load_state_dict(plain.state_dict())
    fused.compile()
    h = torch.randn(3, 7, 4, requires_grad=True) * 3
    d_lower, d_upper = torch.randn(3, 7, 4), torch.randn(3, 7, 4)
    z = plain(h)
    results = []
    for fn, (lower, upper) in ((plain, (lower_leaky_hard_sigmoid(z), upper_leaky_hard_sigmoid(z))),
                               (fused, fused.leaky_hard_importances(h))):
        loss = (lower * d_lower).sum() + (upper * d_upper).sum()
        results.append((lower, upper, *torch.autograd.grad(loss, [h, *fn.parameters()])))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for a, b in zip(fused.leaky_hard_importances(h), results[0][:2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused(h), z, rtol=1e-5, atol=1e-5)
    assert PerComponentMLP(6, 4, [5]).leaky_hard_importances(h) is None  # not compiled


def test_fused_mlp_backward_of_an_empty_batch_is_zero():
    fn = PerComponentMLP(6, 4, [5])
    fn.compile()
    h = torch.randn(0, 4, requires_grad=True)
    lower, upper = fn.leaky_hard_importances(h)
    grads = torch.autograd.grad(lower.sum() + upper.sum(), [h, *fn.parameters()])
    assert [g.shape for g in grads] == [h.shape, *(p.shape for p in fn.parameters())]
    assert all(not g.any() for g in grads)


def test_deeper_per_component_mlp_compiles_whole():
    fn = PerComponentMLP(6, 3, [4, 4])
    fn.compile()
    assert fn.kernels is None


def test_embedding_sites_only_take_mlp():
    with pytest.raises(ValueError, match="use ci.type='mlp' for embeddings"):
        make_ci_fn("vector_mlp", "embedding", 10, 3, [4])
