"""`l2l-recipes export`: one variant of every recipe family, exported, trains and meta-tests
with l2l_recipes and recipes made unimportable, to the numbers of `l2l-recipes run --set
engine=reference`; its config is at the top; every Omniglot and mini-ImageNet export is short;
the command refuses to overwrite. Families come from the registry, so new ones are covered as
they are added."""
import ast
import dataclasses
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import fmean

import pytest

from conftest import cli
from l2l_recipes import data, export, registry
from l2l_recipes.errors import UserError
from l2l_recipes.plain import PlainRun, override

# Puts the package out of reach: a meta-path finder ahead of all others (the editable install's
# included) refuses both names; the block is checked here and again after the run.
BLOCK = """
import runpy
import sys

BLOCKED = ("l2l_recipes", "recipes")


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")


sys.meta_path.insert(0, Refuse())
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the block failed: {name} was imported")
"""
LEAK_CHECK = """
leaked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
assert not leaked, leaked
"""
# Runs a file (argv[1], options after it) with the package blocked.
BLOCKED_RUN = BLOCK + """
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""" + LEAK_CHECK
# Runs several files one after the other in one such process (torch starts once, not once per
# file): argv[1] is a JSON list of [file, options...]; each file's output goes to <file>.out and
# <file>.err, its exit status to <file>.status.
BLOCKED_RUNS = BLOCK + """
import contextlib
import json
import traceback

for argv in json.loads(sys.argv[1]):
    with open(argv[0] + ".out", "w") as out, open(argv[0] + ".err", "w") as err, \\
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv, status = argv, 0
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            status = 1
    with open(argv[0] + ".status", "w") as f:
        f.write(str(status))
""" + LEAK_CHECK

# A tiny budget, for the fields a family's Config has: a few iterations of two 5-way tasks logged
# each time, one validation, a short meta-test (every family's loss falls or its test beats chance:
# measured 2026-12-06; 4 tasks of 10 ways cost 1.7x the time).
TINY = {"iterations": 12, "val_interval": 12, "log_interval": 1, "val_episodes": 4, "test_episodes": 20,
        "queries": 5, "meta_batch_size": 2, "train_ways": 5, "test_adaptation_steps": 5, "batch_size": 32,
        "trajectories": 5, "horizon": 20}


def one_variant_per_family():
    """{family: variant}: the family's Omniglot 5-way 1-shot variant (its own, not a sibling's
    such as fomaml's, where both exist), else its first."""
    chosen = {}
    for name in registry.list_recipes():
        family = registry.get_recipe(name).family
        score = (name.endswith("-omniglot-5w1s"), name.startswith(family.replace("_", "-") + "-"))
        if family not in chosen or score > chosen[family][0]:
            chosen[family] = (score, name)
    return {family: name for family, (_, name) in sorted(chosen.items())}


VARIANTS = one_variant_per_family()


