"""The fast path: episodes gathered on the device, ProtoNet's embedding with fewer passes over
its activations, and MAML's meta-batch as one network.

`DeviceEpisodes` keeps a split's images as one uint8 tensor on the training device and
builds each task by indexing it, from the same learn2learn task description (and so the
same random numbers) that `Taskset.sample()` would use: the tasks are identical, without
the per-image Python of `LoadData`.

`maml_meta_batch` adapts a Conv4 classifier to all tasks of a meta-batch at once: task t's
copy of the weights is group t of grouped convolutions (one ordinary convolution over all
images while the tasks still share the weights), the first layer is one batched product with
the image patches, batch norm is computed per task and channel, and the head is a batched
matrix product. The inner-loop gradients, the adapted weights and the second-order
meta-gradient are those of learn2learn's `MAML.clone()` loop over the tasks, up to float
rounding (tests/test_fast.py compares them). The grouped convolution and batch norm + ReLU
carry their own second derivatives (`ConvBackward`, `BatchNormReLUBackward`): PyTorch's double
backward of a grouped convolution loops over the groups (here, the tasks) one convolution at a
time, and autograd's derivatives of batch norm written from primitive operations make several
times the passes over the activations that the closed forms need.

`vmap_meta_losses` does the same for small networks without batch norm (MAML's sine MLP),
with `torch.func.vmap` over the tasks of one task's inner loop.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from l2l_recipes import data
from l2l_recipes.errors import UserError


class DeviceEpisodes:
    """The tasks of a learn2learn Taskset made by `data.taskset`, built on `device`.

    `get_task(description)` and `sample()` return what the Taskset's own would, as float
    images on `device` (bitwise equal: the same uint8 pixels divided by 255); `get_tasks`
    builds several tasks of one shape at once, stacked. `data.draw` draws from it as from the
    Taskset (the same random numbers), so a recipe can use it in the Taskset's place.
    """

    def __init__(self, tasks, dataset, device):
        self.tasks = tasks
        if not hasattr(dataset, "all_images"):
            raise UserError(f"engine=fast cannot index {type(dataset).__name__} on the device: "
                            f"use --set engine=reference")
        self.images = dataset.all_images().to(device)  # uint8 [items, C, H, W], item i = dataset[i]
        self.device = device
        self.class_of = tasks.dataset.indices_to_labels

    def get_task(self, description):
        x, y = self.get_tasks([description])
        return x[0], y[0]

    def get_tasks(self, descriptions):
        """Several tasks of one shape in one gather: (x [tasks, n, C, H, W], y [tasks, n])."""
        indices, labels = [], []
        for description in descriptions:
            for dd in description:
                # dd.transforms = [LoadData's loader, RemapLabels' mapping]: map the class label only
                item = (None, self.class_of[dd.index])
                for transform in dd.transforms[1:]:
                    item = transform(item)
                indices.append(dd.index)
                labels.append(item[1])
        x = self.images[torch.tensor(indices, device=self.device)].float().div_(255)
        y = torch.tensor(labels, device=self.device).view(len(descriptions), -1)
        return x.view(*y.shape, *x.shape[1:]), y

    def __len__(self):
        return len(self.tasks)

    def sample_task_description(self):
        return self.tasks.sample_task_description()

    def sample(self):
        return self.get_task(data.draw(self))


# ----------------------------------------------------------------------------- ProtoNet embedding

def conv4_embed(backbone, x):
    """`backbone(x)` for learn2learn's Conv4 backbones (conv, batch norm, ReLU, max-pool per
    block), with each ReLU applied after the max-pool instead of before. The two commute
    exactly, in float as well, and so do their gradients (ties in a window go to the same
    first element; where the maximum is not positive both give 0): the same embeddings,
    gradients and batch norm statistics, with the ReLU and its backward on a quarter of the
    largest activations (ProtoNet's training step is bound by passes over those on a CPU).
    NCHW activations are pooled by `MaxPool` (the channels-last kernel: the same values and
    indices, a sixth of the step's time saved on Omniglot). Blocks without max-pooling (any other
    module of a sequential backbone) run as they are."""
    h = x
    for block in backbone:
        pool = getattr(block, "max_pool", None)
        if isinstance(pool, torch.nn.MaxPool2d):
            h = batch_norm(block.conv(h), block.normalize)
            h = block.relu(MaxPool.apply(h, pool.kernel_size) if h.is_contiguous() and _tiling(pool) else pool(h))
        else:
            h = block(h)
    return h.reshape(h.size(0), -1)


def batch_norm(x, bn):
    """`bn(x)`; in training on a channels-last CPU batch, with PyTorch's NCHW precision: its
    channels-last CPU kernel sums the batch statistics ~1e-4 off (the NCHW one ~1e-7) and the
    backward's sums likewise, so they are summed here (the mean, then the squared deviations
    from it) and the running statistics updated as `bn` does."""
    if not (bn.training and bn.affine and x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last) and x.dtype in (torch.float32, torch.float64)):
        return bn(x)
    y, mean, var = _PreciseBatchNorm.apply(x, bn.weight, bn.bias, bn.eps)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            n = x.numel() // x.size(1)
            bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(var * (n / (n - 1)), alpha=momentum)  # unbiased, as bn
    return y


class _PreciseBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of a channels-last batch [N, C, H, W], computed on its [N*H*W, C]
    view (channels-last memory is [N, H, W, C]); also returns the batch's mean and (biased)
    variance."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        rows = _rows(x)
        mean = (_column_sums(rows) / len(rows)).to(x.dtype)
        var = (_column_sums((rows - mean).square_()) / len(rows)).to(x.dtype)
        invstd = torch.rsqrt(var + eps)
        y = torch.addcmul(bias - mean * weight * invstd, rows, weight * invstd)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y.view(x.size(0), x.size(2), x.size(3), x.size(1)).permute(0, 3, 1, 2), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_):
        x, weight, mean, invstd = ctx.saved_tensors
        rows, grad_rows = _rows(x), _rows(grad.contiguous(memory_format=torch.channels_last))
        centered = rows - mean
        sum_grad = _column_sums(grad_rows).to(x.dtype)
        sum_grad_centered = _column_sums(grad_rows * centered).to(x.dtype)
        scale = weight * invstd
        # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), x_hat = (x - mean) * invstd
        grad_x = torch.addcmul(-scale * sum_grad / len(rows), grad_rows, scale)
        grad_x.addcmul_(centered, -scale * invstd * invstd * sum_grad_centered / len(rows))
        return (grad_x.view(x.size(0), x.size(2), x.size(3), x.size(1)).permute(0, 3, 1, 2),
                sum_grad_centered * invstd, sum_grad, None)


def _rows(x):
    """A channels-last [N, C, H, W] tensor as its [N*H*W, C] view."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.size(1))


