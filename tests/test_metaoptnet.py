"""MetaOptNet: both base learners against independent solutions of their problems (primal
ridge regression; the Crammer-Singer dual QP solved by scipy and checked for KKT), gradients
through them, a short real run per head on real Omniglot, and a ResNet-12 smoke test."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

from conftest import cli
from l2l_recipes import harness, registry
from l2l_recipes.errors import UserError
from l2l_recipes.recipes import metaoptnet as recipe


def episode(ways, shots, queries, dim, seed=0):
    """Float64 support/query embeddings (support grouped by class) that need gradients."""
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(ways * shots, dim, generator=g, dtype=torch.float64).requires_grad_()
    query = torch.randn(ways * queries, dim, generator=g, dtype=torch.float64).requires_grad_()
    return support, torch.arange(ways).repeat_interleave(shots), query


# ----------------------------------------------------------------------------- ridge regression

@pytest.mark.parametrize("dim", [4, 40])  # fewer, then more features than support samples
def test_ridge_head_equals_the_primal_solution_and_its_gradient(dim):
    ways, shots, lam = 3, 4, 0.7
    support, labels, query = episode(ways, shots, 2, dim)
    weights = torch.randn(len(query), ways, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    ours = recipe.ridge_logits(support, labels, query, ways, lam)
    ours_grads = torch.autograd.grad((weights * ours).sum(), [support, query])

    # primal: W = (X^T X + lam I)^-1 X^T Y, a d x d system instead of the dual's (N*K) x (N*K)
    targets = F.one_hot(labels, ways).to(torch.float64)
    w = torch.linalg.solve(support.t() @ support + lam * torch.eye(dim, dtype=torch.float64),
                           support.t() @ targets)
    primal = query @ w
    primal_grads = torch.autograd.grad((weights * primal).sum(), [support, query])

    # and the primal once more in NumPy, without autograd
    x, q = support.detach().numpy(), query.detach().numpy()
    numpy_logits = q @ np.linalg.solve(x.T @ x + lam * np.eye(dim), x.T @ np.eye(ways)[labels])

    assert (ours - primal).abs().max() < 1e-10
    assert np.abs(ours.detach().numpy() - numpy_logits).max() < 1e-10
    for a, b in zip(ours_grads, primal_grads):
        assert (a - b).abs().max() < 1e-10 and a.abs().max() > 1e-3


# ----------------------------------------------------------------------------- SVM

def crammer_singer_qp(x, labels, ways, c):
    """The dual QP of the Crammer-Singer SVM (paper eq. 10), over alpha as an (n, ways) matrix
    flattened row-wise: min 1/2 z'Qz + p'z  s.t.  z <= h, A z = 0, where Q = K (x) I + I (the
    identity that MetaOptNet's code and learn2learn add to the quadratic term), p = -Y, h = C Y."""
    n = len(x)
    onehot = np.eye(ways)[labels].reshape(-1)
    q = np.kron(x @ x.T, np.eye(ways)) + np.eye(n * ways)
    a = np.kron(np.eye(n), np.ones((1, ways)))  # sum_k alpha[i, k] = 0 for each support sample i
    return q, -onehot, c * onehot, a


def scipy_solution(q, p, h, a):
    z0 = np.zeros(len(p))  # feasible: 0 <= h and A 0 = 0
    result = scipy.optimize.minimize(
        lambda z: 0.5 * z @ q @ z + p @ z, z0, jac=lambda z: q @ z + p, method="SLSQP",
        constraints=[{"type": "eq", "fun": lambda z: a @ z, "jac": lambda z: a},
                     {"type": "ineq", "fun": lambda z: h - z, "jac": lambda z: -np.eye(len(z))}],
        options={"ftol": 1e-12, "maxiter": 1000})
    assert result.success, result.message
    return result.x


def test_svm_head_solves_the_crammer_singer_dual():
    ways, shots, c = 4, 3, 0.1
    support, labels, query = episode(ways, shots, 2, dim=6, seed=3)
    classifier = recipe.fit_svm(support, labels, ways, c, iterations=50)
    alpha = classifier.qp_solution.detach().numpy()  # (n, ways)
    x = support.detach().numpy()
    q, p, h, a = crammer_singer_qp(x, labels.numpy(), ways, c)
    z = alpha.reshape(-1)

    # KKT: feasibility; stationarity Qz + p + nu_i + lambda = 0 with lambda >= 0 on the
    # constraints at their bound and lambda = 0 elsewhere (so, per sample i, the gradient is
    # equal on its free entries and no larger on the bound ones)
    assert (z <= h + 1e-9).all() and np.abs(a @ z).max() < 1e-9
    gradient = (q @ z + p).reshape(-1, ways)
    free = (h - z).reshape(-1, ways) > 1e-6
    at_bound = ~free
    assert at_bound.any() and free.sum(1).min() >= 1  # both kinds occur: the check has teeth
    for i in range(len(x)):
        nu = -gradient[i, free[i]].mean()
        assert np.abs(gradient[i, free[i]] + nu).max() < 1e-7  # stationarity on the free entries
        assert (-(gradient[i, at_bound[i]] + nu) >= -1e-7).all()  # multipliers >= 0 on the bound ones

    # the same QP solved independently
    reference = scipy_solution(q, p, h, a)
    assert np.abs(z - reference).max() < 1e-6
    objective = lambda v: 0.5 * v @ q @ v + p @ v  # noqa: E731
    assert abs(objective(z) - objective(reference)) < 1e-10

    # the head's logits are the query scores of w_k = sum_i alpha[i, k] x_i
    cfg = recipe.Config(head="svm", svm_c=c, qp_iterations=50)
    logits = recipe.head_logits(cfg, support, labels, query, ways).detach().numpy()
    expected = query.detach().numpy() @ x.T @ reference.reshape(-1, ways)
    assert np.abs(logits - expected).max() < 1e-5


def test_svm_head_gradient_passes_gradcheck():
    ways, c = 3, 0.1
    support, labels, query = episode(ways, 2, 1, dim=4, seed=1)

    def logits(s, q):
        return recipe.fit_svm(s, labels, ways, c, iterations=50)(q)

    assert torch.autograd.gradcheck(logits, (support, query), eps=1e-6, atol=1e-5, rtol=1e-3)
    grads = torch.autograd.grad((logits(support, query) * torch.arange(ways)).sum(), [support, query])
    assert all(g.abs().max() > 1e-4 for g in grads)  # a nonzero gradient reached both inputs


def test_svm_head_early_stop_stays_quiet(capsys):
    """Three QP iterations (the paper's early stop) on a 5-way 15-shot task leave qpth's residual
    above 1, for which it prints a multi-line 'inaccurate solution' banner; the head mutes it."""
    g = torch.Generator().manual_seed(0)
    support, labels = torch.relu(torch.randn(75, 64, generator=g)), torch.arange(5).repeat_interleave(15)
    __import__("learn2learn").nn.SVClassifier(C_reg=0.1, max_iters=3).fit_(support, labels, 5)
    assert "inaccurate" in capsys.readouterr().out  # learn2learn's classifier alone prints it
    classifier = recipe.fit_svm(support, labels, 5, 0.1, iterations=3)
    assert capsys.readouterr().out == "" and torch.isfinite(classifier.qp_solution).all()


def test_missing_qpth_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "qpth", None)  # what `import qpth` sees when it is not installed
    monkeypatch.setitem(sys.modules, "qpth.qp", None)
    support, labels, _ = episode(2, 1, 1, dim=3)
    with pytest.raises(UserError, match=r"needs qpth.*pip install --no-deps qpth==0\.0\.18.*head=ridge"):
        recipe.fit_svm(support, labels, 2, 0.1, iterations=3)


