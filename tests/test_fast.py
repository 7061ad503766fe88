"""The fast path against the plain learn2learn loop: same episodes, same meta-gradients."""
import copy
import dataclasses
import json
import random
import re

import learn2learn as l2l
import pytest
import torch
import torch.nn.functional as F

from l2l_recipes import data, fast, models


@pytest.fixture(scope="module")
def omniglot_train():
    return data.load_split("omniglot", "train")


def test_device_episodes_equal_learn2learn_tasks(omniglot_train):
    tasks = data.taskset(omniglot_train, 5, 1, 2)
    episodes = fast.DeviceEpisodes(tasks, omniglot_train, torch.device("cpu"))
    random.seed(7)
    expected = [tasks.sample() for _ in range(20)]
    random.seed(7)
    got = [episodes.sample() for _ in range(20)]
    for (ex, ey), (gx, gy) in zip(expected, got):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    # and the random stream continues identically afterwards
    random.seed(7)
    [tasks.sample() for _ in range(20)]
    after_reference = random.random()
    random.seed(7)
    [episodes.sample() for _ in range(20)]
    assert random.random() == after_reference


def test_device_episodes_stack_tasks_and_split_them_alike(omniglot_train):
    """get_tasks + one batched split give, task by task, what get_task + split_support_query give."""
    tasks = data.taskset(omniglot_train, 5, 2, 3)
    episodes = fast.DeviceEpisodes(tasks, omniglot_train, torch.device("cpu"))
    random.seed(5)
    descriptions = [data.draw(tasks) for _ in range(7)]
    stacked = data.split_support_query(*episodes.get_tasks(descriptions), 2)
    assert stacked[0].shape == (7, 10, 1, 28, 28) and stacked[3].shape == (7, 15)
    for t, description in enumerate(descriptions):
        for got, expected in zip(stacked, data.split_support_query(*episodes.get_task(description), 2)):
            assert torch.equal(got[t], expected)


def test_device_episodes_cover_rotated_classes(omniglot_train):
    """Every rotation of a character gives its own images, as the dataset's items do."""
    images = omniglot_train.all_images()
    for i in (0, 20 * 1 + 3, 20 * 2 + 5, 20 * 3 + 19, len(omniglot_train) - 1):
        x, _ = omniglot_train[i]
        assert torch.equal(images[i].float().div_(255), x)


def test_device_episodes_rgb():
    images = torch.randint(0, 256, (6 * 8, 3, 12, 12), dtype=torch.uint8)
    targets = torch.arange(6).repeat_interleave(8)
    dataset = data.ClassImages(images, targets, [f"c{i}" for i in range(6)])
    tasks = data.taskset(dataset, 3, 2, 2)
    episodes = fast.DeviceEpisodes(tasks, dataset, torch.device("cpu"))
    random.seed(3)
    expected = [tasks.sample() for _ in range(5)]
    random.seed(3)
    for (ex, ey), (gx, gy) in zip(expected, [episodes.sample() for _ in range(5)]):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)


@pytest.mark.parametrize("dataset,max_pool", [("omniglot", True), ("mini-imagenet", True), ("omniglot", False)])
def test_conv4_embed_equals_the_module_bit_for_bit(omniglot_train, dataset, max_pool):
    """ReLU after max-pool: the same embeddings, gradients and batch norm statistics, bit for bit,
    on real Omniglot images (a constant background: many ties in the pooling windows); blocks
    without max-pooling (strided convolutions) run unchanged."""
    torch.manual_seed(0)
    channels = 1 if dataset == "omniglot" else 3
    module = l2l.vision.models.CNN4Backbone(hidden_size=16, channels=channels, max_pool=max_pool, layers=4)
    reordered = l2l.vision.models.CNN4Backbone(hidden_size=16, channels=channels, max_pool=max_pool, layers=4)
    reordered.load_state_dict(module.state_dict())
    if dataset == "omniglot":
        x = torch.stack([omniglot_train[i][0] for i in range(0, 2000, 20)])
    else:
        x = torch.rand(12, 3, 84, 84)
    for train in (True, False):
        module.train(train), reordered.train(train)
        module.zero_grad(), reordered.zero_grad()
        expected, got = module(x), fast.conv4_embed(reordered, x)
        assert torch.equal(expected, got)
        (expected * expected.detach().cos()).sum().backward()
        (got * got.detach().cos()).sum().backward()
        for (name, p), q in zip(module.named_parameters(), reordered.parameters()):
            assert torch.equal(p.grad, q.grad), name
        for a, b in zip(module.buffers(), reordered.buffers()):
            assert torch.equal(a, b)


