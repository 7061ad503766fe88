"""The installed layout: recipes under the project's namespace, datasets and the speed lab in
subpackages, nothing generic at the top level, and the malloc setting left to trainers."""
import subprocess
import sys

import torch

from l2l_recipes import harness, registry


def test_recipes_install_under_the_project_namespace(tmp_path):
    """From outside the checkout: l2l_recipes.recipes.<family> imports, a top-level `recipes` does not."""
    code = ("import importlib.util, l2l_recipes.recipes.maml as m, l2l_recipes.datasets.omniglot, "
            "l2l_recipes.lab.speed; print(m.__file__); print(importlib.util.find_spec('recipes'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    module_file, top_level = out.stdout.split()
    assert module_file.endswith("recipes/maml.py") and top_level == "None"
    assert registry.get_recipe("maml-omniglot-5w1s").module == "l2l_recipes.recipes.maml"


def test_constructing_a_run_leaves_malloc_alone(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(harness, "keep_freed_memory", lambda: calls.append(1))
    harness.Run(tmp_path / "run", "maml-omniglot-5w1s", None, torch.device("cpu"), progress=False)
    assert calls == []
