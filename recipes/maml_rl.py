"""MAML for reinforcement learning: 2D navigation (Finn, Abbeel & Levine, ICML 2017, Section 5.3).

A point agent starts at the origin and must reach a goal drawn uniformly from [-0.5, 0.5]^2;
each step it moves by its action (clipped to [-0.1, 0.1]) and receives minus its distance to
the goal. Environment: learn2learn's `Particles2DEnv`, one copy per trajectory, stepped in
lockstep. Policy: a Gaussian whose mean is an MLP (two hidden layers of 100 ReLU units) and
whose log standard deviation is a learned vector, as in the paper.

Inner loop (the paper's): one policy-gradient (REINFORCE) step, fast_lr 0.1, on 20 trajectories
of horizon 100 sampled with the current policy; advantages are discounted returns (gamma 0.99)
minus a linear feature baseline fitted to the same trajectories (Duan et al. 2016's features),
normalised. Outer loop: 20 tasks per meta-batch; for each, new trajectories from the adapted
policy and their policy-gradient loss, back-propagated through the inner step (second order).
The paper's outer optimiser is TRPO; this recipe uses Adam on that meta-loss instead (as
learn2learn's `maml_trpo` example offers a plain-gradient variant), which keeps the loop short;
the returns are not directly comparable to the paper's TRPO-trained curves.

Evaluation: on fixed goals, the average return of 20 trajectories before adaptation
(`before_return`) and after `test_adaptation_steps` policy-gradient steps (`return`, which
selects the best weights). The paper reports 2D navigation as a curve (Figure 5: return
against number of gradient steps), no table.

Reproduce:
    l2l-recipes run maml-rl-particles2d
"""
import sys
from dataclasses import dataclass

import learn2learn as l2l
import numpy as np
import torch
from learn2learn.gym.envs.particles import Particles2DEnv
from torch import nn
from tqdm import tqdm

from l2l_recipes.config import check, validate
from l2l_recipes.errors import UserError
from l2l_recipes.harness import Predictor as _Predictor
from l2l_recipes.plain import mean_ci95, seed_everything
from l2l_recipes.registry import register


@dataclass(frozen=True)
class Config:
    # tasks
    trajectories: int = 20  # per task, for each adaptation step and for the meta-loss
    horizon: int = 100
    gamma: float = 0.99
    # policy
    hidden_size: int = 100
    # inner loop
    adaptation_steps: int = 1
    test_adaptation_steps: int = 1
    fast_lr: float = 0.1
    first_order: bool = False
    # outer loop
    meta_batch_size: int = 20
    meta_lr: float = 1e-3
    iterations: int = 500
    # validation and test
    val_interval: int = 50
    val_episodes: int = 40  # fixed goals
    val_seed: int = 1
    test_episodes: int = 100
    test_seed: int = 0
    # system
    seed: int = 42
    device: str = "auto"
    log_interval: int = 1

    def __post_init__(self):
        validate(self)
        check(0 < self.gamma <= 1, f"gamma={self.gamma} is out of range: it must be in (0, 1]")


class GaussianPolicy(nn.Module):
    """Actions ~ Normal(mlp(observation), exp(log_std))."""

    def __init__(self, observation_size, action_size, hidden_size):
        super().__init__()
        self.mean = nn.Sequential(nn.Linear(observation_size, hidden_size), nn.ReLU(),
                                  nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                  nn.Linear(hidden_size, action_size))
        self.log_std = nn.Parameter(torch.zeros(action_size))

    def forward(self, observations):
        return torch.distributions.Normal(self.mean(observations), self.log_std.exp())


def build_model(cfg):
    return GaussianPolicy(2, 2, cfg.hidden_size)


def rollout(policy, envs, goal, horizon, device, generator=None):
    """Run one trajectory per env towards `goal`; observations [T, n, 2], actions [T, n, 2],
    rewards [T, n] and a mask [T, n] that is 0 after a trajectory reached the goal."""
    for env in envs:
        env.set_task({"goal": goal})
    observation = torch.from_numpy(np.stack([env.reset() for env in envs])).float()
    alive = torch.ones(len(envs))
    observations, actions, rewards, masks = [], [], [], []
    for _ in range(horizon):
        with torch.no_grad():
            dist = policy(observation.to(device))
            action = dist.mean + dist.stddev * torch.randn(dist.mean.shape, generator=generator).to(device)
        action = action.cpu()
        steps = [env.step(a) for env, a in zip(envs, action.numpy().astype(np.float32))]
        observations.append(observation)
        actions.append(action)
        rewards.append(torch.tensor([s[1] for s in steps], dtype=torch.float32) * alive)
        masks.append(alive)
        alive = alive * torch.tensor([not s[2] for s in steps], dtype=torch.float32)
        observation = torch.from_numpy(np.stack([s[0] for s in steps])).float()
    return tuple(torch.stack(t).to(device) for t in (observations, actions, rewards, masks))


