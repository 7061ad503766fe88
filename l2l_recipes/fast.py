"""The fast path: episodes gathered on the device, and MAML's meta-batch as one network.

`DeviceEpisodes` keeps a split's images as one uint8 tensor on the training device and
builds each task by indexing it, from the same learn2learn task description (and so the
same random numbers) that `Taskset.sample()` would use: the tasks are identical, without
the per-image Python of `LoadData`.

`maml_meta_batch` adapts a Conv4 classifier to all tasks of a meta-batch at once: task t's
copy of the weights is group t of grouped convolutions, batch norm is computed per task
and channel, and the head is a batched matrix product. The inner-loop gradients, the
adapted weights and the second-order meta-gradient are those of learn2learn's
`MAML.clone()` loop over the tasks, up to float rounding (tests/test_fast.py compares them).
Batch norm is written out from primitive operations: its double backward through
`F.batch_norm` is slower, and the meta-gradient is the same.
"""
import torch
import torch.nn.functional as F

from l2l_recipes import data
from l2l_recipes.errors import UserError


def split_images(dataset):
    """All images of a split's dataset as uint8 [N, C, H, W], item i as `dataset[i]` gives it."""
    if hasattr(dataset, "quarter_turns"):  # Omniglot: characters x drawings, rotation per class
        characters = torch.tensor(dataset.character)
        turns = torch.tensor(dataset.quarter_turns)
        images = dataset.images[characters]  # [classes, drawings, H, W]
        for q in (1, 2, 3):
            images[turns == q] = torch.rot90(images[turns == q], q, dims=(2, 3))
        return images.reshape(-1, 1, *images.shape[2:])
    if hasattr(dataset, "images") and dataset.images.dtype == torch.uint8:
        return dataset.images
    raise UserError(f"engine=fast cannot index {type(dataset).__name__} on the device: "
                    f"use --set engine=reference")


class DeviceEpisodes:
    """The tasks of a learn2learn Taskset made by `data.taskset`, built on `device`.

    `get_task(description)` and `sample()` return what the Taskset's own would, as float
    images on `device` (bitwise equal: the same uint8 pixels divided by 255).
    """

    def __init__(self, tasks, dataset, device):
        self.tasks = tasks
        self.images = split_images(dataset).to(device)
        self.device = device
        self.class_of = tasks.dataset.indices_to_labels

    def get_task(self, description):
        indices, labels = [], []
        for dd in description:
            # dd.transforms = [LoadData's loader, RemapLabels' mapping]: map the class label only
            item = (None, self.class_of[dd.index])
            for transform in dd.transforms[1:]:
                item = transform(item)
            indices.append(dd.index)
            labels.append(item[1])
        x = self.images[torch.tensor(indices, device=self.device)].float().div_(255)
        return x, torch.tensor(labels, device=self.device)

    def sample(self):
        return self.get_task(data.draw(self.tasks))


# ----------------------------------------------------------------------------- MAML meta-batch

def conv4_layers(model):
    """learn2learn's Conv4 classifier as ([conv, batch norm, max-pool or None] x 4, tail, linear),
    tail 'mean' (OmniglotCNN: mean over positions) or 'flatten' (CNN4)."""
    import learn2learn as l2l
    if isinstance(model, l2l.vision.models.OmniglotCNN):
        blocks, tail = list(model.base), "mean"
    elif isinstance(model, l2l.vision.models.CNN4):
        blocks, tail = list(model.features), "flatten"
    else:
        raise UserError(f"engine=fast supports learn2learn's Conv4 classifiers, not {type(model).__name__}: "
                        f"use --set engine=reference")
    layers = [(b.conv, b.normalize, b.max_pool if isinstance(b.max_pool, torch.nn.MaxPool2d) else None)
              for b in blocks]
    return layers, tail, model.classifier


def _batch_norm(h, weight, bias, eps):
    """Training-mode batch norm of [n, groups * C, H, W] per channel, from primitive ops."""
    mean = h.mean((0, 2, 3), keepdim=True)
    centred = h - mean
    var = (centred * centred).mean((0, 2, 3), keepdim=True)
    return centred * (torch.rsqrt(var + eps) * weight.reshape(1, -1, 1, 1)) + bias.reshape(1, -1, 1, 1)


def grouped_forward(structure, weights, x):
    """Logits [tasks, n, ways] of each task's network (weights with a leading task dimension)
    on its own images x [tasks, n, C, H, W]."""
    layers, tail, _ = structure
    tasks, n = x.shape[:2]
    h = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])  # task t's images are channel group t
    i = 0
    for conv, norm, pool in layers:
        cw, cb, bw, bb = weights[i:i + 4]
        i += 4
        h = F.conv2d(h, cw.reshape(-1, *cw.shape[2:]), cb.reshape(-1), stride=conv.stride, padding=conv.padding,
                     groups=tasks)
        h = F.relu(_batch_norm(h, bw, bb, norm.eps))
        if pool is not None:
            h = F.max_pool2d(h, pool.kernel_size, pool.stride, pool.padding)
    if tail == "mean":
        features = h.mean((2, 3)).view(n, tasks, -1)
    else:  # flatten each task's [C, H, W]
        features = h.view(n, tasks, -1, h.shape[2] * h.shape[3]).flatten(2)
    lw, lb = weights[i:i + 2]
    return torch.einsum("ntf,tkf->tnk", features, lw) + lb[:, None]


def parameters_in_order(structure):
    """The model's parameters in grouped_forward's order: per layer conv w, b, norm w, b; head w, b."""
    layers, _, head = structure
    params = []
    for conv, norm, _ in layers:
        params += [conv.weight, conv.bias, norm.weight, norm.bias]
    return params + [head.weight, head.bias]


def _loss_sum(logits, y):
    """Sum over tasks of each task's mean cross-entropy (logits [T, n, ways], y [T, n])."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]


def maml_meta_batch(model, tasks, fast_lr, steps, first_order, scale):
    """learn2learn's MAML meta-batch in one pass: adapt a copy of `model` to each task of `tasks`
    (a list of (support_x, support_y, query_x, query_y), all of one shape) with `steps` SGD steps
    of `fast_lr`, and accumulate the gradient of `scale` x (sum of the query losses) into the
    parameters' .grad. Returns the sums over the tasks of their query losses and accuracies."""
    structure = conv4_layers(model)
    params = parameters_in_order(structure)
    sx, sy, qx, qy = (torch.stack(part) for part in zip(*tasks))
    weights = [p.unsqueeze(0).expand(len(tasks), *p.shape) for p in params]
    for _ in range(steps):
        support_loss = _loss_sum(grouped_forward(structure, weights, sx), sy)
        grads = torch.autograd.grad(support_loss, weights, create_graph=not first_order)
        weights = [w - fast_lr * g for w, g in zip(weights, grads)]
    logits = grouped_forward(structure, weights, qx)
    query_loss = _loss_sum(logits, qy)
    (scale * query_loss).backward()
    accuracies = (logits.argmax(-1) == qy).float().mean(1)
    return query_loss.item(), accuracies.sum().item()
