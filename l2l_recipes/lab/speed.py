"""Side-by-side throughput of learn2learn's plain loops and this project's fast path.

Measures, on the same tasks and weights:
  * MAML Omniglot (Conv4 / OmniglotCNN, second order, meta-batch 32, one inner step):
    learn2learn's loop (Taskset.sample() per task, a MAML clone per task) against
    DeviceEpisodes + fast.maml_meta_batch; the meta-gradient difference between them, and
    each one's difference from the float64 meta-gradient.
  * ProtoNet Omniglot training episodes (60-way 5-shot 5-query): learn2learn's Taskset and a
    Conv4 step against DeviceEpisodes + fast.conv4_embed (the recipe's default), and with
    channels-last tensors as well (an option: faster, but PyTorch's channels-last batch norm
    computes the batch statistics less precisely).
The reference loops run as learn2learn's examples run them (images decoded from their PNG
files per sample: FullOmniglot's data path with get_tasksets' transform; glibc's default
malloc), on this project's uint8 image cache with the default malloc, and on the cache after
`harness.keep_freed_memory()` (which our runs use); the fast path runs as our runs do. Each
loop has a process of its own and they are timed in turns (`interleaved_seconds`). GFLOP/s =
FLOPs of one iteration (torch's FlopCounterMode) / time, next to the float32 matmul rate.
"""
import copy
import multiprocessing
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import learn2learn as l2l
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from l2l_recipes import data, fast, harness, models, registry
from l2l_recipes.datasets import omniglot


@dataclass(frozen=True)
class Settings:
    maml_ways: int = 5
    maml_shots: int = 1
    maml_queries: int = 1
    meta_batch_size: int = 32
    fast_lr: float = 0.4
    proto_ways: int = 60
    proto_shots: int = 5
    proto_queries: int = 5
    hidden_size: int = 64
    iterations: int = 10  # timed iterations per loop (after one warm-up)
    seed: int = 0


TINY = Settings(meta_batch_size=2, proto_ways=5, proto_shots=1, proto_queries=2, hidden_size=8, iterations=1)


class PngOmniglot(torch.utils.data.Dataset):
    """The classes of an `omniglot.OmniglotClasses` split, each item decoded from its PNG file
    on every access and transformed as learn2learn's `get_tasksets('omniglot')` does
    (Resize(28, LANCZOS), ToTensor, 1 - x), then rotated: learn2learn's data path."""

    def __init__(self, split, root):
        from PIL import Image
        from torchvision import transforms
        sources = omniglot.omniglot_sources(data.data_root(root))
        names = list(sources)
        self.files = [sources[names[c]] for c in split.character]
        self.quarter_turns = split.quarter_turns
        self.labels_to_indices = split.labels_to_indices
        self.open = Image.open
        self.transform = transforms.Compose([transforms.Resize(28, interpolation=Image.LANCZOS),
                                             transforms.ToTensor(), lambda x: 1.0 - x])

    def __len__(self):
        return len(self.files) * omniglot.DRAWINGS

    def __getitem__(self, i):
        c, j = divmod(i, omniglot.DRAWINGS)
        with self.open(self.files[c][j]) as image:
            x = self.transform(image.convert("L"))
        return torch.rot90(x, self.quarter_turns[c], dims=(1, 2)), c


def matmul_gflops(size=2048, repeats=10):
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def flops(step):
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- MAML

def maml_reference_step(model, maml, tasks, s):
    """learn2learn's loop: sample each task, adapt a clone, back-propagate query loss / meta-batch."""
    model.zero_grad()
    for _ in range(s.meta_batch_size):
        x, y = tasks.sample()
        sx, sy, qx, qy = data.split_support_query(x, y, s.maml_shots)
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(sx), sy))
        (F.cross_entropy(learner(qx), qy) / s.meta_batch_size).backward()


def maml_fast_step(model, episodes, s):
    model.zero_grad()
    tasks = [data.draw(episodes.tasks) for _ in range(s.meta_batch_size)]
    batch = data.split_support_query(*episodes.get_tasks(tasks), s.maml_shots)
    fast.maml_meta_batch(model, batch, s.fast_lr, 1, False, 1 / s.meta_batch_size)


