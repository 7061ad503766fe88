"""Reptile's fast path (l2l_recipes/fast_reptile.py) against the copy-per-task loop, on real Omniglot.

Conv biases are compared apart: each is followed by batch norm, so its exact gradient is 0 and
both engines compute rounding noise (~1e-17 in float64), which Adam divides by its own size
plus eps = 1e-8: they move by noise alone (~1e-9 in float64, ~lr in float32) and change nothing.
"""
import copy
import dataclasses
import json
import random

import pytest
import torch

from l2l_recipes import data, harness, plain, registry

reptile = registry.get_recipe("reptile-omniglot-5w1s").load_module()


def _meta_batch(split, ways=5, shots=10, tasks=5, seed=0):
    """x [tasks, ways * shots, 1, 28, 28], y [tasks, ways * shots]: real training tasks."""
    taskset = data.taskset(split, ways, shots, 0)
    random.seed(seed)
    return tuple(map(torch.stack, zip(*(taskset.sample() for _ in range(tasks)))))


def _model(dtype, state="carried"):
    """The recipe's model; state "carried": with a carried inner Adam state (as after 40 steps),
    "zero": the state a run starts from, "fresh": without one (carry_adam=False)."""
    torch.manual_seed(0)
    model = reptile.build_model(reptile.Config(carry_adam=state != "fresh")).to(dtype)
    if state == "carried":
        for v in reptile.carried_state(model)[0]:
            v.copy_(torch.rand_like(v) * 1e-4)
        model.adam_step.fill_(40)
    return model


def _both_engines(model, x, y, steps, batch_size):
    """(reference, fast): each engine's adapted weights, second moments and last loss per task,
    in the same mini-batch orders."""
    generator = torch.Generator().manual_seed(1)
    orders = [torch.randperm(y.shape[1], generator=generator) for _ in range(len(y))]
    return [reptile.adapt_copies(model, zip(x, y), orders, steps, batch_size, 1e-3),
            reptile.adapt_fast(model, x, y, orders, steps, batch_size, 1e-3)]


def _is_conv_bias(name):
    return name.endswith("conv.bias")


@pytest.mark.parametrize("steps,batch_size,state", [(5, 10, "carried"), (7, 15, "zero"), (5, 10, "fresh")])
def test_adapted_weights_and_outer_step_equal_the_loop_float64(splits, steps, batch_size, state):
    """(5, 10) is the paper's; (7, 15) cycles with a short last batch."""
    model = _model(torch.float64, state)
    x, y = _meta_batch(splits["train"])
    x = x.double()
    (ref_weights, ref_squares, ref_losses), (fast_weights, fast_squares, fast_losses) = \
        _both_engines(model, x, y, steps, batch_size)
    assert fast_losses == pytest.approx(ref_losses, rel=1e-12)
    names = [name for name, _ in model.named_parameters()]
    for ref_task, fast_task, ref_moments, fast_moments in zip(ref_weights, fast_weights, ref_squares, fast_squares,
                                                              strict=True):
        for name, r, f, p, rm, fm in zip(names, ref_task, fast_task, model.parameters(), ref_moments, fast_moments,
                                         strict=True):
            if _is_conv_bias(name):
                assert f.abs().max() < 1e-7 and r.abs().max() < 1e-7, name
            else:
                assert (r - p).abs().max() > 1e-4, name  # it did move
                assert (f - r).abs().max() <= 1e-9 * r.abs().max(), name
                assert (fm - rm).abs().max() <= 1e-9 * rm.abs().max(), name
    # Reptile's outer step from either engine's weights
    updated, one_process = [], plain.PlainRun("unwritten", "reptile-omniglot-5w1s", None, torch.device("cpu"))
    for adapted in (ref_weights, fast_weights):
        copy_ = copy.deepcopy(model)
        reptile.outer_step(copy_, adapted, 0.7, len(adapted), one_process)
        updated.append(dict(copy_.named_parameters()))
    for name, p in model.named_parameters():
        if not _is_conv_bias(name):
            r, f = updated[0][name].detach(), updated[1][name].detach()
            assert (r - p).abs().max() > 1e-4
            assert (f - r).abs().max() <= 1e-9 * r.abs().max(), name


