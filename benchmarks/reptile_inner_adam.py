"""Reptile's inner Adam state: fresh per task, carried as the official code carries it, or
carried as recipes/reptile.py does. Written apart from the recipe (a plain loop over tasks)
so that it checks the recipe's choice independently.

    python benchmarks/reptile_inner_adam.py MODE ITERATIONS [--model l2l|l2l-init|tf] [--binarize]
        [--data-root DIR]

MODE: fresh (a new Adam per task, the recipe until 2026-12-05), sequential (openai/
supervised-reptile: one Adam through all tasks, one after another; only the weights are reset
after each task), shared (the recipe's carry_adam: every task of a meta-batch starts from the
iteration's state, which then advances over the tasks in order). Omniglot 5w1s with the
paper's settings and its 100,000-iteration annealing (truncated at ITERATIONS); every 500
iterations the validation accuracy on the first 100 of the recipe's fixed validation tasks as
it drew them until 2026-12-05, with 15 query images per class (the recipe now validates with
1), after 50 steps of Adam on the support set from a fresh state and from the carried one.

Measured 2026-12-05 (commit after 59a8778, 2-core AMD EPYC, one thread, beside other runs),
validation accuracy at iteration 500 / 1000 / 1500 / 2000, tested from the carried state:
  fresh       0.629 / 0.668 / 0.682 / 0.689 (tested fresh: the only state it has)
  sequential  0.767 / 0.798 / 0.815 / 0.832
  shared      0.772 / 0.801 / 0.821 / 0.840
and, shared, at iteration 500 / 1000 with the official network (--model tf) 0.708 / 0.795, with
ours initialised as the official one (--model l2l-init) 0.769 / 0.800, on ink-or-not images as the
official code reads them (--binarize) 0.743 / 0.789 (2026-12-05, after a722a3a).
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F

from l2l_recipes import data, models
from l2l_recipes.plain import seed_everything

BETA2, STEPS, BATCH, TASKS = 0.999, 5, 10, 5


class TFOmniglotModel(torch.nn.Sequential):
    """openai/supervised-reptile's OmniglotModel: 4 x [3x3 conv stride 2 with TF's 'same' padding
    (the extra row and column at the bottom and right), batch norm (weight 1, eps 1e-3), ReLU],
    flattened (2 x 2 x 64), a Glorot-uniform linear layer."""

    def __init__(self, ways, hidden=64):
        layers, channels = [], 1
        for side in (28, 14, 7, 4):
            total = max((-(-side // 2) - 1) * 2 + 3 - side, 0)
            layers += [torch.nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2)),
                       torch.nn.Conv2d(channels, hidden, 3, stride=2), torch.nn.BatchNorm2d(hidden, eps=1e-3),
                       torch.nn.ReLU()]
            channels = hidden
        layers += [torch.nn.Flatten(), torch.nn.Linear(hidden * 4, ways)]
        super().__init__(*layers)
        for m in self.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.xavier_uniform_(m.weight)
                torch.nn.init.zeros_(m.bias)


def build(name):
    """The recipe's model (l2l's OmniglotCNN: mean-pooled, batch norm weight ~ U(0, 1), classifier
    weight ~ N(0, 1)), the official code's (tf), or the recipe's with the official initialisation
    of batch norm and classifier (l2l-init)."""
    if name == "tf":
        return TFOmniglotModel(5)
    model = models.conv4_classifier("omniglot", 5, 64)
    if name == "l2l-init":
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)
        torch.nn.init.xavier_uniform_(model.classifier.weight)
    return model


def adam(params):
    return torch.optim.Adam(params, lr=1e-3, betas=(0.0, BETA2))


def validate(model, optimizer, tasks, carried):
    accuracies = []
    for x, y in tasks:
        sx, sy, qx, qy = data.split_support_query(x, y, 1)
        learner = copy.deepcopy(model)
        inner = adam(learner.parameters())
        if carried:
            inner.load_state_dict(optimizer.state_dict())
        for _ in range(50):
            inner.zero_grad()
            F.cross_entropy(learner(sx), sy).backward()
            inner.step()
        with torch.no_grad():
            accuracies.append((learner(qx).argmax(1) == qy).float().mean().item())
    return sum(accuracies) / len(accuracies)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["fresh", "sequential", "shared"])
    parser.add_argument("iterations", type=int)
    parser.add_argument("--model", choices=["l2l", "l2l-init", "tf"], default="l2l")
    parser.add_argument("--binarize", action="store_true",
                        help="ink or not (as the official code's PNGs, resized without smoothing), not grey levels")
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed_everything(42)
    splits = {name: data.load_split("omniglot", name, args.data_root) for name in ("train", "val")}
    for split in splits.values():
        if args.binarize:
            split.images = (split.images > 127).to(torch.uint8) * 255
    train = data.taskset(splits["train"], 5, 10, 0)
    val = data.fixed_taskset(splits["val"], 5, 1, 15, 200, 1)
    val_tasks = [val[i] for i in range(100)]
    model = build(args.model).train()
    params = list(model.parameters())
    optimizer = adam(params)
    started = time.time()
    for iteration in range(1, args.iterations + 1):
        theta = [p.detach().clone() for p in params]
        mean = [torch.zeros_like(p) for p in params]
        start = copy.deepcopy(optimizer.state_dict())
        added = [torch.zeros_like(p) for p in params]  # shared: sum_k d^(K-1-k) (v_k - d v)
        decay = BETA2 ** STEPS
        for k in range(TASKS):
            x, y = train.sample()
            if args.mode == "fresh":
                optimizer = adam(params)
            elif args.mode == "shared":
                optimizer.load_state_dict(copy.deepcopy(start))
            order = torch.randperm(len(y))
            for i in range(STEPS):
                batch = order[i * BATCH:(i + 1) * BATCH]
                optimizer.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
            with torch.no_grad():
                for j, (m, p, t) in enumerate(zip(mean, params, theta)):
                    if args.mode == "shared":
                        v = start["state"][j]["exp_avg_sq"] if start["state"] else torch.zeros_like(p)
                        added[j] += decay ** (TASKS - 1 - k) * (optimizer.state[p]["exp_avg_sq"] - decay * v)
                    m += p / TASKS
                    p.copy_(t)
        with torch.no_grad():
            for p, m in zip(params, mean):
                p += (1 - (iteration - 1) / 100000) * (m - p)
        if args.mode == "shared":
            for j, p in enumerate(params):
                v = start["state"][j]["exp_avg_sq"] if start["state"] else torch.zeros_like(p)
                step = float(start["state"][j]["step"]) if start["state"] else 0.0
                optimizer.state[p]["exp_avg_sq"] = decay ** TASKS * v + added[j]
                optimizer.state[p]["step"] = torch.tensor(step + STEPS * TASKS)
        if iteration % 500 == 0:
            tests = ["fresh"] if args.mode == "fresh" else ["fresh", "carried"]
            scores = " ".join(f"{t} {validate(model, optimizer, val_tasks, t == 'carried'):.4f}" for t in tests)
            print(f"{args.mode} {args.model}{' binarized' * args.binarize} iteration {iteration} validation accuracy tested {scores} "
                  f"({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