# ----------------------------------------------------------------------------- training pieces

def test_label_smoothing_is_the_papers():
    """Target 1 - eps, others eps / (ways - 1): torch's smoothing with eps * ways / (ways - 1)."""
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    ours = recipe.smoothed_cross_entropy(logits, targets, 0.1)
    assert abs(ours - F.cross_entropy(logits, targets, label_smoothing=0.1 * 5 / 4)) < 1e-12
    assert abs(recipe.smoothed_cross_entropy(logits, targets, 0.0) - F.cross_entropy(logits, targets)) < 1e-12


def test_learning_rate_schedule_follows_the_paper():
    cfg = recipe.metaoptnet_svm_mini_imagenet_5w1s()
    assert cfg.lr == 0.1 and cfg.iterations == 60000 and cfg.momentum == 0.9 and cfg.weight_decay == 5e-4
    steps = {0: 0.1, 19999: 0.1, 20000: 0.006, 39999: 0.006, 40000: 0.0012, 50000: 0.00024, 59999: 0.00024}
    for step, lr in steps.items():
        assert abs(cfg.lr * recipe.lr_factor(cfg, step) - lr) < 1e-12


@pytest.mark.parametrize("change, message", [
    ({"head": "knn"}, "head='knn' is not a head"),
    ({"backbone": "vgg"}, "backbone='vgg' is not a backbone"),
    ({"lr_milestones": (200, 100), "lr_factors": (0.1, 0.01)}, "give increasing iterations"),
    ({"lr_factors": (0.1,)}, "give increasing iterations"),
    ({"dataset": "omniglot", "backbone": "resnet12", "dropblock_size": 5}, "does not fit omniglot's 1x1"),
])
def test_bad_config_is_one_clear_error(change, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(recipe.Config(), **change)


def test_variants_follow_the_paper():
    names = registry.list_recipes("metaoptnet-*")
    assert len(names) == 24
    paper_train_shots = {"mini-imagenet": 15, "tiered-imagenet": 10, "cifar-fs": 5, "fc100": 15}
    for dataset, train_shots in paper_train_shots.items():
        for head in ("svm", "ridge"):
            for shots in (1, 5):
                r = registry.get_recipe(f"metaoptnet-{head}-{dataset}-5w{shots}s")
                cfg = r.config()
                assert r.published is not None and r.published.ci95 is not None
                assert (cfg.backbone, cfg.head, cfg.shots) == ("resnet12", head, shots)
                assert (cfg.ways, cfg.train_ways, cfg.train_shots, cfg.val_shots) == (5, 5, train_shots, 5)
                assert cfg.label_smoothing == (0.1 if dataset == "mini-imagenet" else 0.0)
    assert registry.get_recipe("metaoptnet-svm-mini-imagenet-5w1s").published.accuracy == 62.64
    assert registry.get_recipe("metaoptnet-ridge-fc100-5w5s").published.accuracy == 55.3
    omniglot = [n for n in names if "-omniglot-" in n]
    assert len(omniglot) == 8 and all(registry.get_recipe(n).published is None for n in omniglot)
    assert all(registry.get_recipe(n).config().backbone == "conv4" for n in omniglot)


@pytest.mark.parametrize("head", ["svm", "ridge"])
def test_predictor_handles_any_number_of_ways(head):
    cfg = recipe.Config(head=head)
    predictor = recipe.Predictor(cfg, recipe.build_model(cfg), torch.device("cpu"))
    for ways in (2, 7):
        support_y = torch.arange(ways).repeat_interleave(2)
        logits = predictor.predict(torch.rand(2 * ways, 1, 28, 28), support_y, torch.rand(3, 1, 28, 28))
        assert logits.shape == (3, ways) and torch.isfinite(logits).all()


def test_resnet12_forward_and_backward_on_84x84():
    torch.manual_seed(0)
    cfg = recipe.Config(dataset="mini-imagenet", backbone="resnet12", head="ridge")
    model = recipe.build_model(cfg)
    assert isinstance(model.backbone, __import__("learn2learn").vision.models.ResNet12Backbone)
    model.train()
    x = torch.rand(6, 3, 84, 84)
    embeddings = model(x)
    assert embeddings.shape == (6, 640 * 5 * 5)  # no global pooling: 16000-d, as in the paper
    sy = torch.tensor([0, 0, 1, 1])
    logits = model.scale * recipe.head_logits(cfg, embeddings[:4], sy, embeddings[4:], 2)
    assert logits.shape == (2, 2)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert model.scale.grad is not None and torch.isfinite(model.scale.grad)
    conv = model.backbone.layer1[0].conv1.weight.grad
    assert conv is not None and torch.isfinite(conv).all() and conv.abs().sum() > 0


# ----------------------------------------------------------------------------- short real runs

@pytest.mark.parametrize("head", ["svm", "ridge"])
def test_metaoptnet_learns_on_omniglot(tmp_path, data_root, head):
    name = f"metaoptnet-{head}-omniglot-5w1s"
    recipe_ = registry.get_recipe(name)
    # 20 SGD steps of 4 five-way episodes (5-shot training, 1-shot test); chance is 20%
    cfg = dataclasses.replace(recipe_.config(), iterations=20, meta_batch_size=4, val_interval=20,
                              val_episodes=20, queries=5, test_episodes=100, device="cpu")
    run = harness.Run(tmp_path / "run", recipe_.name, cfg, torch.device("cpu"), data_root=data_root,
                      progress=False)
    recipe.train(cfg, run)
    result = harness.meta_test(run.path, device="cpu", data_root=data_root, progress=False)
    assert result["episodes"] == 100 and result["shots"] == 1 and result["split"] == "test"
    assert result["accuracy"] > 0.6, result


@pytest.mark.parametrize("head", ["svm", "ridge"])
def test_resnet12_recipe_runs_end_to_end_on_cifar_fs(tmp_path, monkeypatch, head):
    """A paper variant (ResNet-12, DropBlock 2, 5-shot validation) through `run` and `eval` on a
    tiny generated CIFAR-FS; the schedule is overridden with --set tuples."""
    from test_other_datasets import make_cifar_fs
    monkeypatch.setenv("L2L_RECIPES_CACHE", str(tmp_path / "cache"))
    make_cifar_fs(tmp_path / "data")
    name = f"metaoptnet-{head}-cifar-fs-5w1s"
    small = ["ways=2", "shots=1", "queries=3", "train_ways=2", "train_shots=2", "train_queries=2",
             "val_shots=2", "meta_batch_size=2", "iterations=2", "val_interval=2", "val_episodes=2",
             "test_episodes=4", "lr_milestones=(1,)", "lr_factors=(0.5,)", "log_interval=1"]
    out = cli("run", name, "--data-root", tmp_path / "data", "--device", "cpu", "--out", tmp_path / "runs",
              *[a for kv in small for a in ("--set", kv)])
    assert out.exit_code == 0, out.output + out.stderr
    (run_dir,) = (tmp_path / "runs" / name).iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["backbone"] == "resnet12" and config["dropblock_size"] == 2
    assert config["lr_milestones"] == [1] and config["val_shots"] == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics if "lr" in m] == [0.1, 0.05]  # halved after step 1
    again = cli("eval", run_dir, "--episodes", 4, "--device", "cpu", "--data-root", tmp_path / "data")
    assert again.exit_code == 0, again.output + again.stderr
    assert json.loads(again.output.splitlines()[0])["accuracy"] == json.loads(
        (run_dir / "result.json").read_text())["accuracy"]
