"""Reliability: what an adversarial user of the command line meets gets one clear line and no
lost or misleading files (run directories, resume, damaged data, bad numbers, unwritable
folders, finished runs, exported files)."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import click
import pytest
import torch

from conftest import REPO, cli
from test_data import _tiny_omniglot
from test_export import BLOCKED_RUN, VARIANTS, run_blocked
from l2l_recipes import config, distributed, export, harness, registry
from l2l_recipes.cli import _Group
from l2l_recipes.errors import UserError

NAME = "protonet-omniglot-5w1s"
TINY = [NAME, "--device", "cpu", "--no-progress", "--set", "iterations=2", "--set", "train_ways=5",
        "--set", "val_episodes=5", "--set", "test_episodes=5"]
CPU = torch.device("cpu")


def one_line(result):
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "Traceback" not in result.output
    return line


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root):
    """A finished tiny run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished")
    result = cli("run", *TINY, "--data-root", data_root, "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    (run_dir,) = (out / NAME).iterdir()
    return run_dir


def copy_of(run_dir, tmp_path):
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def truncate_one_png(root):
    """Cut one PNG of a tiny Omniglot tree (test_data._tiny_omniglot) in half; returns its path."""
    victim = root / "omniglot-py" / "images_background" / "Alpha" / "character01" / "0000_07.png"
    victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])
    return victim


def stopped_by_sigint(command, out, env, cwd):
    """Start `command` (a run into `out`), send SIGINT after its first logged loss; returns
    (the run directory, the printed resume command, split as a shell would)."""
    proc = subprocess.Popen(command, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = list(out.glob("*/*/metrics.jsonl"))
        if metrics and '"loss"' in metrics[0].read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    (run_dir,) = out.glob("*/*")
    return run_dir, shlex.split(stderr.split("Resume with: ")[1].strip())


# 40 iterations, each logged: stopped after the first, resumed in a few seconds
STOPPABLE = ["--device", "cpu", "--no-progress", "--set", "iterations=40", "--set", "val_interval=20", "--set",
             "train_ways=10", "--set", "val_episodes=10", "--set", "test_episodes=20", "--set", "log_interval=1"]


# ----------------------------------------------------------------------------- 1: run directories

def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "datetime", type("Frozen", (), {"now": staticmethod(lambda: datetime(2026, 1, 2))}))
    cfg = registry.get_recipe(NAME).config()
    runs = [harness.Run.create(tmp_path, NAME, cfg, CPU) for _ in range(3)]
    assert [r.path.name for r in runs] == ["20260102-000000-s42", "20260102-000000-s42-2", "20260102-000000-s42-3"]
    assert all(r.path.is_dir() for r in runs)  # made at once: a concurrent start cannot take it


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path):
    """...and says so, after having named the directory."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    result = cli("run", *TINY, "--data-root", empty, "--out", tmp_path / "runs")
    assert "Omniglot not found" in one_line(result)
    printed = Path(result.stdout.split("run directory: ")[1].split("  (device")[0])
    assert f"{printed} removed" in result.stdout and not (tmp_path / "runs").exists()  # --out too: made for it
    (tmp_path / "mine" / NAME).mkdir(parents=True)
    result = cli("run", *TINY, "--data-root", empty, "--out", tmp_path / "mine")
    assert result.exit_code == 1 and list((tmp_path / "mine").iterdir()) == [tmp_path / "mine" / NAME]


# ----------------------------------------------------------------------------- 2: resume as printed

def test_the_printed_resume_command_works_as_printed(tmp_path, data_root, monkeypatch):
    """Started with --data-root and a --out with a space, stopped by SIGINT: the printed
    command resumes it without --data-root (with $L2L_RECIPES_DATA pointing elsewhere)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "my runs"
    env = {**os.environ, "L2L_RECIPES_DATA": str(elsewhere)}
    run_dir, command = stopped_by_sigint([sys.executable, "-m", "l2l_recipes.cli", "run", NAME, *STOPPABLE,
                                          "--data-root", str(data_root), "--out", str(out)], out, env, REPO)
    assert command == ["l2l-recipes", "run", "--resume", str(run_dir)]
    monkeypatch.setenv("L2L_RECIPES_DATA", str(elsewhere))
    resumed = cli(*command[1:])
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert json.loads((run_dir / "result.json").read_text())["episodes"] == 20


# ----------------------------------------------------------------------------- 3: one line, not a traceback

