"""Meta-training under torchrun (gloo, 2 CPU processes) against one process: with the same
global tasks the weights agree, evaluation split over the processes gives the same result,
rank 0 alone writes, resume needs the same number of processes; and distributed.py's
identities in a single process."""
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, cli
from l2l_recipes import data, distributed, harness
from l2l_recipes.errors import UserError

CPU = torch.device("cpu")
MAML = ["maml-omniglot-5w1s", "--device", "cpu", "--no-progress", "--set", "hidden_size=8", "--set",
        "meta_batch_size=32", "--set", "iterations=4", "--set", "val_interval=100", "--set", "val_episodes=6",
        "--set", "test_episodes=10", "--set", "log_interval=1"]
PROTONET = ["protonet-omniglot-5w1s", "--device", "cpu", "--no-progress", "--set", "hidden_size=16", "--set",
            "train_ways=10", "--set", "meta_batch_size=4", "--set", "iterations=3", "--set", "val_interval=3",
            "--set", "val_episodes=6", "--set", "test_episodes=20", "--set", "log_interval=1"]
# rank 0 dies (SIGKILL) inside its third checkpoint write: ckpt.pt stays at iteration 2
KILL_HOOK = """\
import os, signal
if os.environ.get("RANK") == "0":
    _fsync, _calls = os.fsync, [0]
    def fsync(fd):
        _calls[0] += 1
        if _calls[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return _fsync(fd)
    os.fsync = fsync
"""