def test_float32_fast_is_as_close_to_float64_as_the_loop(splits):
    """In float32 both engines round differently; against the float64 result the fast path's
    error is at most twice the loop's own (plus 1e-7). From a run's initial state: from a
    carried one, an element whose second moment is near 0 takes a full Adam step of the sign
    of its gradient's rounding on either engine (measured with random moments: after 5 steps
    one element 1.4e-4 off on the fast path, 9e-9 on the loop; in float64 both agree to 1e-9,
    test above)."""
    x, y = _meta_batch(splits["train"], seed=1)
    model = _model(torch.float32, "zero")
    (ref_weights, _, _), (fast_weights, _, _) = _both_engines(model, x, y, 5, 10)
    (exact, _, _), _ = _both_engines(model.double(), x.double(), y, 5, 10)
    names = [name for name, _ in model.named_parameters()]
    for ref_task, fast_task, exact_task in zip(ref_weights, fast_weights, exact):
        for name, r, f, e in zip(names, ref_task, fast_task, exact_task):
            if not _is_conv_bias(name):
                reference_error = (r.double() - e).abs().max().item()
                fast_error = (f.double() - e).abs().max().item()
                assert fast_error <= 2 * reference_error + 1e-7, name


def test_carried_state_with_one_task_is_the_official_codes_one_adam(splits):
    """With one task per meta-batch, the state carried across iterations is that of one
    torch.optim.Adam trained through the tasks one after another, the weights reset after each
    (openai/supervised-reptile); the outer step is left out (it does not touch the state)."""
    model = _model(torch.float64, "zero")
    sequential = copy.deepcopy(model)
    adam = torch.optim.Adam(sequential.parameters(), lr=1e-3, betas=(0.0, reptile.BETA2))
    one_process = plain.PlainRun("unwritten", "reptile-omniglot-5w1s", None, torch.device("cpu"))
    for seed in range(3):
        x, y = _meta_batch(splits["train"], tasks=1, seed=seed)
        order = torch.randperm(len(y[0]))
        _, squares, _ = reptile.adapt_copies(model, zip(x.double(), y), [order], 5, 10, 1e-3)
        reptile.carry_state(model, [0], squares, 5, 1, one_process)
        for i in range(5):
            batch = order[i * 10:(i + 1) * 10]
            adam.zero_grad()
            torch.nn.functional.cross_entropy(sequential(x[0, batch].double()), y[0, batch]).backward()
            adam.step()
        sequential.load_state_dict(model.state_dict())  # the weights reset (to unchanged ones here)
    carried, step = reptile.carried_state(model)
    assert step == 15 == int(adam.state[next(sequential.parameters())]["step"])
    for v, (name, p) in zip(carried, sequential.named_parameters()):
        if not _is_conv_bias(name):  # their gradients are rounding noise (~1e-15), see above
            expected = adam.state[p]["exp_avg_sq"]
            assert expected.abs().max() > 1e-8, name
            assert (v - expected).abs().max() <= 1e-12 * expected.abs().max(), name


def test_carried_state_composes_the_tasks_in_order():
    """Tasks 0 and 1 each reached v_k = d v + c_k from the state v (d = BETA2^steps): the state
    after them is what running task 0 then task 1 gives, d^2 v + d c_0 + c_1, whichever order
    this process holds them in; the step count advances by steps x tasks."""
    model = _model(torch.float64, "carried")
    v = [t.clone() for t in reptile.carried_state(model)[0]]
    d = reptile.BETA2 ** 3
    c = [[torch.rand_like(t) for t in v] for _ in range(2)]
    reached = [[d * t + ck for t, ck in zip(v, c[k])] for k in range(2)]
    one_process = plain.PlainRun("unwritten", "reptile-omniglot-5w1s", None, torch.device("cpu"))
    reptile.carry_state(model, [1, 0], reached[::-1], 3, 2, one_process)
    squares, step = reptile.carried_state(model)
    assert step == 40 + 6
    for got, t, c0, c1 in zip(squares, v, *c):
        assert torch.allclose(got, d * d * t + d * c0 + c1, rtol=1e-12, atol=0)


def test_batched_evaluation_scores_each_task_as_the_loop(splits, monkeypatch):
    """engine=fast adapts chunks of tasks at once (here 3 per chunk, 7 tasks); each task's
    query accuracy is the loop's (engine=reference, task by task), its loss within rounding."""
    cfg = dataclasses.replace(reptile.Config(), test_adaptation_steps=20)
    tasks = data.fixed_taskset(splits["val"], cfg.ways, cfg.shots, cfg.queries, 7, 1)
    model = _model(torch.float32)
    fast = reptile.Predictor(cfg, model, torch.device("cpu"))
    reference = reptile.Predictor(dataclasses.replace(cfg, engine="reference"), model, torch.device("cpu"))
    monkeypatch.setattr(harness, "ACTIVATIONS_AT_ONCE", 3 * 80 * cfg.hidden_size * 28 * 28)  # 3 tasks of 80 images
    got = harness.task_scores(fast, tasks, list(range(7)), cfg.shots)
    expected = []
    for i in range(7):
        sx, sy, qx, qy = data.split_support_query(*tasks[i], cfg.shots)
        logits = reference.predict(sx, sy, qx)
        expected.append(((logits.argmax(1) == qy).float().mean().item(),
                         torch.nn.functional.cross_entropy(logits, qy).item()))
    assert [a for a, _ in got] == [a for a, _ in expected]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-2)
    assert len({a for a, _ in got}) > 1  # the tasks differ: a mix-up of tasks would show
    # the result in harness.evaluate's form, and predict() for one task on the same path
    result = fast.evaluate(tasks, progress=False)
    assert result["accuracy"] == pytest.approx(sum(a for a, _ in got) / 7)
    sx, sy, qx, qy = data.split_support_query(*tasks[4], cfg.shots)
    assert (fast.predict(sx, sy, qx).argmax(1) == qy).float().mean().item() == got[4][0]