def _column_sums(rows):
    """The column sums of [n, C] in float64, about as precise as PyTorch's NCHW batch norm (which
    accumulates in double) at the speed of a float32 sum: blocks of 16 rows summed in float32,
    then the blocks' sums in float64 (measured on 470,400 rows: 1e-9 relative, float32's sum 5e-7)."""
    whole = len(rows) - len(rows) % 16
    blocks = rows[:whole].view(-1, 16, rows.size(1)).sum(1)
    return blocks.sum(0, dtype=torch.float64) + rows[whole:].sum(0, dtype=torch.float64)


def _tiling(pool):
    """Whether max-pool module `pool` takes disjoint windows from the top-left corner (MaxPool's case)."""
    return (pool.stride in (None, pool.kernel_size) and pool.padding in (0, (0, 0))
            and pool.dilation in (1, (1, 1)) and not pool.ceil_mode)


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


def _convolution_backward(grad_out, x, w, conv, groups, mask):
    stride, padding, _ = conv
    bias_sizes = [w.shape[0]] if mask[2] else None
    return torch.ops.aten.convolution_backward(grad_out, x, w, bias_sizes, stride, padding, (1, 1), False, (0, 0),
                                               groups, mask)


def _by_image(x, tasks):
    """[n, tasks * C, H, W] (task t's images in channel group t) viewed as [n * tasks, C, H, W]."""
    return x.view(x.shape[0] * tasks, -1, *x.shape[2:])


