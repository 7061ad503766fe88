"""MAML++ (recipes/mamlpp.py): meta-gradients against an independent computation and finite
differences, the MSL schedule, per-step batch norm, a short real run on Omniglot, and resume."""
import copy
import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F

from l2l_recipes import data, fast_mamlpp, harness, registry
from l2l_recipes.errors import UserError
from l2l_recipes.recipes import mamlpp as recipe

STEPS = 3


def tiny_model():
    """Float64 Conv4PerStep on 16x16 images (16 -> 8 -> 4 -> 2 -> 1), with every per-step quantity
    made distinct so that a mixed-up step index shows in the gradients."""
    torch.manual_seed(0)
    model = recipe.Conv4PerStep(channels=1, ways=3, hidden_size=4, side=1, steps=STEPS, fast_lr=0.2).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lr in model.lrs.values():
            lr.copy_(torch.rand(STEPS, generator=g, dtype=torch.float64) * 0.4 + 0.05)
        model.bn_weight.copy_(1 + 0.3 * torch.randn(model.bn_weight.shape, generator=g, dtype=torch.float64))
        model.bn_bias.copy_(0.3 * torch.randn(model.bn_bias.shape, generator=g, dtype=torch.float64))
    return model


def task():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat(2)
    return (torch.randn(6, 1, 16, 16, generator=g, dtype=torch.float64), y,
            torch.randn(9, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(3).repeat(3))


def meta_parameters(model):
    return [*model.weights.values(), *model.lrs.values(), model.bn_weight, model.bn_bias]


def recipe_gradient(model, step_weights, second_order):
    model.zero_grad()
    loss, _ = recipe.fast_adapt(model, *task(), step_weights, second_order)
    loss.backward()
    return [p.grad.clone() for p in meta_parameters(model)]


def independent_gradient(model, step_weights, second_order):
    """Straightforward MAML++ loss with hand-written batch norm, ReLU and linear layer:
    support pass of step k and query after k steps use BN set k, step k uses rate lrs[k]."""
    weights = {n: w.detach().clone().requires_grad_() for n, w in model.weights.items()}
    lrs = {n: r.detach().clone().requires_grad_() for n, r in model.lrs.items()}
    gamma = model.bn_weight.detach().clone().requires_grad_()
    beta = model.bn_bias.detach().clone().requires_grad_()

    def net(x, w, k):
        for i in range(4):
            x = F.conv2d(x, w[f"conv{i}_weight"], w[f"conv{i}_bias"], padding=1)
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-5) * gamma[i, k].view(1, -1, 1, 1) + beta[i, k].view(1, -1, 1, 1)
            x = F.max_pool2d(x.clamp(min=0), 2)
        return x.flatten(1) @ w["head_weight"].T + w["head_bias"]

    sx, sy, qx, qy = task()
    fast, total = dict(weights), 0
    for k, v in enumerate(step_weights):
        grads = torch.autograd.grad(F.cross_entropy(net(sx, fast, k), sy), list(fast.values()),
                                    create_graph=second_order)
        fast = {n: w - lrs[n][k] * (g if second_order else g.detach()) for (n, w), g in zip(fast.items(), grads)}
        if v > 0:
            total = total + v * F.cross_entropy(net(qx, fast, k + 1), qy)
    return list(torch.autograd.grad(total, [*weights.values(), *lrs.values(), gamma, beta], allow_unused=True))


