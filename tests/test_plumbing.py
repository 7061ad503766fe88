"""Recipes reach torch.distributed only through harness's run helpers: none imports
l2l_recipes.distributed, and the helpers split and merge as distributed.py does."""
import ast

import torch

from conftest import REPO
from l2l_recipes import distributed, harness


def test_no_recipe_imports_distributed():
    importers = []
    for path in sorted((REPO / "recipes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module or ""]
            else:
                continue
            if any(name.split(".")[-1] == "distributed" or name.startswith("torch.distributed") for name in names):
                importers.append(path.name)
    assert importers == []


def test_run_helpers_in_one_process_are_identities(tmp_path):
    run = harness.Run(tmp_path / "run", "maml-omniglot-5w1s", None, torch.device("cpu"), progress=False)
    tasks = ["a", "b", "c"]
    assert run.share(tasks) == tasks and harness.share(range(3)) == range(3) and run.mine(2)
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(run.share(x), x)
    assert run.total(0.25) == 0.25 and run.total(0.25, 3.0) == (0.25, 3.0)
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    run.reduce_gradients(model.parameters())
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    tensors = [torch.ones(2)]
    run.sum_in_place(tensors)
    assert tensors[0].tolist() == [1, 1] and harness.gather([3, 1]) == [3, 1]


def test_share_is_the_tasks_mine_and_gather_undoes_it(monkeypatch):
    """With 3 processes, process r's share is the items i with distributed.mine(i): lists,
    ranges and tensors alike; gathering the three shares gives the items back in order."""
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    items = list(range(7))
    shares = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        mine = [i for i in items if distributed.mine(i)]
        assert harness.share(items) == mine and list(harness.share(range(7))) == mine
        assert harness.share(torch.tensor(items)).tolist() == mine
        shares.append(mine)
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda parts, values: parts.__setitem__(
        slice(None), shares))
    assert harness.gather(shares[0]) == items