def _by_group(x, tasks):
    """The inverse view of `_by_image`."""
    return x.view(-1, tasks * x.shape[1], *x.shape[2:])


def _grouped(w):
    """Per-task weights [tasks, out, in, k, k] as one grouped convolution's [tasks * out, in, k, k]."""
    return w.reshape(-1, *w.shape[2:])


def _shape_of(w):
    """A tensor with the shape of the grouped weight [tasks * out, in, k, k] and no memory, for the
    calls that only need its shape (weight gradients)."""
    tasks, out, *rest = w.shape
    return w.new_empty(1).as_strided((tasks * out, *rest), (0,) * (len(rest) + 1))


class GroupedConv(torch.autograd.Function):
    """Task t's convolution on channel group t of x [n, tasks * in, H, W] with weight w[t]
    ([tasks, out, in, k, k]) and bias b[t] ([tasks, out]), twice differentiable by `ConvBackward`.

    Where every task has the same weights (w and b expanded from one copy, as in the first inner
    step), the forward and input-gradient convolutions run as one ordinary convolution over
    n * tasks images: no per-task copies of the weights for oneDNN to reorder."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding):
        tasks = w.shape[0]
        shared = w.stride(0) == 0 and b.stride(0) == 0
        ctx.save_for_backward(x, w)
        ctx.conv = (tuple(stride), tuple(padding), shared)
        if shared:
            return _by_group(F.conv2d(_by_image(x, tasks), w[0], b[0], stride, padding), tasks)
        return F.conv2d(x, _grouped(w), b.reshape(-1), stride, padding, 1, tasks)

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        return *ConvBackward.apply(grad_out, x, w, ctx.conv, ctx.needs_input_grad[0]), None, None


class ConvBackward(torch.autograd.Function):
    """(grad x, grad w, grad b) of `GroupedConv` from its output gradient (w's gradient per task);
    its own derivative uses native convolutions only."""

    @staticmethod
    def forward(ctx, grad_out, x, w, conv, input_grad):
        tasks, shared = w.shape[0], conv[2]
        ctx.save_for_backward(grad_out, x, w)
        ctx.conv = conv
        if shared:
            grad_x = None
            if input_grad:
                grad_x = _by_group(_convolution_backward(_by_image(grad_out, tasks), _by_image(x, tasks), w[0], conv, 1,
                                                         (True, False, False))[0], tasks)
            _, grad_w, grad_b = _convolution_backward(grad_out, x, _shape_of(w), conv, tasks, (False, True, True))
        else:
            grad_x, grad_w, grad_b = _convolution_backward(grad_out, x, _grouped(w), conv, tasks,
                                                           (input_grad, True, True))
        return grad_x, grad_w.view(w.shape), grad_b.view(tasks, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x, gg_w, gg_b):
        grad_out, x, w = ctx.saved_tensors
        stride, padding, shared = ctx.conv
        tasks = w.shape[0]
        gg_w = _grouped(gg_w)
        d_out = d_x = d_w = None
        if ctx.needs_input_grad[0]:  # the backward is linear in grad_out
            d_out = F.conv2d(x, gg_w, gg_b.reshape(-1), stride, padding, 1, tasks)
            if gg_x is not None and shared:
                d_out += _by_group(F.conv2d(_by_image(gg_x, tasks), w[0], None, stride, padding), tasks)
            elif gg_x is not None:
                d_out += F.conv2d(gg_x, _grouped(w), None, stride, padding, 1, tasks)
        if ctx.needs_input_grad[1]:  # x enters through grad w (x correlated with grad_out)
            d_x = _convolution_backward(grad_out, x, gg_w, ctx.conv, tasks, (True, False, False))[0]
        if ctx.needs_input_grad[2] and gg_x is not None:  # w enters through grad x (grad_out convolved with w^T)
            d_w = _convolution_backward(grad_out, gg_x, _shape_of(w), ctx.conv, tasks, (False, True, False))[1]
            d_w = d_w.view(w.shape)
        return d_out, d_x, d_w, None, None


def first_conv(x, w, b, conv):
    """The first layer's convolution of every task on its own images x [tasks, n, C, H, W], as
    one batched matrix product of the weights [tasks, out, C * k * k + bias] with the image
    patches: [n, tasks * out, H', W'], written once (oneDNN's grouped convolution writes its
    output and then copies it, a pass over the largest activations)."""
    tasks, n = x.shape[:2]
    patches = F.unfold(x.transpose(0, 1).reshape(n * tasks, *x.shape[2:]), conv.kernel_size, conv.dilation,
                       conv.padding, conv.stride)
    patches = patches.view(n, tasks, *patches.shape[1:])
    patches = torch.cat([patches, patches.new_ones(n, tasks, 1, patches.shape[-1])], 2)
    height, width = [(size + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for size, pad, dilation, k, stride
                     in zip(x.shape[3:], conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
    weights = torch.cat([w.flatten(2), b.unsqueeze(2)], 2)
    return torch.matmul(weights.unsqueeze(0), patches).view(n, -1, height, width)


def _channel(v):
    return v.reshape(1, -1, 1, 1)


def _batch_norm_backward(grad, x, w, mean, inv_std, eps, mask=(True, True, True)):
    """PyTorch's batch norm backward kernel (it accumulates in double): for w=None (a scale of 1),
    grad - mean(grad) - x_hat * mean(grad * x_hat), times inv_std; sum(grad * x_hat); sum(grad)."""
    return torch.ops.aten.native_batch_norm_backward(grad, x, w, None, None, mean, inv_std, True, eps, mask)


def _channel_dot(u, v):
    """Per channel, the sum over [n, H, W] of u * v, in one pass of the same kernel."""
    ones = torch.ones(u.shape[1], dtype=u.dtype, device=u.device)
    return _batch_norm_backward(u, v, None, torch.zeros_like(ones), ones, 0.0, (False, True, False))[1]


class BatchNormReLU(torch.autograd.Function):
    """relu(training-mode batch norm of x [n, C, H, W] per channel, scaled by w, shifted by b).
    PyTorch's batch norm kernels (they accumulate in double: float32 meta-gradients summed
    from primitive operations were up to 1e-3 off at some weights); the derivative of the
    backward, needed for second-order MAML, is `BatchNormReLUBackward`. `batch`, if given, is
    two tensors [C] that receive the batch's mean and unbiased variance (the values batch norm
    folds into running statistics)."""

    @staticmethod
    def forward(ctx, x, w, b, eps, batch=None):
        # momentum 1: the kernel's running-statistics update leaves exactly the batch's values
        z, mean, inv_std = torch.ops.aten.native_batch_norm(x, w, b, *(batch or (None, None)), True, 1.0, eps)
        y = z.relu_()
        ctx.save_for_backward(x, w, mean, inv_std, y)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph: this gradient will be differentiated
            return *BatchNormReLUBackward.apply(grad_y, *ctx.saved_tensors, ctx.eps), None, None
        x, w, mean, inv_std, y = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad_y, y, 0)
        return *_batch_norm_backward(g, x, w, mean, inv_std, ctx.eps), None, None


class BatchNormReLUBackward(torch.autograd.Function):
    """(grad x, grad w, grad b) of BatchNormReLU from grad y, with its derivative in closed form,
    written with batch norm's own backward kernel where it fits (fewer passes over the
    activations). mean, inv_std (functions of x) and y (the ReLU mask) are not differentiated."""

    @staticmethod
    def forward(ctx, grad_y, x, w, mean, inv_std, y, eps):
        g = torch.ops.aten.threshold_backward(grad_y, y, 0)
        g_centred, grad_w, grad_b = _batch_norm_backward(g, x, None, mean, inv_std, eps)  # inv_std * P(g)
        ctx.save_for_backward(g_centred, x, w, mean, inv_std, y, grad_w)
        ctx.eps = eps
        return g_centred * _channel(w), grad_w, grad_b

    @staticmethod
    @once_differentiable
    def backward(ctx, a, alpha, beta):
        """Derivatives of <a, grad_x> + <alpha, grad_w> + <beta, grad_b> w.r.t. grad_y, x and w.
        With P the projection removing the components along 1 and x_hat, grad_x = w inv_std P(g)."""
        g_centred, x, w, mean, inv_std, y, grad_w = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        a_centred, sum_a_x, _ = _batch_norm_backward(a, x, w, mean, inv_std, ctx.eps)  # w inv_std P(a)
        k = _channel_dot(a, g_centred)  # = <P(a), g> inv_std = d/dw
        x_hat = (x - _channel(mean)).mul_(_channel(inv_std))
        # d/dx through x_hat and inv_std: a combination of the centred vectors
        scale = w * inv_std
        d_x = g_centred * _channel(alpha - scale * sum_a_x / n)
        d_x.addcmul_(a_centred, _channel(-inv_std * grad_w / n))
        d_x.addcmul_(x_hat, _channel(-scale * k / n))
        d_g = a_centred.add_(_channel(beta)).addcmul_(x_hat, _channel(alpha))
        return torch.ops.aten.threshold_backward(d_g, y, 0), d_x, k, None, None, None, None


class MaxPool(torch.autograd.Function):
    """F.max_pool2d(x, k) of x [n, C, H, W] (NCHW in and out, gradients too) through PyTorch's
    channels-last kernel: the same values and indices (both give a window's maximum to its first
    element on ties), where the NCHW kernel is several times slower on this CPU (MAML++'s first
    layer, [5, 512, 28, 28]: 16 ms against 2 with the layout changes); twice differentiable."""

    @staticmethod
    def forward(ctx, x, k):
        y, indices = F.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), k)
        ctx.save_for_backward(x, indices.contiguous())
        ctx.k = k
        return y.contiguous()

    @staticmethod
    def backward(ctx, grad_y):
        x, indices = ctx.saved_tensors
        return MaxPoolBackward.apply(grad_y, x, indices, ctx.k), None


class MaxPoolBackward(torch.autograd.Function):
    """grad x of `MaxPool` from grad y (each output's gradient to its window's maximum); its own
    derivative gathers at the same indices. x (the indices' input) is not differentiated."""

    @staticmethod
    def forward(ctx, grad_y, x, indices, k):
        ctx.save_for_backward(indices)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_y, x, k, k, 0, 1, False, indices)

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x):
        indices, = ctx.saved_tensors
        return gg_x.flatten(2).gather(2, indices.flatten(2)).view(indices.shape), None, None, None


