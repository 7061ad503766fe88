"""Meta-training over several processes with torch.distributed, launched by `torchrun`.

`l2l-recipes run` calls `init()`; it joins the process group only when torchrun's
environment (WORLD_SIZE, RANK, LOCAL_RANK) is present: gloo on CPU, NCCL on CUDA (one GPU
per process, cuda:LOCAL_RANK). Without a process group every helper here is a no-op or an
identity, so recipes, `l2l_recipes.load` and exported files run unchanged in one process.

How a meta-batch is split ("rank-aware" sampling): every process seeds identically and
draws the description of every task of the meta-batch (`data.draw`: Python's `random`
only, cheap), so all processes keep the same random number stream; each then loads and
trains only the tasks `mine(i)` (i % world_size == rank), a distinct, rank-determined share
of the meta-batch that one process would draw. Recipes divide each task's loss by the
global meta-batch size, so `all_reduce_gradients` (a sum) gives every process the
single-process meta-gradient, and the parameters stay identical everywhere. No
DistributedDataParallel wrapper: its gradient hooks clash with MAML.clone()
(learn2learn issues #128, #170, #263), and the recipes need only one all-reduce per step.

Evaluation splits the fixed tasks the same way and `gather`s the per-task values in task
order, so means and confidence intervals equal one process's. Rank 0 alone writes the run
directory (harness.Run); `on_main` runs a reader there and broadcasts what it read, so
nodes need no shared filesystem.

Recipes never import this module: they call its thin wrappers in harness (`run.share`,
`run.reduce_gradients`, `run.total`; `harness.share` and `harness.gather` in evaluation):
    for description in run.share(descriptions):
        ...  # load, adapt, (loss / meta_batch_size).backward()
    run.reduce_gradients(model.parameters())
    optimizer.step()
"""
import os

import torch
import torch.distributed as dist

from l2l_recipes.errors import UserError

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def launched():
    """True in a process started by torchrun (its environment variables are set)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def init(device):
    """Join torchrun's process group (NCCL for a CUDA `device`, else gloo); returns the device
    this process trains on: cuda:LOCAL_RANK for CUDA, else `device`. No-op outside torchrun."""
    if not launched() or active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close():
    """Leave the process group (at the end of a run, also after an error)."""
    if active():
        dist.destroy_process_group()


def active():
    """True when this process belongs to a process group of torch.distributed."""
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    """True in the process that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def backend():
    """'gloo', 'nccl', or None in a single process."""
    return dist.get_backend() if active() else None


def mine(i):
    """True when task `i` of a meta-batch (or of an evaluation) belongs to this process."""
    return i % world_size() == rank()


def check_split(cfg):
    """A one-line UserError unless cfg's meta-batch (or batch) splits evenly over the processes."""
    world = world_size()
    for key in ("meta_batch_size", "batch_size"):
        size = getattr(cfg, key, None)
        if size is not None and size % world:
            raise UserError(f"{key}={size} does not split evenly over {world} processes: pass --set "
                            f"{key}=N with N a multiple of {world}, or a --nproc_per_node that divides {size}")


def _reduction_device():
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def all_reduce(tensors):
    """Sum each tensor in place over all processes (one collective for all of them)."""
    tensors = list(tensors)
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def all_reduce_gradients(parameters):
    """Sum the parameters' gradients over all processes: with each task's loss divided by the
    global meta-batch size, the sum is the single-process meta-gradient. Every process must
    hold gradients for the same parameters (true when each trains the same kind of tasks)."""
    all_reduce([p.grad for p in parameters if p.grad is not None])


def average_buffers(module):
    """Average the module's floating-point buffers (batch norm running statistics) over all
    processes: each updated them with its own tasks only. A running average is linear in its
    inputs, so averaging before each evaluation and checkpoint equals averaging every step."""
    world = world_size()
    if world == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    all_reduce(buffers)
    for b in buffers:
        b.div_(world)


def all_reduce_floats(values):
    """The floats `values` summed over all processes, as a list (to log a whole meta-batch)."""
    values = list(values)
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_reduction_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag):
    """True on every process when `flag` is true on any (decisions all must take together)."""
    if not active():
        return bool(flag)
    t = torch.tensor([float(bool(flag))], device=_reduction_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(values):
    """Every process's `values` (its tasks `mine(i)`, in order) merged into one list in task
    order, on every process: [v_0, v_1, ...] as one process would have computed them."""
    values = list(values)
    if not active():
        return values
    parts = [None] * world_size()
    dist.all_gather_object(parts, values)
    total = sum(len(part) for part in parts)
    return [parts[i % len(parts)][i // len(parts)] for i in range(total)]


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable object), on every process."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(function, *args):
    """`function(*args)` run by rank 0 alone (e.g. reading a checkpoint), its result sent to every
    process; a UserError it raises is raised on every process, so none waits for the others."""
    if not active():
        return function(*args)
    result = error = None
    if is_main():
        try:
            result = function(*args)
        except UserError as e:
            error = str(e)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise UserError(error)
    return result
