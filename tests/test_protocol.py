"""Paper protocols: early stopping and train+val retraining (ProtoNet), a bench that survives
a kill and is shared by several processes, one trained model tested at other ways and shots,
a published model that re-tests to its record."""
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli
import l2l_recipes
from l2l_recipes import bench, data, registry

TINY = ["--set", "train_ways=10", "--set", "queries=5", "--set", "val_episodes=10", "--set", "log_interval=5"]
# Snell et al.'s protocol, shrunk: validate every 5 episodes, patience 3 validations
EARLY = ["--set", "val_interval=5", "--set", "patience=3", "--set", "lr=0.02", "--set", "test_episodes=20", *TINY]


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("time")
    return rows


def _killing_hook(tmp_path, path_part, count):
    """A sitecustomize that SIGKILLs the process right after the `count`-th file whose path
    contains `path_part` is renamed into place (a checkpoint write completed)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "_replace, _seen = os.replace, [0]\n"
        "def replace(src, dst, *args, **kwargs):\n"
        "    _replace(src, dst, *args, **kwargs)\n"
        f"    if {path_part!r} in str(dst):\n"
        "        _seen[0] += 1\n"
        f"        if _seen[0] == {count}:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n")
    return hook


def _killed(tmp_path, data_root, hook, *args):
    env = {**os.environ, "L2L_RECIPES_DATA": str(data_root), "PYTHONPATH": str(hook)}
    proc = subprocess.run([sys.executable, "-m", "l2l_recipes.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_early_stopping_then_trainval_retraining_resumes_identically(tmp_path, data_root):
    args = ["run", "protonet-omniglot-5w1s", "--device", "cpu", "--no-progress", "--checkpoint-every", 5,
            "--data-root", data_root, *EARLY]
    out = cli(*args, "--out", tmp_path / "a")
    assert out.exit_code == 0, out.output
    (straight,) = (tmp_path / "a" / "protonet-omniglot-5w1s").iterdir()
    rows = _rows(straight)
    (switch,) = [r for r in rows if "early_stop" in r]
    vals = [r for r in rows if "val_loss" in r]
    # stopped after patience + 1 validations without a lower validation loss than the best one
    best = min(vals, key=lambda r: r["val_loss"])
    assert switch["early_stop"] == best["iteration"] and switch["iteration"] == best["iteration"] + 4 * 5
    assert vals[-1]["iteration"] == switch["iteration"]  # no validation while retraining on train+val
    # retrained on train+val for the official length (best epoch's 0-based index + patience epochs)
    end = switch["iteration"] + best["iteration"] + 2 * 5
    assert switch["retrain_until"] == end
    ckpt = torch.load(straight / "ckpt.pt", weights_only=True)
    tested = torch.load(straight / "best.pt", weights_only=True)
    assert ckpt["iteration"] == tested["iteration"] == end and ckpt["training_ended"]
    assert all(torch.equal(ckpt["model"][k], tested["model"][k]) for k in ckpt["model"])  # the final weights
    result = json.loads((straight / "result.json").read_text())
    assert result["ended_by_stopping_rule"] and result["iterations_done"] == end
    assert result["accuracy"] > 0.4  # 5-way chance is 0.2

    # killed right after the checkpoint of the first retraining iterations, then resumed
    n = (switch["iteration"] + 5) // 5  # checkpoints every 5 iterations: this is the one after the switch
    assert switch["iteration"] + 5 < end
    _killed(tmp_path, data_root, _killing_hook(tmp_path, "ckpt.pt", n), *args, "--out", tmp_path / "b")
    (killed,) = (tmp_path / "b" / "protonet-omniglot-5w1s").iterdir()
    assert torch.load(killed / "ckpt.pt", weights_only=True)["retraining"]["start"] == switch["iteration"] + 1
    resumed = cli("run", "--resume", killed, "--data-root", data_root, "--no-progress")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert _rows(killed) == rows
    again = torch.load(killed / "best.pt", weights_only=True)
    assert all(torch.equal(again["model"][k], tested["model"][k]) for k in tested["model"])
    assert json.loads((killed / "result.json").read_text())["accuracy"] == result["accuracy"]


BENCH = ["bench", "protonet-omniglot-5w1s", "--seeds", 2, "--episodes", 20, "--iterations", 30,
         "--set", "val_interval=10", *TINY, "--set", "train_ways=5", "--device", "cpu", "--no-progress"]


def _record(results):
    (path,) = results.glob("*.json")
    record = json.loads(path.read_text())
    for key in ("date", "wall_seconds", "curve", "hostname"):
        record.pop(key)
    for seed in record["seeds"]:
        for key in ("train_seconds", "eval_seconds", "run_dir"):
            seed.pop(key)
    return record


def test_bench_killed_mid_run_resumes_to_the_same_record(tmp_path, data_root):
    straight = cli(*BENCH, "--data-root", data_root, "--runs-dir", tmp_path / "runs-a",
                   "--results-dir", tmp_path / "a" / "results")
    assert straight.exit_code == 0, straight.output
    # killed after seed 2's second checkpoint (seed 1 tested, seed 2 half-way)
    runs, results = tmp_path / "runs-b", tmp_path / "b" / "results"
    hook = _killing_hook(tmp_path, os.path.join("seed-2", "ckpt.pt"), 2)
    _killed(tmp_path, data_root, hook, *BENCH, "--data-root", data_root, "--runs-dir", runs, "--results-dir", results)
    (home,) = (runs / "protonet-omniglot-5w1s").iterdir()
    assert (home / "seed-1" / "result.json").is_file() and not (home / "seed-2" / "result.json").exists()
    assert not list(results.glob("*.json"))
    again = cli(*BENCH, "--data-root", data_root, "--runs-dir", runs, "--results-dir", results)
    assert again.exit_code == 1 and "--resume" in again.stderr and str(home) in again.stderr
    resumed = cli(*BENCH, "--resume", "--data-root", data_root, "--runs-dir", runs, "--results-dir", results)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output + resumed.stderr
    record = _record(results)
    assert record == _record(tmp_path / "a" / "results")
    assert record["protocol"] == "modified" and record["trained_as"] == "protonet-omniglot-5w1s"


def test_a_bench_resumed_after_a_default_layout_change_goes_on_as_it_started(tmp_path, data_root, monkeypatch):
    """A seed started before ProtoNet's channels_last default changed continues (a layout or
    engine is no change of protocol) in its own layout; a changed protocol setting is refused;
    --resume that matches no bench there says which bench is there."""
    args = [*BENCH, "--data-root", data_root, "--runs-dir", tmp_path / "runs", "--results-dir", tmp_path / "results"]
    args[args.index("--seeds") + 1] = 1
    _killed(tmp_path, data_root, _killing_hook(tmp_path, os.path.join("seed-1", "ckpt.pt"), 2), *args)
    (seed,) = (tmp_path / "runs" / "protonet-omniglot-5w1s").glob("*/seed-1")

    def started_with(**settings):  # as if the run had been started with these settings
        ckpt = torch.load(seed / "ckpt.pt", weights_only=False)
        ckpt["config"].update(settings)
        torch.save(ckpt, seed / "ckpt.pt")
        config = json.loads((seed / "config.json").read_text())
        (seed / "config.json").write_text(json.dumps({**config, **settings}))

    started_with(lr=0.5)
    refused = cli(*args, "--resume")
    assert refused.exit_code == 1 and "lr differ" in refused.stderr
    started_with(lr=registry.get_recipe("protonet-omniglot-5w1s").config().lr, channels_last=False)
    module, layouts = registry.get_recipe("protonet-omniglot-5w1s").load_module(), []
    train = module.train
    monkeypatch.setattr(module, "train", lambda cfg, run: layouts.append(cfg.channels_last) or train(cfg, run))
    resumed = cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert layouts == [False] and json.loads((seed / "config.json").read_text())["channels_last"] is False
    assert json.loads((seed / "result.json").read_text())["accuracy"] > 0.2
    assert len(list((tmp_path / "results").glob("*.json"))) == 1
    # --resume with an option forgotten (another test size) starts a new bench: it names the one there
    args[args.index("--episodes") + 1] = 30
    args[args.index("--results-dir") + 1] = seed / "result.json" / "x"  # cannot be made: stops before training
    other = cli(*args, "--resume")
    assert other.exit_code == 1 and f"{seed.parent} holds one of `l2l-recipes bench protonet-omniglot-5w1s " \
        "--seeds 1 --episodes 20 --iterations 30" in other.stderr, other.stderr


def test_one_model_tested_at_other_ways(tmp_path, data_root):
    """bench protonet-omniglot-20w1s tests the 5w1s recipe's model on 20-way tasks, as Snell et
    al. did; `eval --ways 20` on that run gives the same number."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    args = ["--seeds", 1, "--episodes", 10, "--iterations", 10, "--set", "val_interval=10", *TINY, "--device", "cpu",
            "--no-progress", "--data-root", data_root, "--runs-dir", runs, "--results-dir", results]
    assert cli("bench", "protonet-omniglot-5w1s", *args).exit_code == 0
    out = cli("bench", "protonet-omniglot-20w1s", *args)  # no --resume needed: it reuses the 5w1s runs
    assert out.exit_code == 0, out.output
    assert "resuming" not in out.output + out.stderr  # the trained seed is taken as it is
    (record,) = [json.loads(p.read_text()) for p in results.glob("protonet-omniglot-20w1s-*.json")]
    assert record["recipe"] == "protonet-omniglot-20w1s" and record["trained_as"] == "protonet-omniglot-5w1s"
    assert record["ways"] == 20 and record["config"]["ways"] == 5
    (seed_dir,) = (runs / "protonet-omniglot-5w1s").glob("bench-*/seed-1")
    assert json.loads((seed_dir / "result.json").read_text())["ways"] == 5
    evaluated = cli("eval", seed_dir, "--ways", 20, "--episodes", 10, "--device", "cpu", "--data-root", data_root,
                    "--no-progress")
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads((seed_dir / "eval-20w1s-10.json").read_text())
    assert result["ways"] == 20 and result["trained_ways"] == 5 and result["run_dir"] == str(seed_dir)
    assert result["accuracy"] == record["seeds"][0]["accuracy"] > 0.1  # 20-way chance is 0.05
    assert "20-way 1-shot test accuracy" in evaluated.output
    # a cached test result cut short (a crash while it was written) is tested again, not a traceback
    cached = seed_dir / "test-protonet-omniglot-20w1s.json"
    cached.write_text(cached.read_text()[:20])
    tested = dataclasses.replace(registry.get_recipe("protonet-omniglot-20w1s").config(), test_episodes=10)
    again = bench._tested_as("protonet-omniglot-20w1s", tested, seed_dir, torch.device("cpu"), data_root, False)
    assert again["accuracy"] == record["seeds"][0]["accuracy"]
    assert json.loads(cached.read_text())["accuracy"] == again["accuracy"]