def test_a_truncated_png_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("L2L_RECIPES_CACHE", str(tmp_path / "cache"))
    _tiny_omniglot(tmp_path / "data")
    victim = truncate_one_png(tmp_path / "data")
    result = cli("run", *TINY, "--data-root", tmp_path / "data", "--out", tmp_path / "runs")
    line = one_line(result)
    assert str(victim) in line and "l2l-recipes data verify" in line


@pytest.mark.parametrize("seed", [-1, 2 ** 32])
def test_a_seed_out_of_range_is_refused(tmp_path, data_root, seed):
    result = cli("run", *TINY, "--data-root", data_root, "--out", tmp_path, "--seed", seed)
    assert f"seed={seed} is out of range" in one_line(result)
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="seed=-5 is out of range"):
        config.apply_overrides(registry.get_recipe(NAME).config(), ["seed=-5"])


def test_an_out_under_a_file_is_refused_before_training(tmp_path, data_root):
    (tmp_path / "file").write_text("")
    result = cli("run", *TINY, "--data-root", data_root, "--out", tmp_path / "file" / "sub")
    line = one_line(result)
    assert str(tmp_path / "file") in line and "--out" in line
    assert "loss=" not in result.stdout


def test_a_read_only_out_is_refused_before_training(tmp_path, data_root, monkeypatch):
    """Root may write anywhere, so the refusal of the filesystem is simulated."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if readonly in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", refuse)
    result = cli("run", *TINY, "--data-root", data_root, "--out", readonly)
    line = one_line(result)
    assert "Permission denied" in line and "--out" in line and "loss=" not in result.stdout


def test_export_into_an_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    write_text = Path.write_text

    def refuse(self, *args, **kwargs):
        if self.parent == readonly:
            raise PermissionError(13, "Permission denied", str(self))
        return write_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", refuse)
    line = one_line(cli("export", NAME, readonly))
    assert str(readonly) in line and "Permission denied" in line
    assert list(readonly.iterdir()) == []


# ----------------------------------------------------------------------------- 4: misleading or silent answers

def _diverging(tmp_path):
    run = harness.Run.create(tmp_path, NAME, registry.get_recipe(NAME).config(), CPU)
    model = torch.nn.Linear(2, 2)
    run.track(model)
    return run, model


def test_divergence_says_which_checkpoint_is_kept(tmp_path):
    run, model = _diverging(tmp_path)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    with pytest.raises(UserError) as e:
        run.checkpoint(5)
    assert "no checkpoint was written yet" in str(e.value) and "is kept" not in str(e.value)
    with pytest.raises(UserError, match="no checkpoint was written yet"):
        run.log(5, loss=float("inf"))
    model.load_state_dict(good)
    run.checkpoint(10)
    with torch.no_grad():
        model.weight.fill_(float("inf"))
    with pytest.raises(UserError, match=r"ckpt.pt of iteration 10, is kept"):
        run.checkpoint(15)
    with pytest.raises(UserError, match=r"ckpt.pt of iteration 10, is kept"):
        run.log(16, loss=float("nan"))


def test_a_step_too_large_for_memory_is_one_line_not_the_oom_killer(finished, tmp_path, data_root):
    """`--set train_ways=2000` on ProtoNet (20,000-image episodes) was ended by the kernel's OOM
    killer ("Killed", exit status 137), an empty run folder left. A run (and eval) caps its memory
    at what the machine has free (here the process starts capped at 3 GiB, as `prlimit --data`
    does, so that the test does not fill the machine): the allocation fails, the command says so
    in one line naming the sizes to lower, and a run removes its folder."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    result = subprocess.run(
        [sys.executable, "-m", "l2l_recipes.cli", "run", NAME, "--device", "cpu", "--no-progress", "--set",
         "train_ways=1000", "--set", "iterations=2", "--data-root", data_root, "--out", tmp_path / "runs"],
        capture_output=True, text=True, cwd=REPO,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, hard)))
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: out of memory: a training step or test task of this run does not fit in this "
                           "machine's memory (a ")
    assert "run: --set ways, shots, queries, train_ways or meta_batch_size" in line
    assert "removed: the run stopped before writing anything" in result.stdout and not (tmp_path / "runs").exists()
    result = subprocess.run(  # eval at 1000 ways: 16,000 images a task
        [sys.executable, "-m", "l2l_recipes.cli", "eval", copy_of(finished, tmp_path), "--ways", "1000", "--episodes",
         "2", "--device", "cpu", "--no-progress", "--data-root", data_root], capture_output=True, text=True, cwd=REPO,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, hard)))
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: out of memory: ") and "eval: --ways, --shots, --queries" in line


