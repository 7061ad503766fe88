"""MetaOptNet (Lee, Maji, Ravichandran & Soatto, CVPR 2019, arXiv:1904.03758).

Each episode fits a linear classifier to the support embeddings and scores the queries
with it; the embedding is trained through the classifier's solution, so it learns
features that a regularised linear base learner separates well. Two base learners:

  svm    multi-class (Crammer-Singer) SVM, solved in its dual, an (N*K*ways)-variable QP:
         learn2learn's `SVClassifier` (qpth's differentiable interior-point `QPFunction`;
         gradients by implicit differentiation of the KKT conditions; an identity added to
         the QP's quadratic term, as in MetaOptNet's code). C = 0.1, the QP solver stopped
         after 3 iterations in training and at test ("just three", Sec. 4.1). Needs qpth:
         `pip install cvxpy==1.9.3 && pip install --no-deps qpth==0.0.18`.
  ridge  ridge regression in its dual (kernel) form, in closed form: with the N*K support
         embeddings X and one-hot labels Y, alpha = (X X^T + lambda I)^-1 Y (one
         (N*K)x(N*K) system, torch.linalg.solve), W = X^T alpha, logits = Q W. lambda = 50.

Both scale their logits by a learned temperature (`model.scale`, initialised at 1; eq. 12).
Both heads are non-parametric, so a trained model predicts for any number of ways.

Paper settings (Sec. 4.1): ResNet-12 (64-160-320-640 filters, leaky ReLU, DropBlock with
keep rate 0.9, block size 5 on 84x84 images and 2 on 32x32 ones, no global pooling: 16000-d
embeddings on mini-/tiered-ImageNet, 2560-d on CIFAR-FS/FC100); 5-way episodes in training
and at test, 6 query images per class in training and 15 at test; meta-training shot 15 on
mini-ImageNet (5 with a Conv4), 10 on tiered-ImageNet, 5 on CIFAR-FS, 15 on FC100 (more
than at test helps, Figure 2); SGD with Nesterov momentum 0.9, weight decay 5e-4,
8 episodes per step, 60 epochs of 1000 steps, lr 0.1 -> 0.006 -> 0.0012 -> 0.00024 at
epochs 20, 40, 50; label smoothing 0.1 on mini-ImageNet; model chosen on 5-way 5-shot
validation accuracy. Not reproduced here: the paper's data augmentation (random crop,
flip, colour jitter), which its Table 4 credits with part of its accuracy.

Published, 5-way, 95% CIs (Table 1, ResNet-12):
    mini-ImageNet    SVM 62.64 ± 0.61 (1-shot), 78.63 ± 0.46 (5-shot); RR 61.41 ± 0.61, 77.88 ± 0.46
    tiered-ImageNet  SVM 65.99 ± 0.72, 81.56 ± 0.53; RR 65.36 ± 0.71, 81.34 ± 0.52
(Table 2, ResNet-12):
    CIFAR-FS         SVM 72.0 ± 0.7, 84.2 ± 0.5; RR 72.6 ± 0.7, 84.3 ± 0.5
    FC100            SVM 41.1 ± 0.6, 55.5 ± 0.6; RR 40.5 ± 0.6, 55.3 ± 0.6
Table 3 (mini-ImageNet, Conv4, `--set backbone=conv4`): SVM 52.87 ± 0.57 / 68.76 ± 0.48,
RR 53.23 ± 0.59 / 69.51 ± 0.48. Test: 1000 tasks of 15 query images per class, 95% CI.

Omniglot: the paper reports no Omniglot experiment, so there is no paper protocol and no
published number; the Omniglot variants show none and their settings are ours: Conv4,
5-way 5-shot training episodes (the paper's Conv4 setting, Table 3) of 6 queries per class
for every variant, 8 episodes per step, 3000 SGD steps with the paper's schedule shape
(milestones at 1000, 2000, 2500), 1000 test tasks of 15 query images per class.
Where ours differs on the paper's datasets, and why: no data augmentation (above); the
shot used for validation is the test shot unless `val_shots` is set (the paper variants
set 5, as the paper).

Cost: the SVM's QP has shots*ways*ways variables per task, factorised with dense LU: cheap
at 5 ways, ~2 s per task on one CPU core at 20-way 5-shot.

Reproduce:
    l2l-recipes run metaoptnet-ridge-omniglot-5w1s
    l2l-recipes run metaoptnet-svm-mini-imagenet-5w1s --device cuda
"""
import contextlib
import dataclasses
import importlib
import io
import sys
from dataclasses import dataclass

