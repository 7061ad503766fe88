"""Recipes measured by something other than accuracy: MAML sine regression (MSE) and MAML
meta-RL on learn2learn's Particles2D (return). Short real runs through the same harness, CLI
and bench paths as the classifiers."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from l2l_recipes import bench, harness, registry

CPU = torch.device("cpu")


def _train(tmp_path, name, **changes):
    recipe = registry.get_recipe(name)
    cfg = dataclasses.replace(recipe.config(), device="cpu", **changes)
    run = harness.Run(tmp_path / name, recipe.name, cfg, CPU, progress=False)
    model = recipe.load_module().train(cfg, run)
    return recipe.load_module(), cfg, model, run


def test_sine_waves_follow_the_task_distribution():
    module = registry.get_recipe("maml-sine-5s").load_module()
    cfg = registry.get_recipe("maml-sine-5s").config()
    tasks = module.fixed_waves(cfg, 300, seed=3)
    assert all(sx.shape == (5, 1) and qx.shape == (100, 1) for sx, _, qx, _ in tasks)
    xs = torch.cat([torch.cat([sx, qx]) for sx, _, qx, _ in tasks])
    assert xs.min() >= -5 and xs.max() <= 5 and xs.min() < -4.9 and xs.max() > 4.9
    # y = A sin(x + b): the largest |y| of a wave is at most A <= 5, and some waves reach ~5
    peaks = torch.stack([torch.cat([sy, qy]).abs().max() for _, sy, _, qy in tasks])
    assert peaks.max() <= 5 and peaks.max() > 4.5 and peaks.min() < 1
    # the same seed gives the same waves, another seed other waves
    again = module.fixed_waves(cfg, 300, seed=3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(tasks, again))
    assert not torch.equal(tasks[0][1], module.fixed_waves(cfg, 1, seed=4)[0][1])


def test_maml_sine_learns_to_adapt(tmp_path):
    module, cfg, model, run = _train(tmp_path, "maml-sine-10s", iterations=500, val_interval=250,
                                     val_episodes=50)
    result = harness.meta_test(run.path, episodes=200, device="cpu", progress=False, out_name="result.json")
    assert result["metric"] == "mse" and result["higher_is_better"] is False
    curve = result["mse_by_step"]
    assert len(curve) == cfg.test_adaptation_steps + 1 and curve[0] == pytest.approx(result["before_mse"])
    assert curve[-1] == pytest.approx(result["mse"])
    # the same waves and steps from an untrained network: meta-training must beat it clearly
    untrained = module.Predictor(cfg, module.build_model(cfg), CPU)
    baseline = untrained.evaluate(untrained.test_tasks(200, cfg.test_seed), progress=False)
    assert result["mse"] < 0.6 * baseline["mse"], (result, baseline)
    assert result["mse"] < 0.5 * result["before_mse"], result  # adaptation helps
    # best.pt holds the weights with the lowest validation MSE
    metrics = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    vals = [m["val_mse"] for m in metrics if "val_mse" in m]
    best = harness.read_checkpoint(run.path / "best.pt")
    assert best["best_val_score"] == pytest.approx(-min(vals))


def test_rl_rollout_and_advantages():
    module = registry.get_recipe("maml-rl-particles2d").load_module()
    cfg = dataclasses.replace(module.Config(), hidden_size=8)
    policy = module.build_model(cfg)
    envs = [module.Particles2DEnv() for _ in range(4)]
    goal = np.array([0.3, -0.2])
    observations, actions, rewards, masks = module.rollout(policy, envs, goal, 30, CPU,
                                                           torch.Generator().manual_seed(0))
    assert observations.shape == (30, 4, 2) and actions.shape == (30, 4, 2) and rewards.shape == (30, 4)
    # the environment's dynamics: position += clip(action, -0.1, 0.1), reward = -distance to goal
    moved = observations[1:] - observations[:-1]
    assert torch.allclose(moved, actions[:-1].clamp(-0.1, 0.1), atol=1e-6)
    assert observations[0].abs().max() == 0
    position = observations[-1] + actions[-1].clamp(-0.1, 0.1)
    assert torch.allclose(rewards[-1], -(position - torch.tensor(goal, dtype=torch.float32)).norm(dim=1),
                          atol=1e-5)
    advantage = module.advantages(observations, rewards, masks, cfg.gamma)
    assert advantage[masks.bool()].mean().abs() < 1e-5 and abs(advantage[masks.bool()].std() - 1) < 1e-3


def test_rl_policy_gradient_matches_reinforce_by_hand():
    """The inner loss's gradient equals -mean(A * d log pi / d theta) computed per step."""
    module = registry.get_recipe("maml-rl-particles2d").load_module()
    cfg = dataclasses.replace(module.Config(), hidden_size=6)
    torch.manual_seed(0)
    policy = module.build_model(cfg)
    envs = [module.Particles2DEnv() for _ in range(3)]
    batch = module.rollout(policy, envs, np.array([0.1, 0.4]), 12, CPU, torch.Generator().manual_seed(1))
    policy, batch = policy.double(), tuple(t.double() for t in batch)
    loss = module.policy_gradient_loss(policy, batch, cfg.gamma)
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    observations, actions, rewards, masks = batch
    advantage = module.advantages(observations, rewards, masks, cfg.gamma)
    expected = [torch.zeros_like(p) for p in policy.parameters()]
    for t in range(observations.shape[0]):
        for i in range(observations.shape[1]):
            mean = policy.mean(observations[t, i])
            std = policy.log_std.exp()
            # log N(a; mean, std) written out, summed over the two action dimensions
            log_prob = (-(actions[t, i] - mean) ** 2 / (2 * std ** 2) - policy.log_std
                        - 0.5 * math.log(2 * math.pi)).sum()
            step = torch.autograd.grad(log_prob, list(policy.parameters()))
            for e, g in zip(expected, step):
                e -= advantage[t, i] * g / masks.sum()
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, atol=1e-10)


