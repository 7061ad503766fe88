"""Reptile's inner loop for all tasks of a meta-batch (or an evaluation chunk) at once.

Task t's copy of a Conv4 classifier is group t of `l2l_recipes.fast`'s grouped network
(grouped convolutions, batch norm per task and channel, batched head), and the copies'
Adam (beta1 = 0) is written as tensor operations on the stacked weights [tasks, ...]: the
update of `torch.optim.Adam(betas=(0, beta2))`, operation for operation, from a common
starting state (one step count for all tasks: they take their steps together). Each task
takes the mini-batches of its own permutation of its images, as `recipes/reptile.py`'s `inner_train` does on a copy; the
adapted weights are those of the copy-per-task loop up to float rounding
(tests/test_reptile_fast.py compares them). First order: plain autograd of the grouped
forward.
"""
import torch
import torch.nn.functional as F

from l2l_recipes import fast


def adam_step(weights, grads, squares, step, lr, beta2=0.999, eps=1e-8):
    """`torch.optim.Adam(lr=lr, betas=(0, beta2), eps=eps)`'s step number `step` (from 1), out of
    place: the new weights. With beta1 = 0 the first moment is the gradient and its bias
    correction 1; `squares` (the second moments) are updated in place."""
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    new = []
    for w, g, s in zip(weights, grads, squares):
        s.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        new.append(torch.addcdiv(w, g, (s.sqrt() / bias_correction2_sqrt).add_(eps), value=-lr))
    return new


def adapt(model, x, y, orders, steps, batch_size, lr, squares=None, step=0):
    """Train a copy of `model` per task with Adam (beta1 = 0) for `steps` mini-batches of
    `batch_size`, task t cycling through its images x[t] [tasks, n, C, H, W] (labels y [tasks, n])
    in the order orders[t] (a permutation of 0..n-1), as `inner_train` does on one copy. Every
    copy's Adam starts from the second moments `squares` (in `model.parameters()` order; zeros
    when None) after `step` steps. Returns the adapted weights and each copy's second moments,
    both in `model.parameters()` order, each [tasks, *shape], and each task's loss on its last
    mini-batch [tasks]. `model` is left as it is."""
    structure = fast.conv4_layers(model)
    params = fast.parameters_in_order(structure)
    tasks, n = y.shape
    # every copy starts from the model's weights: shared (stride 0) until the first step
    weights = [p.detach().unsqueeze(0).expand(tasks, *p.shape).requires_grad_() for p in params]
    start = dict(zip(map(id, model.parameters()), squares or ()))
    moments = [p.new_zeros(tasks, *p.shape).add_(start.get(id(p), 0)) for p in params]
    rows = torch.arange(tasks, device=y.device).unsqueeze(1)
    for i in range(steps):
        begin = (i * batch_size) % n
        batch = orders[:, begin:begin + batch_size]
        logits = fast.grouped_forward(structure, weights, x[rows, batch])
        losses = F.cross_entropy(logits.transpose(1, 2), y[rows, batch], reduction="none").mean(1)
        grads = torch.autograd.grad(losses.sum(), weights)
        with torch.no_grad():
            weights = [w.requires_grad_() for w in adam_step(weights, grads, moments, step + i + 1, lr)]
    position = {id(p): i for i, p in enumerate(params)}
    in_model_order = [position[id(p)] for p in model.parameters()]
    return [weights[i].detach() for i in in_model_order], [moments[i] for i in in_model_order], losses.detach()


def predict(model, support_x, support_y, query_x, order, steps, batch_size, lr, squares=None, step=0):
    """Logits [tasks, queries, ways] of each task's copy of `model`, adapted on its support set
    (`adapt`, every task in the same `order`, from the same Adam state `squares`, `step`), on its
    query set as one batch (batch norm with the query set's statistics, per task)."""
    tasks = len(support_y)
    with torch.enable_grad():
        weights, _, _ = adapt(model, support_x, support_y, order.expand(tasks, -1), steps, batch_size, lr,
                              squares, step)
    structure = fast.conv4_layers(model)
    by_parameter = dict(zip(map(id, model.parameters()), weights))
    with torch.no_grad():
        return fast.grouped_forward(structure, [by_parameter[id(p)] for p in fast.parameters_in_order(structure)],
                                    query_x)