def run_blocked(path, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(path), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


def config_defaults(tree):
    """The Config class of an exported file and {field: its default, as a value}."""
    (config,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config"]
    return config, {s.target.id: ast.literal_eval(s.value) for s in config.body
                    if isinstance(s, ast.AnnAssign) and s.value is not None and _is_literal(s.value)}


def _is_literal(node):
    try:
        ast.literal_eval(node)
        return True
    except ValueError:
        return False


def trained(metrics, result):
    """The training loss fell (the last third of the logged values below the first third), or
    the meta-test beats chance (accuracy) or its own score before adaptation (other metrics:
    with 12 iterations of 4 tasks a regression loss is too noisy to fall reliably; measured for
    maml-sine-5s, 3.63 -> 3.82, while its test MSE after adaptation beat the one before)."""
    losses = [m["loss"] for m in metrics if "loss" in m]
    k = len(losses) // 3
    if k and fmean(losses[-k:]) < fmean(losses[:k]):
        return True
    metric = result.get("metric", "accuracy")
    if metric == "accuracy":
        return result["accuracy"] - result["ci95"] > 1 / result["ways"]
    before = result.get(f"before_{metric}")
    if before is None:
        return False
    return result[metric] > before if result.get("higher_is_better", True) else result[metric] < before


def plain(cfg):
    """The config a default (plain) export writes: the variant's, on the reference engine."""
    return dataclasses.replace(cfg, engine="reference") if hasattr(cfg, "engine") else cfg


def tiny_budget(name):
    """The TINY budget for the fields that `name`'s Config has, and as `--set` options."""
    fields = {f.name for f in dataclasses.fields(registry.get_recipe(name).config())}
    budget = {k: v for k, v in TINY.items() if k in fields}
    return budget, [arg for k, v in budget.items() for arg in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def exported_runs(tmp_path_factory, data_root):
    """{family: (exported file, exit status, stdout, stderr, runs folder)}: every family's variant
    exported and run on the TINY budget with the package blocked, all in one process."""
    jobs = {}
    for family, name in VARIANTS.items():
        folder = tmp_path_factory.mktemp(family)
        result = cli("export", name, folder)
        assert result.exit_code == 0, result.output
        path = folder / f"{name.replace('-', '_')}.py"
        jobs[family] = path, [str(path), "--data-root", str(data_root), "--device", "cpu", "--out",
                              str(folder / "runs"), *tiny_budget(name)[1]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUNS, json.dumps([argv for _, argv in jobs.values()])],
                          cwd=tmp_path_factory.getbasetemp(), env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the block held, before and after
    return {family: (path, int(Path(f"{path}.status").read_text()), Path(f"{path}.out").read_text(),
                     Path(f"{path}.err").read_text(), path.parent / "runs") for family, (path, _) in jobs.items()}


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_exported_recipe_trains_and_tests_without_the_package(tmp_path, exported_runs, family):
    name = VARIANTS[family]
    path, status, stdout, stderr, out = exported_runs[family]
    source = path.read_text()
    tree = ast.parse(source)
    py_compile.compile(str(path), cfile=str(tmp_path / "compiled.pyc"), doraise=True)
    assert not [m for m in imported_modules(tree) if m.split(".")[0] in ("l2l_recipes", "recipes", "")]
    # plain code: no source run from strings, no import machinery
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"exec", "eval", "compile", "__import__"}
    assert "sys.modules" not in source and "meta_path" not in source
    # the config comes first: the first class or function defined is Config, with the variant's values
    config, defaults = config_defaults(tree)
    first = next(n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)))
    assert first is config
    variant = dataclasses.asdict(plain(registry.get_recipe(name).config()))
    assert defaults == {k: v for k, v in variant.items() if k in defaults}
    assert "engine" not in defaults or ("class DeviceEpisodes" not in source and 'engine == "fast"' not in source)

    budget, _ = tiny_budget(name)
    assert status == 0, stderr[-3000:]
    (run_dir,) = (out / name).iterdir()
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "metrics.jsonl", "ckpt.pt", "best.pt",
                                                    "result.json"}
    config_json = json.loads((run_dir / "config.json").read_text())
    assert config_json["recipe"] == name and config_json["iterations"] == budget["iterations"]
    res = json.loads((run_dir / "result.json").read_text())
    assert res["recipe"] == name and res["split"] == "test" and res["episodes"] == budget["test_episodes"]
    assert f"{name}: " in stdout.splitlines()[-1]  # the result line, as `l2l-recipes run` prints it
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(m["iteration"] for m in metrics) == budget["iterations"]
    assert trained(metrics, res), (metrics, res)


# Runs `l2l-recipes run` for several recipes in one process (torch starts once): argv[1] is a
# JSON list of argument lists.
PACKAGE_RUNS = """
import json
import sys

from l2l_recipes.cli import cli

for args in json.loads(sys.argv[1]):
    try:
        cli.main(args, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
"""