def meta_gradients(model, step, seed):
    random.seed(seed)
    step()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


class Float64Tasks:
    """A Taskset's tasks in float64: the exact meta-gradient, up to ~1e-15, to judge both loops by."""

    def __init__(self, tasks):
        self.tasks = tasks

    def sample(self):
        x, y = self.tasks.sample()
        return x.double(), y


def max_differences(grads, other):
    return {name: (grads[name].double() - other[name].double()).abs().max().item() for name in grads}


# ----------------------------------------------------------------------------- ProtoNet

def proto_step(embed, optimizer, proto_logits, x, y, s):
    """One ProtoNet training episode; proto_logits is the recipe's (distances to the class means)."""
    sx, sy, qx, qy = data.split_support_query(x, y, s.proto_shots)
    optimizer.zero_grad(set_to_none=True)
    embeddings = embed(torch.cat([sx, qx]))
    loss = F.cross_entropy(proto_logits(embeddings[: len(sx)], sy, embeddings[len(sx):], s.proto_ways), qy)
    loss.backward()
    optimizer.step()


LOOPS = {
    "reference_png": "learn2learn loops, PNG per image, default malloc",
    "reference_default_malloc": "learn2learn loops, uint8 cache, default malloc",
    "reference": "learn2learn loops, uint8 cache, keep_freed_memory",
    "fast": "fast path",
}


class Loop:
    """One of LOOPS: its MAML and ProtoNet steps (and the reference loops' sampling alone) on the
    same tasks and initial weights as every other loop; each is built in a process of its own."""

    def __init__(self, name, s, data_root):
        if name in ("reference", "fast"):
            harness.keep_freed_memory()
        self.train = train = data.load_split("omniglot", "train", data_root)
        images = PngOmniglot(train, data_root) if name == "reference_png" else train
        self.maml_tasks = maml_tasks = data.taskset(images, s.maml_ways, s.maml_shots, s.maml_queries)
        self.proto_tasks = proto_tasks = data.taskset(images, s.proto_ways, s.proto_shots, s.proto_queries)
        random.seed(s.seed)
        torch.manual_seed(s.seed)
        self.model = model = models.conv4_classifier("omniglot", s.maml_ways, s.hidden_size)
        self.maml = maml = l2l.algorithms.MAML(model, lr=s.fast_lr)
        self.embedder = embedder = models.conv4_embedding("omniglot", s.hidden_size)
        self.adam = adam = torch.optim.Adam(embedder.parameters(), 1e-3)
        self.proto_logits = proto_logits = registry.get_recipe("protonet-omniglot-5w1s").load_module().proto_logits
        if name != "fast":
            self.steps = {
                "maml": lambda: maml_reference_step(model, maml, maml_tasks, s),
                "maml_sampling": lambda: [maml_tasks.sample() for _ in range(s.meta_batch_size)],
                "proto": lambda: proto_step(embedder, adam, proto_logits, *proto_tasks.sample(), s),
                "proto_sampling": proto_tasks.sample}
            return
        device = torch.device("cpu")
        self.maml_episodes = maml_episodes = fast.DeviceEpisodes(maml_tasks, train, device)
        self.proto_episodes = proto_episodes = fast.DeviceEpisodes(proto_tasks, train, device)
        # ProtoNet's default layout, channels-last (`channels_last=True`), and NCHW
        cl_embedder = copy.deepcopy(embedder).to(memory_format=torch.channels_last)
        cl_adam = torch.optim.Adam(cl_embedder.parameters(), 1e-3)
        self.steps = {
            "maml": lambda: maml_fast_step(model, maml_episodes, s),
            "proto": lambda: proto_step(lambda x: fast.conv4_embed(cl_embedder, x), cl_adam, proto_logits,
                                        *proto_episodes.sample(), s),
            "proto_nchw": lambda: proto_step(lambda x: fast.conv4_embed(embedder, x), adam, proto_logits,
                                             *proto_episodes.sample(), s)}

    def seconds(self, step, count):
        """Seconds of each of `count` calls of a step, after one more call that warms the caches up
        (the loops take turns, and each evicts the others' data from the CPU caches)."""
        self.steps[step]()
        times = []
        for _ in range(count):
            start = time.perf_counter()
            self.steps[step]()
            times.append(time.perf_counter() - start)
        return times


