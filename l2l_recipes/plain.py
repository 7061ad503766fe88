"""What a recipe's plain loop calls: a run in one process, predictors, evaluation with 95% CIs.

PlainRun logs, validates on fixed tasks keeping the best weights and tests them; Predictor is
the base of the recipes' predictors; `evaluate` scores the fixed tasks one by one with the
mean and 95% confidence interval. `l2l-recipes export` copies the parts a recipe uses into
its file. `harness.Run` extends PlainRun with run directories, resuming, stop signals, time
budgets and torchrun; `harness.Predictor` extends Predictor with batched, distributed
evaluation.
"""
import dataclasses
import json
import math
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from l2l_recipes import data
from l2l_recipes.errors import UserError


def seed_everything(seed):
    """Seed Python's `random` (learn2learn's task sampling), NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mean_ci95(values):
    """Mean and half-width of the normal 95% confidence interval of the mean."""
    t = torch.tensor(values, dtype=torch.float64)
    if len(t) < 2:
        return float(t.mean()), float("nan")
    return float(t.mean()), float(1.96 * t.std(unbiased=True) / math.sqrt(len(t)))


def query_scores(logits, query_y):
    """[(query accuracy, query cross-entropy)] per task of logits [tasks, queries, ways] (in float32)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    accuracies = (logits.argmax(-1) == query_y).float().mean(1)
    losses = F.cross_entropy(logits.transpose(1, 2), query_y, reduction="none").mean(1)
    return list(zip(accuracies.tolist(), losses.tolist()))


def summary(scores):
    """{"accuracy": mean, "ci95": half-width of its 95% CI, "loss": mean} of (accuracy, loss) per task."""
    accuracies, losses = zip(*scores)
    accuracy, ci95 = mean_ci95(accuracies)
    return {"accuracy": accuracy, "ci95": ci95, "loss": statistics.fmean(losses)}


def evaluate(predictor, tasks):
    """summary() of `predictor` on each of the fixed `tasks` (a finite Taskset), one by one."""
    scores = []
    for i in range(len(tasks)):
        x, y = tasks[i]
        sx, sy, qx, qy = data.split_support_query(x.to(predictor.device), y.to(predictor.device),
                                                  predictor.cfg.shots)
        scores += query_scores(predictor.predict(sx, sy, qx)[None], qy[None])
    return summary(scores)


class Predictor:
    """A trained model that adapts to a support set and scores a query set: recipes subclass
    it and implement `predict`."""
    metric = "accuracy"  # the key of evaluate()'s result that selects the best weights
    higher_is_better = True
    head = None  # a fixed-head family's name ("MAML"): its models take tasks of cfg.ways ways only

    def __init__(self, cfg, model, device, data_root=None):
        self.cfg = cfg
        self.model = model.to(device)
        self.device = device
        self.data_root = data_root

    def check_ways(self, support_y):
        """A UserError when a fixed-head model (`head`) gets a task of other ways than its own."""
        ways = int(support_y.max()) + 1
        if self.head and ways != self.cfg.ways:
            raise UserError(f"this {self.head} model has a {self.cfg.ways}-way head; got a {ways}-way task")

    def predict(self, support_x, support_y, query_x):
        """Logits [len(query_x), ways] for a task whose support labels are 0..ways-1."""
        raise NotImplementedError

    def test_tasks(self, episodes, seed):
        """The fixed test tasks: `episodes` tasks of the test split, drawn with `seed`."""
        cfg = self.cfg
        split = data.load_split(cfg.dataset, "test", self.data_root)
        return data.fixed_taskset(split, cfg.ways, cfg.shots, cfg.queries, episodes, seed)

    def evaluate(self, tasks):
        """{"accuracy", "ci95", "loss"} over the fixed `tasks` (accuracy as a fraction)."""
        return evaluate(self, tasks)


class EarlyStopping:
    """Stop when the validation loss has not improved for more than `patience` validations
    (Snell et al.'s official code: patience 200 epochs). Checkpointed with the run (pass it to
    `run.track`), so a resumed run stops where an uninterrupted one would."""

    def __init__(self, patience):
        self.patience = patience
        self.best_loss = float("inf")
        self.best_iteration = 0
        self.wait = 0

    def update(self, iteration, loss):
        """Record the validation `loss` of `iteration`; True when patience is exceeded."""
        if loss < self.best_loss:
            self.best_loss, self.best_iteration, self.wait = loss, iteration, 0
        else:
            self.wait += 1
        return self.wait > self.patience

    def state_dict(self):
        return {"best_loss": self.best_loss, "best_iteration": self.best_iteration, "wait": self.wait}

    def load_state_dict(self, state):
        self.best_loss, self.best_iteration, self.wait = state["best_loss"], state["best_iteration"], state["wait"]


