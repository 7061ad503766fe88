"""MAML's fast meta-batch in NCHW (as l2l_recipes.fast runs it) against two channels-last layouts,
the lead docs/speed.md recorded for issue 16's MAML >= 5x: CPU time of the step, and how far each
layout's meta-gradient is from NCHW's.

    python benchmarks/maml_channels_last.py [--rounds 3] [--repeats 7]

Layouts: `convs` converts only the grouped convolutions' inputs and gradients to channels-last at
each call; `network` makes the first layer's output channels-last once and runs every grouped
convolution (the shared-weights one too, as a grouped one) and batch norm in that layout. Omniglot
5w1s, meta-batch 32, one second-order step, 64 filters, random images, one thread; the layouts
take turns, the median of each round is printed.

Measured 2026-12-06 11:17 (commit bdcb87c plus this file, the slower 2-core Zen 1 EPYC, nothing else
running, --rounds 4): nchw 682-770 ms, convs 720-761 ms (meta-gradient 7.8e-7 of its largest entry
from NCHW's), network 893-956 ms (4.1e-3; in float64 the network layout is 8e-15 from NCHW's, so the
same function rounded coarser).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from l2l_recipes import fast, models
from l2l_recipes.harness import keep_freed_memory

CL = torch.channels_last
NCHW_FIRST_CONV, NCHW_FORWARD, NCHW_BACKWARD = fast.first_conv, fast.GroupedConv.forward, fast._convolution_backward


def grouped_conv2d(x, w, b, stride, padding, dilation, groups):
    return F.conv2d(x.contiguous(memory_format=CL), w.contiguous(memory_format=CL), b, stride, padding, dilation,
                    groups).contiguous()


def convolution_backward_cl(grad_out, x, w, conv, groups, mask):
    if groups == 1 or not mask[0]:
        return NCHW_BACKWARD(grad_out, x, w, conv, groups, mask)
    w = w.contiguous(memory_format=CL) if w.stride(0) else w  # a zero-stride shape holder stays as it is
    grads = NCHW_BACKWARD(grad_out.contiguous(memory_format=CL), x.contiguous(memory_format=CL), w, conv, groups, mask)
    return tuple(g if g is None else g.contiguous() for g in grads)


def convs_forward(ctx, x, w, b, stride, padding):
    if w.stride(0) == 0 and b.stride(0) == 0:
        return NCHW_FORWARD(ctx, x, w, b, stride, padding)
    ctx.save_for_backward(x, w)
    ctx.conv = (tuple(stride), tuple(padding), False)
    return grouped_conv2d(x, fast._grouped(w), b.reshape(-1), stride, padding, 1, w.shape[0])


def network_forward(ctx, x, w, b, stride, padding):
    ctx.save_for_backward(x, w)
    ctx.conv = (tuple(stride), tuple(padding), False)  # no per-image view of a channels-last batch
    return F.conv2d(x, fast._grouped(w), b.reshape(-1), stride, padding, 1, w.shape[0])


def use(layout):
    fast.first_conv = NCHW_FIRST_CONV
    fast.GroupedConv.forward = staticmethod(NCHW_FORWARD)
    fast._convolution_backward = NCHW_BACKWARD
    if layout == "convs":
        fast.GroupedConv.forward = staticmethod(convs_forward)
        fast._convolution_backward = convolution_backward_cl
    elif layout == "network":
        fast.first_conv = lambda *args: NCHW_FIRST_CONV(*args).contiguous(memory_format=CL)
        fast.GroupedConv.forward = staticmethod(network_forward)


def step(model, tasks, repeats):
    times = []
    for _ in range(repeats):
        model.zero_grad()
        start = time.process_time()
        fast.maml_meta_batch(model, tasks, 0.4, 1, False, 1 / 32)
        times.append(time.process_time() - start)
    return statistics.median(times), [p.grad.clone() for p in model.parameters()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    torch.manual_seed(0)
    model = models.conv4_classifier("omniglot", 5, 64)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(32, 1)
    tasks = (torch.rand(32, 5, 1, 28, 28, generator=g), labels, torch.rand(32, 5, 1, 28, 28, generator=g), labels)
    layouts = ("nchw", "convs", "network")
    times, grads = {layout: [] for layout in layouts}, {}
    for _ in range(args.rounds):
        for layout in layouts:
            use(layout)
            seconds, grads[layout] = step(model, tasks, args.repeats)
            times[layout].append(round(1000 * seconds))
    largest = max(g.abs().max().item() for g in grads["nchw"])
    for layout in layouts:
        off = max((a - b).abs().max().item() for a, b in zip(grads["nchw"], grads[layout])) / largest
        print(f"{layout:8} {times[layout]} ms a meta-batch; meta-gradient {off:.1e} of its largest entry from NCHW's")
    use("nchw")


if __name__ == "__main__":
    main()