@pytest.fixture(scope="module")
def package_runs(tmp_path_factory, data_root):
    """{family: the runs folder of `l2l-recipes run VARIANT --set engine=reference` on the TINY
    budget}, all in one process with the exported runs' one thread: another number of threads
    sums convolutions in another order, and training amplifies that (1e-3 seen)."""
    out = tmp_path_factory.mktemp("package")
    jobs = []
    for family, name in VARIANTS.items():
        engine = ["--set", "engine=reference"] if hasattr(registry.get_recipe(name).config(), "engine") else []
        jobs.append(["run", name, "--data-root", str(data_root), "--device", "cpu", "--out", str(out / family),
                     "--no-progress", *engine, *tiny_budget(name)[1]])
    proc = subprocess.run([sys.executable, "-c", PACKAGE_RUNS, json.dumps(jobs)], cwd=out, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {family: out / family for family in VARIANTS}


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_exported_recipe_reproduces_the_package_run(exported_runs, package_runs, family):
    """Same config and seed: the exported file (its blocked run above) and `l2l-recipes run
    --set engine=reference` log the same metrics and test on the same tasks to the same score
    (the inlined split, tasks and model are the package's)."""
    name = VARIANTS[family]
    _, status, _, stderr, exported = exported_runs[family]
    assert status == 0, stderr[-3000:]
    runs = [next((folder / name).iterdir()) for folder in (exported, package_runs[family])]
    logs = [[{k: v for k, v in m.items() if k != "time"} for m in map(json.loads, (r / "metrics.jsonl").read_text()
                                                                       .splitlines())] for r in runs]
    assert len(logs[0]) == len(logs[1]) > TINY["iterations"]  # a line per iteration and the validation
    # equal up to float32 rounding: two processes may sum in another order (2e-6 relative seen in CI)
    for exported_row, package_row in zip(*logs):
        assert exported_row.keys() == package_row.keys()
        for key, value in package_row.items():
            assert exported_row[key] == pytest.approx(value, rel=1e-4, nan_ok=True), (key, package_row["iteration"])
    results = [json.loads((r / "result.json").read_text()) for r in runs]
    metric = results[1].get("metric", "accuracy")
    # rounding may flip a few of the 500 test queries' predictions
    assert results[0][metric] == pytest.approx(results[1][metric], rel=1e-4, abs=0.01 * (metric == "accuracy"))


# The most lines of a family's default export of an Omniglot or mini-ImageNet variant: today's
# lengths, as a ratchet (lower them as exports shrink; raised only for the paper's protocol or a
# user's one-line error: Reptile's carried inner Adam state took it from 574 to 618 lines,
# 2026-12-05; the plain file's device, --set type and no-weights checks, +18 lines in every file, the same day;
# MAML++'s test on the top-5 validations' weights, the authors' protocol, 653 to 700, 2026-12-05;
# ProtoNet's early stopping and retraining states checkpointed as plain attributes, 626 to 614, 2026-12-06;
# the checkpoints' format, so that `l2l-recipes eval` and `predict` take a plain file's run, +1, the same day;
# config.validate's ranges, the one-line errors of `run` (ways=1 scored 100%, val_interval=0 divided by 0), +39;
# the support code written compactly, no feature dropped (the ranges as one table, the episodes, the Omniglot
# split read by a glob per character, the plain run and predictor), -27 to -56, 2026-12-06; a run folder
# of its own for each of two runs started in the same second (one's results were lost), and --data-root
# defaulting to $L2L_RECIPES_DATA, +11, the same day; mini-ImageNet's uncached split decoded as tasks ask, -13;
# constants kept together where they were, -2; an --out that is a file one line, not a traceback, +2;
# cuda:K without GPU K one line, +3; the Omniglot split read by the package's one scan of the PNGs, and
# the run folder claimed by the function harness.Run uses too, so that neither is written twice, +6 to +16,
# 2026-12-07; checkpoints written whole, then renamed, +2; engine=fast refused by the plain file, which
# ran the reference loop silently, +2 where the config has an engine, the same day; each recipe's own config
# checks kept in its file (a misspelt choice, e.g. distance=cosin, ran another branch silently), +4 to +26).
# Issue #17 asks for 350, and 450 for MetaOptNet, SNAIL and MAML++: l2l_recipes.plain (~150 lines),
# the config's ranges (~25), the episodes and the uncached loader (~120 for Omniglot, ~150 for
# mini-ImageNet) keep them above.
LINE_LIMITS = {"maml": 588, "protonet": 644, "matchingnet": 602, "anil": 591, "metasgd": 616, "reptile": 654,
               "transfer": 615, "metaoptnet": 698, "snail": 733, "mamlpp": 730}


def test_every_default_export_is_within_its_line_limit():
    """Counted with the header's command as `export NAME DEST`: a long destination path would wrap it."""
    lengths = {}
    for name in registry.list_recipes():
        recipe = registry.get_recipe(name)
        if recipe.family in LINE_LIMITS and getattr(recipe.config(), "dataset", None) in ("omniglot", "mini-imagenet"):
            lengths[name] = (recipe.family, len(export.export_source(name).splitlines()))
    assert {family for family, _ in lengths.values()} == set(LINE_LIMITS)
    too_long = {name: n for name, (family, n) in lengths.items() if n > LINE_LIMITS[family]}
    assert not too_long, too_long


def test_the_block_makes_the_package_unimportable(tmp_path):
    script = tmp_path / "uses_package.py"
    script.write_text("import l2l_recipes\nprint('imported', l2l_recipes.__file__)\n")
    plain = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert plain.returncode == 0 and "imported" in plain.stdout  # the editable install reaches it from anywhere
    blocked = run_blocked(script, cwd=tmp_path)
    assert blocked.returncode != 0 and "l2l_recipes is blocked in this test" in blocked.stderr


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_config_at_the_top_holds_the_variants_values(family):
    """For the family's variant furthest from its Config's defaults, the exported Config's
    defaults are that variant's values."""
    def changed(name):
        cfg = registry.get_recipe(name).config()
        return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}
    name = max((n for n in registry.list_recipes() if registry.get_recipe(n).family == family),
               key=lambda n: len(changed(n)))
    cfg = plain(registry.get_recipe(name).config())
    _, defaults = config_defaults(ast.parse(export.export_source(name)))
    assert {k: defaults.get(k) for k in changed(name)} == {k: getattr(cfg, k) for k in changed(name)}
    assert defaults == {k: v for k, v in dataclasses.asdict(cfg).items() if k in defaults}


