"""MAML++'s meta-batch (recipes/mamlpp.py) as one network: all tasks adapted at once.

Task t's fast weights are group t of `l2l_recipes.fast`'s grouped network (the first layer a
batched product with the image patches, grouped convolutions after it, batch norm + ReLU per
task and channel with its own second derivative, a batched head), on `Conv4PerStep`'s layout:
3x3 convolutions with padding 1, batch norm with step k's weights and biases (shared by the
tasks, learned in the outer loop only), ReLU, 2x2 max-pool, the flattened features into the
head. Each inner step takes LSLR's rate of each weight tensor and step; the query losses after
the steps MSL weighs are summed as the per-task loop sums them. The loop's batch norm folds
every pass's batch statistics into step k's running statistics, task after task; `meta_batch`
records them per task and replays the same updates in the same order. The meta-gradient is
that of `recipes.mamlpp.fast_adapt` task by task, up to float rounding (tests/test_mamlpp.py).
"""
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from l2l_recipes import fast

CONV = SimpleNamespace(kernel_size=(3, 3), dilation=(1, 1), padding=(1, 1), stride=(1, 1))  # every layer's
EPS = 1e-5  # F.batch_norm's default, as Conv4PerStep uses it


def _batch_norm_relu(model, h, i, k, stats, record):
    """relu(batch norm of layer i with step set k) of h [n, tasks * C, H, W]: on each task's batch
    statistics ("batch"; appended to `record` as (mean, unbiased variance) [tasks, C] if given) or
    on set k's running statistics ("running", no gradient)."""
    tasks = h.shape[1] // model.bn_weight.shape[2]
    w, b = model.bn_weight[i, k].repeat(tasks), model.bn_bias[i, k].repeat(tasks)
    if stats == "running":
        mean, var = model.running_mean[i, k].repeat(tasks), model.running_var[i, k].repeat(tasks)
        return F.batch_norm(h, mean, var, w, b, training=False, eps=EPS).relu_()
    batch = None if record is None else (h.new_zeros(h.shape[1]), h.new_zeros(h.shape[1]))
    h = fast.BatchNormReLU.apply(h, w, b, EPS, batch)
    if record is not None:
        record.append(tuple(s.view(tasks, -1) for s in batch))
    return h


def grouped_logits(model, weights, x, step, stats="batch", record=None):
    """Logits [tasks, n, ways] of each task's Conv4PerStep (`weights`: name -> fast weight with a
    leading task dimension) on its own images x [tasks, n, C, H, W], with batch norm set
    min(step, model.steps) on `stats` ("batch" or "running", as Conv4PerStep's forward)."""
    k = min(step, model.steps)
    tasks, n = x.shape[:2]
    h = x
    for i in range(4):
        w, b = weights[f"conv{i}_weight"], weights[f"conv{i}_bias"]
        if i == 0:  # task t's images are channel group t from here on
            h = fast.first_conv(x, w, b, CONV)
        else:
            h = fast.GroupedConv.apply(h, w, b, CONV.stride, CONV.padding)
        h = fast.MaxPool.apply(_batch_norm_relu(model, h, i, k, stats, record), 2)
    features = h.view(n, tasks, -1, h.shape[2] * h.shape[3]).flatten(2)  # each task's [C, H, W] flattened
    return fast._head(features, weights["head_weight"], weights["head_bias"])


def _sgd_step(model, weights, grads, step):
    """The fast weights after one inner step at LSLR's rates (steps past training reuse the last)."""
    rate = min(step, model.steps - 1)
    return {name: w - model.lrs[name][rate] * g for (name, w), g in zip(weights.items(), grads)}


def _stacked(record, passes):
    """A record of `passes` passes ((mean, variance) [tasks, C] of each layer, pass after pass)
    as mean, variance [layers, passes, tasks, C]."""
    return [torch.stack([layer[j] for layer in record]).unflatten(0, (passes, -1)).transpose(0, 1) for j in (0, 1)]


def _fold_running_statistics(model, rounds):
    """Replay the per-task loop's running-statistics updates, momentum as F.batch_norm's. Within a
    task, step set k takes the query pass after step k, then the support pass at step k, and no
    other: so task after task, the query passes (`rounds[0]`), then the support passes
    (`rounds[1]`), each (the BN set of each pass, the passes' record)."""
    m = model.momentum
    rounds = [(sets, _stacked(record, len(sets))) for sets, record in rounds if sets]
    for t in range(rounds[0][1][0].shape[2]):
        for sets, (mean, var) in rounds:
            for running, batch in ((model.running_mean, mean), (model.running_var, var)):
                running[:, sets] = m * batch[:, :, t] + (1 - m) * running[:, sets]


def meta_batch(model, tasks, step_weights, second_order, scale):
    """MAML++'s meta-batch in one pass: adapt a copy of `model`'s weights to each task of `tasks`
    = (support_x, support_y, query_x, query_y), each with a leading task dimension, with
    len(step_weights) inner steps at LSLR's rates, batch norm set k on the support batch at step
    k and on the query batch after k steps; accumulate the gradient of `scale` x (sum over tasks
    of the MSL loss: the query losses after step k weighted by step_weights[k - 1], steps of
    weight 0 skipped) into .grad of the weights, BN weights and biases and rates, first or second
    order, and fold the batch statistics into the running statistics as the per-task loop does.
    Returns the sums over the tasks of their MSL losses and final query accuracies."""
    sx, sy, qx, qy = tasks
    weights = {name: p.unsqueeze(0).expand(len(sx), *p.shape) for name, p in model.weights.items()}
    query, support = ([], []), ([], [])  # (BN sets, batch statistics) of each pass
    losses = 0.0
    for step, importance in enumerate(step_weights):
        support[0].append(step)
        support_loss = fast._loss_sum(grouped_logits(model, weights, sx, step, record=support[1]), sy)
        grads = torch.autograd.grad(support_loss, list(weights.values()), create_graph=second_order)
        weights = _sgd_step(model, weights, grads, step)
        if importance > 0:  # once MSL has annealed, only the last step
            query[0].append(step + 1)
            logits = grouped_logits(model, weights, qx, step + 1, record=query[1])
            losses = losses + importance * F.cross_entropy(logits.transpose(1, 2), qy, reduction="none").mean(1)
    (scale * losses.sum()).backward()
    with torch.no_grad():
        _fold_running_statistics(model, [query, support])
    accuracies = (logits.argmax(-1) == qy).float().mean(1)
    return losses.sum().item(), accuracies.sum().item()


def predict(model, support_x, support_y, query_x, steps, transductive):
    """Test-time MAML++ for many tasks at once, as `recipes.mamlpp.Predictor.predict` task by task:
    `steps` first-order inner steps on each task's support batch statistics, then logits
    [tasks, queries, ways] of the query set on its batch statistics (`transductive`) or on the
    running statistics of set min(steps, model.steps)."""
    weights = {name: p.detach().unsqueeze(0).expand(len(support_x), *p.shape).requires_grad_()
               for name, p in model.weights.items()}
    with torch.enable_grad():
        for step in range(steps):
            loss = fast._loss_sum(grouped_logits(model, weights, support_x, step), support_y)
            grads = torch.autograd.grad(loss, list(weights.values()))
            with torch.no_grad():
                weights = {name: w.requires_grad_() for name, w in _sgd_step(model, weights, grads, step).items()}
    with torch.no_grad():
        return grouped_logits(model, weights, query_x, steps, "batch" if transductive else "running")