@pytest.mark.parametrize("step_weights", [[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
@pytest.mark.parametrize("second_order", [True, False])
def test_meta_gradient_matches_independent_computation(step_weights, second_order):
    ours = recipe_gradient(tiny_model(), step_weights, second_order)
    reference = independent_gradient(tiny_model(), step_weights, second_order)
    for a, b in zip(ours, reference):
        b = torch.zeros_like(a) if b is None else b  # e.g. BN set 0 in first-order mode
        assert (a - b).abs().max().item() < 1e-10
    rates = dict(zip(tiny_model().lrs, ours[len(tiny_model().weights):-2]))
    # every per-layer per-step rate gets a meta-gradient (but the conv biases': batch norm cancels them)
    assert all(r.abs().min() > 1e-6 for name, r in rates.items() if not name.endswith("_bias") or "head" in name)


def test_learned_rate_gradient_matches_finite_differences():
    """Second-order meta-gradient of each per-layer per-step rate against central differences."""
    step_weights = [0.2, 0.3, 0.5]
    model = tiny_model()
    ours = recipe_gradient(model, step_weights, second_order=True)[len(model.weights):-2]
    first_order = recipe_gradient(model, step_weights, second_order=False)[len(model.weights):-2]

    def loss():
        return recipe.fast_adapt(model, *task(), step_weights, second_order=True)[0].item()

    h, worst, gap = 1e-6, 0.0, 0.0
    for rate, grad, grad_first in zip(model.lrs.values(), ours, first_order):
        for k in range(STEPS):
            with torch.no_grad():
                rate[k] += h
            up = loss()
            with torch.no_grad():
                rate[k] -= 2 * h
            down = loss()
            with torch.no_grad():
                rate[k] += h
            numeric = (up - down) / (2 * h)
            worst = max(worst, abs(numeric - grad[k].item()))
            gap = max(gap, abs(numeric - grad_first[k].item()))
    assert worst < 1e-7
    assert gap > 1e-3  # the check tells first from second order


def test_msl_weights_sum_to_one_and_anneal_to_the_last_step():
    for steps in (1, 2, 5):
        schedule = [recipe.msl_weights(i, steps, 100) for i in range(1, 131)]
        for w in schedule:
            assert abs(sum(w) - 1) < 1e-12 and min(w) >= 0
        assert schedule[0] == pytest.approx([1 / steps] * steps)  # uniform at the start
        for before, after in zip(schedule, schedule[1:]):
            assert all(b >= a for b, a in zip(before[:-1], after[:-1])) and after[-1] >= before[-1]
        assert schedule[-1] == [0.0] * (steps - 1) + [1.0]  # after the annealing: last step only
    w = recipe.msl_weights(51, 5, 100)  # half-way: earlier steps at half their start
    assert w == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6])
    assert recipe.msl_weights(100, 5, 100) == pytest.approx([0.006] * 4 + [0.976])  # floor 0.03 / steps
    assert recipe.msl_weights(1, 5, 0) == [0.0] * 4 + [1.0]  # msl_iterations=0: no MSL


def test_per_step_batch_norm_statistics_and_non_transductive_prediction():
    cfg = recipe.Config(hidden_size=8, adaptation_steps=2, test_adaptation_steps=3, device="cpu")
    torch.manual_seed(0)
    model = recipe.build_model(cfg)
    sx, qx = torch.rand(5, 1, 28, 28), torch.rand(10, 1, 28, 28)
    sy, qy = torch.arange(5), torch.arange(5).repeat(2)
    recipe.fast_adapt(model, sx, sy, qx, qy, [0.5, 0.5], second_order=False)
    means = model.running_mean  # [layer, step set, channel]: sets 0, 1, 2 each collected separately
    assert all((means[:, k] != 0).all() for k in range(3))
    assert all(not torch.allclose(means[:, a], means[:, b]) for a, b in ((0, 1), (1, 2), (0, 2)))

    # on running statistics a query's logits do not depend on the other queries; on batch statistics they do
    running = recipe.Predictor(dataclasses.replace(cfg, transductive=False), model, torch.device("cpu"))
    alone, together = running.predict(sx, sy, qx[:1]), running.predict(sx, sy, qx)[:1]
    assert torch.allclose(alone, together, atol=1e-5)
    transductive = recipe.Predictor(cfg, model, torch.device("cpu"))
    assert not torch.allclose(transductive.predict(sx, sy, qx[:1]), transductive.predict(sx, sy, qx)[:1], atol=1e-3)


def test_the_test_averages_the_logits_of_the_best_validations_weights():
    """The model keeps the weights of its `ensemble` best validations; the Predictor adapts each
    of them to the support set and averages their query logits (the authors' code's test),
    task by task and batched alike: against each kept network, rebuilt alone, averaged by hand."""
    cfg = recipe.Config(ways=3, shots=2, queries=3, hidden_size=4, adaptation_steps=STEPS, test_adaptation_steps=2,
                        ensemble=3, device="cpu")
    torch.manual_seed(0)
    model = recipe.Conv4PerStep(1, 3, hidden_size=4, side=1, steps=STEPS, fast_lr=0.2, keep=3).double()
    states, kept = {}, []
    for score in (0.5, 0.7, 0.6, 0.8, 0.4):  # validations of a run: new weights each time
        with torch.no_grad():
            for t in [*model.parameters(), model.running_mean]:
                t.copy_(torch.randn_like(t) * 0.3 + (1 if t is model.bn_weight else 0))
        states[score] = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("kept")}
        kept.append(model.keep(score))
    assert kept == [True, True, True, True, False]  # 0.4 ranks below the three kept
    assert sorted(model.kept_scores.tolist(), reverse=True) == [0.8, 0.7, 0.6]
    members = model.ensemble()
    for member, score in zip(members, (0.8, 0.7, 0.6)):  # best first, each with its own weights
        assert all(torch.equal(member.state_dict()[k], v) for k, v in states[score].items())

    sx, sy, qx, _ = task()
    logits = []
    for score in (0.8, 0.7, 0.6):
        alone = recipe.Conv4PerStep(1, 3, hidden_size=4, side=1, steps=STEPS, fast_lr=0.2).double()
        alone.load_state_dict({**alone.state_dict(), **states[score]})
        logits.append(recipe.Predictor(cfg, alone, torch.device("cpu"), single=True).predict(sx, sy, qx))
    expected = sum(logits) / 3
    predictor = recipe.Predictor(cfg, model, torch.device("cpu"))
    assert torch.allclose(predictor.predict(sx, sy, qx), expected, atol=1e-10)
    batched = predictor.predict_tasks(torch.stack([sx, sx.flip(0)]), torch.stack([sy, sy.flip(0)]), qx[None].repeat(2, 1, 1, 1, 1))
    assert torch.allclose(batched[0], expected, atol=1e-8)
    # validation in training scores the network as it is (the last weights, 0.4's, not kept);
    # a network with nothing kept yet is tested as it is
    last = recipe.Conv4PerStep(1, 3, hidden_size=4, side=1, steps=STEPS, fast_lr=0.2, keep=3).double()
    last.load_state_dict({**last.state_dict(), **states[0.4]})
    single = recipe.Predictor(cfg, model, torch.device("cpu"), single=True).predict(sx, sy, qx)
    assert torch.equal(single, recipe.Predictor(cfg, last, torch.device("cpu")).predict(sx, sy, qx))
    assert not torch.allclose(single, expected, atol=1e-3)
    with pytest.raises(UserError, match="ensemble=0 is out of range: it must be >= 1"):
        recipe.Config(ensemble=0)