def test_channels_last_batch_norm_has_the_nchw_precision():
    """fast.batch_norm on a channels-last batch (ProtoNet's default layout): its output, its
    gradients and the running statistics are about as far from float64 as PyTorch's NCHW kernel
    (its channels-last CPU kernel: statistics ~1e-4 off, the backward's sums 20-200x coarser)."""
    torch.manual_seed(0)
    x = torch.randn(300, 32, 14, 14) * 2 + 3  # activations with an offset, as after a convolution
    grad = torch.randn_like(x) * 1e-3 + 2e-4
    bn = torch.nn.BatchNorm2d(32)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)

    def run(dtype, layout, norm):
        layer = copy.deepcopy(bn).to(dtype)
        inputs = torch.empty_like(x, dtype=dtype, memory_format=layout).copy_(x).requires_grad_()
        out = norm(inputs, layer)
        out.backward(grad.to(dtype).contiguous(memory_format=layout))
        return [out.detach(), inputs.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var]

    exact = run(torch.float64, torch.contiguous_format, lambda t, layer: layer(t))
    nchw = run(torch.float32, torch.contiguous_format, lambda t, layer: layer(t))
    ours = run(torch.float32, torch.channels_last, fast.batch_norm)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    for name, a, b, e in zip(("output", "input grad", "weight grad", "bias grad", "mean", "var"), nchw, ours, exact):
        error = [float((t.double() - e).norm() / e.norm()) for t in (a, b)]
        assert error[1] < 2 * error[0] + 1e-7, (name, error)