def test_the_memory_cap_keeps_a_lower_cap_and_leaves_gpu_runs_alone():
    code = ("import resource, json; from l2l_recipes import harness\n"
            "def soft(): return resource.getrlimit(resource.RLIMIT_DATA)[0]\n"
            "hard = resource.getrlimit(resource.RLIMIT_DATA)[1]\n"
            "resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, hard)); harness.cap_memory('cpu'); kept = soft()\n"
            "resource.setrlimit(resource.RLIMIT_DATA, (hard, hard)); harness.cap_memory('cuda'); gpu = soft()\n"
            "harness.cap_memory('cpu'); capped = soft()\n"
            "status = {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmData')}\n"
            "meminfo = {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/meminfo')}\n"
            "print(json.dumps([kept, gpu, hard, capped, 1024 * (status['VmData'] + meminfo['MemTotal'] + meminfo['SwapTotal'])]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    kept, gpu, hard, capped, ceiling = json.loads(result.stdout)
    assert kept == 2 << 30 and gpu == hard  # a lower cap set from outside stays; a GPU run is not capped
    assert 0 < capped < ceiling  # at most what the machine could ever give


def test_failed_allocations_become_one_line_and_other_errors_do_not():
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)")
    assert "this machine's memory (a 3.0 GiB block)" in str(harness.out_of_memory(cpu))
    assert "this machine's memory: lower" in str(harness.out_of_memory(MemoryError()))
    gpu = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "the GPU's memory: lower" in str(harness.out_of_memory(gpu))
    assert harness.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


@pytest.mark.parametrize("value", ["1e309", "-1e309"])
def test_non_finite_floats_are_refused(value):
    with pytest.raises(UserError, match=f"lr={value[:-5]}inf is out of range: lr must be a finite number"):
        config.apply_overrides(registry.get_recipe(NAME).config(), [f"lr={value}"])


def test_resume_refuses_a_config_json_that_disagrees_with_the_checkpoint(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "result.json").unlink()
    edited = {**json.loads((run_dir / "config.json").read_text()), "recipe": "maml-omniglot-5w1s", "ways": 20}
    (run_dir / "config.json").write_text(json.dumps(edited))
    line = one_line(cli("run", "--resume", run_dir))
    assert str(run_dir / "config.json") in line and str(run_dir / "ckpt.pt") in line
    assert "recipe" in line and "ways" in line
    assert not (run_dir / "result.json").exists()


def test_resuming_a_finished_run_leaves_it_untouched(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()}
    line = one_line(cli("run", "--resume", run_dir))
    assert "finished" in line and f"l2l-recipes eval {run_dir}" in line
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()} == before


def test_eval_says_which_checkpoint_it_tested(finished, tmp_path, data_root):
    run_dir = copy_of(finished, tmp_path)
    best = cli("eval", run_dir, "--episodes", 5, "--data-root", data_root, "--device", "cpu", "--no-progress")
    assert best.exit_code == 0 and best.stderr == ""
    assert json.loads((run_dir / "eval-5.json").read_text())["checkpoint"] == "best.pt"
    (run_dir / "best.pt").unlink()
    fallback = cli("eval", run_dir, "--episodes", 5, "--data-root", data_root, "--device", "cpu", "--no-progress")
    assert fallback.exit_code == 0
    (note,) = fallback.stderr.strip().splitlines()
    assert "no best.pt" in note and "ckpt.pt" in note
    assert json.loads((run_dir / "eval-5.json").read_text())["checkpoint"] == "ckpt.pt"


@pytest.mark.parametrize("ways", [3, 20])
def test_eval_of_a_fixed_head_model_at_other_ways_names_the_head(ways):
    # the committed MAML model: refused before any data is read (no traceback from its 5 outputs)
    result = cli("eval", REPO / "benchmarks" / "models" / "maml-omniglot-5w1s", "--ways", ways, "--device", "cpu")
    assert result.exit_code == 1
    assert "this MAML model has a 5-way head: test it with --ways 5" in one_line(result)


