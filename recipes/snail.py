"""SNAIL, a Simple Neural AttentIve Learner (Mishra, Rohaninejad, Chen & Abbeel, ICLR 2018, arXiv:1707.03141).

A black-box meta-learner: no gradient step at test time. An episode is read as a sequence:
the support examples, each an (embedding, one-hot label) pair, in random order, then a query
whose label vector is zero; the network's output at the query's position is its prediction.
The sequence model interleaves causal attention blocks (each position reads itself and earlier
positions) with TC blocks (dilated causal 1-D convolutions, kernel 2, gated tanh * sigmoid
activations, each block's output concatenated to its input). Few-shot architecture (Appendix),
with T = ways * shots + 1 the sequence length:
    AttentionBlock(keys 64, values 32), TCBlock(T, 128 filters), AttentionBlock(256, 128),
    TCBlock(T, 128), AttentionBlock(512, 256), 1x1 convolution to `ways` logits.

Queries: in the paper each query ends its own sequence (support, then that query). Here an
episode's queries share one sequence, support then all queries, and each query still sees only
the support set and itself: attention masks out the other queries, and each dilated convolution
reads, for every query, the support position it would see at the end of its own sequence. Same
outputs as one sequence per query (tests/test_snail.py), in one pass of length S + Q instead of
Q passes of length S + 1 (a causal network computes the same support activations in each).

Embedding (`backbone`): "conv4" is learn2learn's Conv4 (4 x [3x3 conv, 64 filters, batch norm,
ReLU, 2x2 max-pool] -> 64 features on Omniglot): the paper's Omniglot embedding but for ReLU in
place of leaky ReLU and no final 64 -> 64 linear layer, and cheap enough for CPU runs. "resnet"
is the paper's mini-ImageNet embedding as we read its appendix (public reimplementations build
the same): 4 residual blocks of 3 x [3x3 conv, batch norm, leaky ReLU 0.1] with 64, 96, 128, 256
filters, a 1x1-conv shortcut and 2x2 max-pool, then a 1x1 conv to 2048 channels, average
pooling, ReLU, dropout and a linear map to 384 features. Trained end to end; batch norm uses
running statistics at test time, so a query's logits depend on the support set and itself only.

Hyperparameters: the architecture's sizes are the paper's, and it trains with Adam; a learning
rate, episodes per step and number of steps we could not check in its text, so ours are: Adam
at 1e-3, 32 episodes per step with one query per class (each query one of the paper's
sequences), 20,000 steps. Published: Omniglot (Table 1) 5w1s 99.07 ± 0.16, 5w5s 99.78 ± 0.09,
20w1s 97.64 ± 0.30, 20w5s 99.36 ± 0.18; mini-ImageNet (Table 2, ResNet embedding) 5w1s
55.71 ± 0.99, 5w5s 68.88 ± 0.92.

`--set engine=reference` runs learn2learn's Taskset and the module's forward; the fast engine gathers
episodes on the device and embeds through `fast.conv4_embed`: the same numbers, 1.2x faster (docs/speed.md).

Reproduce:
    l2l-recipes run snail-omniglot-5w1s
    l2l-recipes run snail-mini-imagenet-5w1s --device cuda
"""
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from l2l_recipes import data, fast, models
from l2l_recipes.config import check, validate
from l2l_recipes.errors import UserError
from l2l_recipes.harness import Predictor as _Predictor
from l2l_recipes.plain import seed_everything
from l2l_recipes.registry import Published, register

TC_FILTERS = 128  # the paper's D for every dense block


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 15  # query images per class at validation and test
    train_queries: int = 1  # query images per class per training episode, each its own sequence
    # model
    backbone: str = "conv4"  # conv4 | resnet (the paper's mini-ImageNet embedding)
    hidden_size: int = 64  # conv4 filters
    # optimisation
    meta_batch_size: int = 32  # episodes per Adam step
    meta_lr: float = 1e-3
    iterations: int = 20000
    # validation and test
    val_interval: int = 500
    val_episodes: int = 200
    val_seed: int = 1
    test_episodes: int = 1000
    test_seed: int = 0  # the fixed test tasks, and the fixed order in which predict() reads a support set
    # system
    engine: str = "fast"  # fast: episodes built on the device, fast.conv4_embed (same numbers); reference: learn2learn
    channels_last: bool = True  # engine=fast with the conv4 backbone: channels-last tensors (faster on a CPU)
    seed: int = 42
    device: str = "auto"
    log_interval: int = 10

    def __post_init__(self):
        validate(self)
        check(self.backbone in ("conv4", "resnet"),
              f"backbone={self.backbone!r} is out of range: use conv4 or resnet")