def test_variants_are_registered_with_the_papers_settings():
    names = registry.list_recipes("mamlpp-*")
    assert names == [f"mamlpp-{d}-{s}" for d in ("cifar-fs", "fc100", "mini-imagenet") for s in ("5w1s", "5w5s")] \
        + [f"mamlpp-omniglot-{s}" for s in ("5w1s", "5w5s", "20w1s", "20w5s")] \
        + ["mamlpp-tiered-imagenet-5w1s", "mamlpp-tiered-imagenet-5w5s"]
    omniglot, mini = registry.get_recipe("mamlpp-omniglot-20w1s"), registry.get_recipe("mamlpp-mini-imagenet-5w5s")
    assert (omniglot.published.accuracy, omniglot.published.ci95) == (97.65, 0.05)
    assert (mini.published.accuracy, mini.published.ci95) == (68.32, 0.44)
    assert omniglot.config().hidden_size == 64 and mini.config().hidden_size == 48
    assert omniglot.config().iterations == 100 * 500 and omniglot.config().first_order_iterations == 50 * 500
    with pytest.raises(UserError, match="need 0 <= min_meta_lr <= meta_lr: lower --set min_meta_lr"):
        recipe.Config(min_meta_lr=0.1)
    with pytest.raises(UserError, match="msl_iterations=-1 is out of range"):
        recipe.Config(msl_iterations=-1)


