"""Shared fixtures: the real data beside the checkout (../shared/data), never downloaded."""
import fcntl
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # parallel workers (setup.cfg: -n auto), one per core: one thread each, and in the processes
    # they start (set before torch is imported); measured on 2 cores, 27 -> 19 minutes
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest modules (summed --durations of 2026-12-06: 430, 310, 280, 140, 140, 125 s) go first:
# --dist loadscope hands modules to the workers in collection order, and a long one handed out
# last keeps one worker busy after the other is done.
LONGEST_FIRST = ("test_export.py", "test_learning.py", "test_protocol.py", "test_resume.py",
                 "test_distributed.py", "test_regression_rl.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _shared_data():
    env = os.environ.get("L2L_RECIPES_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root():
    root = _shared_data()
    if not (root / "omniglot-py" / "images_background").is_dir():
        pytest.fail(f"real Omniglot expected at {root}/omniglot-py (set L2L_RECIPES_DATA)")
    return root


@pytest.fixture(scope="session")
def omniglot_images(data_root):
    """(character names, uint8 images [1623, 20, 28, 28]) through the real cache."""
    from l2l_recipes.datasets import omniglot
    return omniglot.load_omniglot(data_root, progress=False)


@pytest.fixture(scope="session")
def splits(data_root, omniglot_images):
    from l2l_recipes import data
    return {s: data.load_split("omniglot", s, data_root) for s in data.SPLIT_NAMES}


def cli(*args):
    """Invoke the l2l-recipes CLI in-process; returns click's Result (stdout and stderr apart)."""
    from click.testing import CliRunner

    from l2l_recipes.cli import cli as group
    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def protonet_run(tmp_path_factory, data_root):
    """A short real ProtoNet run on Omniglot through `l2l-recipes run` (shared by several tests):
    (run folder, the command's output). Trained once for all workers (the first to ask, under a
    lock, in the session's folder they share), not once per worker."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out = shared / "protonet-run"
    with open(shared / "protonet-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "output.txt").is_file():
            result = cli("run", "protonet-omniglot-5w1s", "--data-root", data_root, "--device", "cpu",
                         "--out", out, "--no-progress", "--set", "iterations=80", "--set", "train_ways=20",
                         "--set", "val_interval=40", "--set", "val_episodes=50", "--set", "test_episodes=200")
            assert result.exit_code == 0, result.output
            (out / "output.txt").write_text(result.output)
    (run_dir,) = (out / "protonet-omniglot-5w1s").iterdir()
    return run_dir, (out / "output.txt").read_text()