def test_eval_adapts_with_another_number_of_steps(protonet_run, data_root, tmp_path):
    """`eval --steps N` adapts a gradient-based model with N test-time steps (the committed MAML
    model: 1 instead of its recipe's 3), as scoring the tasks one by one with the loaded model so
    changed does, in its own file; a model without test-time steps (ProtoNet) refuses in one line."""
    run_dir = Path(shutil.copytree(REPO / "benchmarks" / "models" / "maml-omniglot-5w1s", tmp_path / "maml"))
    out = cli("eval", run_dir, "--steps", 1, "--episodes", 20, "--device", "cpu", "--data-root", data_root,
              "--no-progress")
    assert out.exit_code == 0, out.output
    result = json.loads((run_dir / "eval-5w1s1steps-20.json").read_text())
    assert result["test_adaptation_steps"] == 1 and result["trained_test_adaptation_steps"] == 3
    predictor = l2l_recipes.load(run_dir, "cpu", data_root)
    predictor.cfg = dataclasses.replace(predictor.cfg, test_adaptation_steps=1)
    tasks = predictor.test_tasks(20, predictor.cfg.test_seed)
    correct = []
    for x, y in (tasks[i] for i in range(20)):
        sx, sy, qx, qy = data.split_support_query(x, y, 1)
        correct.append((predictor.predict(sx, sy, qx).argmax(1) == qy).float().mean().item())
    assert result["accuracy"] == pytest.approx(sum(correct) / 20, abs=1e-6)
    refused = cli("eval", protonet_run[0], "--steps", 2, "--device", "cpu", "--data-root", data_root)
    assert refused.exit_code == 1
    assert refused.stderr.strip() == "Error: recipe protonet-omniglot-5w1s has no test adaptation steps to change"