@pytest.mark.parametrize("name", [name for name in VARIANTS.values() if name.endswith("-omniglot-5w1s")])
def test_eval_at_20_ways_refuses_in_one_line_or_tests(name, tmp_path, data_root):
    """Every Omniglot classifier family's untrained model, evaluated at 20 ways: a family whose
    model fixes the ways says so in one line, the others test (never a traceback)."""
    recipe = registry.get_recipe(name)
    cfg = recipe.config()
    run = harness.Run.create(tmp_path, name, cfg, CPU)
    run.save("best.pt", recipe.load_module().build_model(cfg), 0)
    result = cli("eval", run.path, "--ways", 20, "--episodes", 2, "--data-root", data_root, "--device", "cpu",
                 "--no-progress")
    if recipe.load_module().Predictor.head:
        assert result.exit_code == 1 and "-way head: test it with --ways 5" in one_line(result)
    else:
        assert result.exit_code == 0, result.output + result.stderr
        assert json.loads((run.path / "eval-20w1s-2.json").read_text())["ways"] == 20


def test_list_of_a_pattern_that_matches_nothing_says_so():
    result = cli("list", "zzz*")
    assert result.exit_code == 1 and result.stdout == ""
    assert "no recipe matches 'zzz*'" in one_line(result)


@pytest.mark.parametrize("command", ["show", "run", "bench", "export"])
def test_a_pattern_where_a_name_is_expected_points_to_list(command, tmp_path):
    result = cli(command, "maml-*", *([tmp_path] if command == "export" else []))
    assert result.exit_code == 1
    assert "'maml-*' is a pattern, not a recipe name: `l2l-recipes list 'maml-*'`" in one_line(result)


def test_eval_of_one_episode_is_refused_and_json_never_holds_nan(finished, tmp_path):
    result = cli("eval", finished, "--episodes", 1)
    assert result.exit_code == 2 and "1 is not in the range x>=2" in result.stderr
    harness.write_json(tmp_path / "r.json", {"accuracy": 0.5, "ci95": float("nan"), "x": [float("inf")]})
    strict = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict == {"accuracy": 0.5, "ci95": None, "x": [None]}
    run = harness.Run.create(tmp_path, NAME, registry.get_recipe(NAME).config(), CPU)
    run.log(1, val_accuracy=0.5, val_ci95=float("nan"))
    row = json.loads((run.path / "metrics.jsonl").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert row["val_ci95"] is None


@pytest.mark.parametrize("flag", ["--no-progress", "--progress"])
def test_no_progress_hides_the_decoding_bar(tmp_path, monkeypatch, flag):
    monkeypatch.setenv("L2L_RECIPES_CACHE", str(tmp_path / "cache"))
    _tiny_omniglot(tmp_path / "data")
    args = [a for a in TINY if a != "--no-progress"]
    result = cli("run", *args, flag, "--data-root", tmp_path / "data", "--out", tmp_path / "runs")
    assert result.exit_code == 1 and "has no images in the Omniglot data" in result.stderr  # a tiny tree
    assert ("decoding Omniglot" in result.stderr) == (flag == "--progress")


def test_only_rank_0_prints_the_stop_message(tmp_path, monkeypatch):
    run, model = _diverging(tmp_path)
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    with pytest.raises(UserError) as e:
        for _ in run.iterations(10):
            os.kill(os.getpid(), signal.SIGINT)
    assert e.value.quiet and "stopped by SIGINT" in str(e.value)

    @click.group(cls=_Group)
    def group():
        pass

    @group.command()
    def stop():
        raise e.value
    from click.testing import CliRunner
    result = CliRunner().invoke(group, ["stop"])
    assert result.exit_code == 1 and result.output == "" and result.stderr == ""


# ----------------------------------------------------------------------------- 5: exported files

def test_an_exported_file_runs_without_file_and_resumes_itself(tmp_path, data_root):
    path = export.export_recipe(NAME, tmp_path / "proto.py", fast=True)
    namespace = {"__name__": "exported"}  # exec: no __file__
    exec(compile(path.read_text(), "<exported>", "exec"), namespace)
    assert namespace["environment"](CPU)["git_commit"] is None

    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_dir, command = stopped_by_sigint([sys.executable, "-c", BLOCKED_RUN, str(path), *STOPPABLE, "--data-root",
                                          str(data_root), "--out", str(out)], out, env, tmp_path)
    assert command == ["python", str(path), "--resume", str(run_dir)]
    resumed = run_blocked(path, *command[2:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["episodes"] == 20
