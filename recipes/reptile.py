"""Reptile (Nichol, Achiam & Schulman, 2018, arXiv:1803.02999).

A first-order meta-learner with its own outer update and no second-order terms: for each
task of a meta-batch, train a copy of the network with Adam (beta1 = 0) for a few steps on
mini-batches of the task's images, then move the initialisation towards the mean of the
adapted weights, theta <- theta + eps * (mean(phi) - theta), eps annealed linearly from
`outer_lr` to 0. At test the copy trains 50 steps on the support set and scores one query per class
as one batch (transductive batch norm; the official code's: 89.4% vs 86.2% with 15 on a checkpoint).

The inner Adam's state carries over (`carry_adam`), as in the official code
(openai/supervised-reptile, reptile.py: between tasks it resets only the trainable variables,
so Adam's second moments and step count run on through all tasks and iterations, and every
test-time adaptation starts from them). The state travels with the weights, as buffers of
the model (checkpoints, best.pt, `load`). Where ours differs: the official code runs a
meta-batch's tasks one after another, each continuing the state the previous one left; here
each task starts from the state at the start of the iteration, and the state then advances
as the sequential run would over the tasks' own steps (`carry_state`), so that the tasks can
run at once (the second moments average ~1,000 steps; a meta-batch is 25). Measured on
Omniglot 5w1s after 2,000 iterations (benchmarks/reptile_inner_adam.py, 100 validation tasks):
validation accuracy 0.689 with a fresh Adam per task (`--set carry_adam=False`; this recipe until
2026-12-05), 0.832 with the official code's sequential state, 0.840 with ours.

Settings: the commands of the official README (its archived version, "the commands used for
the paper"). Omniglot: inner Adam lr 1e-3, inner batch 10, 5 inner steps, 10 training shots,
meta-batch 5, outer step 1.0, 100K iterations, test 50 steps of batch 5 (20-way: lr 5e-4,
inner batch 20, 10 steps, 200K, test batch 10). mini-ImageNet: Conv4 (32 filters, max-pooling),
8 inner steps, 15 training shots, test batch 5 (1-shot) / 15 (5-shot).
Published (Tables 1 and 2, transductive): Omniglot 5w1s 97.68 ± 0.04, 5w5s 99.48 ± 0.06,
20w1s 89.43 ± 0.14, 20w5s 97.12 ± 0.32; mini-ImageNet 5w1s 49.97 ± 0.32, 5w5s 65.99 ± 0.58.

The copies run on `l2l_recipes.fast_reptile` by default: all tasks of a meta-batch (and of
a chunk of validation or test tasks) adapted at once as one grouped network, with each task's
Adam as tensor operations and its own mini-batch order, the same draws as the loop (adapted
weights equal to 1e-9 in float64: tests/test_reptile_fast.py); `--set engine=reference`
trains a deep copy per task. Measured (2026-12-04, commit 75149c9, 2-core AMD EPYC, torch 2.14.1,
OMP_NUM_THREADS=1, two other 1-thread runs on the machine), Omniglot 5w1s: a training
iteration 416 ms on the loop, 233 ms on the fast path (medians of 20, interleaved); a
200-task validation 146 s, 60 s. The paper budget (100,000 iterations, 100 validations, the
1,000-task test) projects to ~16 h on the loop and ~8 h on the fast path (convolutions
dominate both: CPU-bound, the batching saves the per-copy overhead only).

Reproduce:
    l2l-recipes run reptile-omniglot-5w1s --device cuda
"""
import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from l2l_recipes import data, fast, fast_reptile, models
from l2l_recipes.config import validate
from l2l_recipes.harness import Predictor as _Predictor
from l2l_recipes.plain import seed_everything
from l2l_recipes.registry import Published, register


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1  # support images per class at validation and test
    queries: int = 1  # query images per class at validation and test (the official code's evaluate())
    train_shots: int = 10  # images per class in a training task (all used by the inner loop)
    # model
    hidden_size: int = 64
    # inner loop
    inner_lr: float = 1e-3  # Adam, beta1 = 0
    inner_batch_size: int = 10
    adaptation_steps: int = 5
    test_adaptation_steps: int = 50
    test_batch_size: int = 5
    carry_adam: bool = True  # the inner Adam's state carries over between tasks and into test (the official code)
    # outer loop
    meta_batch_size: int = 5
    outer_lr: float = 1.0  # annealed linearly to 0 over `iterations`
    iterations: int = 100000
    # validation and test
    val_interval: int = 1000
    val_episodes: int = 200
    val_seed: int = 1
    test_episodes: int = 1000
    test_seed: int = 0
    # system
    engine: str = "fast"  # fast: l2l_recipes.fast_reptile (same adapted weights); reference: a copy per task
    seed: int = 42
    device: str = "auto"
    log_interval: int = 50

    def __post_init__(self):
        validate(self)


BETA2 = 0.999  # the inner Adam's (beta1 = 0)