def _serve(connection, name, s, data_root):
    """A loop's process: times the (step, count) it is sent, until it is sent None."""
    loop = Loop(name, s, data_root)
    connection.send(list(loop.steps))
    for step, count in iter(connection.recv, None):
        connection.send(loop.seconds(step, count))


TURN = 3  # timed calls of a step per turn


def interleaved_seconds(s, data_root):
    """Median seconds of every step of every loop over `s.iterations` timed calls. Each loop runs
    in its own process (its own allocator settings), and they take turns, `TURN` timed calls of
    every step at a time, so that all loops see the same machine (whose speed drifts by up to
    +-20% over minutes here, more than some of the differences measured)."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    try:
        for name in LOOPS:
            connection, child = context.Pipe()
            process = context.Process(target=_serve, args=(child, name, s, data_root), daemon=True)
            process.start()
            workers[name] = (process, connection)
        steps = {name: receive(LOOPS[name], connection) for name, (_, connection) in workers.items()}
        times = {name: {step: [] for step in steps[name]} for name in workers}
        for done in range(0, s.iterations, TURN):
            for name, (_, connection) in workers.items():
                for step in steps[name]:
                    connection.send((step, min(TURN, s.iterations - done)))
                    times[name][step] += receive(LOOPS[name], connection)
    finally:
        for process, connection in workers.values():
            if process.is_alive():
                connection.send(None)
            process.join(timeout=60)
    return {name: {step: statistics.median(t) for step, t in by_step.items()} for name, by_step in times.items()}


def receive(what, connection):
    """The next message of the timing process of `what`; its failure as one error."""
    try:
        return connection.recv()
    except EOFError:
        raise RuntimeError(f"the process timing {what} failed (its traceback is above)") from None


def measure(settings=Settings(), data_root=None, progress=print):
    """Run every loop; returns the record (dict)."""
    s = settings
    started = time.time()
    record = {"settings": asdict(s), "matmul_gflops": round(matmul_gflops(), 1),
              "timing": f"one process per loop, taking turns of {TURN} timed calls of each step "
                        f"(after an untimed one); medians"}
    seconds = interleaved_seconds(s, data_root)
    for name, label in LOOPS.items():
        t = seconds[name]
        if name == "fast":
            record["fast"] = {"maml_seconds": t["maml"], "proto_seconds": t["proto"]}
            record["proto_nchw_seconds"] = t["proto_nchw"]
            progress(f"{label}: MAML {1000 * t['maml']:.0f} ms/it, ProtoNet {1000 * t['proto']:.0f} ms/episode "
                     f"({1000 * t['proto_nchw']:.0f} ms in NCHW)")
        else:
            record[name] = {"maml_seconds": t["maml"], "maml_sampling_seconds": t["maml_sampling"],
                            "proto_seconds": t["proto"], "proto_sampling_seconds": t["proto_sampling"]}
            progress(f"{label}: MAML {1000 * t['maml']:.0f} ms/it (sampling {1000 * t['maml_sampling']:.0f} ms), "
                     f"ProtoNet {1000 * t['proto']:.0f} ms/episode (sampling {1000 * t['proto_sampling']:.0f} ms)")
    maml_seconds, proto_seconds = record["fast"]["maml_seconds"], record["fast"]["proto_seconds"]
    nchw_seconds = record["proto_nchw_seconds"]

    # the same tasks and weights in this process, for the gradients and the FLOP counts
    loop = Loop("fast", s, data_root)
    model, maml, maml_tasks, proto_tasks = loop.model, loop.maml, loop.maml_tasks, loop.proto_tasks
    embedder, adam, proto_logits = loop.embedder, loop.adam, loop.proto_logits

    def fast_embed(x):
        return fast.conv4_embed(embedder, x)

    # same tasks, same weights: meta-gradients of both MAML loops
    reference_grads = meta_gradients(model, lambda: maml_reference_step(model, maml, maml_tasks, s), s.seed)
    fast_grads = meta_gradients(model, lambda: maml_fast_step(model, loop.maml_episodes, s), s.seed)
    differences = max_differences(fast_grads, reference_grads)
    record["maml_grad_difference_by_parameter"] = differences
    record["maml_max_abs_grad_difference"] = max(differences.values())
    # a convolution's bias before batch norm has an exact meta-gradient of 0: both loops return
    # float32 rounding noise there, learn2learn's ~1e-5
    record["maml_max_abs_grad_difference_without_conv_biases"] = max(
        d for name, d in differences.items() if not name.endswith("conv.bias"))
    # ... so both are also measured against the float64 meta-gradient of the same tasks and weights
    model64 = copy.deepcopy(model).double()
    exact = meta_gradients(model64, lambda: maml_reference_step(
        model64, l2l.algorithms.MAML(model64, lr=s.fast_lr), Float64Tasks(maml_tasks), s), s.seed)
    record["maml_fast_error_by_parameter"] = max_differences(fast_grads, exact)
    record["maml_reference_error_by_parameter"] = max_differences(reference_grads, exact)
    record["maml_fast_max_abs_error"] = max(record["maml_fast_error_by_parameter"].values())
    record["maml_reference_max_abs_error"] = max(record["maml_reference_error_by_parameter"].values())

    # ProtoNet: gradient of one episode (the fast path's in NCHW is bitwise learn2learn's), and
    # each layout's distance from the float64 gradient of the same episode (conv biases before
    # batch norm apart: their exact gradient is 0)
    def proto_gradient(net, embed, tasks, dtype=torch.float32):
        random.seed(s.seed)
        net.zero_grad()
        x, y = tasks.sample()
        sx, sy, qx, qy = data.split_support_query(x.to(dtype), y, s.proto_shots)
        embeddings = embed(torch.cat([sx, qx]))
        F.cross_entropy(proto_logits(embeddings[: len(sx)], sy, embeddings[len(sx):], s.proto_ways), qy).backward()
        return {name: p.grad.clone() for name, p in net.named_parameters()}

    nchw = proto_gradient(embedder, fast_embed, loop.proto_episodes)
    record["proto_max_abs_grad_difference"] = max(max_differences(
        nchw, proto_gradient(embedder, embedder, proto_tasks)).values())
    cl_embedder = copy.deepcopy(embedder).to(memory_format=torch.channels_last)
    embedder64 = copy.deepcopy(embedder).double()
    exact = proto_gradient(embedder64, lambda x: fast.conv4_embed(embedder64, x), loop.proto_episodes, torch.float64)
    kept = [name for name in exact if not name.endswith("conv.bias")]
    for key, grads in (("proto_nchw_grad_error", nchw), ("proto_grad_error", proto_gradient(
            cl_embedder, lambda x: fast.conv4_embed(cl_embedder, x), loop.proto_episodes))):
        record[key] = float(torch.cat([(grads[n].double() - exact[n]).flatten() for n in kept]).norm()
                            / torch.cat([exact[n].flatten() for n in kept]).norm())

    # FLOPs of one iteration, counted on the reference loops (the same arithmetic, done faster)
    maml_flops = flops(lambda: maml_reference_step(model, maml, maml_tasks, s))
    proto_flops = flops(lambda: proto_step(embedder, adam, proto_logits, *proto_tasks.sample(), s))
    record["maml_gflop_per_iteration"] = maml_flops / 1e9
    record["proto_gflop_per_episode"] = proto_flops / 1e9
    for loop in ("reference_png", "reference_default_malloc", "reference", "fast"):
        r = record[loop]
        r["maml_gflops"] = maml_flops / r["maml_seconds"] / 1e9
        r["proto_gflops"] = proto_flops / r["proto_seconds"] / 1e9
    # speed-ups over learn2learn's loops as its examples run them (PNG per image, default malloc)
    record["maml_speedup"] = record["reference_png"]["maml_seconds"] / maml_seconds
    record["proto_speedup"] = record["reference_png"]["proto_seconds"] / proto_seconds
    record["proto_nchw_speedup"] = record["reference_png"]["proto_seconds"] / nchw_seconds
    record["maml_speedup_vs_cache"] = record["reference_default_malloc"]["maml_seconds"] / maml_seconds
    record["proto_speedup_vs_cache"] = record["reference_default_malloc"]["proto_seconds"] / proto_seconds
    record["maml_speedup_vs_tuned_malloc"] = record["reference"]["maml_seconds"] / maml_seconds
    record["proto_speedup_vs_tuned_malloc"] = record["reference"]["proto_seconds"] / proto_seconds
    record["environment"] = environment()
    record["wall_seconds"] = round(time.time() - started, 1)
    return record


def environment():
    """The CPU run's environment, with the date and the load average at the end of the timing."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {**harness.environment(torch.device("cpu")), "date": datetime.now().isoformat(timespec="seconds"),
            "load_average": load}