def test_eval_non_transductive_scores_each_query_with_the_support_images(protonet_run, data_root, tmp_path):
    """`eval --non-transductive` tests a model with batch statistics at test time (the committed
    Meta-SGD model) as `predict` uses it: each query in one batch with its task's support images,
    scored task by task here with the loaded model, in its own file; ProtoNet refuses in one line."""
    run_dir = Path(shutil.copytree(REPO / "benchmarks" / "models" / "metasgd-omniglot-5w1s", tmp_path / "metasgd"))
    out = cli("eval", run_dir, "--non-transductive", "--episodes", 20, "--device", "cpu", "--data-root", data_root,
              "--no-progress")
    assert out.exit_code == 0, out.output
    result = json.loads((run_dir / "eval-nontransductive-20.json").read_text())
    assert result["transductive"] is False and result["episodes"] == 20
    predictor = l2l_recipes.load(run_dir, "cpu", data_root)
    tasks = predictor.test_tasks(20, predictor.cfg.test_seed)
    correct = []
    for x, y in (tasks[i] for i in range(20)):
        sx, sy, qx, qy = data.split_support_query(x, y, 1)
        logits = torch.cat([predictor.predict(sx, sy, torch.cat([sx, q[None]]))[-1:] for q in qx])
        correct.append((logits.argmax(1) == qy).float().mean().item())
    assert result["accuracy"] == pytest.approx(sum(correct) / 20, abs=1e-6)
    refused = cli("eval", protonet_run[0], "--non-transductive", "--device", "cpu", "--data-root", data_root)
    assert refused.exit_code == 1
    assert refused.stderr.strip() == ("Error: protonet-omniglot-5w1s scores each query on its own already (no batch "
                                      "statistics at test time): test it without --non-transductive")