def _second_derivatives(f, inputs):
    """Derivatives w.r.t. `inputs` of a fixed random projection of the gradient of a fixed random
    projection of f(*inputs): exercises the backward and its own derivative (as MAML does)."""
    g = torch.Generator().manual_seed(3)
    out = f(*inputs)
    grads = torch.autograd.grad((out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum(), inputs,
                                create_graph=True)
    total = sum((gi * torch.randn(gi.shape, generator=g, dtype=gi.dtype)).sum() for gi in grads)
    return torch.autograd.grad(total, inputs, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("shared", [False, True])
def test_grouped_conv_second_derivatives_equal_pytorch(stride, input_grad, shared):
    """4 tasks' convolutions, each with its own weights or all with one (expanded) copy."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4 * 2, 9, 9, generator=g, dtype=torch.float64).requires_grad_(input_grad)
    if shared:
        w0 = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
        b0 = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
        leaves = (w0, b0)

        def weights(w0, b0):
            return w0.expand(4, *w0.shape), b0.expand(4, *b0.shape)
    else:
        leaves = (torch.randn(4, 3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True),
                  torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True))

        def weights(w, b):
            return w, b
    inputs = (x, *leaves) if input_grad else leaves

    def ours(*args):
        w, b = weights(*args[-2:])
        return fast.GroupedConv.apply(x if not input_grad else args[0], w, b, (stride, stride), (1, 1))

    def pytorch(*args):
        w, b = weights(*args[-2:])
        return F.conv2d(x if not input_grad else args[0], w.reshape(12, 2, 3, 3), b.reshape(12), stride=stride,
                        padding=1, groups=4)

    assert torch.allclose(ours(*inputs), pytorch(*inputs), rtol=1e-12, atol=1e-12)
    for got, expected in zip(_second_derivatives(ours, inputs), _second_derivatives(pytorch, inputs)):
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_first_conv_equals_grouped_convolution():
    """The first layer as a product with image patches: the grouped convolution's values and
    second derivatives, for Omniglot's strided 1-channel and CNN4's padded 3-channel layers."""
    for channels, size, stride in [(1, 28, 2), (3, 12, 1)]:
        conv = torch.nn.Conv2d(channels, 5, 3, stride, 1)
        g = torch.Generator().manual_seed(1)
        x = torch.rand(4, 3, channels, size, size, generator=g, dtype=torch.float64)
        w = torch.randn(4, 5, channels, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)

        def pytorch(w, b):
            grouped = x.transpose(0, 1).reshape(3, 4 * channels, size, size)
            return F.conv2d(grouped, w.reshape(20, channels, 3, 3), b.reshape(20), stride=stride, padding=1, groups=4)

        def ours(w, b):
            return fast.first_conv(x, w, b, conv)

        def tanh(f):  # linear in (w, b) alone: a nonlinearity after it gives second derivatives to compare
            return lambda w, b: torch.tanh(f(w, b))

        assert torch.allclose(ours(w, b), pytorch(w, b), rtol=1e-12, atol=1e-12)
        for got, expected in zip(_second_derivatives(tanh(ours), (w, b)), _second_derivatives(tanh(pytorch), (w, b))):
            assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_batch_norm_relu_derivatives():
    """Against autograd through batch norm written from primitive ops, and numerically."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = (0.3 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_()

    def primitive(x, w, b):
        centred = x - x.mean((0, 2, 3), keepdim=True)
        inv_std = torch.rsqrt((centred * centred).mean((0, 2, 3), keepdim=True) + 1e-5)
        return F.relu(centred * inv_std * w.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1))

    def ours(x, w, b):
        return fast.BatchNormReLU.apply(x, w, b, 1e-5)

    assert torch.allclose(ours(x, w, b), primitive(x, w, b), rtol=1e-12, atol=1e-12)
    for got, expected in zip(_second_derivatives(ours, (x, w, b)), _second_derivatives(primitive, (x, w, b))):
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(ours, (x, w, b))


def test_max_pool_equals_pytorch_with_its_derivatives():
    """Values, indices and second derivatives of F.max_pool2d's, on a ReLU's output with rows of
    ties (a constant background), where a window's gradient must go to its first maximum."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64).relu_()
    x[:, :, :3] = 0.5
    x.requires_grad_()
    assert torch.equal(fast.MaxPool.apply(x, 2), F.max_pool2d(x, 2))
    got = _second_derivatives(lambda x: torch.tanh(fast.MaxPool.apply(x, 2)) * x[:, :, ::2, ::2], (x,))
    expected = _second_derivatives(lambda x: torch.tanh(F.max_pool2d(x, 2)) * x[:, :, ::2, ::2], (x,))
    assert torch.equal(got[0], expected[0])


def _random_tasks(count, ways, shots, queries, shape, seed):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        sy = torch.randperm(ways, generator=g).repeat_interleave(shots)
        qy = torch.arange(ways).repeat_interleave(queries)
        tasks.append((torch.rand(len(sy), *shape, generator=g), sy, torch.rand(len(qy), *shape, generator=g), qy))
    return tasks


def _double(tasks):
    return [tuple(t.double() if t.is_floating_point() else t for t in task) for task in tasks]


def _stacked(tasks):
    """(support_x, support_y, query_x, query_y) with a leading task dimension, as the fast path takes them."""
    return tuple(torch.stack(part) for part in zip(*tasks))


def _clone_loop_grads(wrapper, tasks, steps):
    """learn2learn's loop: a clone of `wrapper` (MAML, MetaSGD) per task, adapted on the support
    set, query loss / meta-batch back-propagated; the gradients of wrapper's parameters."""
    wrapper.zero_grad()
    for sx, sy, qx, qy in tasks:
        learner = wrapper.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        (F.cross_entropy(learner(qx), qy) / len(tasks)).backward()
    return {name: p.grad.clone() for name, p in wrapper.named_parameters()}


def _reference_grads(model, tasks, fast_lr, steps, first_order):
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=first_order)
    return {name.removeprefix("module."): g for name, g in _clone_loop_grads(maml, tasks, steps).items()}


