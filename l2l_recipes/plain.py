"""What a recipe's plain loop calls: a run in one process, predictors, evaluation with 95% CIs.

`l2l-recipes export` copies the parts a recipe uses into its file, with `load_split` for
`data.load_split` and `override` for --set. `harness.Run` extends PlainRun with resuming,
time budgets and torchrun; `harness.Predictor` extends Predictor with batched evaluation.
"""
import ast
import dataclasses
import itertools
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
from l2l_recipes.config import check, validate
from l2l_recipes.errors import UserError


def override(cfg, assignments):
    """`cfg` with each 'key=value' applied (a Python literal, or a bare string, of the field's type), its ranges
    checked."""
    for text in assignments:
        key, _, value = text.partition("=")
        check(key in cfg.__dataclass_fields__, f"unknown config key '{key}'")
        kind = type(getattr(cfg, key))
        try:
            value = value if kind is str and not value.startswith(("'", '"')) else ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # left a string: refused below unless the field is one
        check(isinstance(value, kind) or kind is float and type(value) is int,
              f"--set {text}: expected {kind.__name__}, got {type(value).__name__}")
        cfg = dataclasses.replace(cfg, **{key: kind(value)})
    validate(cfg)
    return cfg


def resolve_device(name):
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU, or 'cuda:K' without GPU K, is a UserError."""
    check(name in ("auto", "cpu", "cuda") or name.startswith("cuda:"), f"unknown device '{name}': use auto, cpu or cuda")
    check(not name.startswith("cuda") or torch.cuda.is_available(),
          "--device cuda but PyTorch sees no CUDA GPU here: use --device cpu or auto")
    gpus = torch.cuda.device_count() if name.startswith("cuda:") else 0
    check(not gpus or name[5:].isdigit() and int(name[5:]) < gpus, f"unknown device '{name}': this machine's GPUs "
                                                                    f"are cuda:0 to cuda:{gpus - 1}")
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_split(dataset, split, root="data", download=False):
    """One split of `dataset` decoded from its files under `root` (no cache)."""
    return data.dataset_module(dataset).decode_split(split, Path(root), download)


def seed_everything(seed):
    """Seed Python's `random` (learn2learn's task sampling), NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mean_ci95(values):
    """Mean and half-width of the normal 95% confidence interval of the mean (nan for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(1.96 * t.std() / math.sqrt(len(t))) if len(t) > 1 else float("nan")


def query_scores(logits, query_y):
    """[(query accuracy, query cross-entropy)] per task of logits [tasks, queries, ways] (in float32)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(logits.transpose(1, 2), query_y, reduction="none").mean(1)
    return list(zip((logits.argmax(-1) == query_y).float().mean(1).tolist(), losses.tolist()))


def summary(scores):
    """{"accuracy": mean, "ci95": half-width of its 95% CI, "loss": mean} of (accuracy, loss) per task."""
    accuracy, ci95 = mean_ci95([a for a, _ in scores])
    return {"accuracy": accuracy, "ci95": ci95, "loss": statistics.fmean(loss for _, loss in scores)}


class Predictor:
    """A trained model that adapts to a support set and scores a query set (recipes implement `predict`)."""
    metric, higher_is_better = "accuracy", True  # evaluate()'s key that selects the best weights, its sense
    head = None  # a fixed-head family's name ("MAML"): its models take tasks of cfg.ways ways only

    def __init__(self, cfg, model, device, data_root=None):
        self.cfg, self.model, self.device, self.data_root = cfg, model.to(device), device, data_root

    def check_ways(self, support_y):
        ways = int(support_y.max()) + 1
        check(not self.head or ways == self.cfg.ways, f"this {self.head} model has a {self.cfg.ways}-way head; "
                                                      f"got a {ways}-way task")

    def test_tasks(self, episodes, seed):
        cfg = self.cfg
        return data.fixed_taskset(data.load_split(cfg.dataset, "test", self.data_root), cfg.ways, cfg.shots,
                                  cfg.queries, episodes, seed)

    def evaluate(self, tasks):
        """summary() of the fixed `tasks`, scored one by one."""
        scores = []
        for x, y in (tasks[i] for i in range(len(tasks))):
            sx, sy, qx, qy = data.split_support_query(x.to(self.device), y.to(self.device), self.cfg.shots)
            scores += query_scores(self.predict(sx, sy, qx)[None], qy[None])
        return summary(scores)


class EarlyStopping:
    """Stop when the validation loss has not improved for more than `patience` validations."""

    def __init__(self, patience):
        self.patience, self.best_loss, self.best_iteration, self.wait = patience, float("inf"), 0, 0

    def update(self, iteration, loss):
        """Record the validation `loss` of `iteration`; True when patience is exceeded."""
        if loss < self.best_loss:
            self.best_loss, self.best_iteration, self.wait = loss, iteration, 0
        else:
            self.wait += 1
        return self.wait > self.patience


