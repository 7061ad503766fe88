"""Meta-SGD (Li, Zhou, Chen & Li, 2017, arXiv:1707.09835).

MAML with a learned inner-loop learning rate for every parameter entry: the inner update
is theta' = theta - alpha * grad (alpha a tensor shaped like theta), and alpha is
meta-learned with theta (learn2learn's `MetaSGD` wrapper, with its inner update mended
below). One inner step in training and at test, as in the paper; alpha is initialised
uniformly in [0.005, 0.1].

Protocol (paper Section 4.2; no official code was released): MAML's networks (Omniglot:
Conv4 with 64 filters and strided convolutions; mini-ImageNet: Conv4 with 32 filters and
max-pooling) and MAML's few-shot setup, one inner step in training and at test, alpha
learned per parameter entry. From MAML's Appendix A.1, which our defaults take where the
paper was not checked: Adam meta_lr 1e-3, meta-batch 32 (Omniglot 5-way), 16 (20-way),
4 / 2 (mini-ImageNet 1 / 5-shot), 60,000 iterations, K query images per class in training
on Omniglot, 15 on mini-ImageNet, batch norm on the current batch. alpha's initial range
[0.005, 0.1] is the one we recall from the paper's regression setup (Section 4.1; not
re-checked), not checked for classification. Test: 600 tasks with K query images per class, as MAML's
code; not stated in what we checked, but the published CIs fit it (± 0.26 at 99.53% is
what 5 queries per task over 600 tasks give; 15 per class would give ± 0.06).
Published (Table 1, Omniglot): 5w1s 99.53 ± 0.26, 5w5s 99.93 ± 0.09, 20w1s 95.93 ± 0.38,
20w5s 98.97 ± 0.19; (Table 2, mini-ImageNet): 5w1s 50.47 ± 1.87, 5w5s 64.03 ± 0.94.

Where ours differs, and why: the shared Omniglot split (Vinyals et al.'s 1028 training /
172 validation / 423 test characters, each rotation a class) where MAML's code trains on
1200 random characters with a random rotation per character per task; the weights best on
validation are tested (the harness keeps them). The meta-batch sizes, iteration budget and
alpha's initial range for classification are MAML's / the regression section's, not
checked against the paper's classification text.

The meta-batch runs on `l2l_recipes.fast` by default (all tasks adapted at once, rates
included, same meta-gradient: tests/test_fast.py); `--set engine=reference` runs the
`MetaSGD.clone()` loop below.

Reproduce:
    l2l-recipes run metasgd-omniglot-5w1s --device cuda
"""
import sys
from dataclasses import dataclass

import learn2learn as l2l
import torch
import torch.nn.functional as F

from l2l_recipes import data, fast, models
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
    queries: int = 1  # query images per class at validation and test (the paper: K)
    train_queries: int = 1  # query images per class in training
    # model
    hidden_size: int = 64
    # inner loop
    adaptation_steps: int = 1
    test_adaptation_steps: int = 1
    init_lr_low: float = 0.005  # alpha ~ U(init_lr_low, init_lr_high), both > 0
    init_lr_high: float = 0.1
    first_order: bool = False
    # outer loop
    meta_batch_size: int = 32
    meta_lr: float = 1e-3
    iterations: int = 60000
    # validation and test
    val_interval: int = 500
    val_episodes: int = 200
    val_seed: int = 1
    test_episodes: int = 600
    test_seed: int = 0
    # system
    engine: str = "fast"  # fast: l2l_recipes.fast (same meta-gradient); reference: learn2learn's loop
    seed: int = 42
    device: str = "auto"
    log_interval: int = 10

    def __post_init__(self):
        validate(self)
        check(0 < self.init_lr_low <= self.init_lr_high, "need 0 < init_lr_low <= init_lr_high")


class MetaSGD(l2l.algorithms.MetaSGD):
    """learn2learn 0.2.0's MetaSGD with a working inner update.

    Its `meta_sgd_update` parks each gradient in `.grad` of the cloned (non-leaf) parameters;
    current PyTorch does not keep `.grad` on non-leaf tensors, so on learn2learn's Conv4 most
    parameters were silently left unchanged (measured: one step took a support loss from 3.03
    to 2.73 where MAML with the same rate reaches 0.72, and a second step raised an error).
    This update goes through learn2learn's `update_module`, as its MAML does.
    """

    def clone(self):
        return MetaSGD(l2l.clone_module(self.module), lrs=l2l.clone_parameters(self.lrs),
                       first_order=self.first_order)

    def adapt(self, loss, first_order=None):
        first_order = self.first_order if first_order is None else first_order
        grads = torch.autograd.grad(loss, list(self.module.parameters()), retain_graph=not first_order,
                                    create_graph=not first_order)
        self.module = l2l.update_module(self.module, updates=[-lr * g for lr, g in zip(self.lrs, grads)])


def build_model(cfg):
    """Meta-SGD around MAML's Conv4 classifier; its state holds the learned rates too."""
    model = MetaSGD(models.conv4_classifier(cfg.dataset, cfg.ways, cfg.hidden_size), first_order=cfg.first_order)
    with torch.no_grad():
        for lr in model.lrs:
            lr.uniform_(cfg.init_lr_low, cfg.init_lr_high)
    return model


def accuracy(logits, targets):
    return (logits.argmax(dim=1) == targets).float().mean()


def fast_adapt(learner, support_x, support_y, query_x, query_y, steps):
    """Adapt `learner` (a MetaSGD clone) on the support set; return its query loss and accuracy."""
    for _ in range(steps):
        learner.adapt(F.cross_entropy(learner(support_x), support_y))
    logits = learner(query_x)
    return F.cross_entropy(logits, query_y), accuracy(logits, query_y)