def test_eval_scores_another_number_of_queries(protonet_run, data_root):
    """`eval --queries 1` scores one query image per class of fixed test tasks drawn for it,
    as scoring those tasks one by one with the loaded model does, in its own file."""
    run_dir, _ = protonet_run
    out = cli("eval", run_dir, "--queries", 1, "--episodes", 20, "--device", "cpu", "--data-root", data_root,
              "--no-progress")
    assert out.exit_code == 0, out.output
    result = json.loads((run_dir / "eval-5w1s1q-20.json").read_text())
    assert result["queries"] == 1 and result["trained_queries"] == 15 and result["episodes"] == 20
    predictor = l2l_recipes.load(run_dir, "cpu", data_root)
    tasks = data.fixed_taskset(data.load_split("omniglot", "test", data_root), 5, 1, 1, 20, predictor.cfg.test_seed)
    correct = []
    for x, y in (tasks[i] for i in range(20)):
        sx, sy, qx, qy = data.split_support_query(x, y, 1)
        assert len(qy) == 5
        correct.append((predictor.predict(sx, sy, qx).argmax(1) == qy).float().mean().item())
    assert result["accuracy"] == pytest.approx(sum(correct) / 20, abs=1e-6)


def test_published_model_is_small_and_re_tests_to_its_recorded_accuracy(protonet_run, tmp_path, data_root):
    run_dir, _ = protonet_run
    dest = tmp_path / "models" / "protonet-omniglot-5w1s"
    out = cli("publish", run_dir, dest)
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in dest.iterdir()) == ["best.pt", "config.json", "env.json", "result.json"]
    state = torch.load(dest / "best.pt", weights_only=True)
    assert "optimizer" not in state and "rng" not in state and state["published_from"] == str(run_dir)
    assert (dest / "best.pt").stat().st_size < 0.6e6  # Conv4: ~113k parameters
    recorded = json.loads((dest / "result.json").read_text())
    again = cli("eval", dest, "--device", "cpu", "--data-root", data_root, "--no-progress")
    assert again.exit_code == 0, again.output
    assert json.loads((dest / f"eval-{recorded['episodes']}.json").read_text())["accuracy"] == recorded["accuracy"]
    refused = cli("publish", run_dir, dest)
    assert refused.exit_code == 1 and "not empty" in refused.stderr