def claim_folder(path):
    """`path` made now, or `path-2`, `path-3`, ... where another run took the name: mkdir is atomic,
    so two runs never share a folder. A folder that cannot be made is a UserError naming --out."""
    name = path.name
    for k in itertools.count(2):
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            path = path.with_name(f"{name}-{k}")
        except OSError as e:  # a file in the way, no permission
            raise UserError(f"cannot make the run folder {path} ({e.strerror}): pass an --out folder "
                            f"you can write") from None


class PlainRun:
    """A run in one process, in folder `path`: config.json, metrics.jsonl, ckpt.pt, best.pt, result.json."""
    checkpoint_format = 1  # of ckpt.pt and best.pt, as `l2l-recipes eval`, `predict` and `run --resume` read them

    def __init__(self, path, recipe_name, cfg, device, data_root=None, download=False):
        self.path, self.recipe, self.cfg, self.device = Path(path), recipe_name, cfg, device
        self.data_root, self.download, self.started, self.best_val = data_root, download, time.time(), float("-inf")
        self.tracked = None  # (model, optimizer, {name: object}) given to track()
        self.stopped_early = self.ended = self.made = False  # by a time budget (harness.Run); end_training(); folder()

    def track(self, model, optimizer=None, **stateful):
        self.tracked = (model, optimizer, stateful)

    def iterations(self, total):  # 1 to `total`, or until end_training()
        return itertools.takewhile(lambda _: not self.ended, range(1, total + 1))

    def end_training(self):
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
        row = {"iteration": iteration, "time": round(time.time() - self.started, 3), **metrics}
        with open(self.folder() / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def folder(self):
        """The run's folder, made with its config.json on first use: `path`, or `path-2`, `path-3`, ...
        where another run took that name (a directory is made only once: never two runs in one)."""
        if not self.made:
            self.path = claim_folder(self.path)
            (self.path / "config.json").write_text(json.dumps({"recipe": self.recipe, **vars(self.cfg)}, indent=2))
            self.made = True
        return self.path

    def evaluate(self, predictor, tasks):
        return predictor.evaluate(tasks)

    def validate(self, iteration, predictor, tasks, checkpoint=True, save_best=True):
        """Evaluate and log `tasks`, keep the best weights in best.pt (unless the caller does), write ckpt.pt."""
        result = self.evaluate(predictor, tasks)
        self.log(iteration, **{f"val_{key}": value for key, value in result.items()})
        score = result[predictor.metric] * (1 if predictor.higher_is_better else -1)
        if save_best and score > self.best_val:
            self.best_val = score
            self.save("best.pt", predictor.model, iteration, best_val_score=score)
        if checkpoint:
            self.checkpoint(iteration)
        return result

    def checkpoint(self, iteration):
        self.save("ckpt.pt", self.tracked[0], iteration)

    def save(self, name, model, iteration, **extra):
        tmp = self.folder() / f".{name}.tmp"  # written whole, then renamed: a stop never leaves half a file
        torch.save({"format": self.checkpoint_format, "recipe": self.recipe, "config": vars(self.cfg),
                    "iteration": iteration, "model": model.state_dict(), **extra}, tmp)
        tmp.replace(self.path / name)

    def test(self, predictor):
        """Test the weights of best.pt (else ckpt.pt) on the fixed test tasks; write and print result.json."""
        cfg, name = self.cfg, "best.pt" if (self.path / "best.pt").is_file() else "ckpt.pt"
        check((self.path / name).is_file(), "nothing to test: training ran no validation (is iterations below 1?)")
        predictor.model.load_state_dict(torch.load(self.path / name, map_location="cpu", weights_only=True)["model"])
        result = {"recipe": self.recipe, "metric": predictor.metric, "higher_is_better": predictor.higher_is_better,
                  **predictor.evaluate(predictor.test_tasks(cfg.test_episodes, cfg.test_seed)),
                  "episodes": cfg.test_episodes, **{k: vars(cfg)[k] for k in ("ways", "shots", "queries") if k in vars(cfg)},
                  "split": "test", "test_seed": cfg.test_seed, "seed": cfg.seed, "checkpoint": name}
        (self.folder() / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        metric, value, ci95 = result["metric"], result[result["metric"]], result["ci95"]
        shown = f"{100 * value:.2f}% ± {100 * ci95:.2f}%" if metric == "accuracy" else f"{value:.4g} ± {ci95:.2g}"
        print(f"{self.recipe}: test {metric} {shown} (95% CI, {cfg.test_episodes} tasks, weights of {self.path / name})")
        return result
