"""The `l2l-recipes` command line: list, show, run and eval named recipes."""
import dataclasses
import inspect
import json
import shlex
import sys
import time
from pathlib import Path

import click

from l2l_recipes import distributed, harness, plain, registry
from l2l_recipes.bench import format_value
from l2l_recipes.config import apply_overrides, parse_assignment
from l2l_recipes.errors import UserError


class _Group(click.Group):
    """Turns a UserError (or a failed allocation) anywhere below into a one-line 'Error: ...' and
    exit status 1 (without the line where another process prints it)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if e.quiet:
                raise click.exceptions.Exit(1) from None
            raise click.ClickException(str(e)) from None
        except (MemoryError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
            too_big = harness.out_of_memory(e)
            if too_big is None:
                raise
            raise click.ClickException(str(too_big)) from None


@click.group(cls=_Group)
def cli():
    """Run, reproduce and reuse meta-learning recipes built on learn2learn."""


@cli.command("list")
@click.argument("pattern", default="*")
def recipes_list(pattern):
    """List recipe names matching PATTERN (wildcards allowed, e.g. 'maml-*')."""
    names = registry.list_recipes(pattern)
    if not names:
        raise UserError(f"no recipe matches '{pattern}': use wildcards (e.g. '*omniglot*'), or "
                        f"`l2l-recipes list` for all")
    for name in names:
        recipe = registry.get_recipe(name)
        doc = (inspect.getdoc(recipe.make_config) or "").split("\n")[0]
        published = f" Published: {recipe.published}" if recipe.published else ""
        click.echo(f"{name:32s} {doc}{published}")


@cli.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a recipe's description and its resolved config."""
    recipe = registry.get_recipe(name)
    module = recipe.load_module()
    click.echo(f"{name}  (family {recipe.family}, {Path(module.__file__).name})\n")
    click.echo(inspect.getdoc(recipe.make_config) or "")
    for label, number in (("published", recipe.published), ("learn2learn's claim", recipe.learn2learn)):
        if number:
            click.echo(f"{label}: {number}")
    click.echo("")
    for key, value in dataclasses.asdict(recipe.config()).items():
        click.echo(f"  {key} = {value!r}")


@cli.command("run")
@click.argument("name", required=False)
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding the datasets "
              "(default: $L2L_RECIPES_DATA, else ~/.cache/l2l-recipes/data).")
@click.option("--download", is_flag=True, help="Download the dataset into the data root if missing.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Where to train (default: the recipe's, normally auto).")
@click.option("--seed", type=int, default=None, help="Random seed (default: the recipe's).")
@click.option("--out", type=click.Path(file_okay=False), default="runs", show_default=True,
              help="Parent folder of run directories.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override a config field; repeatable, applied left to right.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=100, show_default=True,
              help="Iterations between checkpoints (0: only at validations and on a stop signal).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Budget: stop training after this wall time (the last iteration is validated; "
                   "the best validation weights are tested).")
@click.option("--progress/--no-progress", default=None,
              help="Show progress bars (default: when stderr is a terminal).")
def recipes_run(name, resume_dir, data_root, download, device, seed, out, assignments, checkpoint_every,
                max_minutes, progress):
    """Train recipe NAME (or continue --resume RUN_DIR), then meta-test it on the fixed test tasks.

    Under torchrun (`torchrun --nproc_per_node=N -m l2l_recipes.cli run ...`) the meta-batch and
    the evaluations are split over the N processes; rank 0 writes the run directory.
    """
    progress = sys.stderr.isatty() if progress is None else progress
    if resume_dir:
        if name or seed is not None or assignments:
            raise UserError("--resume continues a run with its own recipe and config: drop NAME, --seed and --set")
        device = plain.resolve_device(device or "auto")
    else:
        if not name:
            raise UserError("run needs a recipe NAME (see `l2l-recipes list`) or --resume RUN_DIR")
        recipe = registry.get_recipe(name)
        flags = [f"seed={seed}"] * (seed is not None) + [f"device='{device}'"] * (device is not None)
        cfg = apply_overrides(recipe.config(), flags + list(assignments))
        device = plain.resolve_device(cfg.device)
    device = distributed.init(device)  # joins torchrun's processes, if launched by torchrun
    try:
        progress = progress and distributed.is_main()
        options = dict(data_root=data_root, download=download, progress=progress, checkpoint_every=checkpoint_every,
                       max_minutes=max_minutes)
        if resume_dir:
            run = harness.Run.resume(resume_dir, device, **options)
        else:
            distributed.check_split(cfg)  # on every process, before anything waits for the others
            if distributed.is_main():
                for text in assignments:
                    click.echo(f"override: {text}")
            run = harness.Run.create(out, name, cfg, device, **options)
        _train_and_test(run, progress)
    finally:
        distributed.close()


