"""`l2l-recipes speed --recipes PATTERN`: each recipe's own training loop timed on both engines.

For every recipe matching the pattern (default: each family's Omniglot 5-way 1-shot variant),
its `train()` runs as `l2l-recipes run` runs it, once per engine (engine=fast and
engine=reference where the Config has an `engine`, else the one loop), each in a process of its
own with one thread by default. A `Run` whose `iterations()` times every iteration's body
makes the processes take turns, `TURN` iterations at a time, so both engines see the same
machine. The last iteration validates on the recipe's fixed validation tasks: its extra time
over the median iteration is the validation's cost. From these the paper budget of each recipe
is projected: median x iterations + validations + the 1,000-task test (at the validation's
cost per task).
"""
import contextlib
import dataclasses
import multiprocessing
import os
import statistics
import tempfile
import time

import torch

from l2l_recipes import harness, registry
from l2l_recipes.lab import speed
from l2l_recipes.errors import UserError

TURN = 2  # iterations per turn
DEFAULT_PATTERN = "*-omniglot-5w1s"
# Recipes whose length is set by a stopping rule, not `iterations` (a cap): the length projected.
# ProtoNet (Snell et al.: patience 200 epochs of 100 episodes, then train+val for best + 199
# epochs): 2 x best + ~40,000 episodes; the GPU-started seeds' best epochs (34-158 so far) give
# 47,000-72,000, of which 60,000 here.
STOPPING_RULE_BUDGET = {"protonet": 60_000}
# Recipes whose step costs change over the run: (iterations, settings that make a fresh run's
# first iterations cost what that part of the schedule costs) per part. MAML++: first order with
# the multi-step loss's every query pass, then first order with the last step's only, then
# second order (derivative-order annealing).
PHASES = {"mamlpp": lambda cfg: [
    (cfg.msl_iterations, {}),
    (cfg.first_order_iterations - cfg.msl_iterations, {"msl_iterations": 0}),
    (cfg.iterations - cfg.first_order_iterations, {"msl_iterations": 0, "first_order_iterations": 0})]}
TINY = {"meta_batch_size": 2, "val_episodes": 2, "train_ways": 5, "hidden_size": 8, "adaptation_steps": 1,
        "test_adaptation_steps": 1, "batch_size": 8}


class TimedRun(harness.Run):
    """A run that times each iteration's body and, every `TURN` iterations, hands the machine
    to the other processes (waits for a message on `connection`)."""

    def __init__(self, *args, connection, **kwargs):
        super().__init__(*args, **kwargs)
        self.connection = connection
        self.seconds = []

    def iterations(self, total):
        for iteration in super().iterations(total):
            if (iteration - 1) % TURN == 0:  # between bodies, never inside one
                self.connection.send("turn")
                self.connection.recv()
            started = time.perf_counter()
            yield iteration
            self.seconds.append(time.perf_counter() - started)


def train_quietly(name, settings, data_root, run_class, **run_options):
    """Train recipe `name` on the CPU with `settings` (those its Config has), in a folder thrown
    away after, its printing silenced, under a `run_class` run; returns the run."""
    recipe = registry.get_recipe(name)
    cfg = recipe.config()
    fields = {f.name for f in dataclasses.fields(cfg)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in settings.items() if k in fields})
    with tempfile.TemporaryDirectory() as folder, open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        run = run_class(folder, name, cfg, torch.device("cpu"), data_root=data_root, progress=False,
                        checkpoint_every=0, **run_options)
        recipe.load_module().train(cfg, run)
    return run


def _serve(connection, name, engine, warmup, iterations, threads, changes, data_root):
    """One loop's process: trains `name` on `engine` for warmup + iterations, validating at the
    end, taking turns; sends the per-iteration seconds."""
    torch.set_num_threads(threads)
    harness.keep_freed_memory()  # as every run here
    total = warmup + iterations + 1  # + the last, validating one
    settings = {**changes, "iterations": total, "val_interval": total, "log_interval": total, "engine": engine}
    run = train_quietly(name, settings, data_root, TimedRun, connection=connection)
    connection.send(("done", run.seconds))


def time_recipe(name, warmup=2, iterations=10, threads=1, changes=None, data_root=None):
    """{engine: per-iteration seconds}: `name` trained on each of its engines, in turns (the
    last iteration validates)."""
    cfg = registry.get_recipe(name).config()
    engines = ("fast", "reference") if hasattr(cfg, "engine") else (None,)
    context = multiprocessing.get_context("spawn")
    workers = {}
    try:
        for engine in engines:
            connection, child = context.Pipe()
            process = context.Process(target=_serve, daemon=True, args=(
                child, name, engine, warmup, iterations, threads, changes or {}, data_root))
            process.start()
            workers[engine] = (process, connection)
        # each process loads its data and stops before its first turn; then they take turns
        last = {engine: speed.receive(f"{name} (engine {engine})", connection) for engine, (_, connection) in workers.items()}
        while any(message == "turn" for message in last.values()):
            for engine, (_, connection) in workers.items():
                if last[engine] == "turn":
                    connection.send("go")
                    last[engine] = speed.receive(f"{name} (engine {engine})", connection)  # after its turn
    finally:
        for process, _ in workers.values():
            process.join(timeout=60)
    return {engine: message[1] for engine, message in last.items()}