# ----------------------------------------------------------------------------- building blocks
# Every block maps tokens [B, S + Q, C] (S support positions, then Q queries) to [B, S + Q, C + added].
# Support position t sees support positions <= t; each query is position S of its own sequence:
# it sees the support set and itself, never another query.

class CausalConv(nn.Module):
    """Kernel-2 causal convolution, dilation d: out[t] = W0 x[t - d] + W1 x[t] (x = 0 before the start),
    i.e. one linear map of [x[t - d], x[t]]."""

    def __init__(self, in_channels, out_channels, dilation):
        super().__init__()
        self.dilation = dilation
        self.linear = nn.Linear(2 * in_channels, out_channels)  # weight = [W0 | W1]

    def forward(self, x, n):
        d, support, query = self.dilation, x[:, :n], x[:, n:]
        past_support = F.pad(support, (0, 0, d, 0))[:, :n]  # support position t - d
        # every query sits at position n of its own sequence: it sees support position n - d
        past_query = support[:, n - d: n - d + 1] if n >= d else torch.zeros_like(support[:, :1])
        past = torch.cat([past_support, past_query.expand(-1, query.shape[1], -1)], dim=1)
        return self.linear(torch.cat([past, x], dim=-1))


class DenseBlock(nn.Module):
    """The paper's Algorithm 1: gated causal convolution, its output appended to the input."""

    def __init__(self, in_channels, dilation, filters):
        super().__init__()
        self.conv = CausalConv(in_channels, 2 * filters, dilation)  # xf and xg in one convolution

    def forward(self, x, n):
        xf, xg = self.conv(x, n).chunk(2, dim=-1)
        return torch.cat([x, torch.tanh(xf) * torch.sigmoid(xg)], dim=-1)


class TCBlock(nn.Module):
    """The paper's Algorithm 2: ceil(log2 T) dense blocks with dilations 2^i, i = 1, 2, ... as
    written there (so the convolutions reach back by even offsets; the attention reads the rest)."""

    def __init__(self, in_channels, seq_length, filters):
        super().__init__()
        blocks = []
        for i in range(1, math.ceil(math.log2(seq_length)) + 1):
            blocks.append(DenseBlock(in_channels, 2 ** i, filters))
            in_channels += filters
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = in_channels

    def forward(self, x, n):
        for block in self.blocks:
            x = block(x, n)
        return x


def visible(n, total, device):
    """[total, total] mask of what each position may read: support position t reads support
    positions 0..t; a query reads the whole support set and itself."""
    seen = torch.eye(total, dtype=torch.bool, device=device)
    seen[:, :n] = True
    seen[:n, :n] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return seen


class AttentionBlock(nn.Module):
    """The paper's Algorithm 3: causally masked soft attention, the read appended to the input."""

    def __init__(self, in_channels, key_size, value_size):
        super().__init__()
        self.sizes = [key_size, key_size, value_size]
        self.qkv = nn.Linear(in_channels, 2 * key_size + value_size)  # query, key and value maps in one

    def forward(self, x, n):
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        logits = q @ k.transpose(1, 2) / math.sqrt(self.sizes[0])
        logits = logits.masked_fill(~visible(n, x.shape[1], x.device), float("-inf"))
        return torch.cat([x, logits.softmax(dim=-1) @ v], dim=-1)


