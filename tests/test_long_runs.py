"""The long-run scripts of benchmarks/: the queue runs each item with its own options, one after
another, past a failed one; long_status.py reports each seed's state; omniglot_rotations.py scores a
run's test tasks by their rotated classes."""
import fcntl
import json
import os
import subprocess
import sys

from conftest import REPO


def test_queue_items_carry_their_options_and_a_failed_bench_does_not_stop_the_queue(tmp_path):
    long = tmp_path / "long"
    (long / "venv" / "bin").mkdir(parents=True)
    (long / "logs").mkdir()
    stub = long / "venv" / "bin" / "l2l-recipes"  # records its arguments; the second bench fails
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/calls\n[ "$4" != anil-omniglot-5w1s ]\n')
    stub.chmod(0o755)
    items = ["reptile-omniglot-5w1s", "anil-omniglot-5w1s",
             "protonet-omniglot-5w1s protonet-omniglot-20w1s --seeds 3 --episodes 1000"]
    subprocess.run(["bash", REPO / "benchmarks" / "bench_queue.sh", long, *items], check=True, timeout=60)
    common = f"--device cpu --resume --runs-dir {long}/bench --results-dir {long}/results --no-progress"
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"bench --seeds 1 reptile-omniglot-5w1s {common}",
        f"bench --seeds 1 anil-omniglot-5w1s {common}",
        f"bench --seeds 1 protonet-omniglot-5w1s protonet-omniglot-20w1s --seeds 3 --episodes 1000 {common}"]
    assert sorted(p.name for p in (long / "logs").iterdir()) == [
        "anil-omniglot-5w1s.log", "protonet-omniglot-5w1s.log", "reptile-omniglot-5w1s.log"]


def test_long_status_reports_each_seed(tmp_path):
    """One line per seed: its pace without the time a pause lost, the hours left; under
    early stopping the end is where training stops if the validation loss does not improve again."""
    home = tmp_path / "bench" / "maml-omniglot-5w1s" / "bench-0123456789"
    for seed, tested in ((1, True), (2, False)):
        run = home / f"seed-{seed}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"iterations": 60000}))
        rows = [{"iteration": i, "time": 0.5 * i + 700 * (i > 1500 and seed == 2), "loss": 1.0}
                for i in range(10, 2010, 10)]  # seed 2 paused after 1,500: 700 s lost
        rows.insert(50, {"iteration": 500, "time": 250.0, "val_accuracy": 0.9, "val_loss": 0.3})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if tested:
            (run / "result.json").write_text("{}")
    stopping = tmp_path / "bench" / "protonet-omniglot-5w1s" / "bench-0123456789" / "seed-1"
    stopping.mkdir(parents=True)
    (stopping / "config.json").write_text(json.dumps({"iterations": 1_000_000, "val_interval": 100,
                                                      "patience": 200, "trainval": True}))
    rows = [{"iteration": i, "time": 0.3 * i + 300 * (i > 500), "loss": 1.0}  # paused 5 min: 11x a step
            for i in range(100, 1100, 100)]
    rows += [{"iteration": i, "time": 0.3 * i, "val_accuracy": 0.99, "val_loss": 0.5 - 0.1 * (i == 400)}
             for i in range(100, 1100, 100)]  # the best validation loss at 400
    (stopping / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "maml-omniglot-5w1s.log").write_text("iteration=10\nError: out of disk space\n")
    with open(home / "seed-2.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a bench process training seed 2
        out = subprocess.run([sys.executable, REPO / "benchmarks" / "long_status.py", tmp_path], check=True,
                             capture_output=True, text=True, timeout=60).stdout.splitlines()
    seed_line = "maml-omniglot-5w1s/bench-0123456789/seed-{}: iteration 2000 of 60000, 0.500 s/it lately, " \
                "val 0.9000 (best 0.9000 at 500), {}"
    # stops at 400 + 201 validations of 100, then retrains for 400 + 199 x 100: ends at 40,800
    assert out == [seed_line.format(1, "tested"), seed_line.format(2, "training, ~8.1 h left at that pace"),
                   "protonet-omniglot-5w1s/bench-0123456789/seed-1: iteration 1000 of 40800, 0.300 s/it lately, "
                   "val 0.9900 (best 0.9900 at 100), stopped, ~3.3 h left at that pace",
                   "maml-omniglot-5w1s.log: Error: out of disk space"]


def test_omniglot_rotations_scores_the_runs_test_tasks_and_upright_ones(protonet_run, data_root):
    """benchmarks/omniglot_rotations.py (a shortfall's investigation) scores the run's own fixed test
    tasks (the accuracy its result.json holds), split by tasks holding two rotations of a character,
    then as many tasks drawn from the 423 upright test characters only."""
    run_dir, _ = protonet_run
    env = {**os.environ, "L2L_RECIPES_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, REPO / "benchmarks" / "omniglot_rotations.py", run_dir], check=True,
                         capture_output=True, text=True, timeout=600, env=env).stdout.splitlines()
    every, upright = map(json.loads, out)
    result = json.loads((run_dir / "result.json").read_text())
    assert every["tasks"] == result["episodes"] == 200
    assert abs(every["accuracy"] - result["accuracy"]) < 1e-6 and abs(every["ci95"] - result["ci95"]) < 1e-6
    groups = [every["shared character"], every["distinct characters"]]
    assert sum(g["tasks"] for g in groups) == 200
    weighted = sum(g["accuracy"] * g["tasks"] for g in groups) / 200
    assert abs(weighted - every["accuracy"]) < 1e-6
    assert upright["upright classes"] == 423 and upright["tasks"] == 200 and 0.4 < upright["accuracy"] <= 1


def test_long_runs_checks_out_the_commit_asked_for_even_abbreviated(tmp_path):
    """COMMIT may be any name git knows (an abbreviated hash too); one that names no commit stops
    the script before it touches LONG."""
    def git(*args, cwd=REPO):
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()
    long, script = tmp_path / "long", REPO / "benchmarks" / "long_runs.sh"
    env = {**os.environ, "LONG": str(long), "QUEUES": "0"}
    bad = subprocess.run(["bash", script], env={**env, "COMMIT": "no-such-commit"}, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == "COMMIT=no-such-commit is no commit of this repository"
    assert not long.exists()
    wanted = git("rev-parse", "HEAD~1")
    git("clone", "-q", str(REPO), str(long / "code"))  # its venv made already: bootstrap.sh's stamp at that commit
    git("checkout", "-q", wanted, cwd=long / "code")
    key = subprocess.run("cat requirements.txt setup.cfg pyproject.toml tools/bootstrap.sh tools/learn2learn_wheel.sh"
                         " | sha256sum | cut -c1-16", shell=True, cwd=long / "code", check=True, capture_output=True,
                         text=True).stdout.strip()
    git("checkout", "-q", "HEAD~1", cwd=long / "code")  # elsewhere: the script must move it back
    (long / "venv").mkdir()
    (long / "venv" / f".stamp-{key}").touch()
    subprocess.run(["bash", script], env={**env, "COMMIT": wanted[:7]}, check=True, capture_output=True, timeout=120)
    assert git("rev-parse", "HEAD", cwd=long / "code") == wanted