def test_all_datasets_includes_every_loader_of_the_family(tmp_path):
    result = cli("export", "protonet-omniglot-5w1s", tmp_path / "all.py", "--all-datasets")
    assert result.exit_code == 0, result.output
    source = (tmp_path / "all.py").read_text()
    tree = ast.parse(source)
    (table,) = [n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "DATASETS"]
    family = {registry.get_recipe(n).config().dataset for n in registry.list_recipes("protonet-*")}
    assert {k.value for k in table.keys} == family
    # each dataset module's uncached decode_split, renamed apart, and plain.load_split under its name
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {f"{data.DATASETS[d].rsplit('.', 1)[-1]}_decode_split" for d in family} | {"load_split"} <= defined
    py_compile.compile(str(tmp_path / "all.py"), cfile=str(tmp_path / "all.pyc"), doraise=True)


def test_export_refuses_to_overwrite_without_force(tmp_path):
    dest = tmp_path / "mine.py"
    dest.write_text("# my edits\n")
    result = cli("export", "maml-omniglot-5w1s", dest)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"Error: {dest} exists: pass --force to overwrite it"]
    assert dest.read_text() == "# my edits\n"
    result = cli("export", "maml-omniglot-5w1s", dest, "--force")
    assert result.exit_code == 0, result.output
    assert 'RECIPE = "maml-omniglot-5w1s"' in dest.read_text()


