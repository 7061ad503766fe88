"""MAML's meta-gradient through the recipe's `fast_adapt` and learn2learn's wrapper equals an
independent computation: torch.autograd through a hand-written functional inner loop."""
import learn2learn as l2l
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from recipes import maml as recipe


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3),
    ).double()


def tasks(n):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        y = torch.arange(3).repeat(2)
        out.append((torch.randn(6, 1, 6, 6, generator=g, dtype=torch.float64), y,
                    torch.randn(9, 1, 6, 6, generator=g, dtype=torch.float64), torch.arange(3).repeat(3)))
    return out


def independent_meta_gradient(model, batch, lr, steps, second_order):
    params = dict(model.named_parameters())
    total = 0
    for sx, sy, qx, qy in batch:
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(functional_call(model, fast, (qx,)), qy) / len(batch)
    return torch.autograd.grad(total, list(params.values()))


def recipe_meta_gradient(model, batch, lr, steps, first_order):
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)
    maml.zero_grad()
    for sx, sy, qx, qy in batch:
        loss, _ = recipe.fast_adapt(maml.clone(), sx, sy, qx, qy, steps)
        (loss / len(batch)).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_independent_computation(first_order, steps):
    batch = tasks(2)
    model = tiny_model()
    ours = recipe_meta_gradient(model, batch, lr=0.4, steps=steps, first_order=first_order)
    reference = independent_meta_gradient(tiny_model(), batch, lr=0.4, steps=steps,
                                          second_order=not first_order)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in ours)


def test_second_order_terms_matter():
    """The check above can tell first from second order: the two gradients differ."""
    batch = tasks(2)
    second = recipe_meta_gradient(tiny_model(), batch, lr=0.4, steps=2, first_order=False)
    first = recipe_meta_gradient(tiny_model(), batch, lr=0.4, steps=2, first_order=True)
    assert max((a - b).abs().max().item() for a, b in zip(second, first)) > 1e-4