def _train_and_test(run, progress):
    harness.prepare_to_train(run.device)  # freed buffers kept; a step too large fails in one line
    if distributed.is_main():
        world = distributed.world_size()
        processes = f", {world} processes ({distributed.backend()})" if world > 1 else ""
        click.echo(f"run directory: {run.path}  (device {run.device}{processes})")
    try:
        try:
            registry.get_recipe(run.recipe).load_module().train(run.cfg, run)
        except BaseException:
            if run.remove_if_empty():  # e.g. its data failed to load
                click.echo(f"run directory {run.path} removed: the run stopped before writing anything")
            raise
        # every process tests its share of the tasks on best.pt, which rank 0 reads and sends
        result = harness.meta_test(run.path, device=str(run.device), data_root=run.data_root, progress=progress,
                                   out_name="result.json", train_seconds=round(time.time() - run.started, 1),
                                   iterations_done=run.iterations_done, max_minutes=run.max_minutes,
                                   stopped_by_time_budget=run.stopped_early, ended_by_stopping_rule=run.ended)
    finally:
        harness.release_run_dir(run.path)  # held since create() or resume(): no other process trains it
    if distributed.is_main():
        click.echo(_result_line(result))


@cli.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--episodes", type=click.IntRange(min=2), default=None,
              help="Test tasks (default: the recipe's, 1000).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--ways", type=click.IntRange(min=2), default=None,
              help="Test on N-way tasks instead of the recipe's (models without a fixed head).")
@click.option("--shots", type=click.IntRange(min=1), default=None,
              help="Test with K support images per class instead of the recipe's.")
@click.option("--queries", type=click.IntRange(min=1), default=None,
              help="Score Q query images per class instead of the recipe's (a batch-norm model "
                   "normalising with the query batch's statistics gives other numbers).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Adapt with N test-time steps instead of the recipe's (MAML, ANIL, Meta-SGD, Reptile, "
                   "MAML++ and their kin).")
@click.option("--non-transductive", "alone", is_flag=True,
              help="Score each query in one batch with the support images, not with the other queries "
                   "(models with batch statistics at test time: MAML and its kin; what `predict` does).")
@click.option("--progress/--no-progress", default=None,
              help="Show progress bars (default: when stderr is a terminal).")
def recipes_eval(run_dir, episodes, device, data_root, ways, shots, queries, steps, alone, progress):
    """Meta-test the model of RUN_DIR on the fixed test tasks of its recipe (or, with --ways and
    --shots, on fixed test tasks of that setting: one 1-shot ProtoNet gives the 5- and 20-way rows)."""
    progress = sys.stderr.isatty() if progress is None else progress
    harness.cap_memory(plain.resolve_device(device))  # tasks too large fail in one line, not by the OOM killer
    result = harness.meta_test(run_dir, episodes, device, data_root, progress, ways=ways, shots=shots,
                               queries=queries, steps=steps, alone=alone)
    click.echo(json.dumps(harness.json_safe(result), allow_nan=False))
    click.echo(_result_line(result))


@cli.command("predict")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("more_queries", nargs=-1, type=click.Path(), metavar="[QUERY]...")
@click.option("--support", type=click.Path(), help="Folder with one subfolder of images per class.")
@click.option("--query", "queries", multiple=True, type=click.Path(),
              help="Image file or folder of images to classify; repeatable, more may follow.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list with every class's probability.")
@click.option("--transductive", is_flag=True,
              help="Score all queries in one batch, as the test tasks of MAML and its kin: each query is "
                   "then normalised with the others' batch statistics.")