def torchrun(*args, data_root, env=None, timeout=300):
    """`torchrun --standalone --nproc_per_node=2 -m l2l_recipes.cli run ARGS` (a free port each time)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "L2L_RECIPES_DATA": str(data_root), **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "l2l_recipes.cli", "run", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def the_run(out, name):
    (run_dir,) = (out / name).iterdir()  # exactly one run directory: rank 1 made none
    assert [p.name for p in out.iterdir()] == [name]
    return run_dir


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len({json.dumps({k: v for k, v in r.items() if k != "time"}) for r in rows}) == len(rows)  # no line twice
    return rows


def assert_same_weights(one_dir, two_dir):
    """Parameters equal within 1e-6, but for elements whose gradient is rounding noise, whose sum
    depends on the order of summation and which Adam's normalisation turns into steps of about
    lr: biases of convolutions before batch norm (gradient 0 in exact arithmetic) and elements
    whose gradient RMS (Adam's second moment) is below 1e-6. They are a few percent."""
    one, two = (torch.load(d / "ckpt.pt", weights_only=True) for d in (one_dir, two_dir))
    names = [name for name, _ in harness.load(one_dir, device="cpu").model.named_parameters()]
    compared = total = 0
    for index, name in enumerate(names):  # the optimizer holds the model's parameters in this order
        adam = one["optimizer"]["state"][index]
        rms = (adam["exp_avg_sq"] / (1 - 0.999 ** adam["step"])).sqrt()
        signal = rms >= 1e-6 if not name.endswith("conv.bias") else torch.zeros_like(rms, dtype=torch.bool)
        difference = (one["model"][name] - two["model"][name]).abs()
        assert torch.where(signal, difference, 0).max() <= 1e-6, name
        compared, total = compared + int(signal.sum()), total + rms.numel()
    assert compared >= 0.95 * total, (compared, total)


@pytest.fixture(scope="module")
def maml_runs(tmp_path_factory, data_root):
    """MAML with 32 tasks per step: one process, and two processes whose rank 0 is killed after the
    checkpoint of iteration 2, resumed under torchrun. Returns both run directories and the resume."""
    out = tmp_path_factory.mktemp("maml")
    one = cli("run", *MAML, "--data-root", data_root, "--out", out / "one")
    assert one.exit_code == 0, one.output
    hook = out / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    killed = torchrun(*MAML, "--data-root", data_root, "--out", out / "two", "--checkpoint-every", 1,
                      data_root=data_root, env={"PYTHONPATH": str(hook)})
    assert killed.returncode != 0, killed.stdout
    two_dir = the_run(out / "two", "maml-omniglot-5w1s")
    assert torch.load(two_dir / "ckpt.pt", weights_only=True)["iteration"] == 2
    assert not (two_dir / "result.json").exists()
    resumed = torchrun("--resume", two_dir, "--data-root", data_root, data_root=data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return the_run(out / "one", "maml-omniglot-5w1s"), two_dir, resumed


def test_maml_two_processes_resumed_equal_one_process(maml_runs):
    one_dir, two_dir, resumed = maml_runs
    ckpt = torch.load(two_dir / "ckpt.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng_by_rank"]) == 2
    assert_same_weights(one_dir, two_dir)
    # the whole meta-batch's loss logged once per iteration by rank 0, as one process logs it
    rows_one, rows_two = metrics(one_dir), metrics(two_dir)
    assert [r["iteration"] for r in rows_two] == [r["iteration"] for r in rows_one] == [1, 2, 3, 4, 4]
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (rows_one, rows_two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert {p.name for p in two_dir.iterdir()} == {"config.json", "env.json", "metrics.jsonl", "ckpt.pt",
                                                   "best.pt", "result.json"}  # the killed write cleaned up
    env = json.loads((two_dir / "env.json").read_text())
    assert env["world_size"] == 2 and env["backend"] == "gloo"
    assert json.loads((one_dir / "env.json").read_text())["world_size"] == 1
    # rank 0 alone prints
    assert resumed.stdout.count("maml-omniglot-5w1s: 5-way 1-shot test accuracy") == 1
    assert resumed.stdout.count("resuming ") == 1


def test_resume_with_another_number_of_processes_is_refused(maml_runs, tmp_path):
    two_dir = shutil.copytree(maml_runs[1], tmp_path / "two")
    (two_dir / "result.json").unlink()  # a finished run is refused as such
    result = cli("run", "--resume", two_dir, "--device", "cpu")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line == (f"Error: run {two_dir} was trained with 2 process(es), not 1: resume it with as many, e.g. "
                    f"torchrun --nproc_per_node=2 -m l2l_recipes.cli run --resume {two_dir} (or --nnodes x "
                    f"--nproc_per_node = 2)")


def test_a_checkpoint_without_world_size_counts_as_one_process(maml_runs, tmp_path):
    one_dir, _, _ = maml_runs
    old = tmp_path / "old"
    shutil.copytree(one_dir, old)
    (old / "result.json").unlink()  # a finished run is refused as such
    state = torch.load(old / "ckpt.pt", weights_only=True)
    assert state.pop("world_size") == 1
    torch.save(state, old / "ckpt.pt")
    assert harness.Run.resume(old, CPU).resume_state["iteration"] == 4
    torch.save({**state, "world_size": 2}, old / "ckpt.pt")
    with pytest.raises(UserError, match="was trained with 2 process"):
        harness.Run.resume(old, CPU)


def test_protonet_two_processes_equal_one_and_split_evaluation(tmp_path, data_root):
    one = cli("run", *PROTONET, "--data-root", data_root, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = torchrun(*PROTONET, "--data-root", data_root, "--out", tmp_path / "two", data_root=data_root)
    assert two.returncode == 0, two.stderr[-3000:]
    one_dir, two_dir = the_run(tmp_path / "one", "protonet-omniglot-5w1s"), the_run(tmp_path / "two",
                                                                                     "protonet-omniglot-5w1s")
    assert_same_weights(one_dir, two_dir)
    rows_one, rows_two = metrics(one_dir), metrics(two_dir)
    assert [r["iteration"] for r in rows_two] == [1, 2, 3, 3]
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (rows_one, rows_two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert two.stdout.count("run directory: ") == 1 and "2 processes (gloo)" in two.stdout
    # the test tasks split over two processes and gathered: one process on the same weights agrees
    split = json.loads((two_dir / "result.json").read_text())
    single = harness.meta_test(two_dir, device="cpu", data_root=data_root, progress=False,
                               out_name="one-process.json")
    assert (split["accuracy"], split["ci95"], split["episodes"]) == (single["accuracy"], single["ci95"], 20)
    val = [r for r in rows_two if "val_accuracy" in r][0]
    predictor = harness.load(two_dir, device="cpu")  # best.pt: the validated weights
    val_tasks = data.fixed_taskset(data.load_split("omniglot", "val", data_root), 5, 1, 15, 6, 1)
    assert predictor.evaluate(val_tasks, progress=False)["accuracy"] == val["val_accuracy"]


def test_meta_batch_not_divisible_is_one_clear_line_on_each_process(tmp_path, data_root):
    started = time.time()
    result = torchrun(*MAML, "--set", "meta_batch_size=3", "--data-root", data_root, "--out", tmp_path / "runs",
                      data_root=data_root, timeout=120)
    assert result.returncode != 0 and time.time() - started < 120
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: meta_batch_size=3 does not split evenly over 2 processes: pass --set "
                      "meta_batch_size=N with N a multiple of 2, or a --nproc_per_node that divides 3"] * 2
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- one process

def test_single_process_helpers_are_identities(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched() and not distributed.active()
    assert distributed.init(CPU) == CPU and not distributed.active()  # no torchrun: no process group
    assert (distributed.rank(), distributed.world_size(), distributed.is_main(), distributed.backend()) == (0, 1, True,
                                                                                                             None)
    assert all(distributed.mine(i) for i in range(7))
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    model(torch.randn(4, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    distributed.all_reduce_gradients(model.parameters())
    distributed.average_buffers(model)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    tensors = [torch.ones(2), torch.zeros(3)]
    distributed.all_reduce(tensors)
    assert tensors[0].tolist() == [1, 1] and tensors[1].tolist() == [0, 0, 0]
    assert distributed.all_reduce_floats([0.1, 2.5]) == [0.1, 2.5]
    assert distributed.any_rank("SIGTERM") and not distributed.any_rank(None)
    assert distributed.gather([3, 1, 2]) == [3, 1, 2]
    state = {"a": torch.arange(3)}
    assert distributed.broadcast_object(state) is state
    assert distributed.on_main(lambda x: x + 1, 1) == 2
    def refuse():
        raise UserError("bad input")
    with pytest.raises(UserError, match="bad input"):
        distributed.on_main(refuse)
    distributed.close()
    distributed.check_split(harness.recipe_module("maml-omniglot-5w1s").Config(meta_batch_size=3))


def test_gather_restores_task_order_and_check_split_names_the_fix(monkeypatch):
    """With 3 processes, process r holds tasks r, r + 3, ...: gather interleaves them back."""
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shares = [[0, 3, 6], [1, 4], [2, 5]]
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda parts, values: parts.__setitem__(
        slice(None), shares))
    assert distributed.gather(shares[0]) == list(range(7))
    cfg = harness.recipe_module("protonet-omniglot-5w1s").Config()  # meta_batch_size=1
    with pytest.raises(UserError, match=r"meta_batch_size=1 does not split evenly over 3 processes: pass "
                                        r"--set meta_batch_size=N with N a multiple of 3"):
        distributed.check_split(cfg)
    transfer = harness.recipe_module("transfer-omniglot-5w1s").Config(batch_size=64)
    with pytest.raises(UserError, match="batch_size=64 does not split evenly over 3 processes"):
        distributed.check_split(transfer)


def test_draw_uses_the_random_numbers_of_sample(splits):
    """data.draw + get_task gives what Taskset.sample() gives and leaves `random` where it would."""
    tasks = data.taskset(splits["train"], 5, 1, 2)
    random.seed(7)
    sampled = [tasks.sample() for _ in range(5)]
    after_sample = random.getstate()
    random.seed(7)
    drawn = [data.draw(tasks) for _ in range(5)]
    assert random.getstate() == after_sample
    loaded = [tasks.get_task(d) for d in drawn]
    assert random.getstate() == after_sample  # loading draws nothing: processes stay in step
    for (x, y), (x2, y2) in zip(sampled, loaded):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_reptile_two_processes_carry_the_inner_adam_state_of_one(tmp_path, data_root):
    """Reptile's carried inner Adam state advances over the whole meta-batch whichever process
    adapted each task (`carry_state` sums the processes' shares): after two iterations of four
    tasks, the state and the weights under torchrun are those of one process."""
    args = ["reptile-omniglot-5w1s", "--device", "cpu", "--no-progress", "--set", "hidden_size=8", "--set",
            "meta_batch_size=4", "--set", "iterations=2", "--set", "val_episodes=4", "--set",
            "test_adaptation_steps=3", "--set", "test_episodes=4", "--data-root", data_root]
    one = cli("run", *args, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = torchrun(*args, "--out", tmp_path / "two", data_root=data_root)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = (torch.load(the_run(tmp_path / n, "reptile-omniglot-5w1s") / "ckpt.pt", weights_only=True)["model"]
                for n in ("one", "two"))
    assert int(one["adam_step"]) == int(two["adam_step"]) == 2 * 4 * 5
    for name, value in one.items():
        if name.startswith("adam_sq_") and not name.endswith("conv_bias"):
            assert value.abs().max() > 0 and torch.allclose(two[name], value, rtol=1e-4, atol=0), name
        elif not name.startswith("adam_") and not name.endswith("conv.bias"):
            assert (two[name] - value).abs().max() <= 1e-4, name