def report(record):
    """The record as a short table."""
    s = record["settings"]
    rows = [("", "MAML ms/it", "GFLOP/s", "ProtoNet ms/ep", "GFLOP/s")]
    for label, key in (("learn2learn loop (PNG per image)", "reference_png"),
                       ("learn2learn loop on the uint8 cache", "reference_default_malloc"),
                       ("the same + keep_freed_memory", "reference"), ("fast path", "fast")):
        r = record[key]
        rows.append((label, f"{1000 * r['maml_seconds']:.0f}", f"{r['maml_gflops']:.1f}",
                     f"{1000 * r['proto_seconds']:.0f}", f"{r['proto_gflops']:.1f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"MAML Omniglot {s['maml_ways']}w{s['maml_shots']}s, meta-batch {s['meta_batch_size']}, second order; "
             f"ProtoNet {s['proto_ways']}w{s['proto_shots']}s{s['proto_queries']}q episodes; "
             f"{record['environment']['torch_threads']} threads"]
    lines += [f"{r[0]:<{width}}  {r[1]:>10}  {r[2]:>7}  {r[3]:>14}  {r[4]:>7}" for r in rows]
    lines.append(f"speed-up over the learn2learn loop: MAML {record['maml_speedup']:.2f}x, "
                 f"ProtoNet {record['proto_speedup']:.2f}x (over it on the uint8 cache: "
                 f"{record['maml_speedup_vs_cache']:.2f}x, {record['proto_speedup_vs_cache']:.2f}x; "
                 f"with keep_freed_memory too: {record['maml_speedup_vs_tuned_malloc']:.2f}x, "
                 f"{record['proto_speedup_vs_tuned_malloc']:.2f}x)")
    lines.append(f"ProtoNet's fast path in NCHW (channels_last=False; the default is channels-last): "
                 f"{1000 * record['proto_nchw_seconds']:.0f} ms/episode, {record['proto_nchw_speedup']:.2f}x; "
                 f"gradient of one episode against float64 (relative): channels-last "
                 f"{record['proto_grad_error']:.1e}, NCHW {record['proto_nchw_grad_error']:.1e}")
    lines.append(f"MAML meta-gradient, same tasks and weights: max |fast - learn2learn| = "
                 f"{record['maml_max_abs_grad_difference']:.2e}; without the conv biases before batch norm "
                 f"(exact gradient 0, rounding noise in both loops): "
                 f"{record['maml_max_abs_grad_difference_without_conv_biases']:.2e}; max |loop - float64 "
                 f"meta-gradient|: fast path {record['maml_fast_max_abs_error']:.2e}, learn2learn's loop "
                 f"{record['maml_reference_max_abs_error']:.2e}")
    lines.append(f"ProtoNet gradient of one episode, fast path against learn2learn's loop: max difference "
                 f"{record['proto_max_abs_grad_difference']:.2e}")
    lines.append(f"float32 matmul 2048x2048: {record['matmul_gflops']:.0f} GFLOP/s")
    return "\n".join(lines)


def write_record(record, folder, prefix="speed"):
    """Write `record` as `folder/<prefix>-<host>-torch<version>-<time>.json`; returns the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"{prefix}-{platform.node() or 'host'}-torch{torch.__version__.split('+')[0]}-{stamp}.json"
    harness.write_json(path, record)
    return path