def recipes_predict(run_dir, more_queries, support, queries, device, as_json, transductive):
    """Classify query images among the classes of a support folder with the model of RUN_DIR;
    prints each query's path, predicted class and its probability.

    Each query is scored as if it were the only one: MAML, Meta-SGD, ANIL, Reptile and MAML++,
    which normalise with batch statistics at test time, see it in one batch with the support
    images. With --transductive they see all queries in one batch, as their papers test them (a
    query's class then depends on the other queries: use it for a batch of several classes)."""
    from l2l_recipes import predict
    if support is None:
        raise UserError("predict needs --support DIR: a folder with one subfolder of images per class")
    harness.cap_memory(plain.resolve_device(device))
    results = predict.classify(run_dir, support, queries + more_queries, device, transductive)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(f"{r['query']}\t{r['class']}\t{r['probability']:.4f}")


@cli.command("publish")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
def recipes_publish(run_dir, dest):
    """Copy RUN_DIR's tested model to DEST as a small run folder (config.json, env.json,
    result.json, best.pt without optimizer state) that `eval`, `predict` and `load` take:
    how benchmarks/models/ holds the reproduced models."""
    path = harness.publish(run_dir, dest)
    size = (path / "best.pt").stat().st_size
    click.echo(f"published {run_dir} to {path} (best.pt {size / 1e6:.2f} MB); test it with: "
               f"l2l-recipes eval {shlex.quote(str(path))}")


@cli.command("export")
@click.argument("name")
@click.argument("dest", type=click.Path())
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
@click.option("--all-datasets", is_flag=True,
              help="Include the loaders of every dataset the recipe's family uses (default: the variant's).")
@click.option("--fast", is_flag=True,
              help="Keep the recipe's fast path (engine=fast) and run's resume machinery; by default the file "
                   "holds the plain loop only.")
def recipes_export(name, dest, force, all_datasets, fast):
    """Write recipe NAME as one Python file, DEST or DEST/<name>.py, that needs only learn2learn,
    torch and torchvision: its config at the top, then the package code it uses, inlined. The
    file trains with the recipe's plain loop in one process (as `run NAME --set engine=reference`,
    to the same numbers) and reads its class splits from splits/ beside it, written too; --fast
    keeps the fast path and run's resume machinery, and the splits inside the file."""
    from l2l_recipes import export
    path = export.export_recipe(name, dest, force=force, all_datasets=all_datasets, fast=fast)
    lines = len(path.read_text().splitlines())
    splits = "" if fast else f" and {path.parent / 'splits'}/, which it reads (copy both)"
    click.echo(f"wrote {path} ({lines} lines){splits}; run it with: python {path} --data-root DIR "
               f"[--set key=value ...]")


class SeedRange(click.ParamType):
    """`--seeds`: N (seeds 1..N) or FIRST-LAST, as a range of seed numbers."""
    name = "N|FIRST-LAST"

    def convert(self, value, param, ctx):
        if isinstance(value, range):
            return value
        first, dash, last = str(value).strip().rpartition("-")
        try:
            seeds = range(int(first) if dash else 1, int(last) + 1)
        except ValueError:
            self.fail(f"{value!r} is neither N (seeds 1..N) nor FIRST-LAST (e.g. 2-3)", param, ctx)
        if not 1 <= seeds.start < seeds.stop:
            self.fail(f"{value!r} names no seed: seeds are numbered from 1 (N >= 1, 1 <= FIRST <= LAST)", param, ctx)
        return seeds

    @staticmethod
    def text(seeds):
        """The option as given to reproduce `seeds`: '3' for 1..3, '2-3'."""
        return f"{seeds.stop - 1}" if seeds.start == 1 else f"{seeds.start}-{seeds.stop - 1}"


@cli.command("bench")
@click.argument("names", nargs=-1, required=True)
@click.option("--seeds", type=SeedRange(), default="3", show_default=True,
              help="Training runs per recipe: N for seeds 1..N, FIRST-LAST for those seeds (e.g. 2-2: seed 2 "
                   "alone, its record merged later with `bench-merge`).")