def build_model(cfg):
    """MAML's Conv4 classifier, with buffers for the inner Adam's carried state if `carry_adam`:
    a second moment per parameter (`adam_sq_<parameter name>`) and the step count (`adam_step`)."""
    model = models.conv4_classifier(cfg.dataset, cfg.ways, cfg.hidden_size)
    if cfg.carry_adam:
        for name, p in list(model.named_parameters()):
            model.register_buffer("adam_sq_" + name.replace(".", "_"), torch.zeros_like(p.detach()))
        model.register_buffer("adam_step", torch.zeros((), dtype=torch.long))
    return model


def carried_state(model):
    """(second moments in `model.parameters()` order, step count) of `model`'s carried Adam state,
    or (None, 0): a fresh Adam."""
    if not hasattr(model, "adam_step"):
        return None, 0
    squares = [getattr(model, "adam_sq_" + name.replace(".", "_")) for name, _ in model.named_parameters()]
    return squares, int(model.adam_step)


def inner_train(model, x, y, order, steps, batch_size, lr, squares=None, step=0):
    """Train `model` in place with Adam (beta1 = 0), `steps` mini-batches cycling through (x, y) in
    `order`, from the state (`squares`, `step`); the last mini-batch's loss, the moments reached."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, BETA2))
    for p, square in zip(model.parameters(), squares or ()):
        optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": square.clone()}
    for i in range(steps):
        start = (i * batch_size) % len(y)
        batch = order[start: start + batch_size]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss, [optimizer.state[p]["exp_avg_sq"] for p in model.parameters()]


def adapt_copies(model, tasks, orders, steps, batch_size, lr):
    """engine=reference: per task (x, y) of `tasks`, a copy of `model` trained by `inner_train` in its
    order of `orders` from the carried state: each copy's parameters, moments and last loss."""
    adapted, squares, losses = [], [], []
    for (x, y), order in zip(tasks, orders):
        learner = copy.deepcopy(model)
        loss, reached = inner_train(learner, x, y, order.to(y.device), steps, batch_size, lr,
                                    *carried_state(model))
        adapted.append([p.detach() for p in learner.parameters()])
        squares.append(reached)
        losses.append(loss.item())
    return adapted, squares, losses


def adapt_fast(model, x, y, orders, steps, batch_size, lr):
    """engine=fast: what `adapt_copies` returns, for the tasks x [tasks, n, ...], y [tasks, n]
    adapted at once (`fast_reptile.adapt`) in the same `orders`."""
    orders = torch.stack(list(orders)).to(y.device)
    weights, squares, losses = fast_reptile.adapt(model, x, y, orders, steps, batch_size, lr, *carried_state(model))
    per_task = range(len(y))
    return [[w[t] for w in weights] for t in per_task], [[s[t] for s in squares] for t in per_task], losses.tolist()


def carry_state(model, order, task_squares, steps, meta_batch_size, run):
    """Advance `model`'s carried Adam state as the official code's one Adam would over the meta-
    batch's tasks one after another: second moments v <- d^K v + sum_k d^(K-1-k) (v_k - d v), with
    d = BETA2^steps, K tasks and v_k the moments task k (of `order`, this process's) reached from
    v; the step count advances by steps x K (summed over the processes by `run`)."""
    squares, _ = carried_state(model)
    decay = BETA2 ** steps
    added = [torch.zeros_like(v) for v in squares]
    for k, reached in zip(order, task_squares):
        for a, v, v_k in zip(added, squares, reached):
            a += decay ** (meta_batch_size - 1 - k) * (v_k - decay * v)
    run.sum_in_place(added)
    for v, a in zip(squares, added):
        v.mul_(decay ** meta_batch_size).add_(a)
    model.adam_step += steps * meta_batch_size


def outer_step(model, adapted, outer_lr, meta_batch_size, run):
    """Reptile's outer step theta <- theta + eps * (mean(phi) - theta), the mean over the whole
    meta-batch of `adapted` (this process's tasks' parameters, summed over the processes by `run`)."""
    mean_weights = [torch.zeros_like(p) for p in model.parameters()]
    for phi in adapted:
        for m, p in zip(mean_weights, phi):
            m += p / meta_batch_size
    run.sum_in_place(mean_weights)
    with torch.no_grad():
        for p, m in zip(model.parameters(), mean_weights):
            p += outer_lr * (m - p)


class Predictor(_Predictor):
    head, transductive = "Reptile", True  # a fixed head; batch statistics at test time

    def predict(self, support_x, support_y, query_x):
        if self.cfg.engine == "fast":
            return self.predict_tasks(support_x[None], support_y[None], query_x[None])[0]
        self.check_ways(support_y)
        learner = copy.deepcopy(self.model).train()  # batch statistics: transductive, as in the paper
        order = torch.randperm(len(support_y), generator=torch.Generator().manual_seed(0))  # the same every time
        with torch.enable_grad():
            inner_train(learner, support_x, support_y, order.to(support_y.device), self.cfg.test_adaptation_steps,
                        self.cfg.test_batch_size, self.cfg.inner_lr, *carried_state(self.model))
        with torch.no_grad():
            return learner(query_x)

    def predict_tasks(self, support_x, support_y, query_x):
        self.check_ways(support_y)
        order = torch.randperm(support_y.shape[1], generator=torch.Generator().manual_seed(0))
        return fast_reptile.predict(self.model, support_x, support_y, query_x, order.to(support_y.device),
                                    self.cfg.test_adaptation_steps, self.cfg.test_batch_size, self.cfg.inner_lr,
                                    *carried_state(self.model))


