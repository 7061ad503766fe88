"""MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019, arXiv:1810.09502).

MAML with the paper's six changes, all here:
    MSL   multi-step loss: the query loss after every inner step, weighted; the weights start
          uniform and anneal towards the last step over the first `msl_iterations`, after which
          only the last step's loss counts (the schedule of the authors' code, made continuous).
    DA    derivative-order annealing: first-order for the first `first_order_iterations`
          (the paper: 50 epochs), second order after.
    BNRS  per-step batch-norm running statistics, BNWB per-step batch-norm weights and biases:
          set k serves the network after k inner steps (k = 0..adaptation_steps; the query after
          the last step gets its own set instead of sharing the last support step's). BN weights
          and biases are learned in the outer loop only, as in the authors' code. Training
          normalises with batch statistics and folds them into set k's running statistics. At
          meta-test the inner loop, as in training, uses the support set's batch statistics;
          the query then uses the query batch's statistics (`transductive=True`, the default:
          the authors' code, which produced the published numbers, normalises with batch
          statistics at test and only collects the running statistics) or, with
          `transductive=False`, set k's running statistics, so that a query image's prediction
          never depends on the other queries (measured on Omniglot 5w1s after 300 meta-iterations
          of 8 tasks: 83% transductive, 43% on running statistics: the adapted weights move each
          task's statistics away from the running averages).
    LSLR  a learned inner learning rate per layer (parameter tensor) and per step, initialised
          to `fast_lr` and meta-learned with the weights (it may turn negative: a direction).
    CA    Adam's meta learning rate cosine-annealed to `min_meta_lr` over the run (stepped per
          iteration; the authors' code steps it per epoch).
The network is the authors' Conv4: 4 x [3x3 conv (padding 1), BN, ReLU, 2x2 max-pool], linear
head; 64 filters on Omniglot, 48 on mini-ImageNet. It is written functionally (weights passed
to forward) rather than with learn2learn's `MAML` wrapper: the forward must know the inner step
(per-step BN), BN weights must stay out of the inner update, and each update needs a rate per
tensor and step; learn2learn 0.2.0 ships no per-step batch norm.

Settings (the authors' released configs, HowToTrainYourMAMLPytorch experiment_config/*maml++*;
an epoch is 500 meta-iterations): 5 inner steps in training and test, 100 epochs, Adam 1e-3
annealed to 1e-5 (their mini-ImageNet configs keep 1e-3: `--set min_meta_lr=0.001`).
Omniglot: meta-batch 8, 1 query image per class (training and test; the count matters with the query
batch's statistics: 90.9% against 88.9% with 15 after 600 iterations), fast_lr 0.1, MSL over 10 epochs.
mini-ImageNet: meta-batch 2, 15 query images, fast_lr 0.01, MSL over 15 epochs, meta-gradients
clamped to +-10. DA over the first 50 epochs follows the paper (the released configs train
second order throughout: `--set first_order_iterations=0`). The test, as in the authors' code
(its last version: experiment_builder.py, `evaluated_test_set_using_the_best_models(top_n_models=5)`;
the paper says top 3), averages the logits of the weights of the 5 validations (epochs) best on
validation accuracy: the model keeps those weights (`ensemble`; best.pt holds them, written
whenever the set changes; `--set ensemble=1`: the best validation's weights alone).
Published (Antoniou et al. 2019, Table 1, Omniglot): 5w1s 99.47, 5w5s 99.93, 20w1s 97.65 ± 0.05,
20w5s 99.33 ± 0.03; (Table 2, mini-ImageNet) 5w1s 52.15 ± 0.26, 5w5s 68.32 ± 0.44.
Not checked against the paper's PDF (not reachable offline): Papers with Code lists the same
Omniglot numbers except 99.85 for 5w5s, and 52.40 / 67.15 for mini-ImageNet.

The meta-batch runs on `l2l_recipes.fast_mamlpp` by default (all tasks at once, the same meta-gradient
and running statistics: tests/test_mamlpp.py); `--set engine=reference` runs `fast_adapt` task by task.

Reproduce:
    l2l-recipes run mamlpp-omniglot-20w1s --device cuda
    l2l-recipes run mamlpp-mini-imagenet-5w1s --device cuda
"""
import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from l2l_recipes import data, fast, fast_mamlpp
from l2l_recipes.config import check, validate
from l2l_recipes.harness import Predictor as _Predictor
from l2l_recipes.plain import seed_everything
from l2l_recipes.registry import Published, register


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 1  # query images per class at validation and test (the authors' num_target_samples)
    train_queries: int = 1  # query images per class in training
    # model
    hidden_size: int = 64  # Conv4 filters
    bn_momentum: float = 0.1  # of the per-step running statistics
    # inner loop
    adaptation_steps: int = 5  # one BN set and one learned rate per layer for each step
    test_adaptation_steps: int = 5  # steps past adaptation_steps reuse the last rates and BN set
    fast_lr: float = 0.1  # initial value of every per-layer per-step rate (LSLR)
    transductive: bool = True  # query batch statistics at test (authors' code); False: running statistics
    ensemble: int = 5  # test: the mean logits of the weights of the `ensemble` best validations
    # outer loop
    meta_batch_size: int = 8
    meta_lr: float = 1e-3
    min_meta_lr: float = 1e-5  # cosine annealing (CA) floor, reached at the last iteration
    iterations: int = 50000  # 100 epochs of 500 meta-iterations
    msl_iterations: int = 5000  # MSL annealing (10 epochs); 0 = last step's loss only
    first_order_iterations: int = 25000  # DA: first-order until here (50 epochs); 0 = never
    grad_clamp: float = 0.0  # clamp meta-gradients to +-grad_clamp; 0 = off
    # validation and test
    val_interval: int = 500
    val_episodes: int = 200
    val_seed: int = 1
    test_episodes: int = 1000
    test_seed: int = 0
    # system
    engine: str = "fast"  # fast: l2l_recipes.fast_mamlpp (same meta-gradient); reference: the loop below
    seed: int = 42
    device: str = "auto"
    log_interval: int = 10

    def __post_init__(self):
        validate(self)
        check(0 <= self.min_meta_lr <= self.meta_lr, "need 0 <= min_meta_lr <= meta_lr: lower --set min_meta_lr")
        check(0 < self.bn_momentum <= 1, "need 0 < bn_momentum <= 1: fix --set bn_momentum")
        check(self.ensemble >= 1, f"ensemble={self.ensemble!r} is out of range: it must be >= 1")
        for name in ("msl_iterations", "first_order_iterations", "grad_clamp"):
            check(getattr(self, name) >= 0, f"{name}={getattr(self, name)!r} is out of range: it must be >= 0")