class ResidualBlock(nn.Module):
    """3 x [3x3 conv, batch norm, leaky ReLU 0.1] plus a 1x1-conv shortcut, then 2x2 max-pool."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        layers = []
        for c in (in_channels, out_channels, out_channels):
            layers += [nn.Conv2d(c, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                       nn.LeakyReLU(0.1)]
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return F.max_pool2d(self.body(x) + self.shortcut(x), 2)


def embedding(cfg):
    """(embedding network, its feature size) for `cfg.backbone`."""
    if cfg.backbone == "conv4":
        return (models.conv4_embedding(cfg.dataset, cfg.hidden_size),
                models.conv4_embedding_size(cfg.dataset, cfg.hidden_size))
    channels = data.dataset_module(cfg.dataset).CHANNELS
    net = nn.Sequential(ResidualBlock(channels, 64), ResidualBlock(64, 96), ResidualBlock(96, 128),
                        ResidualBlock(128, 256), nn.Conv2d(256, 2048, 1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.ReLU(), nn.Dropout(0.1), nn.Linear(2048, 384))
    return net, 384


class SNAIL(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ways, self.engine = cfg.ways, cfg.engine
        self.embed, c = embedding(cfg)
        c += cfg.ways  # the one-hot label
        seq_length = cfg.ways * cfg.shots + 1
        self.attention1 = AttentionBlock(c, 64, 32)
        self.tc1 = TCBlock(c + 32, seq_length, TC_FILTERS)
        self.attention2 = AttentionBlock(self.tc1.out_channels, 256, 128)
        self.tc2 = TCBlock(self.tc1.out_channels + 128, seq_length, TC_FILTERS)
        self.attention3 = AttentionBlock(self.tc2.out_channels, 512, 256)
        self.head = nn.Linear(self.tc2.out_channels + 256, cfg.ways)  # the final 1x1 convolution
        self.blocks = [self.attention1, self.tc1, self.attention2, self.tc2, self.attention3]

    def sequence(self, support, support_y, query):
        """Features [B, S, F], labels [B, S], query features [B, Q, F] -> logits [B, S, W], [B, Q, W]."""
        support = torch.cat([support, F.one_hot(support_y, self.ways).to(support.dtype)], dim=-1)
        query = torch.cat([query, query.new_zeros(*query.shape[:2], self.ways)], dim=-1)  # no label
        x, n = torch.cat([support, query], dim=1), support.shape[1]
        for block in self.blocks:
            x = block(x, n)
        logits = self.head(x)
        return logits[:, :n], logits[:, n:]

    def forward(self, support_x, support_y, query_x):
        """Episodes: support images [B, S, ...] with labels [B, S], queries [B, Q, ...] -> [B, Q, ways]."""
        b, s, q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        images = torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)])
        features = fast.conv4_embed(self.embed, images) if self.engine == "fast" else self.embed(images)
        support, query = features[: b * s].view(b, s, -1), features[b * s:].view(b, q, -1)
        return self.sequence(support, support_y, query)[1]


def build_model(cfg):
    return SNAIL(cfg)


class Predictor(_Predictor):
    head = "SNAIL"  # its label vectors fix the number of ways

    def predict(self, support_x, support_y, query_x):
        ways = int(support_y.max()) + 1
        if ways != self.cfg.ways:
            raise UserError(f"this SNAIL model reads {self.cfg.ways}-way label vectors; got a {ways}-way "
                            f"task (train a {ways}-way recipe)")
        shots = torch.bincount(support_y, minlength=ways).tolist()
        if set(shots) != {self.cfg.shots}:  # the sequence length it was trained on
            raise UserError(f"this SNAIL model reads {self.cfg.shots} support image(s) per class "
                            f"({self.cfg.ways}-way {self.cfg.shots}-shot sequences); got {', '.join(map(str, shots))}")
        # training shows the support set in random order, never grouped by class: read it in a
        # shuffled order fixed by test_seed, so that predictions are deterministic
        order = torch.randperm(len(support_y), generator=torch.Generator().manual_seed(self.cfg.test_seed))
        order = order.to(support_y.device)
        self.model.eval()  # running batch-norm statistics: queries do not interact
        with torch.no_grad():
            return self.model(support_x[order][None], support_y[order][None], query_x[None])[0]


def sample_episodes(tasks, cfg, run):
    """A meta-batch of episodes stacked on `run.device`: support [B, S, ...] in random order, labels,
    queries, labels. Under torchrun, this process's `run.share` of it (every process draws the
    whole meta-batch: the same random numbers)."""
    # per episode, its description and the paper's random order of support examples
    drawn = [(data.draw(tasks), torch.randperm(cfg.ways * cfg.shots)) for _ in range(cfg.meta_batch_size)]
    episodes = []
    for episode, order in run.share(drawn):
        x, y = tasks.get_task(episode)
        sx, sy, qx, qy = data.split_support_query(x, y, cfg.shots)
        episodes.append((sx[order], sy[order], qx, qy))
    return [torch.stack(parts).to(run.device) for parts in zip(*episodes)]


def train(cfg, run):
    seed_everything(cfg.seed)
    device = run.device
    train_set = data.load_split(cfg.dataset, "train", run.data_root, run.download)
    val_set = data.load_split(cfg.dataset, "val", run.data_root)
    train_tasks = data.taskset(train_set, cfg.ways, cfg.shots, cfg.train_queries)
    val_tasks = data.fixed_taskset(val_set, cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes, cfg.val_seed)

    model = build_model(cfg).to(device)
    if cfg.engine == "fast":  # the same episodes, built from the split's images held on the device
        train_tasks = fast.DeviceEpisodes(train_tasks, train_set, device)
        if cfg.channels_last and cfg.backbone == "conv4":  # channels-last weights, so activations
            model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr, fused=True)  # 3x faster step on CPU
    run.track(model, optimizer)  # checkpointed (and restored by l2l-recipes run --resume)
    for iteration in run.iterations(cfg.iterations):  # (l2l-recipes run: or until its time budget)
        # a meta-batch of episodes (this process's share under torchrun), every query the end
        # of its own sequence; one forward pass (batch norm statistics over the share)
        model.train()
        sx, sy, qx, qy = sample_episodes(train_tasks, cfg, run)
        logits = model(sx, sy, qx)
        weight = len(qy) / cfg.meta_batch_size  # 1.0 in one process
        loss = F.cross_entropy(logits.flatten(0, 1), qy.flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss * weight).backward()  # summed over processes: the whole meta-batch's mean
        run.reduce_gradients(model.parameters())
        optimizer.step()

        if iteration % cfg.log_interval == 0:
            accuracy = (logits.argmax(-1) == qy).float().mean().item()
            loss_sum, accuracy = run.total(loss.item() * weight, accuracy * weight)
            run.log(iteration, loss=loss_sum, accuracy=accuracy)

        # validate on the fixed tasks, keep the best weights, checkpoint
        if run.validation_due(iteration, cfg.val_interval, cfg.iterations):
            run.validate(iteration, Predictor(cfg, model, device), val_tasks)
    return model


# ----------------------------------------------------------------------------- variants

@register(published=Published(99.07, 0.16, "Mishra et al. 2018, Table 1"))
def snail_omniglot_5w1s():
    """SNAIL, Omniglot 5-way 1-shot."""
    return Config(ways=5, shots=1)


@register(published=Published(99.78, 0.09, "Mishra et al. 2018, Table 1"))
def snail_omniglot_5w5s():
    """SNAIL, Omniglot 5-way 5-shot."""
    return Config(ways=5, shots=5)


@register(published=Published(97.64, 0.30, "Mishra et al. 2018, Table 1"))
def snail_omniglot_20w1s():
    """SNAIL, Omniglot 20-way 1-shot."""
    return Config(ways=20, shots=1)


@register(published=Published(99.36, 0.18, "Mishra et al. 2018, Table 1"))
def snail_omniglot_20w5s():
    """SNAIL, Omniglot 20-way 5-shot."""
    return Config(ways=20, shots=5)


# RGB datasets: the paper's ResNet-like embedding (384 features).
def _rgb(dataset, shots):
    return Config(dataset=dataset, ways=5, shots=shots, backbone="resnet")


@register(published=Published(55.71, 0.99, "Mishra et al. 2018, Table 2"))
def snail_mini_imagenet_5w1s():
    """SNAIL, mini-ImageNet 5-way 1-shot."""
    return _rgb("mini-imagenet", 1)


@register(published=Published(68.88, 0.92, "Mishra et al. 2018, Table 2"))
def snail_mini_imagenet_5w5s():
    """SNAIL, mini-ImageNet 5-way 5-shot."""
    return _rgb("mini-imagenet", 5)


@register
def snail_cifar_fs_5w1s():
    """SNAIL, CIFAR-FS 5-way 1-shot (mini-ImageNet's settings; no published number)."""
    return _rgb("cifar-fs", 1)


@register
def snail_cifar_fs_5w5s():
    """SNAIL, CIFAR-FS 5-way 5-shot (mini-ImageNet's settings; no published number)."""
    return _rgb("cifar-fs", 5)


@register
def snail_fc100_5w1s():
    """SNAIL, FC100 5-way 1-shot (mini-ImageNet's settings; no published number)."""
    return _rgb("fc100", 1)


@register
def snail_fc100_5w5s():
    """SNAIL, FC100 5-way 5-shot (mini-ImageNet's settings; no published number)."""
    return _rgb("fc100", 5)


@register
def snail_tiered_imagenet_5w1s():
    """SNAIL, tiered-ImageNet 5-way 1-shot (mini-ImageNet's settings; no published number)."""
    return _rgb("tiered-imagenet", 1)


@register
def snail_tiered_imagenet_5w5s():
    """SNAIL, tiered-ImageNet 5-way 5-shot (mini-ImageNet's settings; no published number)."""
    return _rgb("tiered-imagenet", 5)


if __name__ == "__main__":
    from l2l_recipes.cli import main
    main(["run", *sys.argv[1:]])