def grouped_features(structure, weights, x):
    """The body's features [n, tasks, F] of each task's network (the body's weights, in
    `parameters_in_order`, with a leading task dimension) on its own images x [tasks, n, C, H, W]."""
    layers, tail, _ = structure
    tasks, n = x.shape[:2]
    for i, (conv, norm, pool) in enumerate(layers):
        cw, cb, bw, bb = weights[4 * i:4 * i + 4]
        if i == 0:
            h = first_conv(x, cw, cb, conv)  # task t's images are channel group t from here on
        else:
            h = GroupedConv.apply(h, cw, cb, conv.stride, conv.padding)
        h = BatchNormReLU.apply(h, bw.reshape(-1), bb.reshape(-1), norm.eps)
        if pool is not None:
            h = MaxPool.apply(h, pool.kernel_size) if _tiling(pool) else pool(h)
    return _tail(h, tail, n, tasks)


def shared_features(structure, x):
    """`grouped_features` of a body that every task shares (ANIL's, the model's own weights): each
    convolution is one ordinary convolution over all the tasks' images, whose weight gradient is
    the sum over the tasks in one pass (`GroupedConv` takes it per task, then sums); batch norm
    per task and channel as there."""
    layers, tail, _ = structure
    tasks, n = x.shape[:2]
    h = x.transpose(0, 1).reshape(n * tasks, *x.shape[2:])  # image i of task t at i * tasks + t
    for conv, norm, pool in layers:
        h = _by_group(F.conv2d(h, conv.weight, conv.bias, conv.stride, conv.padding), tasks)
        h = BatchNormReLU.apply(h, norm.weight.repeat(tasks), norm.bias.repeat(tasks), norm.eps)
        if pool is not None:
            h = MaxPool.apply(h, pool.kernel_size) if _tiling(pool) else pool(h)
        h = _by_image(h, tasks)
    return _tail(_by_group(h, tasks), tail, n, tasks)