class Predictor(_Predictor):
    head, transductive = "Meta-SGD", True  # a fixed head; batch statistics at test time

    def predict_tasks(self, support_x, support_y, query_x):
        self.check_ways(support_y)
        return fast.maml_predict(self.model.module, support_x, support_y, query_x, list(self.model.lrs),
                                 self.cfg.test_adaptation_steps)

    def predict(self, support_x, support_y, query_x):
        self.check_ways(support_y)
        self.model.train()  # batch statistics at test time too, as in MAML
        learner = self.model.clone()
        with torch.enable_grad():
            for _ in range(self.cfg.test_adaptation_steps):
                learner.adapt(F.cross_entropy(learner(support_x), support_y), first_order=True)
        with torch.no_grad():
            return learner(query_x)


def train(cfg, run):
    seed_everything(cfg.seed)
    device = run.device
    train_set = data.load_split(cfg.dataset, "train", run.data_root, run.download)
    val_set = data.load_split(cfg.dataset, "val", run.data_root)
    train_tasks = data.taskset(train_set, cfg.ways, cfg.shots, cfg.train_queries)
    val_tasks = data.fixed_taskset(val_set, cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes, cfg.val_seed)

    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr)  # weights and rates
    run.track(model, optimizer)  # checkpointed (and restored by l2l-recipes run --resume)
    if cfg.engine == "fast":  # the same tasks, built from the split's images held on the device
        train_tasks = fast.DeviceEpisodes(train_tasks, train_set, device)
    for iteration in run.iterations(cfg.iterations):  # (l2l-recipes run: or until its time budget)
        # meta-batch: every process draws the same tasks and adapts to its share of them (all
        # of them in one process) with the learned rates, accumulating the query loss
        model.train()
        optimizer.zero_grad(set_to_none=True)
        tasks = [data.draw(train_tasks) for _ in range(cfg.meta_batch_size)]
        tasks = run.share(tasks)
        if cfg.engine == "fast":  # all tasks at once, one grouped network (l2l_recipes.fast)
            batch = data.split_support_query(*train_tasks.get_tasks(tasks), cfg.shots)  # [tasks, ...] each
            meta_loss, meta_acc = fast.maml_meta_batch(model.module, batch, list(model.lrs), cfg.adaptation_steps,
                                                       cfg.first_order, 1 / cfg.meta_batch_size)
            meta_loss, meta_acc = meta_loss / cfg.meta_batch_size, meta_acc / cfg.meta_batch_size
        else:  # learn2learn's loop: a clone per task
            meta_loss = meta_acc = 0.0
            for task in tasks:
                x, y = train_tasks.get_task(task)
                sx, sy, qx, qy = data.split_support_query(x.to(device), y.to(device), cfg.shots)
                loss, acc = fast_adapt(model.clone(), sx, sy, qx, qy, cfg.adaptation_steps)
                (loss / cfg.meta_batch_size).backward()
                meta_loss += loss.item() / cfg.meta_batch_size
                meta_acc += acc.item() / cfg.meta_batch_size
        run.reduce_gradients(model.parameters())  # sum of the processes' shares
        optimizer.step()

        if iteration % cfg.log_interval == 0:
            meta_loss, meta_acc = run.total(meta_loss, meta_acc)
            mean_rate = torch.cat([lr.flatten() for lr in model.lrs]).mean().item()
            run.log(iteration, loss=meta_loss, accuracy=meta_acc, mean_inner_lr=mean_rate)

        # validate on the fixed tasks, keep the best weights, checkpoint
        if run.validation_due(iteration, cfg.val_interval, cfg.iterations):
            run.validate(iteration, Predictor(cfg, model, device), val_tasks)
    return model


# ----------------------------------------------------------------------------- variants

@register(published=Published(99.53, 0.26, "Li et al. 2017, Table 1"))
def metasgd_omniglot_5w1s():
    """Meta-SGD, Omniglot 5-way 1-shot."""
    return Config(ways=5, shots=1, train_queries=1, queries=1)


@register(published=Published(99.93, 0.09, "Li et al. 2017, Table 1"))
def metasgd_omniglot_5w5s():
    """Meta-SGD, Omniglot 5-way 5-shot."""
    return Config(ways=5, shots=5, train_queries=5, queries=5)


@register(published=Published(95.93, 0.38, "Li et al. 2017, Table 1"))
def metasgd_omniglot_20w1s():
    """Meta-SGD, Omniglot 20-way 1-shot."""
    return Config(ways=20, shots=1, train_queries=1, queries=1, meta_batch_size=16)


@register(published=Published(98.97, 0.19, "Li et al. 2017, Table 1"))
def metasgd_omniglot_20w5s():
    """Meta-SGD, Omniglot 20-way 5-shot."""
    return Config(ways=20, shots=5, train_queries=5, queries=5, meta_batch_size=16)


@register(published=Published(50.47, 1.87, "Li et al. 2017, Table 2"))
def metasgd_mini_imagenet_5w1s():
    """Meta-SGD, mini-ImageNet 5-way 1-shot."""
    return Config(dataset="mini-imagenet", ways=5, shots=1, train_queries=15, hidden_size=32,
                  queries=1, meta_batch_size=4)


@register(published=Published(64.03, 0.94, "Li et al. 2017, Table 2"))
def metasgd_mini_imagenet_5w5s():
    """Meta-SGD, mini-ImageNet 5-way 5-shot."""
    return Config(dataset="mini-imagenet", ways=5, shots=5, train_queries=15, hidden_size=32,
                  queries=5, meta_batch_size=2)


if __name__ == "__main__":
    from l2l_recipes.cli import main
    main(["run", *sys.argv[1:]])
