"""`l2l-recipes speed --recipes PATTERN --gpu-estimate`: a recipe's paper budget on one GPU, estimated.

Small few-shot models on a GPU spend their time launching kernels more than computing, so a
step's cost is estimated from what it asks of the device: its PyTorch operations (views
excepted: they launch nothing) and its FLOPs, both counted here on the CPU in the recipe's
own `train()` on its default engine (a training iteration, and one validation on
`VAL_TASKS` tasks for the cost per task of validation and test). Seconds = operations x the
seconds per operation of the one GPU run measured (`MEASURED`: its FLOPs at `ASSUMED_FLOPS`
taken out first) + FLOPs / `ASSUMED_FLOPS`. An estimate, not a measurement: data prepared on
the host (the reference engine's learn2learn Tasksets) is not in it.
"""
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from l2l_recipes import harness, registry
from l2l_recipes.errors import UserError
from l2l_recipes.lab import recipe_speed, speed

# The one GPU measurement (docs/speed.md, "On a GPU"): six bench processes shared one NVIDIA
# H200 (torch 2.11.0+cu130, float32, fast engine, commit 280d361, 2026-12-04); each trained
# this recipe at 28 episodes a second, validations included.
MEASURED = {"recipe": "protonet-omniglot-5w1s", "iterations_per_second": 28.0,
            "device": "NVIDIA H200, shared by six bench processes", "date": "2026-12-04",
            "source": "docs/speed.md, On a GPU"}
ASSUMED_FLOPS = 10e12  # FLOP/s of a step's arithmetic (unmeasured; a small fraction of an H200's TF32 rate)
VAL_TASKS = 16  # validation tasks counted (the cost per task is what is kept)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs):
    """A convolution's gradients, each as many FLOPs as its forward: torch's own formula counts a
    grouped convolution's weight gradient as if ungrouped (x groups: 32x for the fast path's
    meta-batch of 32 tasks)."""
    transposed, output_mask = args[4], args[7]
    return sum(output_mask[:2]) * conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)


class CountOps(TorchDispatchMode):
    """Counts the operations dispatched to PyTorch's kernels, views apart."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count["views" if func.is_view else "ops"] += 1
        return func(*args, **(kwargs or {}))


class CountingRun(harness.Run):
    """A run that counts the operations and FLOPs of each of its iterations (from the second)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = []  # (ops, flops) of iterations 2, 3, ...

    def iterations(self, total):
        for iteration in super().iterations(total):
            if iteration == 1:  # warm-up: lazily built state, caches
                yield iteration
                continue
            with CountOps() as ops, FlopCounterMode(display=False, custom_mapping={
                    torch.ops.aten.convolution_backward: conv_backward_flops}) as flops:
                yield iteration
            self.counts.append((ops.count["ops"], flops.get_total_flops()))


def _count(name, changes, data_root):
    """(ops, flops) of a training iteration and of one validation task of `name` with `changes`."""
    settings = {**changes, "iterations": 3, "val_interval": 3, "log_interval": 3, "val_episodes": VAL_TASKS}
    run = recipe_speed.train_quietly(name, settings, data_root, CountingRun)
    (train_ops, train_flops), (last_ops, last_flops) = run.counts  # iteration 3 validates too
    return (train_ops, train_flops), ((last_ops - train_ops) / VAL_TASKS, (last_flops - train_flops) / VAL_TASKS)


def count_recipe(name, data_root=None):
    """A record row: `name`'s operations and FLOPs per iteration of each part of its paper budget,
    per validation task, and how many validations and test tasks the budget holds."""
    recipe = registry.get_recipe(name)
    cfg = recipe.config()
    parts, validation = [], None
    for iterations, changes in recipe_speed.phases(name):
        (ops, flops), per_task = _count(name, changes, data_root)
        parts.append({"iterations": iterations, "ops": ops, "flops": flops})
        validation = validation or per_task
    budget = sum(p["iterations"] for p in parts)
    return {"recipe": name, "engine": getattr(cfg, "engine", "plain"), "budget_iterations": budget,
            "phases": parts, "validation_task": {"ops": round(validation[0], 1), "flops": validation[1]},
            "validation_tasks": budget // cfg.val_interval * cfg.val_episodes, "test_tasks": cfg.test_episodes}


def totals(row):
    """(ops, flops) of a row's whole paper budget: training, validations, the test."""
    tasks = row["validation_tasks"] + row["test_tasks"]
    return tuple(sum(p["iterations"] * p[key] for p in row["phases"]) + tasks * row["validation_task"][key]
                 for key in ("ops", "flops"))


def seconds_per_op(row):
    """The measured GPU run's seconds per operation, from the count of its own recipe (`row`)."""
    cfg = registry.get_recipe(row["recipe"]).config()
    part, task = row["phases"][0], row["validation_task"]
    # one validation interval: its iterations and one validation
    ops, flops = (cfg.val_interval * part[key] + cfg.val_episodes * task[key] for key in ("ops", "flops"))
    seconds = cfg.val_interval / MEASURED["iterations_per_second"]
    return (seconds - flops / ASSUMED_FLOPS) / ops


def gpu_hours(row, op_seconds):
    ops, flops = totals(row)
    return (ops * op_seconds + flops / ASSUMED_FLOPS) / 3600


def measure(pattern, data_root=None, progress=print):
    """Count every recipe matching `pattern` (and the measured GPU run's recipe); the record (dict)."""
    started, environment = time.time(), speed.environment()  # commit read before counting
    names = registry.list_recipes(pattern)
    if not names:
        raise UserError(f"no recipe matches {pattern!r}: see `l2l-recipes list`")
    torch.set_num_threads(1)
    rows, skipped = {}, {}
    for name in dict.fromkeys([MEASURED["recipe"], *names]):
        try:
            rows[name] = count_recipe(name, data_root)
        except UserError as e:  # its data is not on this machine
            skipped[name] = str(e)
            progress(f"{name}: not counted ({e})")
    op_seconds = seconds_per_op(rows[MEASURED["recipe"]])
    for name, row in rows.items():
        row["gpu_hours"] = round(gpu_hours(row, op_seconds), 3)
        if name in names:
            progress(format_row(row))
    return {"pattern": pattern, "measured": MEASURED, "assumed_flops_per_second": ASSUMED_FLOPS,
            "seconds_per_op": op_seconds, "recipes": [rows[n] for n in names if n in rows], "skipped": skipped,
            "method": __doc__.split("\n\n", 1)[1].strip(), "environment": environment,
            "wall_seconds": round(time.time() - started, 1)}


def format_row(row):
    ops, flops = row["phases"][0]["ops"], row["phases"][0]["flops"]
    return (f"{row['recipe']:<36} {ops:>6} ops/it {flops / 1e9:>8.2f} GFLOP/it "
            f"{row['budget_iterations']:>7} it: ~{row['gpu_hours']:.2f} h on one GPU (estimate)")