def _tail(h, tail, n, tasks):
    """Features [n, tasks, F] from the last block's output [n, tasks * C, H, W]."""
    if tail == "mean":
        return h.mean((2, 3)).view(n, tasks, -1)
    return h.view(n, tasks, -1, h.shape[2] * h.shape[3]).flatten(2)  # flatten each task's [C, H, W]


def _head(features, w, b):
    """Each task's linear head: logits [tasks, n, ways] from features [n, tasks, F]."""
    return torch.einsum("ntf,tkf->tnk", features, w) + b[:, None]


def grouped_forward(structure, weights, x):
    """Logits [tasks, n, ways] of each task's network (weights with a leading task dimension)
    on its own images x [tasks, n, C, H, W]."""
    return _head(grouped_features(structure, weights[:-2], x), *weights[-2:])


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


def _query_backward(logits, qy, scale):
    """Back-propagate `scale` x (sum over tasks of the query losses); the sums of the tasks'
    query losses and accuracies."""
    query_loss = _loss_sum(logits, qy)
    (scale * query_loss).backward()
    accuracies = (logits.argmax(-1) == qy).float().mean(1)
    return query_loss.item(), accuracies.sum().item()


def _rates_in_order(model, params, fast_lr):
    """One inner-loop rate per parameter of `params`: fast_lr for all (MAML), or Meta-SGD's rate
    tensors, given in `model.parameters()` order."""
    if isinstance(fast_lr, (int, float)):
        return [fast_lr] * len(params)
    by_parameter = dict(zip(map(id, model.parameters()), fast_lr, strict=True))
    return [by_parameter[id(p)] for p in params]