def test_two_bench_processes_share_the_seeds_and_write_one_record(tmp_path, data_root):
    """Seed 1 is held (locked) by another bench process: this one trains seed 2 and leaves the
    record to the last to finish; once seed 1 is tested, --resume writes the record, once."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    overrides = ["val_interval=5", "train_ways=10", "val_episodes=10", "log_interval=5"]
    args = ["bench", "protonet-omniglot-5w1s", "--seeds", 2, "--episodes", 10, "--iterations", 5,
            *[a for o in overrides for a in ("--set", o)], "--device", "cpu", "--no-progress",
            "--data-root", data_root, "--runs-dir", runs, "--results-dir", results, "--resume"]
    home = bench.bench_dir(runs, "protonet-omniglot-5w1s", 10, ["iterations=5", *overrides], None)
    home.mkdir(parents=True)
    with open(home / "seed-1.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is training seed 1
        out = cli(*args)
        assert out.exit_code == 0, out.output
        assert "seed(s) 1 still training in another bench process" in out.output
        assert (home / "seed-2" / "result.json").is_file() and not (home / "seed-1").exists()
        assert not list(results.glob("*.json"))
    out = cli(*args)  # seed 1 is free now: trained here, and the record written
    assert out.exit_code == 0, out.output
    (record,) = [json.loads(p.read_text()) for p in results.glob("*.json")]
    assert [s["seed"] for s in record["seeds"]] == [1, 2]
    again = cli(*args)
    assert again.exit_code == 0 and len(list(results.glob("*.json"))) == 1  # no second record


def test_a_bench_of_one_seed_grows_to_more_seeds_without_training_it_again(tmp_path, data_root):
    """benchmarks/long_runs.sh benches ProtoNet's seed 1 alone (a verdict sooner), then the same
    bench with --seeds 3: seed 1's tested run is taken as it is, and a record of all seeds is added."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    args = ["bench", "protonet-omniglot-5w1s", "--episodes", 10, "--iterations", 4, "--set", "train_ways=10",
            "--set", "val_interval=2", "--set", "val_episodes=10", "--device", "cpu", "--no-progress",
            "--data-root", data_root, "--runs-dir", runs, "--results-dir", results, "--resume"]
    assert cli(*args, "--seeds", 1).exit_code == 0
    (seed_1,) = runs.glob("protonet-omniglot-5w1s/bench-*/seed-1")
    trained = {name: (seed_1 / name).read_bytes() for name in ("metrics.jsonl", "best.pt", "result.json")}
    out = cli(*args, "--seeds", 2)
    assert out.exit_code == 0, out.output
    assert {name: (seed_1 / name).read_bytes() for name in trained} == trained
    one, two = sorted((json.loads(p.read_text()) for p in results.glob("*.json")), key=lambda r: len(r["seeds"]))
    assert [s["seed"] for s in one["seeds"]] == [1] and [s["seed"] for s in two["seeds"]] == [1, 2]
    assert two["seeds"][0] == one["seeds"][0]


def test_a_seed_trained_under_other_defaults_is_refused_and_left_as_it_was(tmp_path, data_root):
    """A recipe's defaults changed since a seed's bench started (ANIL's inner step, 2026-12-07): the
    bench refuses to continue it in one line, and its checkpoint, metrics and env.json (no
    continuation noted for a run that did not continue) stay as they were."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    args = ["bench", "protonet-omniglot-5w1s", "--seeds", 1, "--episodes", 10, "--iterations", 4,
            "--set", "train_ways=10", "--set", "val_interval=2", "--set", "val_episodes=10", "--no-progress",
            "--device", "cpu", "--data-root", data_root, "--runs-dir", runs, "--results-dir", results, "--resume"]
    assert cli(*args).exit_code == 0
    (seed,) = runs.glob("protonet-omniglot-5w1s/bench-*/seed-1")
    (seed / "result.json").unlink()  # stopped before its test
    state = torch.load(seed / "ckpt.pt", weights_only=True)
    state["config"]["lr"] = 0.5  # as if started when the recipe's default was another
    torch.save(state, seed / "ckpt.pt")
    config = json.loads((seed / "config.json").read_text())
    (seed / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    kept = {p.name: p.read_bytes() for p in seed.iterdir() if p.is_file()}
    out = cli(*args)
    assert out.exit_code != 0
    assert out.output.strip().splitlines()[-1].startswith(f"Error: {seed} was trained with other settings (lr differ")
    assert {p.name: p.read_bytes() for p in seed.iterdir() if p.is_file()} == kept


def test_a_seed_started_on_another_machine_is_finished_here_and_both_are_recorded(tmp_path, data_root):
    """A bench's runs do not depend on the device (a seed started on a GPU machine continues on a
    CPU with the same command plus --resume); env.json and the record name every machine."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    args = ["bench", "protonet-omniglot-5w1s", "--seeds", 1, "--episodes", 10, "--iterations", 4,
            "--set", "train_ways=10", "--set", "val_interval=2", "--set", "val_episodes=10", "--no-progress",
            "--data-root", data_root, "--runs-dir", runs, "--results-dir", results, "--resume"]
    assert cli(*args, "--device", "cpu").exit_code == 0
    (first,) = [json.loads(p.read_text()) for p in results.glob("*.json")]
    home = bench.bench_dir(runs, "protonet-omniglot-5w1s", 10, ["iterations=4", "train_ways=10", "val_interval=2",
                                                                "val_episodes=10"], None)
    seed = home / "seed-1"
    # make it a run that a GPU machine trained and that stopped before its test
    env = json.loads((seed / "env.json").read_text())
    (seed / "env.json").write_text(json.dumps({**env, "device": "cuda", "gpu": "NVIDIA H200", "cpu_count": 16}))
    config = json.loads((seed / "config.json").read_text())
    (seed / "config.json").write_text(json.dumps({**config, "device": "cuda"}))
    state = torch.load(seed / "ckpt.pt", weights_only=True)
    state["config"]["device"] = "cuda"
    torch.save(state, seed / "ckpt.pt")
    for done in [seed / "result.json", *home.glob("record-*.txt"), *results.iterdir()]:
        done.unlink()
    out = cli(*args, "--device", "auto")  # auto: the CPU here
    assert out.exit_code == 0, out.output
    (record,) = [json.loads(p.read_text()) for p in results.glob("*.json")]
    here = f"{env['processor']} ({env['cpu_count']} cores)"
    assert record["machines"] == record["seeds"][0]["machines"] == ["NVIDIA H200", here]
    (continued,) = json.loads((seed / "env.json").read_text())["continued"]
    assert continued["device"] == "cpu" and continued["after_iteration"] == 4 and "gpu" not in continued
    assert continued["torch_threads"] == torch.get_num_threads() and continued["world_size"] == 1
    assert record["seeds"][0]["accuracy"] == first["seeds"][0]["accuracy"]  # the same weights, the same tasks
    assert f"| NVIDIA H200 + {here}, " in (results.parent / "README.md").read_text()