def _fast_grads(model, tasks, fast_lr, steps, first_order):
    model.zero_grad()
    loss_sum, accuracy_sum = fast.maml_meta_batch(model, _stacked(tasks), fast_lr, steps, first_order, 1 / len(tasks))
    assert 0 <= accuracy_sum <= len(tasks) and loss_sum > 0
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dataset,ways,shots,steps,first_order", [
    ("omniglot", 5, 1, 1, False),
    ("omniglot", 5, 2, 3, False),
    ("omniglot", 5, 1, 2, True),
    ("cifar-fs", 3, 2, 2, False),  # CNN4 with max-pooling, flattened features
])
def test_maml_meta_gradient_equals_learn2learn_loop(dataset, ways, shots, steps, first_order):
    torch.manual_seed(0)
    model = models.conv4_classifier(dataset, ways, 16).double()
    shape = (1, 28, 28) if dataset == "omniglot" else (3, 32, 32)
    tasks = _double(_random_tasks(6, ways, shots, 2, shape, seed=1))
    reference = _reference_grads(model, tasks, 0.4, steps, first_order)
    got = _fast_grads(model, tasks, 0.4, steps, first_order)
    assert reference.keys() == got.keys()
    for name in reference:
        assert torch.allclose(got[name], reference[name], rtol=1e-9, atol=1e-11), name
    # second order really differs from first order (the test would not notice a dropped term otherwise)
    if not first_order:
        first = _fast_grads(model, tasks, 0.4, steps, True)
        assert max((first[n] - got[n]).abs().max() for n in got) > 1e-4


@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (1, True)])
def test_metasgd_meta_gradient_equals_its_loop(steps, first_order):
    """Meta-SGD on the fast path (a learned rate per parameter entry): the meta-gradients of the
    weights and of the rates equal those of the recipe's MetaSGD.clone() loop, in float64."""
    from l2l_recipes import registry
    module = registry.get_recipe("metasgd-omniglot-5w1s").load_module()
    torch.manual_seed(0)
    cfg = dataclasses.replace(module.Config(), hidden_size=16, first_order=first_order)
    model = module.build_model(cfg).double()
    tasks = _double(_random_tasks(6, 5, 1, 2, (1, 28, 28), seed=2))
    reference = _clone_loop_grads(model, tasks, steps)
    model.zero_grad()
    fast.maml_meta_batch(model.module, _stacked(tasks), list(model.lrs), steps, first_order, 1 / len(tasks))
    assert len(reference) == 2 * len(list(model.module.parameters()))  # weights and rates
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, reference[name], rtol=1e-9, atol=1e-11), name


@pytest.mark.parametrize("dataset,steps,first_order", [("omniglot", 1, False), ("omniglot", 3, False),
                                                      ("omniglot", 2, True), ("cifar-fs", 2, False)])
def test_anil_meta_gradient_equals_its_loop(dataset, steps, first_order):
    """ANIL on the fast path: body features of all tasks at once (batch norm per task and per set),
    heads adapted together; the meta-gradient equals the recipe's loop (a head clone per task
    on `model.features`) in float64."""
    from l2l_recipes import registry
    module = registry.get_recipe("anil-omniglot-5w1s").load_module()
    torch.manual_seed(0)
    cfg = dataclasses.replace(module.Config(), dataset=dataset, ways=3, hidden_size=16, first_order=first_order)
    model = module.build_model(cfg).double()
    with torch.no_grad():  # a head away from its zero start, so every term is exercised
        model.classifier.weight.normal_(0, 0.1)
    shape = (1, 28, 28) if dataset == "omniglot" else (3, 32, 32)
    tasks = _double(_random_tasks(5, 3, 2, 2, shape, seed=3))
    model.zero_grad()
    head = l2l.algorithms.MAML(model.classifier, lr=0.4, first_order=first_order)
    for sx, sy, qx, qy in tasks:
        loss, _ = module.fast_adapt(model.features, head.clone(), sx, sy, qx, qy, steps)
        (loss / len(tasks)).backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    fast.anil_meta_batch(model, _stacked(tasks), 0.4, steps, first_order, 1 / len(tasks))
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, reference[name], rtol=1e-9, atol=1e-11), name