def test_export_into_a_directory_and_its_refusals(tmp_path):
    result = cli("export", "anil-omniglot-5w1s", tmp_path)
    assert result.exit_code == 0 and (tmp_path / "anil_omniglot_5w1s.py").is_file()
    assert "python " in result.output and "anil_omniglot_5w1s.py" in result.output
    # the class splits beside the file: the shipped ones; an edited copy is replaced only with --force
    split = tmp_path / "splits" / "omniglot-vinyals" / "test.txt"
    assert split.read_text().split() == data.read_split("omniglot-vinyals", "test")
    split.write_text("Hebrew/character01/rot000\n")
    edited = cli("export", "maml-omniglot-5w1s", tmp_path)
    assert edited.exit_code == 1 and f"{split} exists and differs from the shipped split" in edited.stderr
    assert not (tmp_path / "maml_omniglot_5w1s.py").exists()
    assert cli("export", "maml-omniglot-5w1s", tmp_path, "--force").exit_code == 0
    assert split.read_text().split() == data.read_split("omniglot-vinyals", "test")
    unknown = cli("export", "protonet-omniglot-5w1", tmp_path)
    assert unknown.exit_code == 1 and "did you mean protonet-omniglot-5w1s" in unknown.stderr
    not_py = cli("export", "protonet-omniglot-5w1s", tmp_path / "notes.txt")
    assert not_py.exit_code == 1 and "pass DEST as a .py path" in not_py.stderr
    assert not (tmp_path / "notes.txt").exists()


def test_split_patterns_expand_to_the_shipped_splits():
    for name in ("omniglot-vinyals", "mini-imagenet-ravi"):
        for split in data.SPLIT_NAMES:
            names = data.read_split(name, split)
            patterns = export.brace_patterns(names)
            assert [n for p in patterns for n in export.expand_braces(p)] == names
            if name == "omniglot-vinyals":  # one pattern per alphabet (Gurmukhi spans train and test)
                assert len(patterns) == len({n.split("/")[0] for n in names})


@pytest.mark.parametrize("name", ["maml-omniglot-5w1s", "reptile-omniglot-5w1s", "protonet-omniglot-5w1s",
                                  "mamlpp-omniglot-5w1s"])
def test_plain_export_drops_the_fast_path_and_fast_keeps_it(name):
    """By default the file is the plain loop (`run --set engine=reference`); --fast keeps the fast path."""
    plain_source, fast_source = export.export_source(name), export.export_source(name, fast=True)
    assert not [m for m in ("fast", "fast_reptile", "fast_mamlpp") if f"l2l_recipes/{m}.py:" in plain_source]
    assert "def maml_meta_batch" not in plain_source and "class DeviceEpisodes" not in plain_source
    assert "class DeviceEpisodes" in fast_source and 'engine == "fast"' in fast_source
    assert len(plain_source.splitlines()) < len(fast_source.splitlines())
    _, defaults = config_defaults(ast.parse(plain_source))
    assert defaults["engine"] == "reference"


def test_plain_source_keeps_the_reference_branch():
    text = ('''def f(cfg):
    # engine=fast: explained
    x = fast_thing() if cfg.engine == "fast" else plain_thing()
    if cfg.engine == "fast":  # all at once
        y = 1
    else:  # one by one
        for i in range(2):
            y = i  # kept
    return x, y


class Predictor:
    def predict_tasks(self):
        return 1

    def predict(self):
        return 0
''')
    assert export.plain_source(text) == ('''def f(cfg):
    x = plain_thing()
    for i in range(2):
        y = i  # kept
    return x, y


class Predictor:
    def predict(self):
        return 0
''')


def test_unused_methods_go_until_none_is_left_and_kept_classes_stay_whole():
    text = ('''class Run:
    def __init__(self):
        self.n = 0

    def log(self):
        return self.helper()

    def helper(self):
        return 1

    def share(self, items):
        return items

    def mine(self):
        return self.only_for_mine()

    def only_for_mine(self):
        return 2


class Net(torch.nn.Module):
    def forward(self, x):
        return x


class Predictor:
    def hook(self):
        return 3


run = Run()
run.log(), run.share([])
''')
    pruned = export.without_unused_methods(text, keep_classes={"Predictor"})
    assert [f.name for f in ast.walk(ast.parse(pruned)) if isinstance(f, ast.FunctionDef)] == [
        "__init__", "log", "helper", "share", "forward", "hook"]