class PlainRun:
    """A run in one process, written to folder `path`: config.json, metrics.jsonl, ckpt.pt
    (the latest weights), best.pt (the best validation's) and result.json (the test)."""

    def __init__(self, path, recipe_name, cfg, device, data_root=None, download=False):
        self.path, self.recipe, self.cfg, self.device = Path(path), recipe_name, cfg, device
        self.data_root, self.download = data_root, download
        self.progress = False  # no progress bars
        self.started, self.best_val = time.time(), float("-inf")
        self.tracked = None  # (model, optimizer, {name: object}) given to track()
        self.stopped_early = self.ended = False  # by a time budget (harness.Run); by end_training()

    def track(self, model, optimizer=None, **stateful):
        """Name what checkpoints hold (here the model's weights)."""
        self.tracked = (model, optimizer, stateful)

    def iterations(self, total):
        """Iterations 1 to `total`, until the recipe calls end_training()."""
        for iteration in range(1, total + 1):
            yield iteration
            if self.ended:
                return

    def end_training(self):
        """Stop after this iteration: the recipe's stopping rule ended training."""
        self.ended = True

    # One process trains the whole meta-batch; harness.Run shares it out under torchrun.
    def share(self, items):
        return items

    def mine(self, i):
        return True

    def reduce_gradients(self, parameters):
        pass

    def sum_in_place(self, tensors):
        pass

    def total(self, *shares):
        return shares[0] if len(shares) == 1 else shares

    def validation_due(self, iteration, interval, total):
        return iteration % interval == 0 or iteration == total

    def log(self, iteration, **metrics):
        """Append a line to metrics.jsonl and print it."""
        row = {"iteration": iteration, "time": round(time.time() - self.started, 3), **metrics}
        with open(self.folder() / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def folder(self):
        """The run's folder, made with its config.json on first use."""
        if not (self.path / "config.json").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            config = {"recipe": self.recipe, **dataclasses.asdict(self.cfg)}
            (self.path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return self.path

    def evaluate(self, predictor, tasks):
        return predictor.evaluate(tasks)

    def validate(self, iteration, predictor, tasks, checkpoint=True):
        """Evaluate on the fixed validation `tasks`, log `val_<key>` for each key of the result,
        keep the best weights (by the predictor's metric) in best.pt and write ckpt.pt (unless
        `checkpoint` is False: a recipe that updates tracked state from the result checkpoints
        after that). Returns the result."""
        result = self.evaluate(predictor, tasks)
        self.log(iteration, **{f"val_{key}": value for key, value in result.items()})
        value = result[predictor.metric]
        score = value if predictor.higher_is_better else -value
        if score > self.best_val:
            self.best_val = score
            self.save("best.pt", predictor.model, iteration, best_val_score=score)
        if checkpoint:
            self.checkpoint(iteration)
        return result

    def checkpoint(self, iteration):
        self.save("ckpt.pt", self.tracked[0], iteration)

    def save(self, name, model, iteration, **extra):
        """Write checkpoint `name`: the recipe, its config, the iteration and the model's weights."""
        torch.save({"recipe": self.recipe, "config": dataclasses.asdict(self.cfg), "iteration": iteration,
                    "model": model.state_dict(), **extra}, self.folder() / name)

    def test(self, predictor):
        """Test the weights of best.pt (else ckpt.pt) on the fixed test tasks; write result.json,
        print the result and return it."""
        cfg, name = self.cfg, "best.pt" if (self.path / "best.pt").is_file() else "ckpt.pt"
        predictor.model.load_state_dict(torch.load(self.path / name, map_location="cpu", weights_only=True)["model"])
        result = {"recipe": self.recipe, "metric": predictor.metric, "higher_is_better": predictor.higher_is_better,
                  **predictor.evaluate(predictor.test_tasks(cfg.test_episodes, cfg.test_seed)),
                  "episodes": cfg.test_episodes,
                  **{key: getattr(cfg, key) for key in ("ways", "shots", "queries") if hasattr(cfg, key)},
                  "split": "test", "test_seed": cfg.test_seed, "seed": cfg.seed, "checkpoint": name}
        (self.folder() / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        metric, value, ci95 = result["metric"], result[result["metric"]], result["ci95"]
        shown = f"{100 * value:.2f}% ± {100 * ci95:.2f}%" if metric == "accuracy" else f"{value:.4g} ± {ci95:.2g}"
        print(f"{self.recipe}: test {metric} {shown} (95% CI, {cfg.test_episodes} tasks, weights of {name})")
        return result
