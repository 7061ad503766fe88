"""Longer learning checks, kept out of the test suite (tests/ keeps a short real run per family).

Each trains a recipe for a minute or two of CPU on real Omniglot and asserts that it reaches an
accuracy it has reached before. Run them with

    python -m pytest benchmarks/learning_checks.py -q

(data as for the tests: ../shared/data beside the checkout, or $L2L_RECIPES_DATA).
"""
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from l2l_recipes import data, harness, registry

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def data_root():
    root = Path(os.environ.get("L2L_RECIPES_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (root / "omniglot-py" / "images_background").is_dir():
        pytest.fail(f"real Omniglot expected at {root}/omniglot-py (set L2L_RECIPES_DATA)")
    return root


def train(tmp_path, data_root, name, **changes):
    recipe = registry.get_recipe(name)
    cfg = dataclasses.replace(recipe.config(), device="cpu", **changes)
    run = harness.Run(tmp_path / "run", recipe.name, cfg, CPU, data_root=data_root, progress=False)
    model = recipe.load_module().train(cfg, run)
    return recipe.load_module(), cfg, model, run


@pytest.mark.parametrize("name, changes, floor", [
    # chance is 20% on 5-way test tasks of unseen characters
    ("fomaml-omniglot-5w1s", {"iterations": 60, "meta_batch_size": 16, "val_interval": 60}, 0.45),
    ("matchingnet-omniglot-5w1s", {"fce": False, "iterations": 150, "val_interval": 150}, 0.55),
    # tests/ test Reptile on 100 of these tasks, and fewer steps of SNAIL and the transfer baseline
    ("reptile-omniglot-5w1s", {"iterations": 100, "test_adaptation_steps": 20, "val_interval": 100}, 0.45),
    # 1000 steps of 4 episodes, 16 filters (measured: 0.68 with seed 42, 0.61 with seed 7)
    ("snail-omniglot-5w1s", {"iterations": 1000, "meta_batch_size": 4, "hidden_size": 16, "val_interval": 1000,
                             "queries": 5}, 0.5),
])
def test_recipe_learns(tmp_path, data_root, name, changes, floor):
    _, _, _, run = train(tmp_path, data_root, name, val_episodes=50, test_episodes=200, **changes)
    result = harness.meta_test(run.path, device="cpu", data_root=data_root, progress=False)
    assert result["episodes"] == 200 and result["accuracy"] > floor, result


def test_transfer_baseline_learns_with_both_heads(tmp_path, data_root):
    module, cfg, model, _ = train(tmp_path, data_root, "transfer-omniglot-5w1s", iterations=300, batch_size=64,
                                  val_interval=300, val_episodes=50)
    tasks = data.fixed_taskset(data.load_split("omniglot", "test", data_root), 5, 1, 15, 200, seed=0)
    for head in ("linear", "centroid"):
        predictor = module.Predictor(dataclasses.replace(cfg, head=head), model, CPU)
        accuracy = harness.evaluate(predictor, tasks, shots=1, progress=False)["accuracy"]
        # 300 supervised mini-batches of 64 over the 4112 training classes (measured: 0.64 and 0.63)
        assert accuracy > 0.55, (head, accuracy)