class Conv4PerStep(torch.nn.Module):
    """The authors' Conv4, called with explicit weights and the inner step: forward(x, weights, step, stats).

    `weights` (the inner loop's fast weights) start as `self.weights`; BN weights, biases and
    running statistics have one row per step k = 0..steps; `lrs[name][step]` is LSLR's rate.
    `stats`: "update" (batch statistics, folded into step k's running statistics: training),
    "running" (step k's running statistics: meta-test) or "batch" (batch statistics only).
    `keep` > 0: the network also holds the weights of the `keep` best validations (keep(), ensemble()).
    """

    def __init__(self, channels, ways, hidden_size, side, steps, fast_lr, momentum=0.1, keep=0):
        super().__init__()
        self.steps, self.momentum = steps, momentum
        self.weights = torch.nn.ParameterDict()  # adapted in the inner loop
        for i in range(4):
            conv = torch.empty(hidden_size, channels if i == 0 else hidden_size, 3, 3)
            self.weights[f"conv{i}_weight"] = torch.nn.Parameter(torch.nn.init.xavier_normal_(conv))
            self.weights[f"conv{i}_bias"] = torch.nn.Parameter(torch.zeros(hidden_size))
        head = torch.empty(ways, hidden_size * side * side)
        self.weights["head_weight"] = torch.nn.Parameter(torch.nn.init.xavier_normal_(head))
        self.weights["head_bias"] = torch.nn.Parameter(torch.zeros(ways))
        self.bn_weight = torch.nn.Parameter(torch.ones(4, steps + 1, hidden_size))  # BNWB
        self.bn_bias = torch.nn.Parameter(torch.zeros(4, steps + 1, hidden_size))
        self.register_buffer("running_mean", torch.zeros(4, steps + 1, hidden_size))  # BNRS
        self.register_buffer("running_var", torch.ones(4, steps + 1, hidden_size))
        self.lrs = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(torch.full((steps,), fast_lr)) for name in self.weights})  # LSLR
        # the kept validations' weights, statistics and rates (flat, as snapshot() gives) and
        # their scores (-1: an empty slot)
        self.register_buffer("kept", torch.zeros(keep, len(self.snapshot())))
        self.register_buffer("kept_scores", torch.full((keep,), -1.0))

    def snapshot(self):
        """Everything but the kept weights, as one flat vector."""
        return torch.cat([t.flatten() for name, t in self.state_dict().items() if not name.startswith("kept")])

    def keep(self, score):
        """Keep the current weights if `score` (>= 0) ranks among the kept ones; True if kept."""
        if not len(self.kept_scores) or score <= self.kept_scores.min():
            return False
        slot = self.kept_scores.argmin()
        self.kept[slot], self.kept_scores[slot] = self.snapshot(), score
        return True

    def ensemble(self):
        """Copies of the network with each kept weights, best first; [self] if none is kept."""
        members = []
        for slot in self.kept_scores.argsort(descending=True)[:int((self.kept_scores >= 0).sum())]:
            member, flat = copy.deepcopy(self), self.kept[slot]
            with torch.no_grad():
                for name, t in member.state_dict().items():
                    if not name.startswith("kept"):
                        t.copy_(flat[:t.numel()].view_as(t))
                        flat = flat[t.numel():]
            members.append(member)
        return members or [self]

    def forward(self, x, weights, step, stats):
        k = min(step, self.steps)
        for i in range(4):
            x = F.conv2d(x, weights[f"conv{i}_weight"], weights[f"conv{i}_bias"], padding=1)
            running = (self.running_mean[i, k], self.running_var[i, k]) if stats != "batch" else (None, None)
            x = F.batch_norm(x, *running, self.bn_weight[i, k], self.bn_bias[i, k],
                             training=stats != "running", momentum=self.momentum)
            x = F.max_pool2d(F.relu(x), 2)
        return F.linear(x.flatten(1), weights["head_weight"], weights["head_bias"])