def maml_meta_batch(model, tasks, fast_lr, steps, first_order, scale):
    """learn2learn's MAML meta-batch in one pass: adapt a copy of `model` to each task of `tasks`
    = (support_x, support_y, query_x, query_y), each with a leading task dimension (as
    `data.split_support_query(*DeviceEpisodes.get_tasks(...), shots)` gives them), with `steps`
    SGD steps of `fast_lr`, and accumulate the gradient of `scale` x (sum of the query losses)
    into the parameters' .grad. `fast_lr` is a float, or Meta-SGD's learned rates (a tensor per
    parameter, in `model.parameters()` order; their meta-gradient is accumulated too).
    Returns the sums over the tasks of their query losses and accuracies."""
    structure = conv4_layers(model)
    params = parameters_in_order(structure)
    rates = _rates_in_order(model, params, fast_lr)
    sx, sy, qx, qy = tasks
    weights = [p.unsqueeze(0).expand(len(sx), *p.shape) for p in params]
    for _ in range(steps):
        support_loss = _loss_sum(grouped_forward(structure, weights, sx), sy)
        grads = torch.autograd.grad(support_loss, weights, create_graph=not first_order)
        weights = [w - rate * g if torch.is_tensor(rate) else torch.add(w, g, alpha=-rate)
                   for w, g, rate in zip(weights, grads, rates)]
    return _query_backward(grouped_forward(structure, weights, qx), qy, scale)


def anil_meta_batch(model, tasks, fast_lr, steps, first_order, scale):
    """ANIL's meta-batch in one pass, as `maml_meta_batch` for MAML: the shared body's features of
    every task's support and of its query images (two calls, so batch norm sees each set alone,
    as the loop's `model.features(support_x)`, `model.features(query_x)` do), then each task's
    copy of the head adapted with `steps` SGD steps of `fast_lr`. Accumulates the gradient of
    `scale` x (sum of the query losses) into .grad; returns the sums of query losses and accuracies."""
    structure = conv4_layers(model)
    sx, sy, qx, qy = tasks
    support, query = shared_features(structure, sx), shared_features(structure, qx)
    head = [p.unsqueeze(0).expand(len(sx), *p.shape) for p in (structure[2].weight, structure[2].bias)]
    for _ in range(steps):
        grads = torch.autograd.grad(_loss_sum(_head(support, *head), sy), head, create_graph=not first_order)
        head = [torch.add(w, g, alpha=-fast_lr) for w, g in zip(head, grads)]
    return _query_backward(_head(query, *head), qy, scale)