def phases(name):
    """[(iterations, settings)]: the parts of `name`'s paper budget timed apart (one for most)."""
    recipe = registry.get_recipe(name)
    cfg = recipe.config()
    budget = STOPPING_RULE_BUDGET.get(recipe.family, cfg.iterations)
    return [(n, changes) for n, changes in PHASES[recipe.family](cfg) if n > 0] if recipe.family in PHASES \
        else [(budget, {})]


def summary(name, timed, warmup):
    """A recipe's timings, the validation's cost and the projected hours of its paper budget, from
    `timed` = [(iterations, {engine: per-iteration seconds})], one per phase."""
    recipe = registry.get_recipe(name)
    cfg = recipe.config()
    budget = sum(n for n, _ in timed)
    validations = budget // cfg.val_interval
    engines = {}
    for engine in timed[0][1]:
        medians = [statistics.median(seconds[engine][warmup:-1]) for _, seconds in timed]
        validation = max(timed[0][1][engine][-1] - medians[0], 0.0)
        train = sum(n * median for (n, _), median in zip(timed, medians))
        test = validation * cfg.test_episodes / cfg.val_episodes
        engines[engine or "plain"] = {
            "seconds_per_iteration": round(train / budget, 4), "timed_iterations": len(timed[0][1][engine]) - warmup - 1,
            "validation_seconds": round(validation, 2), "projected_hours": round((train + validation * validations
                                                                                 + test) / 3600, 2),
            **({"phases": [{"iterations": n, "seconds_per_iteration": round(m, 4)} for (n, _), m in zip(timed, medians)]}
               if len(timed) > 1 else {})}
    return {"recipe": name, "family": recipe.family, "budget_iterations": budget,
            "budget_from": "stopping rule (projected)" if recipe.family in STOPPING_RULE_BUDGET else "iterations",
            "val_interval": cfg.val_interval, "val_episodes": cfg.val_episodes, "test_episodes": cfg.test_episodes,
            "engines": engines}


def measure(pattern=DEFAULT_PATTERN, warmup=2, iterations=10, threads=1, tiny=False, data_root=None, progress=print):
    """Time every recipe matching `pattern`; returns the record (dict)."""
    started = time.time()
    names = registry.list_recipes(pattern)
    if not names:
        raise UserError(f"no recipe matches {pattern!r}: see `l2l-recipes list`")
    rows = []
    for name in names:
        timed = [(n, time_recipe(name, warmup, iterations, threads, {**changes, **(TINY if tiny else {})}, data_root))
                 for n, changes in phases(name)]
        rows.append(summary(name, timed, warmup))
        progress(format_row(rows[-1]))
    return {"pattern": pattern, "threads": threads, "warmup": warmup, "iterations": iterations, "tiny": tiny,
            "timing": f"one process per engine, {threads} thread(s), taking turns of {TURN} iterations; "
                      f"medians; the last iteration validates", "recipes": rows,
            "environment": speed.environment(),
            "wall_seconds": round(time.time() - started, 1)}


def format_row(row):
    parts = [f"{engine} {1000 * e['seconds_per_iteration']:.0f} ms/it, validation {e['validation_seconds']:.1f} s, "
             f"{e['projected_hours']:.1f} h" for engine, e in row["engines"].items()]
    return f"{row['recipe']:<32} {row['budget_iterations']:>7} it: " + "; ".join(parts)


def report(record):
    """The record as a Markdown table."""
    lines = [f"{record['threads']} thread(s); {record['environment']['processor']}, torch {record['environment']['torch']}; "
             f"{record['environment']['date'][:10]}",
             "",
             "| recipe | paper budget (it) | fast ms/it | plain ms/it | speed-up | validation s (fast / plain) "
             "| projected h (fast / plain) |",
             "|---|---|---|---|---|---|---|"]
    for row in record["recipes"]:
        e = row["engines"]
        fast, plain = e.get("fast"), e.get("reference", e.get("plain"))
        budget = f"{row['budget_iterations']:,}" + (" (stopping rule)" if row["budget_from"] != "iterations" else "")
        ms = lambda x: f"{1000 * x['seconds_per_iteration']:.0f}" if x else "–"  # noqa: E731
        speedup = f"{plain['seconds_per_iteration'] / fast['seconds_per_iteration']:.2f}x" if fast else "–"
        both = lambda key: " / ".join(f"{x[key]:.1f}" for x in (fast, plain) if x)  # noqa: E731
        lines.append(f"| `{row['recipe']}` | {budget} | {ms(fast)} | {ms(plain)} | {speedup} | "
                     f"{both('validation_seconds')} | {both('projected_hours')} |")
    return "\n".join(lines)