def build_model(cfg):
    module = data.dataset_module(cfg.dataset)
    return Conv4PerStep(module.CHANNELS, cfg.ways, cfg.hidden_size, module.SIZE // 16, cfg.adaptation_steps,
                        cfg.fast_lr, cfg.bn_momentum, keep=cfg.ensemble if cfg.ensemble > 1 else 0)


def msl_weights(iteration, steps, anneal_iterations):
    """MSL importance of the query loss after each inner step (1-based `iteration`); sums to 1.

    Uniform at the first iteration; then each earlier step's weight falls linearly to a floor of
    0.03 / steps at the end of `anneal_iterations` while the last step takes the rest; after
    that (or with anneal_iterations=0) only the last step counts.
    """
    if iteration > anneal_iterations:
        return [0.0] * (steps - 1) + [1.0]
    progress = (iteration - 1) / anneal_iterations
    early = max((1 - progress) / steps, 0.03 / steps)
    return [early] * (steps - 1) + [1 - (steps - 1) * early]


def inner_loop(model, support_x, support_y, steps, second_order, stats):
    """Yield the fast weights after each SGD step on the support set, at LSLR's rates."""
    adapted = dict(model.weights)
    for step in range(steps):
        loss = F.cross_entropy(model(support_x, adapted, step, stats), support_y)
        grads = torch.autograd.grad(loss, list(adapted.values()), create_graph=second_order)
        rate = min(step, model.steps - 1)  # test steps past training reuse the last rates
        adapted = {name: w - model.lrs[name][rate] * g for (name, w), g in zip(adapted.items(), grads)}
        yield adapted


def fast_adapt(model, support_x, support_y, query_x, query_y, step_weights, second_order):
    """One task's MSL loss (query loss after step k weighted by step_weights[k - 1]) and final query accuracy."""
    loss = 0.0
    steps = len(step_weights)
    for step, adapted in enumerate(inner_loop(model, support_x, support_y, steps, second_order, "update"), 1):
        if step_weights[step - 1] > 0:  # once MSL has annealed, only the last step
            logits = model(query_x, adapted, step, "update")
            loss = loss + step_weights[step - 1] * F.cross_entropy(logits, query_y)
    return loss, (logits.argmax(dim=1) == query_y).float().mean()