def advantages(observations, rewards, masks, gamma):
    """Discounted returns minus a linear feature baseline fitted to them, normalised."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running * masks[t]
        returns[t] = running
    # Duan et al.'s features: observation, its square, time and its powers, a constant
    steps = len(rewards)
    time = (torch.arange(steps, dtype=torch.float32, device=rewards.device) / 100).view(-1, 1, 1)
    time = time.expand(steps, rewards.shape[1], 1)
    obs = observations.clamp(-10, 10)
    features = torch.cat([obs, obs ** 2, time, time ** 2, time ** 3, torch.ones_like(time)], dim=2)
    x, y, w = features.reshape(-1, features.shape[2]), returns.reshape(-1, 1), masks.reshape(-1, 1)
    ridge = 1e-5 * torch.eye(x.shape[1], device=x.device)
    coefficients = torch.linalg.solve((x * w).T @ x + ridge, (x * w).T @ y)
    advantage = (returns - (x @ coefficients).view_as(returns)) * masks
    valid = masks.bool()
    mean, std = advantage[valid].mean(), advantage[valid].std()
    return ((advantage - mean) / (std + 1e-8)) * masks


def policy_gradient_loss(policy, batch, gamma):
    """REINFORCE surrogate: minus the mean of log pi(a|s) times the advantage over live steps."""
    observations, actions, rewards, masks = batch
    advantage = advantages(observations, rewards, masks, gamma)
    log_prob = policy(observations).log_prob(actions).sum(dim=2)
    return -(log_prob * advantage).sum() / masks.sum()


def average_return(batch):
    return batch[2].sum(dim=0).mean().item()


def fixed_goals(count, seed):
    """`count` goals ~ U[-0.5, 0.5]^2 (the environment's task distribution), the same for a seed."""
    return list(np.random.default_rng(seed).uniform(-0.5, 0.5, size=(count, 2)))


class Predictor(_Predictor):
    metric = "return"

    def predict(self, support_x, support_y, query_x):
        raise UserError("a meta-RL policy has no support/query predict(); use `l2l-recipes eval` for returns")

    def test_tasks(self, episodes, seed):
        return fixed_goals(episodes, seed)

    def evaluate(self, tasks, desc="eval", progress=True):
        """Average return per goal before adaptation and after test_adaptation_steps steps.
        Not split under torchrun: one noise generator runs through the goals in order, so every
        process evaluates them all (the same result everywhere)."""
        cfg = self.cfg
        envs = [Particles2DEnv() for _ in range(cfg.trajectories)]
        generator = torch.Generator().manual_seed(0)  # the same action noise for every evaluation
        before, after = [], []
        for goal in tqdm(tasks, desc=desc, leave=False, disable=not progress):
            learner = l2l.algorithms.MAML(self.model, lr=cfg.fast_lr, first_order=True).clone()
            batch = rollout(learner, envs, goal, cfg.horizon, self.device, generator)
            before.append(average_return(batch))
            for _ in range(cfg.test_adaptation_steps):
                with torch.enable_grad():
                    learner.adapt(policy_gradient_loss(learner, batch, cfg.gamma))
                batch = rollout(learner, envs, goal, cfg.horizon, self.device, generator)
            after.append(average_return(batch))
        mean, ci95 = mean_ci95(after)
        before_mean, before_ci95 = mean_ci95(before)
        return {"return": mean, "ci95": ci95, "before_return": before_mean, "before_ci95": before_ci95}


def train(cfg, run):
    seed_everything(cfg.seed)
    device = run.device
    envs = [Particles2DEnv() for _ in range(cfg.trajectories)]
    val_goals = fixed_goals(cfg.val_episodes, cfg.val_seed)

    policy = build_model(cfg).to(device)
    maml = l2l.algorithms.MAML(policy, lr=cfg.fast_lr, first_order=cfg.first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=cfg.meta_lr)
    run.track(policy, optimizer)  # checkpointed (and restored by l2l-recipes run --resume)
    for iteration in run.iterations(cfg.iterations):
        # meta-batch: per goal, adapt on trajectories of the current policy, then the
        # policy-gradient loss of trajectories from the adapted policy is the meta-loss
        # (under torchrun each process trains its share of the goals; the rollouts draw
        # from the same torch generator, so the goals differ from one process's but are
        # distinct across processes)
        optimizer.zero_grad(set_to_none=True)
        before = after = 0.0
        for i in range(cfg.meta_batch_size):
            goal = (torch.rand(2) - 0.5).numpy()  # the environment's own task distribution
            if not run.mine(i):
                continue
            learner = maml.clone()
            batch = rollout(learner, envs, goal, cfg.horizon, device)
            before += average_return(batch) / cfg.meta_batch_size
            for _ in range(cfg.adaptation_steps):
                learner.adapt(policy_gradient_loss(learner, batch, cfg.gamma))
                batch = rollout(learner, envs, goal, cfg.horizon, device)
            after += average_return(batch) / cfg.meta_batch_size
            (policy_gradient_loss(learner, batch, cfg.gamma) / cfg.meta_batch_size).backward()
        run.reduce_gradients(maml.parameters())  # sum of the processes' shares
        optimizer.step()

        if iteration % cfg.log_interval == 0:
            before, after = run.total(before, after)
            run.log(iteration, return_before=before, return_after=after)

        # validate on the fixed goals (highest return after adaptation is kept), checkpoint
        if run.validation_due(iteration, cfg.val_interval, cfg.iterations):
            run.validate(iteration, Predictor(cfg, policy, device), val_goals)
    return policy


# ----------------------------------------------------------------------------- variants

@register
def maml_rl_particles2d():
    """MAML (policy gradient), 2D navigation to a random goal, learn2learn's Particles2D."""
    return Config()


if __name__ == "__main__":
    from l2l_recipes.cli import main
    main(["run", *sys.argv[1:]])