@click.option("--episodes", type=click.IntRange(min=2), default=None,
              help="Fixed test tasks per evaluation (default: the recipe's, its paper's number).")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Budget: training iterations (default: the recipe's).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Budget: training wall time per seed; the last iteration reached is validated.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="Config override.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--runs-dir", type=click.Path(file_okay=False), default="runs/bench", show_default=True)
@click.option("--results-dir", type=click.Path(file_okay=False), default="benchmarks/results",
              show_default=True)
@click.option("--resume", is_flag=True,
              help="Continue this bench (same NAME and options) after a stop: tested seeds are kept, "
                   "a seed with a checkpoint continues from it, the rest start.")
@click.option("--progress/--no-progress", default=None)
def recipes_bench(names, seeds, episodes, iterations, max_minutes, assignments, device, data_root, runs_dir,
                  results_dir, resume, progress):
    """Train and meta-test each recipe NAME over seeds; write records and the benchmark table.

    The seeds' runs are kept in RUNS_DIR/NAME/bench-<key>/seed-N (the key: a hash of the
    options other than --seeds: --resume with a larger --seeds trains the seeds a finished
    bench lacks and writes a record of them all). A bench stopped at any moment (Ctrl-C, kill,
    machine gone) continues with the same command plus --resume, and ends with the record an
    unstopped bench would write.
    Several processes (or machines sharing RUNS_DIR) may run one bench with --resume: each
    trains the seeds no other holds, the last to finish writes the record.
    """
    from l2l_recipes import bench
    names = tuple(dict.fromkeys(names))  # a name given twice is benched once
    for name in names:
        registry.get_recipe(name)  # fail on a typo before hours of training
    keys = {parse_assignment(a)[0] for a in assignments}
    if "seed" in keys:  # each seed's run sets it: the record would name an override that did nothing
        raise UserError("bench trains seeds 1..N (--seeds N, or FIRST-LAST): drop --set seed")
    if "iterations" in keys and iterations:
        raise UserError("--iterations and --set iterations=... both set the budget: give one")
    progress = sys.stderr.isatty() if progress is None else progress
    budget = [f"iterations={iterations}"] if iterations else []
    flags = f" --seeds {SeedRange.text(seeds)}" + (f" --episodes {episodes}" if episodes else "")
    flags += f" --iterations {iterations}" if iterations else ""
    flags += f" --max-minutes {max_minutes:g}" if max_minutes else ""
    flags += "".join(f" --set {shlex.quote(a)}" for a in assignments) + f" --device {device}"
    for name in names:
        try:
            record = bench.bench_recipe(name, seeds, episodes, [*budget, *assignments], max_minutes, device,
                                        data_root, runs_dir, results_dir, progress,
                                        command=f"l2l-recipes bench {name}{flags}", resume=resume)
        except bench.BenchPending as pending:
            click.echo(str(pending))
            continue
        except harness.Stopped as stopped:  # its seed's `run --resume` would leave the bench without a record
            folders = "".join(f" {option} {shlex.quote(str(value))}" for option, value in (
                ("--data-root", data_root), ("--runs-dir", runs_dir), ("--results-dir", results_dir)) if value)
            again = f"l2l-recipes bench {' '.join(map(shlex.quote, names))}{flags}{folders} --resume"
            raise UserError(f"{str(stopped).split(' Resume with: ')[0]} Resume the bench with: {again}") from None
        click.echo(f"{name}: {bench.summary(record)}; record {Path(results_dir) / record['curve'][:-4]}.json")
    bench.write_table(results_dir, Path(results_dir).parent / "README.md")


@cli.command("bench-merge")
@click.argument("records", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--results-dir", type=click.Path(file_okay=False), default="benchmarks/results", show_default=True,
              help="Where the merged record goes; the table goes into README.md beside it.")
def recipes_bench_merge(records, results_dir):
    """Merge RECORDS of one bench's seeds trained apart (`bench NAME --seeds 2-2` ...) into one
    record of all their seeds, and rebuild the table.

    The records must be of the same recipe, options, versions and test tasks, with no seed twice;
    they stay as they are (the table shows the merged one, the most seeds, first)."""
    from l2l_recipes import bench
    command = "l2l-recipes bench-merge " + " ".join(shlex.quote(str(r)) for r in records)
    record = bench.merge_records(records, results_dir, command)
    click.echo(f"{record['recipe']}: {bench.summary(record)}; record {Path(results_dir) / record['curve'][:-4]}.json")
    bench.write_table(results_dir, Path(results_dir).parent / "README.md")


@cli.command("bench-table")
@click.option("--results-dir", type=click.Path(exists=True, file_okay=False), default="benchmarks/results",
              show_default=True, help="The folder of the records; the table goes into README.md beside it.")
def recipes_bench_table(results_dir):
    """Regenerate benchmarks/README.md's table from the records in RESULTS_DIR."""
    from l2l_recipes import bench
    count = bench.write_table(results_dir, Path(results_dir).parent / "README.md")
    click.echo(f"table rebuilt from {count} record(s) in {results_dir}")


@cli.command("speed")
@click.option("--iterations", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed iterations per loop (the median is reported).")
@click.option("--tiny", is_flag=True, help="A tiny configuration that only checks the script runs.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--out", type=click.Path(file_okay=False), default="benchmarks/speed", show_default=True,
              help="Folder for the record (JSON).")
@click.option("--recipes", "pattern", default=None, metavar="PATTERN",
              help="Instead: time the training loop of each recipe matching PATTERN (e.g. '*-omniglot-5w1s') "
                   "on both engines and project its paper budget.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --recipes: threads per timed process.")
@click.option("--gpu-estimate", is_flag=True,
              help="With --recipes: instead of timing, count each recipe's operations and FLOPs per iteration "
                   "and estimate its paper budget on one GPU from the one GPU run measured.")
def recipes_speed(iterations, tiny, data_root, out, pattern, threads, gpu_estimate):
    """Time learn2learn's plain MAML and ProtoNet loops against the fast path, side by side (CPU);
    with --recipes, every recipe's own loop on both engines."""
    from l2l_recipes.lab import speed
    if gpu_estimate:
        if pattern is None:
            raise click.UsageError("--gpu-estimate counts the recipes of --recipes PATTERN: add it")
        from l2l_recipes.lab import gpu_estimate as estimate
        record = estimate.measure(pattern, data_root=data_root, progress=click.echo)
        click.echo(f"record: {speed.write_record(record, out, prefix='gpu-estimate')}")
        return
    if pattern is not None:
        from l2l_recipes.lab import recipe_speed
        record = recipe_speed.measure(pattern, iterations=iterations, threads=threads, tiny=tiny,
                                      data_root=data_root, progress=click.echo)
        click.echo(recipe_speed.report(record))
        click.echo(f"record: {speed.write_record(record, out, prefix='recipes')}")
        return
    settings = speed.TINY if tiny else speed.Settings(iterations=iterations)
    record = speed.measure(settings, data_root, progress=click.echo)
    click.echo(speed.report(record))
    click.echo(f"record: {speed.write_record(record, out)}")


@cli.group("data")
def data_group():
    """Dataset utilities."""


@data_group.command("verify")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
def data_verify(data_root):
    """Check the data root's files against every SHA256SUMS manifest in it."""
    from l2l_recipes import data
    root = data.data_root(data_root)
    report = data.verify(root)
    if not report["manifests"]:
        raise UserError(f"no SHA256SUMS manifest under {root}: nothing to verify")
    for path in report["bad"][:20]:
        click.echo(f"MISMATCH {path}")
    for path in report["missing"][:20]:
        click.echo(f"MISSING  {path}")
    summary = (f"{report['checked']} files checked against {len(report['manifests'])} manifest(s): "
               f"{len(report['bad'])} mismatched, {len(report['missing'])} missing")
    if report["bad"] or report["missing"]:
        raise UserError(summary + "; re-extract or re-download the files listed")
    click.echo(summary)


def _result_line(r):
    metric = r.get("metric", "accuracy")
    value, ci95 = format_value(metric, r[metric]), format_value(metric, r["ci95"])
    if metric == "accuracy":
        return (f"{r['recipe']}: {r['ways']}-way {r['shots']}-shot test accuracy {value}% ± {ci95}% "
                f"(95% CI, {r['episodes']} episodes)")
    before = f" (before adaptation: {format_value(metric, r[f'before_{metric}'])})" if f"before_{metric}" in r else ""
    return f"{r['recipe']}: test {metric} {value} ± {ci95} (95% CI, {r['episodes']} tasks){before}"


def main(args=None):
    cli.main(args=args, prog_name="l2l-recipes")


if __name__ == "__main__":
    main()