def test_override_reads_each_value_as_its_fields_type():
    cfg = registry.get_recipe("maml-omniglot-5w1s").config()
    new = override(cfg, ["fast_lr=1", "first_order=True", "device=cpu", "dataset='mini-imagenet'", "ways=20"])
    assert (new.fast_lr, new.first_order, new.device, new.dataset, new.ways) == (1.0, True, "cpu", "mini-imagenet", 20)
    assert type(new.fast_lr) is float
    with pytest.raises(UserError, match="unknown config key 'way'"):
        override(cfg, ["way=3"])
    for bad, kind, got in (("ways=abc", "int", "str"), ("ways=1.5", "int", "float"), ("first_order=1", "bool", "int"),
                           ("fast_lr='x'", "float", "str"), ("meta_lr=(1,", "float", "str")):
        with pytest.raises(UserError, match=rf"--set {re.escape(bad)}: expected {kind}, got {got}"):
            override(cfg, [bad])


def test_the_plain_file_refuses_a_bad_device_or_range_and_a_run_without_weights_in_one_line(tmp_path, data_root):
    """The ranges `run` checks (config.validate, and each recipe's own): a 1-way task would score 100%,
    val_interval=0 divide by 0."""
    path = export.export_recipe("maml-omniglot-5w1s", tmp_path)
    for assignment, error in (("device=gpu", "device='gpu' is out of range: use auto, cpu or cuda"),
                              ("ways=1", "ways=1 is out of range: ways must be at least 2"),
                              ("val_interval=0", "val_interval=0 is out of range: val_interval must be at least 1"),
                              ("fast_lr=-1", "fast_lr=-1.0 is out of range: fast_lr must be > 0"),
                              # accepted, and the reference loop run silently, before
                              ("engine=fast", "engine=fast is not in this file, which holds the reference loop alone: "
                                              "use engine=reference, or export the recipe with --fast")):
        result = run_blocked(path, "--set", assignment, cwd=tmp_path)
        assert result.returncode == 1 and result.stderr.strip() == f"Error: {error}", assignment
    # a recipe's own checks (its config's __post_init__) come with it: a misspelt choice ran the other
    # branch silently before (Matching Networks' distance=cosin: l2; transfer's head=Centroid: linear)
    for name, assignment, error in (
            ("matchingnet-omniglot-5w1s", "distance=cosin", "distance='cosin' is out of range: use cosine or l2"),
            ("transfer-omniglot-5w1s", "head=Centroid", "head='Centroid' is out of range: use linear or centroid")):
        result = run_blocked(export.export_recipe(name, tmp_path), "--set", assignment, cwd=tmp_path)
        assert result.returncode == 1 and result.stderr.strip() == f"Error: {error}", assignment
    # the file copied into a project without the splits/ folder written beside it: said so, where the
    # message said "split must be one of train, val, test" (the split was train)
    (tmp_path / "project").mkdir()
    alone = Path(shutil.copy(path, tmp_path / "project"))
    result = run_blocked(alone, "--data-root", data_root, cwd=tmp_path / "project")
    split = tmp_path / "project" / "splits" / "omniglot-vinyals" / "train.txt"
    assert result.returncode == 1 and result.stderr.strip() == (
        f"Error: no split file {split}: the class splits are read from the splits/ folder beside "
        f"{alone.name}; copy that folder along with it")
    cfg = registry.get_recipe("maml-omniglot-5w1s").config()
    with pytest.raises(UserError, match="nothing to test: training ran no validation"):  # e.g. iterations=0
        PlainRun(tmp_path / "run", "maml-omniglot-5w1s", cfg, "cpu").test(None)