def vmap_meta_losses(model, tasks, fast_lr, steps, first_order, loss=F.mse_loss):
    """learn2learn's MAML meta-batch for a network without batch norm or buffers (MAML sine's MLP),
    every task at once: `torch.func.vmap` over tasks = (support_x, support_y, query_x, query_y),
    each with a leading task dimension, of one task's inner loop (`steps` SGD steps of `fast_lr`
    on `loss`, through `torch.func.grad`; first order: those gradients taken as constants).
    Returns each task's query loss [tasks], differentiable (second order unless first_order)
    with respect to the model's parameters: the gradients of a `MAML.clone()` per task."""
    if any(True for _ in model.buffers()):
        raise UserError(f"engine=fast adapts networks without buffers (no batch norm), not this "
                        f"{type(model).__name__}: use --set engine=reference")
    params = dict(model.named_parameters())

    def query_loss(support_x, support_y, query_x, query_y):
        def support_loss(weights):
            return loss(torch.func.functional_call(model, weights, (support_x,)), support_y)

        weights = params
        for _ in range(steps):
            grads = torch.func.grad(support_loss)(weights)
            weights = {k: w - fast_lr * (grads[k].detach() if first_order else grads[k]) for k, w in weights.items()}
        return loss(torch.func.functional_call(model, weights, (query_x,)), query_y)

    return torch.func.vmap(query_loss)(*tasks)


# ----------------------------------------------------------------------------- evaluation

def maml_predict(model, support_x, support_y, query_x, fast_lr, steps):
    """Test-time MAML (or Meta-SGD, with `fast_lr` its rate tensors) for many tasks at once: each
    task's copy of `model` takes `steps` SGD steps on its own support set (first order: nothing
    is differentiated afterwards), then scores its query set. Logits [tasks, queries, ways]; batch
    norm on each set's own statistics, as the per-task `MAML.clone()` loop in train mode."""
    structure = conv4_layers(model)
    params = parameters_in_order(structure)
    rates = _rates_in_order(model, params, fast_lr)
    weights = [p.detach().unsqueeze(0).expand(len(support_x), *p.shape).requires_grad_() for p in params]
    with torch.enable_grad():
        for _ in range(steps):
            grads = torch.autograd.grad(_loss_sum(grouped_forward(structure, weights, support_x), support_y), weights)
            with torch.no_grad():
                weights = [(w - rate.detach() * g if torch.is_tensor(rate) else torch.add(w, g, alpha=-rate))
                           .requires_grad_() for w, g, rate in zip(weights, grads, rates)]
    with torch.no_grad():
        return grouped_forward(structure, weights, query_x)


def anil_predict(model, support_x, support_y, query_x, fast_lr, steps):
    """Test-time ANIL for many tasks at once: the body's features of each task's support and query
    sets (batch norm on each set's own statistics), then each task's copy of the head takes `steps`
    SGD steps on its support features. Logits [tasks, queries, ways]."""
    structure = conv4_layers(model)
    with torch.no_grad():
        support, query = (shared_features(structure, x) for x in (support_x, query_x))
    head = [p.detach().unsqueeze(0).expand(len(support_x), *p.shape).requires_grad_()
            for p in (structure[2].weight, structure[2].bias)]
    with torch.enable_grad():
        for _ in range(steps):
            grads = torch.autograd.grad(_loss_sum(_head(support, *head), support_y), head)
            with torch.no_grad():
                head = [torch.add(w, g, alpha=-fast_lr).requires_grad_() for w, g in zip(head, grads)]
    with torch.no_grad():
        return _head(query, *head)