import learn2learn as l2l
import torch
import torch.nn.functional as F

from l2l_recipes import data, models
from l2l_recipes.config import check, validate
from l2l_recipes.errors import UserError
from l2l_recipes.harness import Predictor as _Predictor
from l2l_recipes.plain import seed_everything
from l2l_recipes.registry import Published, register


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "omniglot"
    ways: int = 5  # classes per validation and test task
    shots: int = 1  # support images per class at test
    queries: int = 15  # query images per class at validation and test
    train_ways: int = 5  # the paper trains with as many ways as it tests
    train_shots: int = 5  # the paper trains with more shots than it tests (Figure 2)
    train_queries: int = 6
    val_shots: int = 0  # support images per class at validation; 0: as at test (the paper: 5)
    # model
    backbone: str = "conv4"  # conv4 | resnet12
    hidden_size: int = 64  # Conv4 filters
    dropblock_size: int = 5  # ResNet-12 DropBlock block size (5 on 84x84 images, 2 on 32x32, 1 on 28x28)
    dropblock_dropout: float = 0.1  # ResNet-12 drop rate (1 - keep rate)
    # base learner
    head: str = "svm"  # svm | ridge
    svm_c: float = 0.1  # the SVM's regularisation parameter C
    qp_iterations: int = 3  # interior-point iterations of the SVM's QP, in training and at test
    ridge_lambda: float = 50.0  # the ridge regression's regularisation parameter
    # optimisation
    meta_batch_size: int = 8  # episodes per SGD step
    iterations: int = 60000  # SGD steps: 60 epochs of 1000
    lr: float = 0.1  # SGD with Nesterov momentum
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: tuple = (20000, 40000, 50000)  # SGD steps after which the learning rate changes
    lr_factors: tuple = (0.06, 0.012, 0.0024)  # lr multiplier from each milestone on
    label_smoothing: float = 0.0  # the paper: 0.1 on mini-ImageNet
    # validation and test
    val_interval: int = 1000
    val_episodes: int = 200
    val_seed: int = 1
    test_episodes: int = 1000
    test_seed: int = 0
    # system
    seed: int = 42
    device: str = "auto"
    log_interval: int = 50

    def __post_init__(self):
        validate(self)
        check(self.head in ("svm", "ridge"), f"head={self.head!r} is not a head: use svm or ridge")
        check(self.backbone in ("conv4", "resnet12"),
              f"backbone={self.backbone!r} is not a backbone: use conv4 or resnet12")
        check(self.val_shots >= 0, f"val_shots={self.val_shots!r} is out of range: use 0 (as shots) or more")
        check(self.svm_c > 0 and self.ridge_lambda > 0,
              f"svm_c={self.svm_c!r}, ridge_lambda={self.ridge_lambda!r}: both must be > 0")
        check(self.qp_iterations >= 1, f"qp_iterations={self.qp_iterations!r} is out of range: need >= 1")
        check(0 <= self.momentum < 1 and self.weight_decay >= 0,
              f"momentum={self.momentum!r}, weight_decay={self.weight_decay!r}: need 0 <= momentum < 1, "
              f"weight_decay >= 0")
        check(0 <= self.label_smoothing < 1 and 0 <= self.dropblock_dropout < 1,
              f"label_smoothing={self.label_smoothing!r}, dropblock_dropout={self.dropblock_dropout!r}: "
              f"each must be in [0, 1)")
        check(len(self.lr_milestones) == len(self.lr_factors)
              and all(isinstance(m, int) and m >= 1 for m in self.lr_milestones)
              and list(self.lr_milestones) == sorted(self.lr_milestones)
              and all(isinstance(f, (int, float)) and f > 0 for f in self.lr_factors),
              f"lr_milestones={self.lr_milestones!r}, lr_factors={self.lr_factors!r}: give increasing "
              f"iterations and as many positive factors, e.g. (200, 400) and (0.1, 0.01)")
        if self.backbone == "resnet12":
            side = data.dataset_module(self.dataset).SIZE // 16  # ResNet-12's last feature map
            check(1 <= self.dropblock_size <= side, f"dropblock_size={self.dropblock_size!r} does not fit "
                  f"{self.dataset}'s {side}x{side} last feature map: use 1 to {side}")


