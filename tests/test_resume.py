"""Resume: a run killed with SIGKILL and resumed ends bitwise identical to the same run uninterrupted."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, cli

ARGS = ["protonet-omniglot-5w1s", "--device", "cpu", "--no-progress", "--set", "iterations=40",
        "--set", "val_interval=10", "--set", "train_ways=10", "--set", "val_episodes=10",
        "--set", "test_episodes=20", "--set", "log_interval=5"]


def _rows(run_dir):
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    for row in rows:
        row.pop("time")
    return rows


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root):
    """The reference: the same run, never interrupted."""
    out = tmp_path_factory.mktemp("straight")
    assert cli("run", *ARGS, "--data-root", data_root, "--out", out).exit_code == 0
    (run_dir,) = (out / "protonet-omniglot-5w1s").iterdir()
    return run_dir


def _assert_same_run(straight, resumed_dir):
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(resumed_dir / "ckpt.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 40
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert _rows(straight) == _rows(resumed_dir)  # the same losses and validations, logged once
    result_a = json.loads((straight / "result.json").read_text())
    result_b = json.loads((resumed_dir / "result.json").read_text())
    assert result_a["accuracy"] == result_b["accuracy"]


def test_killed_run_resumes_to_identical_weights(tmp_path, data_root, straight):

    env = {**os.environ, "L2L_RECIPES_DATA": str(data_root)}
    proc = subprocess.Popen([sys.executable, "-m", "l2l_recipes.cli", "run", *ARGS, "--out", str(tmp_path / "b")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    killed_dir = None
    while time.time() < deadline and proc.poll() is None:
        runs = list((tmp_path / "b" / "protonet-omniglot-5w1s").glob("*")) if (tmp_path / "b").exists() else []
        if runs and any(r.get("iteration", 0) >= 20 and "val_accuracy" in r for r in _rows(runs[0])):
            proc.send_signal(signal.SIGKILL)  # mid-run, after at least two checkpoints
            killed_dir = runs[0]
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_dir is not None, "the run finished before it could be killed"
    assert not (killed_dir / "result.json").exists()
    at_kill = torch.load(killed_dir / "ckpt.pt", weights_only=True)["iteration"]
    assert 10 <= at_kill < 40  # the checkpoint of iteration 20 may not be written yet

    resumed = cli("run", "--resume", killed_dir, "--data-root", data_root, "--no-progress")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    _assert_same_run(straight, killed_dir)


def test_killed_while_writing_a_checkpoint_resumes_to_identical_weights(tmp_path, data_root, straight):
    """SIGKILL inside a checkpoint write (before its fsync): the previous ckpt.pt stays whole."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "_fsync, _calls = os.fsync, [0]\n"
        "def fsync(fd):\n"
        "    _calls[0] += 1\n"
        "    if _calls[0] == 4:  # the fourth checkpoint file written: die half-way\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return _fsync(fd)\n"
        "os.fsync = fsync\n")
    env = {**os.environ, "L2L_RECIPES_DATA": str(data_root), "PYTHONPATH": str(hook)}
    proc = subprocess.run([sys.executable, "-m", "l2l_recipes.cli", "run", *ARGS, "--out", str(tmp_path / "b")],
                          cwd=REPO, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    (run_dir,) = (tmp_path / "b" / "protonet-omniglot-5w1s").iterdir()
    assert list(run_dir.glob(".*.tmp*"))  # the write in progress when it died
    resumed = cli("run", "--resume", run_dir, "--data-root", data_root, "--no-progress")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    _assert_same_run(straight, run_dir)
    assert not list(run_dir.glob(".*.tmp*"))


def test_resume_refuses_a_new_config(tmp_path):
    result = cli("run", "--resume", tmp_path, "--set", "iterations=5")
    assert result.exit_code == 1 and "--resume continues a run with its own recipe and config" in result.stderr


def _start(tmp_path, data_root, *extra):
    env = {**os.environ, "L2L_RECIPES_DATA": str(data_root)}
    return subprocess.Popen([sys.executable, "-m", "l2l_recipes.cli", "run", *ARGS, *extra, "--out",
                             str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_sigterm_and_sigint_finish_the_step_checkpoint_and_say_how_to_resume(tmp_path, data_root):
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = tmp_path / sig.name
        proc = _start(out, data_root)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            runs = list(out.glob("*/*"))
            if runs and any("loss" in r for r in _rows(runs[0])):
                break
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        (run_dir,) = out.glob("*/*")
        assert proc.returncode == 1
        assert f"stopped by {sig.name} after iteration" in stderr
        assert f"Resume with: l2l-recipes run --resume {run_dir}" in stderr
        stopped_at = int(stderr.split("after iteration ")[1].split(";")[0])
        assert torch.load(run_dir / "ckpt.pt", weights_only=True)["iteration"] == stopped_at
        assert "Traceback" not in stderr


def test_divergence_stops_with_the_iteration_and_keeps_the_good_checkpoint(tmp_path, data_root):
    result = cli("run", *ARGS, "--data-root", data_root, "--out", tmp_path, "--set", "lr=1e30",
                 "--set", "log_interval=1")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "at iteration" in line and "training diverged" in line and "lower the learning rate" in line
    for ckpt in tmp_path.glob("*/*/*.pt"):  # whatever was saved before is finite
        state = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_an_existing_run_directory_is_never_reused(tmp_path, monkeypatch):
    from datetime import datetime

    from l2l_recipes import harness, registry
    monkeypatch.setattr(harness, "datetime", type("Frozen", (), {"now": staticmethod(lambda: datetime(2026, 1, 2))}))
    cfg = registry.get_recipe("protonet-omniglot-5w1s").config()
    run = harness.Run.create(tmp_path, "protonet-omniglot-5w1s", cfg, torch.device("cpu"))
    run.log(0, note="started")
    again = harness.Run.create(tmp_path, "protonet-omniglot-5w1s", cfg, torch.device("cpu"))
    assert again.path.name == run.path.name + "-2" and list(again.path.iterdir()) == []


def test_resuming_from_a_foreign_checkpoint_is_one_clear_line(tmp_path):
    torch.save({"format": 1, "recipe": "protonet-omniglot-5w1s", "config": {"wayz": 5}}, tmp_path / "ckpt.pt")
    result = cli("run", "--resume", tmp_path)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: checkpoint {tmp_path / 'ckpt.pt'} does not match recipe protonet-omniglot-5w1s")


def test_a_checkpoint_missing_a_plain_objects_attribute_is_one_clear_line(tmp_path, data_root, straight):
    """ProtoNet's early-stopping state is a plain object: resuming needs every one of its attributes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_bytes((straight / "config.json").read_bytes())
    state = torch.load(straight / "ckpt.pt", weights_only=True)
    state["iteration"] = 30  # not finished: the resume restores the tracked objects
    del state["stopper"]["wait"]
    torch.save(state, run_dir / "ckpt.pt")
    result = cli("run", "--resume", run_dir, "--data-root", data_root)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: checkpoint {run_dir / 'ckpt.pt'} does not fit recipe protonet-omniglot-5w1s")
    assert "EarlyStopping holds" in line