def test_mamlpp_learns_on_omniglot(tmp_path, data_root):
    """50 meta-iterations of 4 tasks, MSL over the first 25 and second order after 25; two inner
    steps (the paper's 2-step MAML++ setting) keep the run short. An untrained network already
    reaches ~40% after its two steps, so the trained one is compared with it on the same test tasks
    (measured: 42% untrained, 53% trained; with 5 steps the untrained network reaches 64%)."""
    recipe_ = registry.get_recipe("mamlpp-omniglot-5w1s")
    cfg = dataclasses.replace(recipe_.config(), iterations=50, meta_batch_size=4, adaptation_steps=2,
                              test_adaptation_steps=2, msl_iterations=25, first_order_iterations=25,
                              val_interval=50, val_episodes=10, queries=5, test_episodes=60, device="cpu")
    tasks = data.fixed_taskset(data.load_split("omniglot", "test", data_root), 5, 1, 5, 60, cfg.test_seed)
    torch.manual_seed(cfg.seed)
    untrained = harness.evaluate(recipe.Predictor(cfg, recipe.build_model(cfg), torch.device("cpu")), tasks,
                                 shots=1, progress=False)["accuracy"]
    run = harness.Run(tmp_path / "run", recipe_.name, cfg, torch.device("cpu"), data_root=data_root, progress=False)
    recipe.train(cfg, run)
    result = harness.meta_test(run.path, device="cpu", data_root=data_root, progress=False)
    assert result["accuracy"] > 0.45 and result["accuracy"] > untrained + 0.05, (result, untrained)

    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["second_order"] for r in logged] == [0, 0, 1, 1, 1]  # DA: first order up to iteration 25
    assert [r["last_step_weight"] for r in logged] == [pytest.approx(recipe.msl_weights(r["iteration"], 2, 25)[-1])
                                                       for r in logged]
    assert all(a["meta_lr"] > b["meta_lr"] for a, b in zip(logged, logged[1:]))  # cosine annealing