class Predictor(_Predictor):
    """Adapts the kept best validations' weights (the network itself if none is kept, or if
    `single`: validation in training) to the support set; their query logits averaged."""
    head, transductive = "MAML++", property(lambda self: self.cfg.transductive)  # per the config

    def __init__(self, cfg, model, device, data_root=None, single=False):
        super().__init__(cfg, model, device, data_root)
        self.single = single

    def networks(self):
        return [self.model] if self.single else self.model.ensemble()

    def predict_tasks(self, support_x, support_y, query_x):
        self.check_ways(support_y)
        return torch.stack([fast_mamlpp.predict(net, support_x, support_y, query_x, self.cfg.test_adaptation_steps,
                                                self.cfg.transductive) for net in self.networks()]).mean(0)

    def predict(self, support_x, support_y, query_x):
        self.check_ways(support_y)
        steps, logits = self.cfg.test_adaptation_steps, []
        for net in self.networks():
            with torch.enable_grad():  # as in training, on the support set's statistics; first-order
                for adapted in inner_loop(net, support_x, support_y, steps, False, "batch"):
                    pass
            with torch.no_grad():  # each query on the running statistics, unless transductive
                logits.append(net(query_x, adapted, steps, "batch" if self.cfg.transductive else "running"))
        return torch.stack(logits).mean(0)


def train(cfg, run):
    seed_everything(cfg.seed)
    device = run.device
    train_set = data.load_split(cfg.dataset, "train", run.data_root, run.download)
    val_set = data.load_split(cfg.dataset, "val", run.data_root)
    train_tasks = data.taskset(train_set, cfg.ways, cfg.shots, cfg.train_queries)
    val_tasks = data.fixed_taskset(val_set, cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes, cfg.val_seed)

    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr)  # weights, BN weights, rates
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.iterations, eta_min=cfg.min_meta_lr)
    run.track(model, optimizer, scheduler=scheduler)  # checkpointed (and restored by l2l-recipes run --resume)
    if cfg.engine == "fast":  # the same tasks, built from the split's images held on the device
        train_tasks = fast.DeviceEpisodes(train_tasks, train_set, device)
    for iteration in run.iterations(cfg.iterations):  # (l2l-recipes run: or until its time budget)
        # this iteration's MSL step weights and derivative order (DA)
        step_weights = msl_weights(iteration, cfg.adaptation_steps, cfg.msl_iterations)
        second_order = iteration > cfg.first_order_iterations
        meta_lr = scheduler.get_last_lr()[0]

        # meta-batch: every process draws the same tasks and adapts the fast weights to its
        # share of them (all of them in one process), accumulating the mean MSL loss's gradient
        optimizer.zero_grad(set_to_none=True)
        tasks = [data.draw(train_tasks) for _ in range(cfg.meta_batch_size)]
        tasks = run.share(tasks)
        if cfg.engine == "fast":  # all tasks at once, one grouped network (l2l_recipes.fast_mamlpp)
            batch = data.split_support_query(*train_tasks.get_tasks(tasks), cfg.shots)  # [tasks, ...] each
            meta_loss, meta_acc = fast_mamlpp.meta_batch(model, batch, step_weights, second_order,
                                                         1 / cfg.meta_batch_size)
            meta_loss, meta_acc = meta_loss / cfg.meta_batch_size, meta_acc / cfg.meta_batch_size
        else:  # task by task
            meta_loss = meta_acc = 0.0
            for task in tasks:
                x, y = train_tasks.get_task(task)
                sx, sy, qx, qy = data.split_support_query(x.to(device), y.to(device), cfg.shots)
                loss, acc = fast_adapt(model, sx, sy, qx, qy, step_weights, second_order)
                (loss / cfg.meta_batch_size).backward()
                meta_loss += loss.item() / cfg.meta_batch_size
                meta_acc += acc.item() / cfg.meta_batch_size
        run.reduce_gradients(model.parameters())  # sum of the processes' shares
        if cfg.grad_clamp:  # the authors' code clamps mini-ImageNet's meta-gradients
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.clamp_(-cfg.grad_clamp, cfg.grad_clamp)
        optimizer.step()
        scheduler.step()  # CA, annealed per iteration

        if iteration % cfg.log_interval == 0:
            meta_loss, meta_acc = run.total(meta_loss, meta_acc)
            mean_rate = torch.cat([lr.detach().flatten() for lr in model.lrs.values()]).mean().item()
            run.log(iteration, loss=meta_loss, accuracy=meta_acc, meta_lr=meta_lr, second_order=int(second_order),
                    last_step_weight=step_weights[-1], mean_inner_lr=mean_rate)

        # validate; the model keeps its `ensemble` best validations' weights (best.pt when they change)
        if run.validation_due(iteration, cfg.val_interval, cfg.iterations):
            result = run.validate(iteration, Predictor(cfg, model, device, single=True), val_tasks,
                                  checkpoint=False, save_best=False)
            if model.keep(result["accuracy"]):
                run.save("best.pt", model, iteration)
            run.checkpoint(iteration)
    return model