def test_maml_rl_runs_end_to_end_and_adaptation_improves_return(tmp_path):
    module, cfg, policy, run = _train(tmp_path, "maml-rl-particles2d", iterations=12, meta_batch_size=8,
                                      trajectories=10, horizon=50, val_interval=12, val_episodes=6,
                                      meta_lr=3e-3)
    result = harness.meta_test(run.path, episodes=16, device="cpu", progress=False, out_name="result.json")
    assert result["metric"] == "return" and result["episodes"] == 16
    # adaptation to each goal: one policy-gradient step clearly raises the return
    assert result["return"] > result["before_return"] + 2, result
    # and meta-training made the post-adaptation return better than the untrained policy's
    untrained = module.Predictor(cfg, module.build_model(cfg), CPU)
    baseline = untrained.evaluate(untrained.test_tasks(16, cfg.test_seed), progress=False)
    assert result["return"] > baseline["return"] + 2, (result, baseline)


def test_bench_records_non_accuracy_metrics(tmp_path):
    record = bench.bench_recipe("maml-sine-5s", seeds=1, episodes=20, assignments=["iterations=20",
                                "val_interval=10", "val_episodes=10", "meta_batch_size=4"], device="cpu",
                                runs_dir=tmp_path / "runs", results_dir=tmp_path / "results")
    assert record["metric"] == "mse" and record["higher_is_better"] is False and "ways" not in record
    seed = record["seeds"][0]
    assert seed["mse"] == record["mean_mse"] and "before_mse" in seed
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "maml-sine-5s").glob("bench-*/seed-1/metrics.jsonl")
               .__next__().read_text().splitlines()]
    vals = {m["iteration"]: m["val_mse"] for m in metrics if "val_mse" in m}
    assert sorted(vals) == [10, 20] and seed["best_val_mse"] == min(vals.values())  # lowest is best
    assert seed["best_val_iteration"] == min(vals, key=vals.get)
    bench.write_table(tmp_path / "results", tmp_path / "README.md")
    row = next(line for line in (tmp_path / "README.md").read_text().splitlines() if "`maml-sine-5s`" in line
               and "seed" in line)
    assert f"{record['mean_mse']:.3g}" in row and "mse" in row