class MetaOptNet(torch.nn.Module):
    """An embedding network and the learned scale of the base learner's logits."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.backbone(x)


def build_model(cfg):
    """Conv4 (64-d embeddings on Omniglot, 1600-d on 84x84) or ResNet-12 without global pooling.

    learn2learn's ResNet-12 (adapted from MetaOptNet's code) ramps DropBlock's drop rate up
    over each block's first 40000 forward calls; train() makes one call per episode, 8 per
    step, where MetaOptNet's code makes 2 (support, query), so the ramp ends after 5000 steps.
    """
    if cfg.backbone == "conv4":
        return MetaOptNet(models.conv4_embedding(cfg.dataset, cfg.hidden_size))
    channels = data.dataset_module(cfg.dataset).CHANNELS
    return MetaOptNet(l2l.vision.models.ResNet12Backbone(
        avg_pool=False, wider=True, dropblock_dropout=cfg.dropblock_dropout,
        dropblock_size=cfg.dropblock_size, channels=channels))


def ridge_logits(support, support_y, query, ways, lam):
    """Ridge regression onto one-hot labels, solved in its dual: alpha = (X X^T + lam I)^-1 Y.

    Equal to the primal W = (X^T X + lam I)^-1 X^T Y (push-through identity), but the system
    is (N*K)x(N*K) instead of d x d, which is what makes 16000-d embeddings affordable.
    """
    targets = F.one_hot(support_y, ways).to(support.dtype)
    kernel = support @ support.t()
    eye = torch.eye(len(support), dtype=support.dtype, device=support.device)
    alpha = torch.linalg.solve(kernel + lam * eye, targets)
    return (query @ support.t()) @ alpha


def require_qpth():
    """Import qpth (the QP solver learn2learn's SVClassifier imports lazily) or raise a UserError."""
    try:
        importlib.import_module("qpth.qp")
    except ImportError as e:
        raise UserError(f"the SVM head needs qpth, which does not import ({e}): pip install cvxpy==1.9.3 "
                        f"&& pip install --no-deps qpth==0.0.18 (qpth pins numpy<2 but runs on numpy 2), "
                        f"or --set head=ridge") from None


def fit_svm(support, support_y, ways, c, iterations):
    """learn2learn's Crammer-Singer SVClassifier fitted on the support set (dual in `.qp_solution`).

    It solves the dual of eq. 10 with an identity added to the quadratic term, as MetaOptNet's
    code does ("seems to help avoid PSD error from the QP solver"). Two shims around learn2learn
    0.2.0 / qpth 0.0.18: SVClassifier builds its one-hot labels and identity matrices in the
    default dtype, so float64 embeddings fail in qpth's `lu_solve` (dtype mismatch) unless the
    default dtype matches; and qpth prints a multi-line "inaccurate solution" banner whenever
    its residual is still above 1 when it stops, which the paper's early stop after 3
    iterations does by design, so that output is muted.
    """
    require_qpth()
    dtype = torch.float64 if support.dtype == torch.float64 else torch.float32
    classifier = l2l.nn.SVClassifier(C_reg=c, max_iters=iterations)
    previous = torch.get_default_dtype()
    if dtype != previous:  # float64 embeddings (gradient checks); training never gets here
        torch.set_default_dtype(dtype)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            classifier.fit_(support.to(dtype), support_y, ways)
    finally:
        if dtype != previous:
            torch.set_default_dtype(previous)
    return classifier


def head_logits(cfg, support, support_y, query, ways):
    """The base learner's (unscaled) logits for the query embeddings."""
    if cfg.head == "ridge":
        return ridge_logits(support, support_y, query, ways, cfg.ridge_lambda)
    classifier = fit_svm(support, support_y, ways, cfg.svm_c, cfg.qp_iterations)
    return classifier(query.to(classifier.support.dtype)).to(query.dtype)


def smoothed_cross_entropy(logits, targets, eps):
    """Cross-entropy against 1 - eps on the target and eps / (ways - 1) elsewhere (the paper's code)."""
    ways = logits.size(1)
    one_hot = F.one_hot(targets, ways).to(logits.dtype)
    soft = one_hot * (1 - eps) + (1 - one_hot) * eps / (ways - 1)
    return -(soft * logits.log_softmax(dim=1)).sum(dim=1).mean()


def lr_factor(cfg, iteration):
    """Multiplier of cfg.lr after `iteration` steps: 1, then lr_factors[i] from lr_milestones[i] on."""
    factor = 1.0
    for milestone, f in zip(cfg.lr_milestones, cfg.lr_factors):
        if iteration >= milestone:
            factor = f
    return factor


class Predictor(_Predictor):
    def predict(self, support_x, support_y, query_x):
        self.model.eval()  # running batch-norm statistics, no DropBlock
        with torch.no_grad():
            ways = int(support_y.max()) + 1
            support, query = self.model(support_x), self.model(query_x)
            return self.model.scale * head_logits(self.cfg, support, support_y, query, ways)


def train(cfg, run):
    seed_everything(cfg.seed)
    device = run.device
    val_shots = cfg.val_shots or cfg.shots
    train_set = data.load_split(cfg.dataset, "train", run.data_root, run.download)
    val_set = data.load_split(cfg.dataset, "val", run.data_root)
    train_tasks = data.taskset(train_set, cfg.train_ways, cfg.train_shots, cfg.train_queries)
    val_tasks = data.fixed_taskset(val_set, cfg.ways, val_shots, cfg.queries, cfg.val_episodes, cfg.val_seed)
    val_cfg = dataclasses.replace(cfg, shots=val_shots)  # the predictor that validates, val_shots-shot

    model = build_model(cfg).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
    run.track(model, optimizer, scheduler=scheduler)  # checkpointed (and restored by l2l-recipes run --resume)
    for iteration in run.iterations(cfg.iterations):  # (l2l-recipes run: or until its time budget)
        # meta-batch: every process draws the same episodes and trains its share of them (all
        # of them in one process); one forward per episode (support and query together)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        episodes = [data.draw(train_tasks) for _ in range(cfg.meta_batch_size)]
        meta_loss = meta_acc = 0.0
        for episode in run.share(episodes):
            x, y = train_tasks.get_task(episode)
            sx, sy, qx, qy = data.split_support_query(x.to(device), y.to(device), cfg.train_shots)
            embeddings = model(torch.cat([sx, qx]))
            support, query = embeddings[: len(sx)], embeddings[len(sx):]
            logits = model.scale * head_logits(cfg, support, sy, query, cfg.train_ways)
            loss = smoothed_cross_entropy(logits, qy, cfg.label_smoothing)
            (loss / cfg.meta_batch_size).backward()
            meta_loss += loss.item() / cfg.meta_batch_size
            meta_acc += (logits.argmax(1) == qy).float().mean().item() / cfg.meta_batch_size
        run.reduce_gradients(model.parameters())  # sum of the processes' shares
        lr = scheduler.get_last_lr()[0]  # this step's
        optimizer.step()
        scheduler.step()  # the schedule counts SGD steps: lr_factors[i] from step lr_milestones[i] + 1 on

        if iteration % cfg.log_interval == 0:
            meta_loss, meta_acc = run.total(meta_loss, meta_acc)
            run.log(iteration, loss=meta_loss, accuracy=meta_acc, lr=lr, scale=model.scale.item())

        # validate on the fixed tasks, keep the best weights, checkpoint
        if run.validation_due(iteration, cfg.val_interval, cfg.iterations):
            run.validate(iteration, Predictor(val_cfg, model, device), val_tasks)
    return model


# ----------------------------------------------------------------------------- variants

# Omniglot, Conv4, sized for a CPU: the paper's Conv4 training episodes (5-way 5-shot, Table 3)
# for every variant, 20-way ones included (the heads take any number of ways), and the
# schedule's shape on 3000 steps: ~1.5 h on one core. `--set train_ways=20` trains on 20-way
# episodes, ~3x slower. The SVM's QP costs ~2.4 s per 20-way 5-shot task on one core, so
# metaoptnet-svm-omniglot-20w5s spends ~50 min validating and ~40 min testing.
def _omniglot(head, ways, shots):
    return Config(head=head, ways=ways, shots=shots, train_ways=5, train_shots=5, iterations=3000,
                  lr_milestones=(1000, 2000, 2500), val_interval=500)


# The paper's datasets: ResNet-12, its training shots, label smoothing on mini-ImageNet only.
_TRAIN_SHOTS = {"mini-imagenet": 15, "tiered-imagenet": 10, "cifar-fs": 5, "fc100": 15}
_DROPBLOCK = {"mini-imagenet": 5, "tiered-imagenet": 5, "cifar-fs": 2, "fc100": 2}


def _paper(head, dataset, shots):
    return Config(dataset=dataset, head=head, ways=5, shots=shots, train_ways=5,
                  train_shots=_TRAIN_SHOTS[dataset], train_queries=6, val_shots=5, backbone="resnet12",
                  dropblock_size=_DROPBLOCK[dataset], val_episodes=2000,
                  label_smoothing=0.1 if dataset == "mini-imagenet" else 0.0)


@register
def metaoptnet_svm_omniglot_5w1s():
    """MetaOptNet-SVM, Omniglot 5-way 1-shot (Conv4; no published number)."""
    return _omniglot("svm", 5, 1)


@register
def metaoptnet_svm_omniglot_5w5s():
    """MetaOptNet-SVM, Omniglot 5-way 5-shot (Conv4; no published number)."""
    return _omniglot("svm", 5, 5)


@register
def metaoptnet_svm_omniglot_20w1s():
    """MetaOptNet-SVM, Omniglot 20-way 1-shot (Conv4; no published number)."""
    return _omniglot("svm", 20, 1)


@register
def metaoptnet_svm_omniglot_20w5s():
    """MetaOptNet-SVM, Omniglot 20-way 5-shot (Conv4; no published number)."""
    return _omniglot("svm", 20, 5)


@register
def metaoptnet_ridge_omniglot_5w1s():
    """MetaOptNet-RR, Omniglot 5-way 1-shot (Conv4; no published number)."""
    return _omniglot("ridge", 5, 1)


@register
def metaoptnet_ridge_omniglot_5w5s():
    """MetaOptNet-RR, Omniglot 5-way 5-shot (Conv4; no published number)."""
    return _omniglot("ridge", 5, 5)


@register
def metaoptnet_ridge_omniglot_20w1s():
    """MetaOptNet-RR, Omniglot 20-way 1-shot (Conv4; no published number)."""
    return _omniglot("ridge", 20, 1)


@register
def metaoptnet_ridge_omniglot_20w5s():
    """MetaOptNet-RR, Omniglot 20-way 5-shot (Conv4; no published number)."""
    return _omniglot("ridge", 20, 5)


@register(published=Published(62.64, 0.61, "Lee et al. 2019, Table 1"))
def metaoptnet_svm_mini_imagenet_5w1s():
    """MetaOptNet-SVM, mini-ImageNet 5-way 1-shot (ResNet-12)."""
    return _paper("svm", "mini-imagenet", 1)


@register(published=Published(78.63, 0.46, "Lee et al. 2019, Table 1"))
def metaoptnet_svm_mini_imagenet_5w5s():
    """MetaOptNet-SVM, mini-ImageNet 5-way 5-shot (ResNet-12)."""
    return _paper("svm", "mini-imagenet", 5)


@register(published=Published(61.41, 0.61, "Lee et al. 2019, Table 1"))
def metaoptnet_ridge_mini_imagenet_5w1s():
    """MetaOptNet-RR, mini-ImageNet 5-way 1-shot (ResNet-12)."""
    return _paper("ridge", "mini-imagenet", 1)


@register(published=Published(77.88, 0.46, "Lee et al. 2019, Table 1"))
def metaoptnet_ridge_mini_imagenet_5w5s():
    """MetaOptNet-RR, mini-ImageNet 5-way 5-shot (ResNet-12)."""
    return _paper("ridge", "mini-imagenet", 5)


@register(published=Published(65.99, 0.72, "Lee et al. 2019, Table 1"))
def metaoptnet_svm_tiered_imagenet_5w1s():
    """MetaOptNet-SVM, tiered-ImageNet 5-way 1-shot (ResNet-12)."""
    return _paper("svm", "tiered-imagenet", 1)


@register(published=Published(81.56, 0.53, "Lee et al. 2019, Table 1"))
def metaoptnet_svm_tiered_imagenet_5w5s():
    """MetaOptNet-SVM, tiered-ImageNet 5-way 5-shot (ResNet-12)."""
    return _paper("svm", "tiered-imagenet", 5)


@register(published=Published(65.36, 0.71, "Lee et al. 2019, Table 1"))
def metaoptnet_ridge_tiered_imagenet_5w1s():
    """MetaOptNet-RR, tiered-ImageNet 5-way 1-shot (ResNet-12)."""
    return _paper("ridge", "tiered-imagenet", 1)


@register(published=Published(81.34, 0.52, "Lee et al. 2019, Table 1"))
def metaoptnet_ridge_tiered_imagenet_5w5s():
    """MetaOptNet-RR, tiered-ImageNet 5-way 5-shot (ResNet-12)."""
    return _paper("ridge", "tiered-imagenet", 5)


@register(published=Published(72.0, 0.7, "Lee et al. 2019, Table 2"))
def metaoptnet_svm_cifar_fs_5w1s():
    """MetaOptNet-SVM, CIFAR-FS 5-way 1-shot (ResNet-12)."""
    return _paper("svm", "cifar-fs", 1)


@register(published=Published(84.2, 0.5, "Lee et al. 2019, Table 2"))
def metaoptnet_svm_cifar_fs_5w5s():
    """MetaOptNet-SVM, CIFAR-FS 5-way 5-shot (ResNet-12)."""
    return _paper("svm", "cifar-fs", 5)


@register(published=Published(72.6, 0.7, "Lee et al. 2019, Table 2"))
def metaoptnet_ridge_cifar_fs_5w1s():
    """MetaOptNet-RR, CIFAR-FS 5-way 1-shot (ResNet-12)."""
    return _paper("ridge", "cifar-fs", 1)


@register(published=Published(84.3, 0.5, "Lee et al. 2019, Table 2"))
def metaoptnet_ridge_cifar_fs_5w5s():
    """MetaOptNet-RR, CIFAR-FS 5-way 5-shot (ResNet-12)."""
    return _paper("ridge", "cifar-fs", 5)


@register(published=Published(41.1, 0.6, "Lee et al. 2019, Table 2"))
def metaoptnet_svm_fc100_5w1s():
    """MetaOptNet-SVM, FC100 5-way 1-shot (ResNet-12)."""
    return _paper("svm", "fc100", 1)


@register(published=Published(55.5, 0.6, "Lee et al. 2019, Table 2"))
def metaoptnet_svm_fc100_5w5s():
    """MetaOptNet-SVM, FC100 5-way 5-shot (ResNet-12)."""
    return _paper("svm", "fc100", 5)


@register(published=Published(40.5, 0.6, "Lee et al. 2019, Table 2"))
def metaoptnet_ridge_fc100_5w1s():
    """MetaOptNet-RR, FC100 5-way 1-shot (ResNet-12)."""
    return _paper("ridge", "fc100", 1)


@register(published=Published(55.3, 0.6, "Lee et al. 2019, Table 2"))
def metaoptnet_ridge_fc100_5w5s():
    """MetaOptNet-RR, FC100 5-way 5-shot (ResNet-12)."""
    return _paper("ridge", "fc100", 5)


if __name__ == "__main__":
    from l2l_recipes.cli import main
    main(["run", *sys.argv[1:]])