# ----------------------------------------------------------------------------- variants

@register(published=Published(99.47, None, "Antoniou et al. 2019, Table 1"))
def mamlpp_omniglot_5w1s():
    """MAML++, Omniglot 5-way 1-shot."""
    return Config(ways=5, shots=1)


@register(published=Published(99.93, None, "Antoniou et al. 2019, Table 1"))
def mamlpp_omniglot_5w5s():
    """MAML++, Omniglot 5-way 5-shot."""
    return Config(ways=5, shots=5)


@register(published=Published(97.65, 0.05, "Antoniou et al. 2019, Table 1"))
def mamlpp_omniglot_20w1s():
    """MAML++, Omniglot 20-way 1-shot."""
    return Config(ways=20, shots=1)


@register(published=Published(99.33, 0.03, "Antoniou et al. 2019, Table 1"))
def mamlpp_omniglot_20w5s():
    """MAML++, Omniglot 20-way 5-shot."""
    return Config(ways=20, shots=5)


# RGB datasets (84x84 or 32x32): the authors' mini-ImageNet settings.
def _rgb(dataset, shots):
    return Config(dataset=dataset, ways=5, shots=shots, queries=15, train_queries=15, hidden_size=48, fast_lr=0.01,
                  meta_batch_size=2, msl_iterations=7500, grad_clamp=10.0)


@register(published=Published(52.15, 0.26, "Antoniou et al. 2019, Table 2"))
def mamlpp_mini_imagenet_5w1s():
    """MAML++, mini-ImageNet 5-way 1-shot."""
    return _rgb("mini-imagenet", 1)


@register(published=Published(68.32, 0.44, "Antoniou et al. 2019, Table 2"))
def mamlpp_mini_imagenet_5w5s():
    """MAML++, mini-ImageNet 5-way 5-shot."""
    return _rgb("mini-imagenet", 5)


@register
def mamlpp_cifar_fs_5w1s():
    """MAML++, CIFAR-FS 5-way 1-shot (mini-ImageNet settings; no published number)."""
    return _rgb("cifar-fs", 1)


@register
def mamlpp_cifar_fs_5w5s():
    """MAML++, CIFAR-FS 5-way 5-shot (mini-ImageNet settings; no published number)."""
    return _rgb("cifar-fs", 5)


@register
def mamlpp_fc100_5w1s():
    """MAML++, FC100 5-way 1-shot (mini-ImageNet settings; no published number)."""
    return _rgb("fc100", 1)


@register
def mamlpp_fc100_5w5s():
    """MAML++, FC100 5-way 5-shot (mini-ImageNet settings; no published number)."""
    return _rgb("fc100", 5)


@register
def mamlpp_tiered_imagenet_5w1s():
    """MAML++, tiered-ImageNet 5-way 1-shot (mini-ImageNet settings; no published number)."""
    return _rgb("tiered-imagenet", 1)


@register
def mamlpp_tiered_imagenet_5w5s():
    """MAML++, tiered-ImageNet 5-way 5-shot (mini-ImageNet settings; no published number)."""
    return _rgb("tiered-imagenet", 5)


if __name__ == "__main__":
    from l2l_recipes.cli import main
    main(["run", *sys.argv[1:]])