def train(cfg, run):
    seed_everything(cfg.seed)
    device = run.device
    train_set = data.load_split(cfg.dataset, "train", run.data_root, run.download)
    val_set = data.load_split(cfg.dataset, "val", run.data_root)
    train_tasks = data.taskset(train_set, cfg.ways, cfg.train_shots, 0)
    val_tasks = data.fixed_taskset(val_set, cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes, cfg.val_seed)

    model = build_model(cfg).to(device)
    run.track(model)  # checkpointed (and restored by l2l-recipes run --resume)
    if cfg.engine == "fast":  # the same tasks, built from the split's images held on the device
        train_tasks = fast.DeviceEpisodes(train_tasks, train_set, device)
    for iteration in run.iterations(cfg.iterations):  # (l2l-recipes run: or until its time budget)
        # meta-batch: every process draws the same tasks and adapts a copy of the network to
        # each task of its share (all of them in one process); the adapted weights are averaged
        model.train()
        outer_lr = cfg.outer_lr * (1 - (iteration - 1) / cfg.iterations)
        tasks = [data.draw(train_tasks) for _ in range(cfg.meta_batch_size)]
        orders = [torch.randperm(cfg.ways * cfg.train_shots) for _ in tasks]  # each task's mini-batch order
        mine = run.share(range(cfg.meta_batch_size))  # this process's tasks
        tasks, orders = [tasks[k] for k in mine], [orders[k] for k in mine]
        inner = (cfg.adaptation_steps, cfg.inner_batch_size, cfg.inner_lr)
        if cfg.engine == "fast":  # all tasks at once, one grouped network (l2l_recipes.fast_reptile)
            adapted, squares, losses = adapt_fast(model, *train_tasks.get_tasks(tasks), orders, *inner)
        else:  # a copy per task
            pairs = ((x.to(device), y.to(device)) for x, y in map(train_tasks.get_task, tasks))
            adapted, squares, losses = adapt_copies(model, pairs, orders, *inner)
        outer_step(model, adapted, outer_lr, cfg.meta_batch_size, run)
        if cfg.carry_adam:
            carry_state(model, mine, squares, cfg.adaptation_steps, cfg.meta_batch_size, run)
        meta_loss = sum(loss / cfg.meta_batch_size for loss in losses)

        if iteration % cfg.log_interval == 0:
            meta_loss = run.total(meta_loss)
            run.log(iteration, loss=meta_loss, outer_lr=outer_lr)

        # validate on the fixed tasks, keep the best weights, checkpoint
        if run.validation_due(iteration, cfg.val_interval, cfg.iterations):
            run.validate(iteration, Predictor(cfg, model, device), val_tasks)
    return model


# ----------------------------------------------------------------------------- variants

@register(published=Published(97.68, 0.04, "Nichol et al. 2018, Table 1 (transductive)"))
def reptile_omniglot_5w1s():
    """Reptile, Omniglot 5-way 1-shot."""
    return Config(ways=5, shots=1)


@register(published=Published(99.48, 0.06, "Nichol et al. 2018, Table 1 (transductive)"))
def reptile_omniglot_5w5s():
    """Reptile, Omniglot 5-way 5-shot."""
    return Config(ways=5, shots=5)


@register(published=Published(89.43, 0.14, "Nichol et al. 2018, Table 1 (transductive)"))
def reptile_omniglot_20w1s():
    """Reptile, Omniglot 20-way 1-shot."""
    return Config(ways=20, shots=1, inner_batch_size=20, adaptation_steps=10, inner_lr=5e-4, iterations=200000,
                  test_batch_size=10)


@register(published=Published(97.12, 0.32, "Nichol et al. 2018, Table 1 (transductive)"))
def reptile_omniglot_20w5s():
    """Reptile, Omniglot 20-way 5-shot."""
    return Config(ways=20, shots=5, inner_batch_size=20, adaptation_steps=10, inner_lr=5e-4, iterations=200000,
                  test_batch_size=10)


@register(published=Published(49.97, 0.32, "Nichol et al. 2018, Table 2 (transductive)"))
def reptile_mini_imagenet_5w1s():
    """Reptile, mini-ImageNet 5-way 1-shot."""
    return Config(dataset="mini-imagenet", ways=5, shots=1, train_shots=15, hidden_size=32,
                  adaptation_steps=8, test_batch_size=5)


@register(published=Published(65.99, 0.58, "Nichol et al. 2018, Table 2 (transductive)"))
def reptile_mini_imagenet_5w5s():
    """Reptile, mini-ImageNet 5-way 5-shot."""
    return Config(dataset="mini-imagenet", ways=5, shots=5, train_shots=15, hidden_size=32,
                  adaptation_steps=8, test_batch_size=15)


if __name__ == "__main__":
    from l2l_recipes.cli import main
    main(["run", *sys.argv[1:]])