def test_interrupted_run_resumes_to_identical_weights(tmp_path, data_root):
    """A run stopped after its first iteration (time budget) and resumed ends where an
    uninterrupted one does: weights, rates, per-step BN statistics, the cosine schedule and the
    kept validations' weights (every iteration validates: the first one's are kept before the
    stop), and best.pt holds the kept weights."""
    recipe_ = registry.get_recipe("mamlpp-omniglot-5w1s")
    cfg = dataclasses.replace(recipe_.config(), hidden_size=8, adaptation_steps=2, test_adaptation_steps=2,
                              meta_batch_size=2, iterations=4, msl_iterations=2, first_order_iterations=2,
                              val_interval=1, val_episodes=2, device="cpu")
    device = torch.device("cpu")
    straight = harness.Run(tmp_path / "a", recipe_.name, cfg, device, data_root=data_root, progress=False)
    saves, save = [], straight.save
    straight.save = lambda name, *args, **kwargs: saves.append(name) or save(name, *args, **kwargs)
    recipe.train(cfg, straight)
    assert saves.count("best.pt") == 4  # once per validation that changed the kept weights
    stopped = harness.Run(tmp_path / "b", recipe_.name, cfg, device, data_root=data_root, progress=False, max_minutes=0)
    recipe.train(cfg, stopped)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["iteration"] == 1
    resumed = harness.Run.resume(tmp_path / "b", device, data_root=data_root, progress=False)
    recipe.train(resumed.cfg, resumed)
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in "ab")
    assert a["iteration"] == b["iteration"] == 4 and a["scheduler"] == b["scheduler"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert (a["model"]["kept_scores"] >= 0).sum() == 4  # the 4 validations, all among the 5 kept
    best = torch.load(tmp_path / "b" / "best.pt", weights_only=True)["model"]
    assert torch.equal(best["kept"], b["model"]["kept"])


# ----------------------------------------------------------------------------- engine=fast

def _distinct_model(channels, ways, side, steps, seed=0):
    """Float64 Conv4PerStep (8 filters) with distinct rates, BN weights, biases and running
    statistics for every step, so that a mixed-up step or BN set shows."""
    torch.manual_seed(seed)
    model = recipe.Conv4PerStep(channels, ways, hidden_size=8, side=side, steps=steps, fast_lr=0.2).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for lr in model.lrs.values():
            lr.copy_(torch.rand(steps, generator=g, dtype=torch.float64) * 0.3 + 0.05)
        model.bn_weight.copy_(1 + 0.3 * torch.randn(model.bn_weight.shape, generator=g, dtype=torch.float64))
        model.bn_bias.copy_(0.3 * torch.randn(model.bn_bias.shape, generator=g, dtype=torch.float64))
        model.running_mean.copy_(0.1 * torch.randn(model.running_mean.shape, generator=g, dtype=torch.float64))
        model.running_var.copy_(1 + torch.rand(model.running_var.shape, generator=g, dtype=torch.float64))
    return model


def _tasks(count, ways, shots, queries, shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        sy, qy = torch.randperm(ways, generator=g).repeat(shots), torch.arange(ways).repeat(queries)
        tasks.append((torch.rand(len(sy), *shape, generator=g, dtype=dtype), sy,
                      torch.rand(len(qy), *shape, generator=g, dtype=dtype), qy))
    return tasks


def _loop(model, tasks, step_weights, second_order):
    """The recipe's engine=reference meta-batch: (gradients, loss sum, accuracy sum)."""
    model.zero_grad()
    loss_sum = accuracy_sum = 0.0
    for sx, sy, qx, qy in tasks:
        loss, accuracy = recipe.fast_adapt(model, sx, sy, qx, qy, step_weights, second_order)
        (loss / len(tasks)).backward()
        loss_sum, accuracy_sum = loss_sum + loss.item(), accuracy_sum + accuracy.item()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss_sum, accuracy_sum


def _fast(model, tasks, step_weights, second_order):
    model.zero_grad()
    stacked = tuple(torch.stack(part) for part in zip(*tasks))
    loss_sum, accuracy_sum = fast_mamlpp.meta_batch(model, stacked, step_weights, second_order, 1 / len(tasks))
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss_sum, accuracy_sum


@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("step_weights", [[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
@pytest.mark.parametrize("channels,size,ways,shots", [(1, 28, 5, 1), (1, 28, 20, 1), (3, 32, 5, 2)])
def test_fast_meta_batch_equals_the_loop(channels, size, ways, shots, step_weights, second_order):
    """engine=fast's meta-gradient of every parameter (conv weights, head, BN weights and biases,
    rates), its loss and accuracy sums and the per-step running statistics it leaves equal the
    per-task loop's, in float64 (RGB 32x32: features of 2x2 positions flattened into the head)."""
    tasks = _tasks(4, ways, shots, 2, (channels, size, size), seed=3)
    reference, ours = (_distinct_model(channels, ways, size // 16, len(step_weights)) for _ in range(2))
    expected, got = _loop(reference, tasks, step_weights, second_order), _fast(ours, tasks, step_weights, second_order)
    for name, grad in expected[0].items():
        assert torch.allclose(got[0][name], grad, rtol=1e-9, atol=1e-12), name
    assert got[1] == pytest.approx(expected[1], rel=1e-12) and got[2] == pytest.approx(expected[2], rel=1e-6)
    assert torch.allclose(ours.running_mean, reference.running_mean, rtol=1e-12, atol=1e-14)
    assert torch.allclose(ours.running_var, reference.running_var, rtol=1e-12, atol=1e-14)
    moved = ours.running_mean != _distinct_model(channels, ways, size // 16, len(step_weights)).running_mean
    assert moved.all()  # every set of every layer was updated: the comparison is not vacuous
    if second_order:  # second order really differs from first order
        first = _fast(ours, tasks, step_weights, False)[0]
        assert max((first[n] - got[0][n]).abs().max() for n in first) > 1e-4


def test_fast_meta_gradient_float32(data_root):
    """Real Omniglot 5w1s tasks, 64 filters, meta-batch 8, 5 steps, MSL uniform, second order, in
    float32: measured against float64, the fast path's meta-gradient and running statistics are
    no farther off than twice the loop's own, plus 1e-6 and 2e-5 of the largest value: float32
    sums round with the order of the reduction, which the thread count changes (the loop's
    running means were 1.6e-6 off at values of 0.01, the fast path's 0.8e-6; on the rate of
    conv3's weight, gradient 0.69, the loop's error was 3.6e-6 with 2 threads and 9.1e-6 with 1,
    the fast path's 8.5e-6 with either: rounding, where a wrong term would be off by ~1e-2)."""
    tasks_ = data.taskset(data.load_split("omniglot", "train", data_root), 5, 1, 1)
    random.seed(0)
    tasks = [data.split_support_query(*tasks_.sample(), 1) for _ in range(8)]
    cfg = recipe.Config(device="cpu")
    torch.manual_seed(0)
    model = recipe.build_model(cfg)
    ours, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    step_weights = recipe.msl_weights(1, cfg.adaptation_steps, cfg.msl_iterations)
    reference, got = _loop(model, tasks, step_weights, True)[0], _fast(ours, tasks, step_weights, True)[0]
    exact = _loop(model64, [tuple(t.double() if t.is_floating_point() else t for t in task) for task in tasks],
                  step_weights, True)[0]
    for statistics in ("running_mean", "running_var"):
        reference[statistics], got[statistics], exact[statistics] = (getattr(m, statistics)
                                                                     for m in (model, ours, model64))
    for name in exact:
        fast_error = (got[name].double() - exact[name]).abs().max().item()
        reference_error = (reference[name].double() - exact[name]).abs().max().item()
        assert fast_error <= 2 * reference_error + 2e-5 * exact[name].abs().max().item() + 1e-6, name
