"""Meta-gradients through the recipes' `fast_adapt` and learn2learn's wrappers equal an
independent computation: torch.autograd through a hand-written functional inner loop."""
import learn2learn as l2l
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from l2l_recipes.recipes import maml as recipe
from l2l_recipes.recipes import metasgd


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


def test_metasgd_gradient_of_weights_and_learned_rates():
    """Meta-SGD's inner step is theta - alpha * grad with alpha per entry; both get meta-gradients."""
    batch = tasks(2)
    model = tiny_model()
    meta = metasgd.MetaSGD(model, lr=0.3)
    with torch.no_grad():
        for lr in meta.lrs:
            lr.uniform_(0.05, 0.5, generator=torch.Generator().manual_seed(3))
    rates = [lr.detach().clone().requires_grad_() for lr in meta.lrs]
    meta.zero_grad()
    for sx, sy, qx, qy in batch:
        loss, _ = metasgd.fast_adapt(meta.clone(), sx, sy, qx, qy, steps=2)
        (loss / len(batch)).backward()

    reference = tiny_model()
    params = dict(reference.named_parameters())
    total = 0
    for sx, sy, qx, qy in batch:
        fast = dict(params)
        for _ in range(2):
            loss = F.cross_entropy(functional_call(reference, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: p - a * g for (name, p), a, g in zip(fast.items(), rates, grads)}
        total = total + F.cross_entropy(functional_call(reference, fast, (qx,)), qy) / len(batch)
    expected = torch.autograd.grad(total, list(params.values()) + rates)
    ours = [p.grad for p in model.parameters()] + [lr.grad for lr in meta.lrs]
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert all(lr.grad.abs().sum() > 0 for lr in meta.lrs)


def test_metasgd_with_equal_rates_adapts_exactly_like_maml():
    """On learn2learn's Omniglot Conv4 (where learn2learn 0.2.0's own MetaSGD update fails)."""
    torch.manual_seed(0)
    net = l2l.vision.models.OmniglotCNN(5)
    x, y = torch.randn(5, 1, 28, 28), torch.arange(5)
    maml_clone, msgd_clone = l2l.algorithms.MAML(net, lr=0.4).clone(), metasgd.MetaSGD(net, lr=0.4).clone()
    for _ in range(3):
        maml_clone.adapt(F.cross_entropy(maml_clone(x), y))
        msgd_clone.adapt(F.cross_entropy(msgd_clone(x), y))
        torch.testing.assert_close(msgd_clone(x), maml_clone(x))
    assert F.cross_entropy(msgd_clone(x), y) < 0.1  # three steps fit the support set
