"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

Each class is the mean embedding (prototype) of its support images; queries are scored
by negative squared Euclidean distance to the prototypes. Conv4 backbone (4 x [conv 3x3,
64 filters, batch norm, ReLU, 2x2 max-pool]), Adam at 1e-3 halved every 2000 episodes,
60-way training episodes with 5 queries per class and as many shots as at test.

Omniglot protocol (the paper, and its official code where the paper is silent: Snell's
scripts/train/few_shot/run_train.py, trainval.py and predict/few_shot/eval.py):
    epochs of 100 training episodes (60-way, shot = test shot, 5 queries); after each epoch
    the validation loss on 100 5-way episodes (15 queries); stop when it has not improved
    for more than 200 epochs (patience), at most 10,000 epochs; then train a fresh model
    from the same initialisation on train + val (the `trainval` split) for best epoch - 1 +
    200 epochs (trainval.py takes the best epoch's 0-based index), with the same schedule,
    and test its final weights on 1,000 test episodes (15 queries per class). One 1-shot
    model gives the 5-way and 20-way 1-shot numbers (`l2l-recipes eval RUN --ways 20`), one
    5-shot model the 5-shot ones.
Where ours differs, and why:
    - the validation episodes are 100 tasks drawn once (`val_seed`) rather than 100 new
      ones per epoch, so that validations are comparable with each other;
    - the 20-way variants validate on 20-way tasks (the official code validates every
      model on 5-way tasks): `protonet-omniglot-5w1s` trained once and evaluated at 20
      ways is the paper's 20-way protocol;
    - `--max-minutes` (e.g. `make run`) cuts phase one short: no train+val retraining
      then, the best-validation weights are tested, and the record says "reduced";
    - the images: grayscale, Lanczos to 28x28, as every Omniglot recipe here (docs/data.md);
      Snell's `protonets/data/omniglot.py` resizes the 1-bit PNGs as they are, which Pillow
      does by nearest neighbour, so its images are binary (`--set dataset=omniglot-binary`:
      0.36 ± 0.16 points lower after 2,000 episodes, seed 1, paired on the same test tasks).

Published: Omniglot (Table 1, 1000 test episodes) 5w1s 98.8, 5w5s 99.7, 20w1s 96.0,
20w5s 98.9; mini-ImageNet (Table 2, 600 test episodes; 30-way 1-shot / 20-way 5-shot
training, 15 queries) 5w1s 49.42 ± 0.78, 5w5s 68.20 ± 0.66. The mini-ImageNet and other
variants train for a fixed 20,000 episodes and test the best-validation weights (no early
stopping, no retraining: `--set patience=200 --set trainval=False` adds early stopping).

Training episodes are gathered on the device by default (`l2l_recipes.fast`: the episodes
learn2learn's Taskset draws, without its per-image loading) and embedded with each ReLU after
its max-pool (`fast.conv4_embed`: the same numbers, fewer passes over the activations);
`--set engine=reference` runs learn2learn's Taskset and the module's own forward. The fast
engine keeps the network in channels-last layout (`--set channels_last=False`: NCHW), 1.2x
faster per 60-way episode on a 2-core CPU, its batch norm as precise as PyTorch's NCHW kernel
(`fast.batch_norm`; PyTorch's channels-last CPU kernel is ~1e-4 off), its convolutions rounding
otherwise than NCHW's (docs/speed.md). `--set amp=bf16` or `fp16`: mixed precision for the
training step (it changes rounding); bf16 is 1.7x faster per 60-way episode on a CPU with
AVX512-BF16 (docs/speed.md).

Reproduce:
    l2l-recipes run protonet-omniglot-5w1s
    l2l-recipes run protonet-omniglot-20w5s --device cuda
"""
import copy
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from l2l_recipes import data, fast, models
from l2l_recipes.config import check, validate
from l2l_recipes.harness import Predictor as _Predictor
from l2l_recipes.plain import EarlyStopping, seed_everything
from l2l_recipes.registry import Published, register


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "omniglot"
    ways: int = 5  # classes per test (and validation) task
    shots: int = 1  # support images per class, in training and at test
    queries: int = 15  # query images per class at validation and test
    train_ways: int = 60  # Snell et al.: more ways in training than at test helps
    train_queries: int = 5
    # model
    hidden_size: int = 64  # Conv4 filters
    # optimisation
    iterations: int = 2000  # Adam steps (of meta_batch_size training episodes each)
    meta_batch_size: int = 1  # episodes per Adam step, losses averaged (the paper: 1)
    lr: float = 1e-3  # Adam
    lr_step: int = 2000  # halve the learning rate every lr_step iterations
    lr_gamma: float = 0.5
    # stopping rule (Snell et al.'s official code: patience 200 epochs, then retrain on train+val)
    patience: int = 0  # stop when validation loss has not improved for more than this many validations (0: off)
    trainval: bool = False  # after early stopping, retrain from scratch on train+val for best + patience epochs
    # validation and test
    val_interval: int = 250  # iterations between validations (and checkpoints): an "epoch"
    val_episodes: int = 200
    val_seed: int = 1  # the fixed validation tasks
    test_episodes: int = 1000
    test_seed: int = 0  # the fixed test tasks
    # system
    engine: str = "fast"  # fast: episodes built on the device, fast.conv4_embed (same numbers); reference: learn2learn
    channels_last: bool = True  # engine=fast: channels-last tensors (1.2x faster on a CPU; docs/speed.md)
    amp: str = "off"  # off | bf16 | fp16: mixed precision for the training step (bf16: CPUs with AVX512-BF16, GPUs)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    log_interval: int = 50

    def __post_init__(self):
        validate(self)
        check(0 < self.lr_gamma <= 1, f"lr_gamma={self.lr_gamma!r} is out of range: need 0 < lr_gamma <= 1")
        check(self.amp in AMP_DTYPES, f"amp={self.amp!r} is out of range: use {', '.join(AMP_DTYPES)}")
        check(self.patience >= 0, f"patience={self.patience!r} is out of range: need patience >= 0")
        check(not self.trainval or self.patience > 0, "trainval=True retrains for the early-stopped "
              "length: it needs patience > 0")


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(cfg):
    """Conv4 embedding: 28x28 Omniglot -> 64 features, 84x84 mini-ImageNet -> 1600."""
    return models.conv4_embedding(cfg.dataset, cfg.hidden_size)


def prototypes(embeddings, labels, ways):
    """Mean embedding of each class 0..ways-1."""
    one_hot = F.one_hot(labels, ways).to(embeddings.dtype)
    return one_hot.t() @ embeddings / one_hot.sum(0, keepdim=True).t()


def proto_logits(support, support_y, query, ways):
    """Negative squared Euclidean distances from each query to each prototype."""
    protos = prototypes(support, support_y, ways)
    return -((query.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)


class Predictor(_Predictor):
    def predict(self, support_x, support_y, query_x):
        self.model.eval()
        with torch.no_grad():
            ways = int(support_y.max()) + 1
            return proto_logits(self.model(support_x), support_y, self.model(query_x), ways)


class Retraining:
    """The train+val phase: its first and last iteration once early stopping has started it."""

    def __init__(self):
        self.start = self.end = None


def train(cfg, run):
    seed_everything(cfg.seed)
    device = run.device
    splits = ("train", "trainval") if cfg.trainval else ("train",)
    sets = {name: data.load_split(cfg.dataset, name, run.data_root, run.download) for name in splits}
    tasks = {name: data.taskset(sets[name], cfg.train_ways, cfg.shots, cfg.train_queries) for name in splits}
    val_set = data.load_split(cfg.dataset, "val", run.data_root)
    val_tasks = data.fixed_taskset(val_set, cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes, cfg.val_seed)

    model = build_model(cfg).to(device)
    if cfg.engine == "fast":  # the same episodes, built from the split's images held on the device
        tasks = {name: fast.DeviceEpisodes(tasks[name], sets[name], device) for name in splits}
        if cfg.channels_last:  # channels-last weights, so activations: faster on a CPU (docs/speed.md)
            model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    # mixed precision (amp=bf16|fp16); fp16 gradients are scaled against underflow
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[cfg.amp], enabled=cfg.amp != "off")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    # the retraining on train+val starts again from these initial states
    initial = [copy.deepcopy(obj.state_dict()) for obj in (model, optimizer, scheduler)]
    stopper, retraining = EarlyStopping(cfg.patience), Retraining()
    states = {"scheduler": scheduler, "stopper": stopper, "retraining": retraining,
              **({"scaler": scaler} if cfg.amp == "fp16" else {})}
    run.track(model, optimizer, **states)  # checkpointed (and restored by l2l-recipes run --resume)
    for iteration in run.iterations(cfg.iterations):  # (l2l-recipes run: or until its time budget)
        split = "train" if retraining.start is None else "trainval"
        # meta-batch of training episodes (one by default): every process draws the same
        # episodes and trains its share of them (all of them in one process)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        episodes = [data.draw(tasks[split]) for _ in range(cfg.meta_batch_size)]
        meta_loss = meta_acc = 0.0
        for episode in run.share(episodes):
            x, y = tasks[split].get_task(episode)
            sx, sy, qx, qy = data.split_support_query(x.to(device), y.to(device), cfg.shots)
            # one forward pass for support and query, as in the paper's code (shared batch norm statistics)
            with autocast:
                images = torch.cat([sx, qx])
                embeddings = fast.conv4_embed(model, images) if cfg.engine == "fast" else model(images)
                logits = proto_logits(embeddings[: len(sx)].float(), sy, embeddings[len(sx):].float(),
                                      cfg.train_ways)
                loss = F.cross_entropy(logits, qy)
            scaler.scale(loss / cfg.meta_batch_size).backward()
            meta_loss += loss.item() / cfg.meta_batch_size
            meta_acc += (logits.argmax(1) == qy).float().mean().item() / cfg.meta_batch_size
        run.reduce_gradients(model.parameters())  # sum of the processes' shares
        scaler.step(optimizer)  # optimizer.step(), after unscaling fp16 gradients
        scaler.update()
        scheduler.step()

        if iteration % cfg.log_interval == 0:
            meta_loss, meta_acc = run.total(meta_loss, meta_acc)
            run.log(iteration, loss=meta_loss, accuracy=meta_acc, lr=scheduler.get_last_lr()[0])

        if retraining.start is not None:  # train+val phase: no validation; its last weights are tested
            if iteration == retraining.end:
                run.save("best.pt", model, iteration)
                run.end_training()
            else:
                run.validation_due(iteration, cfg.val_interval, cfg.iterations)  # watches the time budget
            continue
        # validate on the fixed tasks, keep the best weights, stop early on the validation loss
        if run.validation_due(iteration, cfg.val_interval, cfg.iterations):
            result = run.validate(iteration, Predictor(cfg, model, device), val_tasks, checkpoint=False)
            if cfg.patience and stopper.update(iteration, result["loss"]) and not run.stopped_early:
                if cfg.trainval:  # a fresh model on train+val for the early-stopped length
                    # (the official trainval.py: best epoch's 0-based index + patience epochs)
                    length = stopper.best_iteration + (cfg.patience - 1) * cfg.val_interval
                    retraining.start, retraining.end = iteration + 1, iteration + length
                    for obj, state in zip((model, optimizer, scheduler), initial):
                        obj.load_state_dict(state)
                    run.log(iteration, early_stop=stopper.best_iteration, retrain_until=retraining.end)
                else:
                    run.end_training()
            run.checkpoint(iteration)
    return model


# ----------------------------------------------------------------------------- variants

# Snell et al.'s official Omniglot protocol: epochs of 100 episodes, validation on 100 tasks
# after each, patience 200 epochs on the validation loss, at most 10,000 epochs, then the
# train+val retraining whose final weights are tested.
SNELL_OMNIGLOT = dict(val_interval=100, val_episodes=100, patience=200, trainval=True, iterations=1_000_000)


@register(published=Published(98.8, None, "Snell et al. 2017, Table 1"))
def protonet_omniglot_5w1s():
    """ProtoNet, Omniglot 5-way 1-shot."""
    return Config(ways=5, shots=1, **SNELL_OMNIGLOT)


@register(published=Published(99.7, None, "Snell et al. 2017, Table 1"))
def protonet_omniglot_5w5s():
    """ProtoNet, Omniglot 5-way 5-shot."""
    return Config(ways=5, shots=5, **SNELL_OMNIGLOT)


@register(published=Published(96.0, None, "Snell et al. 2017, Table 1"),
          tested_from="protonet-omniglot-5w1s")
def protonet_omniglot_20w1s():
    """ProtoNet, Omniglot 20-way 1-shot."""
    return Config(ways=20, shots=1, **SNELL_OMNIGLOT)


@register(published=Published(98.9, None, "Snell et al. 2017, Table 1"),
          tested_from="protonet-omniglot-5w5s")
def protonet_omniglot_20w5s():
    """ProtoNet, Omniglot 20-way 5-shot."""
    return Config(ways=20, shots=5, **SNELL_OMNIGLOT)


@register(published=Published(49.42, 0.78, "Snell et al. 2017, Table 2"),
          learn2learn=Published(49.1, None, "learn2learn 0.2.0 examples/vision/README.md"))
def protonet_mini_imagenet_5w1s():
    """ProtoNet, mini-ImageNet 5-way 1-shot."""
    return Config(dataset="mini-imagenet", ways=5, shots=1, train_ways=30, train_queries=15, iterations=20000)


@register(published=Published(68.20, 0.66, "Snell et al. 2017, Table 2"),
          learn2learn=Published(66.5, None, "learn2learn 0.2.0 examples/vision/README.md"))
def protonet_mini_imagenet_5w5s():
    """ProtoNet, mini-ImageNet 5-way 5-shot."""
    return Config(dataset="mini-imagenet", ways=5, shots=5, train_ways=20, train_queries=15, iterations=20000)


# CIFAR-FS, FC100 and tiered-ImageNet: the mini-ImageNet settings (Snell et al.'s higher
# training ways, 15 queries).
@register(published=Published(55.5, 0.7, "Bertinetto et al. 2019, Table 1"))
def protonet_cifar_fs_5w1s():
    """ProtoNet, CIFAR-FS 5-way 1-shot."""
    return Config(dataset="cifar-fs", ways=5, shots=1, train_ways=30, train_queries=15, iterations=20000)


@register(published=Published(72.0, 0.6, "Bertinetto et al. 2019, Table 1"))
def protonet_cifar_fs_5w5s():
    """ProtoNet, CIFAR-FS 5-way 5-shot."""
    return Config(dataset="cifar-fs", ways=5, shots=5, train_ways=20, train_queries=15, iterations=20000)


@register
def protonet_fc100_5w1s():
    """ProtoNet, FC100 5-way 1-shot."""
    return Config(dataset="fc100", ways=5, shots=1, train_ways=30, train_queries=15, iterations=20000)


@register
def protonet_fc100_5w5s():
    """ProtoNet, FC100 5-way 5-shot."""
    return Config(dataset="fc100", ways=5, shots=5, train_ways=20, train_queries=15, iterations=20000)


@register(published=Published(46.52, 0.52, "Ren et al. 2018"))
def protonet_tiered_imagenet_5w1s():
    """ProtoNet, tiered-ImageNet 5-way 1-shot."""
    return Config(dataset="tiered-imagenet", ways=5, shots=1, train_ways=30, train_queries=15,
                  iterations=20000)


@register(published=Published(66.15, 0.22, "Ren et al. 2018"))
def protonet_tiered_imagenet_5w5s():
    """ProtoNet, tiered-ImageNet 5-way 5-shot."""
    return Config(dataset="tiered-imagenet", ways=5, shots=5, train_ways=20, train_queries=15,
                  iterations=20000)


if __name__ == "__main__":
    from l2l_recipes.cli import main
    main(["run", *sys.argv[1:]])