def test_maml_meta_gradient_float32(omniglot_train):
    """The issue's setting: real Omniglot 5w1s tasks, Conv4 with 64 filters, meta-batch 32, float32.

    Both loops round differently in float32; measured against the float64 meta-gradient, the
    fast path's error must be no larger than the learn2learn loop's own (plus 1e-6), and the two
    within 1e-5 of each other, apart from the reference loop's own error on gradients that are
    exactly 0 (conv biases before batch norm; learn2learn's float32 loop is ~1e-5 off there)."""
    tasks_ = data.taskset(omniglot_train, 5, 1, 1)
    random.seed(0)
    tasks = [data.split_support_query(*tasks_.sample(), 1) for _ in range(32)]
    torch.manual_seed(0)
    model = models.conv4_classifier("omniglot", 5, 64)
    reference = _reference_grads(model, tasks, 0.4, 1, False)
    got = _fast_grads(model, tasks, 0.4, 1, False)
    model64 = model.double()
    exact = _reference_grads(model64, _double(tasks), 0.4, 1, False)
    for name in exact:
        fast_error = (got[name].double() - exact[name]).abs().max().item()
        reference_error = (reference[name].double() - exact[name]).abs().max().item()
        assert fast_error <= reference_error + 1e-6, name
        if exact[name].abs().max() > 1e-9:
            assert (got[name] - reference[name]).abs().max().item() <= 1e-5, name


def test_fast_path_refuses_other_models():
    from l2l_recipes.errors import UserError
    with pytest.raises(UserError, match="engine=reference"):
        fast.conv4_layers(torch.nn.Linear(3, 2))


def _train(tmp_path, data_root, name, **changes):
    from l2l_recipes import harness, registry
    recipe = registry.get_recipe(name)
    cfg = dataclasses.replace(recipe.config(), device="cpu", log_interval=1, val_episodes=20, **changes)
    run = harness.Run(tmp_path / f"{name}-{changes['engine']}", name, cfg, torch.device("cpu"),
                      data_root=data_root, progress=False)
    model = recipe.load_module().train(cfg, run)
    metrics = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    return model, [m for m in metrics if "loss" in m]


@pytest.mark.parametrize("name,changes", [
    ("maml-omniglot-5w1s", {"iterations": 4, "meta_batch_size": 8, "hidden_size": 32, "val_interval": 4}),
    # ProtoNet in NCHW: channels-last sums in another order, and Adam turns the near-zero gradients'
    # rounding into whole steps (losses 3e-5 apart at the second iteration, 3e-3 at the fourth);
    # its precision is test_channels_last_batch_norm_has_the_nchw_precision's
    ("protonet-omniglot-5w1s", {"iterations": 4, "train_ways": 20, "val_interval": 4, "channels_last": False}),
    ("metasgd-omniglot-5w1s", {"iterations": 4, "meta_batch_size": 8, "hidden_size": 32, "val_interval": 4}),
    ("anil-omniglot-5w1s", {"iterations": 4, "meta_batch_size": 8, "hidden_size": 32, "val_interval": 4}),
    # MAML++: MSL uniform, then last step only; first order, then second (DA)
    ("mamlpp-omniglot-5w1s", {"iterations": 4, "meta_batch_size": 8, "hidden_size": 32, "adaptation_steps": 3,
                              "test_adaptation_steps": 3, "msl_iterations": 2, "first_order_iterations": 2,
                              "val_interval": 4}),
    ("snail-omniglot-5w1s", {"iterations": 4, "meta_batch_size": 4, "hidden_size": 16, "val_interval": 4,
                             "queries": 5, "channels_last": False}),
])
def test_recipes_train_alike_on_both_engines(tmp_path, data_root, name, changes):
    """The recipes' default engine=fast and engine=reference see the same tasks and take the same
    steps: equal losses and accuracies at every iteration, weights equal up to float32 rounding."""
    fast_model, fast_log = _train(tmp_path, data_root, name, engine="fast", **changes)
    reference_model, reference_log = _train(tmp_path, data_root, name, engine="reference", **changes)
    assert len(fast_log) == len(reference_log) == changes["iterations"]
    for f, r in zip(fast_log, reference_log):
        assert f["loss"] == pytest.approx(r["loss"], rel=1e-4) and f["accuracy"] == pytest.approx(r["accuracy"])
    reference = reference_model.state_dict()
    for key, value in fast_model.state_dict().items():
        if value.is_floating_point() and "running" not in key:
            # Adam steps of ~1e-3; parameters whose exact gradient is 0 (conv biases before batch
            # norm, and MAML++'s rates of those biases) move by rounding noise alone, in both
            # engines, so they are not compared
            # (MAML++'s kept validation weights are the weights compared here, at the validation)
            if key.endswith("conv.bias") or re.fullmatch(r"(weights|lrs)\.conv\d_bias", key) or key.startswith("kept"):
                continue
            assert (value - reference[key]).abs().max() < 1e-4, key