def test_plain_runs_started_in_the_same_second_keep_a_folder_each(tmp_path):
    """Two runs of an exported file with the same seed in the same second (a sweep started at once)
    once shared one folder, one run's metrics and best.pt lost under the other's: each gets its own."""
    cfg = registry.get_recipe("maml-omniglot-5w1s").config()
    runs = [PlainRun(tmp_path / "runs" / "20261206-202353-s42", "maml-omniglot-5w1s", cfg, "cpu") for _ in range(3)]
    for k, run in enumerate(runs):  # all three made before any writes its folder
        run.log(1, loss=float(k))
    assert [r.path.name for r in runs] == ["20261206-202353-s42", "20261206-202353-s42-2", "20261206-202353-s42-3"]
    for k, run in enumerate(runs):
        assert [json.loads(line)["loss"] for line in (run.path / "metrics.jsonl").read_text().splitlines()] == [k]
        assert json.loads((run.path / "config.json").read_text())["recipe"] == "maml-omniglot-5w1s"
    (tmp_path / "a file").write_text("")  # --out a file: one line (a traceback at the first log before)
    with pytest.raises(UserError, match="cannot make the run folder .*a file/x-s42 .*pass an --out folder you can"):
        PlainRun(tmp_path / "a file" / "x-s42", "maml-omniglot-5w1s", cfg, "cpu").log(1, loss=0.0)


def test_a_plain_run_stopped_while_saving_keeps_its_last_weights(tmp_path, monkeypatch):
    """best.pt was written in place: a Ctrl-C (or a full disk) in the middle of a new best left a
    truncated file where the last good weights were, and the run's test had nothing to read."""
    import torch
    cfg = registry.get_recipe("maml-omniglot-5w1s").config()
    run = PlainRun(tmp_path / "run-s42", "maml-omniglot-5w1s", cfg, "cpu")
    run.save("best.pt", torch.nn.Linear(2, 2), 1)

    def stopped(obj, path):  # half the file written, then the stop
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        run.save("best.pt", torch.nn.Linear(2, 2), 2)
    monkeypatch.undo()
    assert torch.load(run.path / "best.pt", weights_only=True)["iteration"] == 1


def test_the_package_tests_and_refuses_to_resume_an_exported_files_run(exported_runs, tmp_path, data_root):
    """A run folder the exported file wrote is a model for `l2l-recipes eval` (the same test tasks
    and weights: the same score) and `predict`; `run --resume` says it cannot go on from it."""
    for family, name in VARIANTS.items():
        _, status, _, stderr, out = exported_runs[family]
        assert status == 0, stderr[-3000:]
        (run_dir,) = (out / name).iterdir()
        recorded = json.loads((run_dir / "result.json").read_text())
        result = cli("eval", run_dir, "--episodes", TINY["test_episodes"], "--device", "cpu", "--no-progress",
                     "--data-root", data_root)
        assert result.exit_code == 0, (family, result.output)
        tested = json.loads(result.stdout.splitlines()[0])
        metric = recorded["metric"]
        assert tested[metric] == pytest.approx(recorded[metric], rel=1e-4, abs=0.01 * (metric == "accuracy")), family
    # predict: two evaluation characters laid out as a user would, each query among its own class's
    (run_dir,) = (exported_runs["protonet"][4] / VARIANTS["protonet"]).iterdir()
    characters = sorted((Path(data_root) / "omniglot-py" / "images_evaluation" / "Angelic").iterdir())[:2]
    for character in characters:
        drawings = sorted(character.iterdir())
        (tmp_path / "support" / character.name).mkdir(parents=True)
        shutil.copy(drawings[0], tmp_path / "support" / character.name)
        shutil.copy(drawings[1], tmp_path / f"{character.name}.png")
    result = cli("predict", run_dir, "--support", tmp_path / "support", "--device", "cpu", "--json",
                 *(tmp_path / f"{c.name}.png" for c in characters))
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 2 and all(sorted(row["probabilities"]) == [c.name for c in characters] for row in rows)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    (unfinished / "result.json").unlink()
    result = cli("run", "--resume", unfinished)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "written by an exported recipe file" in line and "run the file again" in line