def test_bench_processes_checking_one_results_folder_at_once_all_pass(tmp_path):
    """Several bench processes share --results-dir; each one's write check must not trip the others'
    (a shared probe file name did: one process removed it under another)."""
    from concurrent.futures import ThreadPoolExecutor

    def check(_):
        for _ in range(200):
            bench.check_writable(tmp_path / "results", "--results-dir")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(check, range(8)))  # re-raises any UserError
    assert not list((tmp_path / "results").iterdir())


def test_bench_refuses_folders_it_cannot_write_before_training(tmp_path, data_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for option in ("--runs-dir", "--results-dir"):
        paths = {"--runs-dir": tmp_path / "runs", "--results-dir": tmp_path / "results", option: blocker / "sub"}
        out = cli("bench", "protonet-omniglot-5w1s", "--seeds", 1, "--iterations", 1, "--device", "cpu",
                  "--data-root", data_root, *[a for item in paths.items() for a in item])
        assert out.exit_code == 1 and f"cannot write {option} {blocker / 'sub'}" in out.stderr, out.output
        assert len(out.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "runs" / "protonet-omniglot-5w1s").exists()  # a later bench needs no --resume


def test_one_sine_model_tested_at_other_shots(tmp_path):
    """bench maml-sine-10s tests the maml-sine-5s model with 10 support points (Finn et al.'s single
    meta-learned model); `eval --shots 10` on that run gives the same error."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    args = ["--seeds", 1, "--episodes", 20, "--iterations", 20, "--set", "val_interval=10", "--set", "val_episodes=10",
            "--device", "cpu", "--no-progress", "--runs-dir", runs, "--results-dir", results]
    assert cli("bench", "maml-sine-5s", *args).exit_code == 0
    out = cli("bench", "maml-sine-10s", *args)
    assert out.exit_code == 0, out.output
    (record,) = [json.loads(p.read_text()) for p in results.glob("maml-sine-10s-*.json")]
    assert record["trained_as"] == "maml-sine-5s" and record["shots"] == 10 and record["config"]["shots"] == 5
    (five,) = [json.loads(p.read_text()) for p in results.glob("maml-sine-5s-*.json")]
    assert record["seeds"][0]["mse"] != five["seeds"][0]["mse"]  # tested on other support sets
    (seed_dir,) = (runs / "maml-sine-5s").glob("bench-*/seed-1")
    evaluated = cli("eval", seed_dir, "--shots", 10, "--episodes", 20, "--device", "cpu", "--no-progress")
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads((seed_dir / "eval-10s-20.json").read_text())
    assert result["shots"] == 10 and result["trained_shots"] == 5 and "trained_ways" not in result
    assert result["mse"] == record["seeds"][0]["mse"] and result["before_mse"] == record["seeds"][0]["before_mse"]