def test_engine_and_amp_are_checked():
    from l2l_recipes import registry
    from l2l_recipes.config import apply_overrides
    from l2l_recipes.errors import UserError
    for name in ("maml-omniglot-5w1s", "protonet-omniglot-5w1s", "metasgd-omniglot-5w1s", "anil-omniglot-5w1s",
                 "mamlpp-omniglot-5w1s", "maml-sine-5s", "snail-omniglot-5w1s"):
        with pytest.raises(UserError, match="engine='turbo' is out of range"):
            apply_overrides(registry.get_recipe(name).config(), ["engine='turbo'"])
    with pytest.raises(UserError, match="amp='fp8' is out of range"):
        apply_overrides(registry.get_recipe("protonet-omniglot-5w1s").config(), ["amp='fp8'"])


# fp16's gradient scaler skips the first steps whose scaled gradients overflow, and the schedule
# still steps (it counts episodes, as the paper's): torch warns that the scheduler stepped first.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize("options", [{"amp": "bf16"}, {"amp": "fp16"}, {"channels_last": False}])
def test_protonet_speed_options_run(tmp_path, data_root, options):
    """amp (autocast, for GPUs; fp16 with a gradient scaler) and channels_last train and log
    finite losses; measured on CPU only."""
    _, log = _train(tmp_path, data_root, "protonet-omniglot-5w1s", engine="fast", iterations=3,
                    train_ways=10, val_interval=3, **options)
    assert all(m["loss"] == m["loss"] and m["loss"] < 10 for m in log)


@pytest.mark.parametrize("name,dtype,changes", [
    ("maml-omniglot-5w1s", torch.float32, {}), ("maml-omniglot-5w1s", torch.float64, {}),
    ("maml-omniglot-20w5s", torch.float64, {}), ("metasgd-omniglot-5w1s", torch.float64, {}),
    ("anil-omniglot-5w1s", torch.float64, {}), ("mamlpp-omniglot-5w1s", torch.float64, {}),
    # MAML++'s query on BN set k's running statistics, more test steps than training steps
    ("mamlpp-omniglot-5w5s", torch.float64, {"transductive": False, "adaptation_steps": 2,
                                             "test_adaptation_steps": 4}),
])
def test_batched_evaluation_scores_each_task_as_the_loop(splits, monkeypatch, name, dtype, changes):
    """engine=fast adapts chunks of tasks at once at validation and test (here 3 per chunk, 7
    tasks); each task's query accuracy is the loop's (engine=reference: learn2learn's clone per
    task, or MAML++'s own loop), its loss the same up to float rounding. (float64: in float32 the
    20-way variant's five steps of an untrained model amplify rounding until both paths are
    0.13-0.15 off float64 in the logits, each flipping a near-tie or two.)"""
    from l2l_recipes import harness, registry
    recipe = registry.get_recipe(name)
    module = recipe.load_module()
    cfg = dataclasses.replace(recipe.config(), device="cpu", hidden_size=32, queries=3, **changes)
    torch.manual_seed(0)
    model = module.build_model(cfg).to(dtype)
    if hasattr(model, "running_mean"):  # MAML++: running statistics of its own for every BN set
        with torch.no_grad():
            model.running_mean.normal_(0, 0.1), model.running_var.uniform_(0.01, 0.1)
    tasks = [(x.to(dtype), y) for x, y in data.fixed_taskset(splits["val"], cfg.ways, cfg.shots, cfg.queries, 7, 1)]
    batched = module.Predictor(cfg, model, torch.device("cpu"))
    loop = module.Predictor(dataclasses.replace(cfg, engine="reference"), model, torch.device("cpu"))
    assert batched.batched and not loop.batched
    monkeypatch.setattr(harness, "ACTIVATIONS_AT_ONCE", 3 * tasks[0][0].numel() * cfg.hidden_size)
    got = harness.task_scores(batched, tasks, list(range(7)), cfg.shots)
    expected = harness.task_scores(loop, tasks, list(range(7)), cfg.shots)
    assert [a for a, _ in got] == [a for a, _ in expected]
    rel = 1e-9 if dtype == torch.float64 else 1e-4
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=rel)
    assert len({a for a, _ in got}) > 1  # the tasks differ: a mix-up of tasks would show
    assert batched.evaluate(tasks, progress=False)["accuracy"] == pytest.approx(sum(a for a, _ in got) / 7)