def test_evaluation_refuses_other_ways(splits):
    from l2l_recipes.errors import UserError
    cfg = reptile.Config()
    tasks = data.fixed_taskset(splits["val"], 3, 1, 2, 2, 1)
    with pytest.raises(UserError, match="5-way head; got a 3-way task"):
        reptile.Predictor(cfg, _model(torch.float32), torch.device("cpu")).evaluate(tasks, progress=False)


def _train(tmp_path, data_root, **changes):
    cfg = dataclasses.replace(reptile.Config(), **{"device": "cpu", "log_interval": 1, **changes})
    run = harness.Run(tmp_path / cfg.engine, "reptile-omniglot-5w1s", cfg, torch.device("cpu"),
                      data_root=data_root, progress=False)
    model = reptile.train(cfg, run)
    return model, [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]


def test_both_engines_train_alike(tmp_path, data_root):
    """The same tasks and mini-batches on both engines: equal losses, validation and weights
    up to float32 rounding. (Two iterations: float32 Reptile is chaotic beyond that, on either
    engine: Adam with beta1 = 0 turns the rounding of near-zero gradient components into full
    steps of either sign. Measured here: at iteration 3, the loop's weights move 1-2% (relative
    to each tensor's largest) from the float64 run when the initial weights are scaled by
    1 +- 1e-7, and the fast path's are 1-13% off, equal to the loop's for most perturbations.)
    How far the engines drift apart in two iterations depends on the machine's kernels: on a
    2-core AMD EPYC (family 23, 2026-12-05) the losses were 8e-4 and 1.1% apart, the weights up
    to 1.1e-3, the validation loss 3e-4, where earlier machines stayed within 1e-3 throughout;
    other tasks or mini-batches would change the first loss by far more than 0.5%."""
    changes = dict(iterations=2, val_interval=2, val_episodes=4, test_adaptation_steps=5)
    fast_model, fast_log = _train(tmp_path, data_root, engine="fast", **changes)
    reference_model, reference_log = _train(tmp_path, data_root, engine="reference", **changes)
    assert len(fast_log) == len(reference_log) == 3  # 2 iterations, 1 validation
    for f, r, tolerance in zip(fast_log[:2], reference_log[:2], (5e-3, 3e-2)):
        assert f["loss"] == pytest.approx(r["loss"], rel=tolerance)
    assert fast_log[2]["val_loss"] == pytest.approx(reference_log[2]["val_loss"], rel=1e-2)
    assert fast_log[2]["val_accuracy"] == pytest.approx(reference_log[2]["val_accuracy"], abs=0.01)
    reference = dict(reference_model.named_parameters())
    for name, p in fast_model.named_parameters():
        if not _is_conv_bias(name):
            assert (p - reference[name]).abs().max() < 5e-3, name


def test_fast_engine_learns(tmp_path, data_root):
    """A short real run on the default engine: validation accuracy well above chance (20%; the
    initial weights score 23% on these tasks, 39% after 40 iterations)."""
    assert reptile.Config().engine == "fast"
    _, log = _train(tmp_path, data_root, iterations=40, val_interval=40, val_episodes=10, log_interval=40)
    (validation,) = [m for m in log if "val_accuracy" in m]
    assert validation["val_accuracy"] > 0.33


def test_a_run_written_before_carry_adam_loads_as_it_ran(tmp_path):
    """A run folder whose config predates `carry_adam` (a fresh Adam per task, weights without the
    state's buffers) loads with carry_adam=False (config.OLDER_RUNS; a resume reads it the same way)."""
    cfg = reptile.Config(carry_adam=False, device="cpu")
    stored = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "carry_adam"}
    (tmp_path / "config.json").write_text(json.dumps({"recipe": "reptile-omniglot-5w1s", **stored}))
    torch.save({"format": plain.PlainRun.checkpoint_format, "recipe": "reptile-omniglot-5w1s", "config": stored,
                "iteration": 1, "model": reptile.build_model(cfg).state_dict()}, tmp_path / "best.pt")
    predictor = harness.load(tmp_path, device="cpu")
    assert predictor.cfg.carry_adam is False
    assert reptile.carried_state(predictor.model) == (None, 0)