def _sine_meta_gradients(dtype, steps, first_order, engine, weights_from=None):
    """The meta-gradient of MAML sine's meta-batch (25 waves, 10 + 10 points) on `engine`, from
    the seeded initial weights (or `weights_from`'s, cast to `dtype`)."""
    import learn2learn as l2l
    from l2l_recipes import registry
    module, cfg = registry.get_recipe("maml-sine-5s").load_module(), registry.get_recipe("maml-sine-5s").config()
    torch.manual_seed(0)
    model = module.build_model(cfg)
    waves = [module.sample_wave(cfg, 10, 10) for _ in range(cfg.meta_batch_size)]
    if weights_from is not None:
        model.load_state_dict(weights_from.state_dict())
    model, waves = model.to(dtype), [[t.to(dtype) for t in wave] for wave in waves]
    if engine == "fast":
        losses = fast.vmap_meta_losses(model, [torch.stack(t) for t in zip(*waves)], cfg.fast_lr, steps, first_order)
        (losses.sum() / len(waves)).backward()
    else:  # the recipe's reference loop: a learn2learn clone per wave
        maml = l2l.algorithms.MAML(model, lr=cfg.fast_lr, first_order=first_order)
        for sx, sy, qx, qy in waves:
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.mse_loss(learner(sx), sy))
            (F.mse_loss(learner(qx), qy) / len(waves)).backward()
    return model, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (2, True)])
def test_sine_meta_gradient_matches_the_clone_loop(steps, first_order):
    """MAML sine's fast engine (torch.func.vmap over the waves) gives learn2learn's clone loop's
    meta-gradient: in float64 to 1e-9 relative; in float32, per parameter, no farther from float64
    than the loop is, plus two float32 rounding units of the largest gradient (the output bias's
    small gradient, 0.02 against 0.6, is where the two orders of summation differ most: 8e-8)."""
    model, exact = _sine_meta_gradients(torch.float64, steps, first_order, "fast")
    _, loop = _sine_meta_gradients(torch.float64, steps, first_order, "reference", model)
    for e, g in zip(exact, loop):
        assert (e - g).abs().max() <= 1e-9 * e.abs().max()
    errors = {}
    for engine in ("fast", "reference"):
        _, grads = _sine_meta_gradients(torch.float32, steps, first_order, engine, model)
        errors[engine] = [(g.double() - e).abs().max().item() for g, e in zip(grads, exact)]
    unit = torch.finfo(torch.float32).eps * max(e.abs().max().item() for e in exact)
    assert all(f <= r + 2 * unit for f, r in zip(errors["fast"], errors["reference"])), errors


def test_vmap_meta_losses_refuses_a_network_with_buffers():
    from l2l_recipes.errors import UserError
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    tasks = [torch.zeros(2, 3, 1)] * 4
    with pytest.raises(UserError, match=r"without buffers \(no batch norm\), not this Sequential: use --set engine=reference"):
        fast.vmap_meta_losses(model, tasks, 0.01, 1, False)


def test_sine_trains_alike_on_both_engines(tmp_path):
    """The same waves and Adam steps on both engines: equal losses at every iteration and weights
    equal up to float32 rounding (validation and test run the same evaluation)."""
    from l2l_recipes import harness, registry
    recipe = registry.get_recipe("maml-sine-5s")
    models, logs = {}, {}
    for engine in ("fast", "reference"):
        cfg = dataclasses.replace(recipe.config(), device="cpu", log_interval=1, iterations=6, val_interval=6,
                                  val_episodes=10, engine=engine)
        run = harness.Run(tmp_path / engine, recipe.name, cfg, torch.device("cpu"), progress=False)
        models[engine] = recipe.load_module().train(cfg, run)
        logs[engine] = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [m.keys() for m in logs["fast"]] == [m.keys() for m in logs["reference"]] and len(logs["fast"]) == 7
    for f, r in zip(logs["fast"], logs["reference"]):
        for key in f.keys() - {"time"}:
            assert f[key] == pytest.approx(r[key], rel=1e-5), key
    reference = models["reference"].state_dict()
    for key, value in models["fast"].state_dict().items():
        assert (value - reference[key]).abs().max() < 1e-5, key
