"""Run directories, checkpoints, evaluation with 95% confidence intervals, and `load()`.

A run directory `runs/<recipe>/<YYYYmmdd-HHMMSS>-s<seed>/` holds:
    config.json    the resolved config (with the recipe name)
    env.json       versions, git commit, device, host
    metrics.jsonl  one JSON object per log step
    ckpt.pt        latest checkpoint: model, optimizer, iteration, best validation, config
    best.pt        weights with the best validation accuracy (what gets tested)
    result.json    the final meta-test: accuracy and ci95 as fractions, episodes, ways, shots, split

Checkpoints also record the --data-root the run was started with, which --resume, `eval`
and `load()` use when none is given. JSON files hold null where a number is not finite.

Under torchrun (see l2l_recipes.distributed) rank 0 alone writes the directory and shows
progress; evaluation is split over the processes and gathered, and every decision taken
from it (the best weights, stopping) is the same on every process.
"""
import dataclasses
import fcntl
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm, trange

from l2l_recipes import data, distributed, plain
from l2l_recipes.config import as_ran
from l2l_recipes.errors import UserError
from l2l_recipes.registry import get_recipe


def prepare_to_train(device):
    """Set this process up to train on `device`: freed activation buffers kept (keep_freed_memory),
    its memory capped so that a step too large fails in one line, not by the OOM killer (cap_memory)."""
    keep_freed_memory()
    cap_memory(device)


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory instead of handing it back to the OS.

    Every training step allocates and frees the same large activation buffers; by default
    glibc serves each with a fresh mmap and unmaps it on free, so every step pays page
    faults (measured here: 40% of a ProtoNet 60-way episode's time, in the kernel). Keeping
    the memory makes that episode 1.8x faster on a 2-core CPU. No-op off glibc.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_top_pad, 1 << 28)


_memory_cap = None  # the RLIMIT_DATA soft limit cap_memory() set last


def cap_memory(device):
    """On Linux, training on the CPU: cap this process's data memory (RLIMIT_DATA) at what it holds
    now plus 90% of what the machine has free (never above a cap set before it, e.g. by `prlimit`), so
    that a step too large for the machine fails as an allocation error, which the CLI reports in
    one line (`out_of_memory`), instead of the kernel's OOM killer ending the process without a
    word ("Killed", exit status 137)."""
    global _memory_cap
    if sys.platform != "linux" or torch.device(device).type != "cpu":
        return
    import resource
    try:
        def kib(path, key):
            lines = Path(path).read_text().splitlines()
            return int(next(line for line in lines if line.startswith(key + ":")).split()[1])
        free = kib("/proc/meminfo", "MemAvailable") + kib("/proc/meminfo", "SwapFree")
        cap = 1024 * (kib("/proc/self/status", "VmData") + free * 9 // 10)  # the kernel keeps a reserve
    except (OSError, StopIteration, ValueError, IndexError):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if soft not in (resource.RLIM_INFINITY, _memory_cap):
        cap = min(cap, soft)  # someone else's cap
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    _memory_cap = cap


def out_of_memory(error):
    """The one-line UserError for `error` when it is a failed allocation (CPU or GPU), else None."""
    text = str(error)
    if isinstance(error, MemoryError) or "can't allocate memory" in text or "not enough memory" in text:
        where = "this machine's memory"
    elif isinstance(error, torch.cuda.OutOfMemoryError):
        where = "the GPU's memory"
    else:
        return None
    size = re.search(r"allocate (\d+) bytes", text)
    size = f" (a {int(size[1]) / 2 ** 30:.1f} GiB block)" if size else ""
    return UserError(f"out of memory: a training step or test task of this run does not fit in {where}{size}: "
                     f"lower its sizes (run: --set ways, shots, queries, train_ways or meta_batch_size; eval: "
                     f"--ways, --shots, --queries)")


def object_state(obj):
    """A tracked object's checkpoint entry: its state_dict(), or a plain object's attributes."""
    return obj.state_dict() if hasattr(obj, "state_dict") else dict(vars(obj))


def load_object_state(obj, state):
    """Restore what object_state() saved; a plain object's saved attributes must be exactly its
    own (KeyError otherwise: the checkpoint is another recipe's or another version's)."""
    if hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
    elif set(state) != set(vars(obj)):
        raise KeyError(f"{type(obj).__name__} holds {sorted(vars(obj))}, the checkpoint {sorted(state)}")
    else:
        vars(obj).update(state)


def rng_state():
    """Every random number generator a run draws from: Python's (task sampling), NumPy's, torch's."""
    import random

    import numpy as np
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                      has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import random

    import numpy as np
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _git_commit():
    try:
        here = Path(__file__).parent
    except NameError:  # an exported file's code run by exec(): no file to ask git about
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is None or out.returncode != 0:  # no git, or a copy without its history: the sender may say
        return os.environ.get("L2L_RECIPES_GIT_COMMIT")
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    """Versions, git commit, device and host: what env.json records."""
    import learn2learn
    import torchvision
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "learn2learn": learn2learn.__version__,
        "git_commit": _git_commit(),
        "device": str(device),
        "world_size": distributed.world_size(),
        "backend": distributed.backend(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "hostname": platform.node(),
        "command": " ".join(["l2l-recipes"] + sys.argv[1:]),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def json_safe(obj):
    """`obj` with each non-finite float (NaN, infinity: not JSON) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def read_json(path, fix):
    """The JSON object in file `path`, or a one-line UserError naming it, why, and `fix`."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # missing, unreadable, cut short, not JSON, not UTF-8
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0][:120]
        raise UserError(f"cannot read {path} ({type(e).__name__}: {reason}): {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds no JSON object: {fix}")
    return value


# the run directories this process trains, each held with an exclusive flock on the directory
# itself (no file added to it): realpath -> file descriptor; released when the process ends
_HELD = {}


def hold_run_dir(path):
    """Claim run directory `path` for this process: a UserError if another process trains it now
    (two `run --resume` of one run, or one beside the bench that trains it). No-op if the
    directory does not exist yet or the file system has no locks."""
    key = os.path.realpath(path)
    if key in _HELD:
        return
    try:
        fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"run {path} is being trained by another process right now: let it finish, or stop it "
                        f"(its checkpoint is kept) and resume the run once") from None
    except OSError:  # a file system without flock: go on unclaimed, as before
        os.close(fd)
        return
    _HELD[key] = fd


def release_run_dir(path):
    """Give up the claim of hold_run_dir (when the run's process is done with it)."""
    fd = _HELD.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)


def write_json(path, obj):
    """Write `obj` as indented JSON (null for non-finite floats) through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


class Stopped(UserError):
    """A run stopped by SIGINT or SIGTERM, its checkpoint saved; the message ends with
    "Resume with: <command>"."""


class Run(plain.PlainRun):
    """A run directory being written: config, environment, metrics, checkpoints.

    create() makes the directory at once, empty; config.json, written with the first log line
    or checkpoint, marks it as a run (a run that fails while loading its data leaves it empty:
    remove_if_empty). `data_root`, `download` and `progress` are the machine-side options a
    recipe's train() passes on to the data loaders (progress also to their decoding bars);
    `command` is what resumes the run, before `--resume RUN_DIR`. Under torchrun, every process
    holds a Run with the same path; only rank 0 writes and shows progress.
    """

    def __init__(self, path, recipe_name, cfg, device, data_root=None, download=False, progress=True,
                 max_minutes=None, checkpoint_every=100, command="l2l-recipes run"):
        super().__init__(path, recipe_name, cfg, device, data_root, download)
        self.progress = progress and distributed.is_main()
        data.PROGRESS["decoding"] = self.progress
        self.command = command
        self.max_minutes = max_minutes  # wall-time budget for training, None for none
        self.checkpoint_every = checkpoint_every  # iterations between checkpoints (also at each validation)
        self.iterations_done = 0
        self.resume_state = None  # the checkpoint a resumed run continues from
        self.start_iteration = 0
        self.stop_signal = None  # set by SIGINT / SIGTERM during iterations()
        self._checkpointed_at = None
        self._made_parents = []  # the folders above the run directory that create() made
        self.saved_iteration = None  # the iteration of the ckpt.pt on disk, None before the first

    @classmethod
    def resume(cls, run_dir, device, **options):
        """The run of `run_dir`, to continue from its ckpt.pt (its config is the checkpoint's), with
        the data root and the time budget (--max-minutes, of training in all) it was started with,
        unless `data_root` or `max_minutes` is given; a run its budget stopped goes on without one."""
        run_dir = Path(run_dir)
        state = distributed.on_main(_claim_resumable, run_dir)  # nodes need no shared disk
        trained, world = state.get("world_size", 1), distributed.world_size()
        if trained != world:
            quoted = shlex.quote(str(run_dir))
            how = (f"torchrun --nproc_per_node={trained} -m l2l_recipes.cli run --resume {quoted} (or "
                   f"--nnodes x --nproc_per_node = {trained})" if trained > 1
                   else f"l2l-recipes run --resume {quoted}, without torchrun")
            raise UserError(f"run {run_dir} was trained with {trained} process(es), not {world}: resume it "
                            f"with as many, e.g. {how}")
        cfg = _config_of(state, run_dir / "ckpt.pt")
        if "rng" not in state:
            raise UserError(f"{run_dir / 'ckpt.pt'} was written by an exported recipe file, which keeps no state "
                            f"to resume from: run the file again (`l2l-recipes eval` and `predict` take its weights)")
        options["data_root"] = options.get("data_root") or _recorded_root(state)
        options["max_minutes"] = options.get("max_minutes") or state.get("max_minutes")
        run = cls(run_dir, state["recipe"], cfg, device, **options)
        run.resume_state = state
        if distributed.is_main():
            if not (run_dir / "config.json").is_file():  # lost: the checkpoint's config is the run's
                write_json(run_dir / "config.json", {"recipe": run.recipe, **dataclasses.asdict(cfg)})
            for partial in run_dir.glob(".*.tmp*"):  # writes cut short by a crash
                partial.unlink()
        return run

    def track(self, model, optimizer=None, **stateful):
        """Name what checkpoints hold: model, optimizer and `stateful` objects: ones with
        state_dict() (e.g. scheduler=...) or plain ones, whose attributes are their state. On a
        resumed run, also load them and every random number generator state from the checkpoint."""
        super().track(model, optimizer, **stateful)
        state = self.resume_state
        if state is None:
            return
        try:
            model.load_state_dict(state["model"])
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
            for name, obj in stateful.items():
                load_object_state(obj, state[name])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"checkpoint {self.path / 'ckpt.pt'} does not fit recipe {self.recipe} "
                            f"({str(e).splitlines()[0][:160]})") from None
        set_rng_state(state.get("rng_by_rank", [state["rng"]])[distributed.rank()])
        self.best_val = state.get("best_val_score", state.get("best_val_accuracy"))
        self.ended = state.get("training_ended", False)
        self.start_iteration = self.iterations_done = self.saved_iteration = state["iteration"]
        self.started = time.time() - state["elapsed_seconds"]
        if not distributed.is_main():
            return
        _note_continuation(self.path, state["iteration"], self.device)  # here, once the checkpoint fits
        # drop metrics logged after the checkpoint: those iterations run again; and lines a crash
        # cut short (appends are not synced), which nothing could read
        metrics = self.path / "metrics.jsonl"
        kept, unreadable = [], 0
        for line in metrics.read_text(errors="replace").splitlines() if metrics.is_file() else []:
            try:
                after = json.loads(line)["iteration"] > self.start_iteration
            except (ValueError, KeyError, TypeError):
                unreadable += 1
                continue
            if not after:
                kept.append(line)
        if unreadable:
            tqdm.write(f"note: {unreadable} unreadable line(s) of {metrics} dropped (cut short by a crash?)")
        tmp = metrics.with_name(f".{metrics.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics)
        tqdm.write(f"resuming {self.path} after iteration {self.start_iteration}")

    def iterations(self, total):
        """Yield iterations with a progress bar, from 1 (or after a resumed checkpoint) to `total`.

        Stops after the iteration at which `validation_due` found the time budget spent (so
        that iteration is validated). On SIGINT or SIGTERM the current iteration finishes, a
        checkpoint is written and a UserError says how to resume (under torchrun: on every
        process, after the iteration in which any of them got the signal).
        """
        if self.tracked is None:
            raise RuntimeError("a recipe must call run.track(model, optimizer, ...) before run.iterations()")
        if self.ended:  # a resumed run whose stopping rule had already ended training
            return
        previous = self._catch_stop_signals()
        try:
            for iteration in trange(self.start_iteration + 1, total + 1, initial=self.start_iteration,
                                    total=total, desc="train", disable=not self.progress):
                yield iteration
                self.iterations_done = iteration
                stop = distributed.any_rank(self.stop_signal)
                if stop or self.ended or (self.checkpoint_every and iteration % self.checkpoint_every == 0):
                    self.checkpoint(iteration)
                if self.ended:
                    return
                if stop:  # every process stops; rank 0 alone prints it
                    error = Stopped(f"stopped by {self.stop_signal or 'a signal to another process'} after "
                                      f"iteration {iteration}; checkpoint saved. Resume with: "
                                      f"{self._resume_command()}")
                    error.quiet = not distributed.is_main()
                    raise error
                if self.stopped_early:
                    if distributed.is_main():
                        tqdm.write(f"time budget of {self.max_minutes} minutes spent after iteration {iteration}")
                    return
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _catch_stop_signals(self):
        def stop(signum, frame):
            if self.stop_signal:  # a second signal: stop at once
                raise KeyboardInterrupt
            self.stop_signal = signal.Signals(signum).name
            if distributed.is_main():
                tqdm.write(f"{self.stop_signal} received: stopping after this iteration")
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, stop)
        return previous

    def _resume_command(self):
        world = distributed.world_size()
        launcher = f"torchrun --nproc_per_node={world} -m l2l_recipes.cli run" if world > 1 else self.command
        return f"{launcher} --resume {shlex.quote(str(self.path))}"

    def validation_due(self, iteration, interval, total):
        """True every `interval` iterations, at the last one, and when the time budget is spent
        (on any process: all must validate together)."""
        if self.max_minutes is not None and distributed.any_rank(time.time() - self.started >= 60 * self.max_minutes):
            self.stopped_early = iteration < total
        return super().validation_due(iteration, interval, total) or self.stopped_early

    @classmethod
    def create(cls, out, recipe_name, cfg, device, **options):
        """A new run in a directory made now, `out/<recipe>/<time>-s<seed>`, or with `-2`, `-3`, ...
        added when another run took that name in the same second (an existing directory is never
        reused). An --out that cannot be written is a UserError, before any training. Under
        torchrun, rank 0 makes the directory and its path is every process's."""
        def new_path():
            parent = Path(out) / recipe_name
            made = [d for d in (parent, *parent.parents) if not d.exists()]  # deepest first
            path = plain.claim_folder(parent / f"{datetime.now():%Y%m%d-%H%M%S}-s{cfg.seed}")
            hold_run_dir(path)
            return path, made
        path, made = distributed.on_main(new_path)
        run = cls(path, recipe_name, cfg, device, **options)
        run._made_parents = made
        return run

    def remove_if_empty(self):
        """Remove the run directory if nothing was written into it yet, and the parents create()
        made for it if they are empty (rank 0); True if removed."""
        if not distributed.is_main():
            return False
        release_run_dir(self.path)
        for k, folder in enumerate([self.path, *self._made_parents]):
            try:
                folder.rmdir()  # only ever removes an empty directory
            except OSError:
                return k > 0
        return True

    def folder(self):  # made by create(), completed by the first log or checkpoint
        self._materialise()
        return self.path

    def _materialise(self):
        if not distributed.is_main() or (self.path / "config.json").exists():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        hold_run_dir(self.path)
        write_json(self.path / "env.json", environment(self.device))
        # config.json last: its presence marks the directory as complete
        write_json(self.path / "config.json", {"recipe": self.recipe, **dataclasses.asdict(self.cfg)})

    # ---- the recipes' plumbing: the same numbers in one process and under torchrun

    def share(self, items):
        """This process's share of a meta-batch's `items` (a list or tensor; all of them in one
        process): each process trains its own share, together the whole meta-batch."""
        return share(items)

    def mine(self, i):
        """True when item `i` of a meta-batch is this process's (for loops that draw as they go)."""
        return distributed.mine(i)

    def reduce_gradients(self, parameters):
        """Sum the parameters' gradients over the processes (no-op in one process): with each
        task's loss divided by the global meta-batch size, the single-process meta-gradient."""
        distributed.all_reduce_gradients(parameters)

    def total(self, *shares):
        """The floats `shares` (this process's parts of a meta-batch's metrics) summed over the
        processes, each unchanged in one process; every process must call it. One float for one
        argument, else a tuple: `loss, accuracy = run.total(loss, accuracy)`."""
        return super().total(*distributed.all_reduce_floats(shares))

    def sum_in_place(self, tensors):
        """Sum each tensor in place over the processes (no-op in one process)."""
        distributed.all_reduce(tensors)

    def log(self, iteration, **metrics):
        """Append one metrics line and print it (rank 0); a non-finite loss stops the run, naming
        the iteration (on every process: recipes log the loss of the whole meta-batch)."""
        loss = metrics.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise self._diverged(f"loss is {loss}", iteration)
        if not distributed.is_main():
            return
        self._materialise()
        row = {"iteration": iteration, "time": round(time.time() - self.started, 3), **metrics}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items()))
        sys.stdout.flush()

    def checkpoint(self, iteration):
        """Write ckpt.pt with everything track() named, for resuming after `iteration`.

        Under torchrun (a collective call): average the batch norm statistics, check that every
        process holds the same weights, and record every process's random number generators.
        """
        if self._checkpointed_at == iteration:
            return
        self._checkpointed_at = iteration
        model, optimizer, stateful = self.tracked
        per_rank = {}
        if distributed.world_size() > 1:
            distributed.average_buffers(model)
            weights = sum(float(t.double().sum()) for t in model.state_dict().values()).hex()
            gathered = distributed.gather([(weights, rng_state())])
            if len({w for w, _ in gathered}) > 1:
                raise RuntimeError(f"the processes' weights differ at iteration {iteration}: a recipe "
                                   f"updates them without distributed.all_reduce_gradients")
            per_rank = {"rng_by_rank": [rng for _, rng in gathered]}
        self.save("ckpt.pt", model, iteration, optimizer, best_val_score=self.best_val,
                  **{name: object_state(obj) for name, obj in stateful.items()}, **per_rank)

    def save(self, name, model, iteration, optimizer=None, **extra):
        """Write checkpoint `name` (ckpt.pt or best.pt) atomically (rank 0); non-finite weights are
        refused, so a diverged run never replaces its last good checkpoint."""
        if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
            raise self._diverged("non-finite weights", iteration)
        state = {
            "format": self.checkpoint_format,
            "recipe": self.recipe,
            "config": dataclasses.asdict(self.cfg),
            "iteration": iteration,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": rng_state(),
            "elapsed_seconds": time.time() - self.started,
            "world_size": distributed.world_size(),
            "training_ended": self.ended,
            # a resume keeps a budget not yet spent (elapsed_seconds counts against it); resuming a
            # run its budget stopped means going on without one (or with a new --max-minutes)
            "max_minutes": None if self.stopped_early else self.max_minutes,
            "data_root": str(Path(self.data_root).expanduser().resolve()) if self.data_root else None,
            **extra,
        }
        if name == "ckpt.pt":
            self.saved_iteration = iteration
        if not distributed.is_main():
            return
        self._materialise()
        data.atomic_save(state, self.path / name)

    def _diverged(self, what, iteration):
        kept = (f"the last good checkpoint, {self.path / 'ckpt.pt'} of iteration {self.saved_iteration}, is kept"
                if self.saved_iteration is not None else "no checkpoint was written yet")
        return UserError(f"{what} at iteration {iteration}: training diverged; {kept} (lower the learning rate)")

    def evaluate(self, predictor, tasks):
        """The validation of PlainRun.validate, the same on every process: the batch norm
        statistics averaged, the evaluation split over the processes and gathered."""
        distributed.average_buffers(predictor.model)
        return predictor.evaluate(tasks, desc="val", progress=self.progress)


class Predictor(plain.Predictor):
    """A trained model that adapts to a support set and scores a query set (plain.Predictor),
    evaluated in batches of tasks and over torchrun's processes.

    Attributes: `transform` (PIL image as read from the dataset's files -> input tensor, as
    in training), `test_classes` (the test split's class names), `cfg`, `model`, `device`.
    Classification recipes subclass it and implement `predict`; recipes measured otherwise
    (regression error, reinforcement-learning return) override `metric`, `higher_is_better`,
    `test_tasks` and `evaluate`.
    """
    # recipes with a fast path define predict_tasks(support_x, support_y, query_x): `predict` for
    # several tasks of one shape at once (each part with a leading task dimension), logits
    # [tasks, queries, ways]
    predict_tasks = None
    # whether `predict` normalises the queries with their own batch's statistics (MAML and its kin,
    # as their papers test them): a query's logits then depend on the other queries given with it
    transductive = False
    alone = False  # evaluate() scores each query with `predict_each` (eval --non-transductive)

    @property
    def transform(self):
        return data.dataset_module(self.cfg.dataset).transform

    @property
    def test_classes(self):
        return data.dataset_module(self.cfg.dataset).classes("test", self.data_root)

    @property
    def batched(self):
        """Whether evaluation adapts many tasks at once: engine=fast and a recipe's predict_tasks."""
        return getattr(self.cfg, "engine", None) == "fast" and self.predict_tasks is not None

    def predict_each(self, support_x, support_y, query_x):
        """Logits [queries, ways] of each query as if it were the only one: `predict`'s unless the
        model is `transductive`; then each query is scored in one batch with the support images,
        so that it takes their batch statistics (Nichol et al. 2018's non-transductive test)."""
        if not self.transductive:
            return self.predict(support_x, support_y, query_x)
        if not self.batched:
            return torch.cat([self.predict(support_x, support_y, torch.cat([support_x, q[None]]))[-1:]
                              for q in query_x])
        n, channels, height, width = support_x.shape
        chunk = tasks_at_once(self.cfg, 2 * n + 1, channels, height, width)  # support + (support, query)
        logits = []
        for start in range(0, len(query_x), chunk):
            q = query_x[start:start + chunk, None]
            sx = support_x.expand(len(q), *support_x.shape)
            batches = torch.cat([sx, q], 1)  # [k, support + 1, C, H, W]
            logits.append(self.predict_tasks(sx, support_y.expand(len(q), -1), batches)[:, -1])
        return torch.cat(logits)

    def evaluate(self, tasks, desc="eval", progress=True):
        """{metric: mean over `tasks`, "ci95": half-width of its 95% CI, "loss": mean query
        cross-entropy} (accuracy as a fraction)."""
        return evaluate(self, tasks, self.cfg.shots, desc=desc, progress=progress)


def share(items):
    """This process's share of a meta-batch or of evaluation tasks (a list, range or tensor):
    the items i with i % world_size == rank, that is all of them in one process."""
    return items[distributed.rank()::distributed.world_size()]


def gather(values):
    """Every process's `values` (computed for its `share` of some items) merged in item order:
    the list one process would have computed."""
    return distributed.gather(values)


def evaluate(predictor, tasks, shots, desc="eval", progress=True):
    """{"accuracy": mean query accuracy over `tasks` (a finite Taskset), "ci95": its 95% CI
    (fractions), "loss": mean query cross-entropy}. Under torchrun each process scores its
    `share` of the tasks; the per-task values are gathered."""
    return summarise(task_scores(predictor, tasks, share(range(len(tasks))), shots, desc, progress))


# batched evaluation: as many tasks at once as keep one layer's activations under this many floats
ACTIVATIONS_AT_ONCE = 2 ** 26


def tasks_at_once(cfg, images, channels, height, width):
    """How many tasks of `images` images [channels, height, width] to adapt in one batched call."""
    return max(1, ACTIVATIONS_AT_ONCE // (images * max(channels, getattr(cfg, "hidden_size", 64)) * height * width))


def task_scores(predictor, tasks, indices, shots, desc="eval", progress=False):
    """(query accuracy, query cross-entropy) of each task tasks[i], i in `indices`: task by task
    with `predictor.predict`, or in chunks of tasks with `predict_tasks` where the predictor is
    `batched` (the same per-task values up to float rounding)."""
    chunk, alone = 1, predictor.alone
    if predictor.batched and indices and not alone:
        chunk = tasks_at_once(predictor.cfg, *tasks[indices[0]][0].shape)
    scores = []
    with tqdm(total=len(indices), desc=desc, leave=False, disable=not progress) as bar:
        for start in range(0, len(indices), chunk):
            x, y = map(torch.stack, zip(*(tasks[i] for i in indices[start:start + chunk])))
            sx, sy, qx, qy = data.split_support_query(x.to(predictor.device), y.to(predictor.device), shots)
            if alone:
                logits = predictor.predict_each(sx[0], sy[0], qx[0])[None]
            elif predictor.batched:
                logits = predictor.predict_tasks(sx, sy, qx)
            else:
                logits = predictor.predict(sx[0], sy[0], qx[0])[None]
            scores += plain.query_scores(logits, qy)
            bar.update(len(qy))
    return scores


def summarise(scores):
    """evaluate()'s result from this process's (accuracy, loss) per task, gathered over the
    processes: mean accuracy, its 95% CI, mean loss."""
    return plain.summary(gather(scores))


def read_checkpoint(path):
    """Load a checkpoint file, or raise a one-line UserError naming it and the reason."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        reason = str(e).splitlines()[0].split(". ")[0][:120]
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}: {reason}): "
                        f"restore it from a copy, or train again with `l2l-recipes run`") from None
    expected = plain.PlainRun.checkpoint_format
    if not isinstance(state, dict) or state.get("format") != expected:
        raise UserError(f"checkpoint {path} is not an l2l-recipes checkpoint of format {expected}: "
                        f"pass a run folder that `l2l-recipes run` wrote")
    return state


def recipe_module(name):
    """The module holding recipe `name`'s Config, build_model and Predictor (the one registry
    lookup of `load` and `meta_test`; `l2l-recipes export` writes a file's own in its place)."""
    return get_recipe(name).load_module()


def _resumable(run_dir):
    """The state of run_dir's ckpt.pt to resume from; a UserError for a finished run or one whose
    config.json disagrees with the checkpoint (the checkpoint's config is what a resume trains)."""
    if (run_dir / "result.json").is_file():
        raise UserError(f"run {run_dir} is finished (it has result.json): nothing to resume; to test it "
                        f"again, run `l2l-recipes eval {shlex.quote(str(run_dir))}`")
    if not (run_dir / "ckpt.pt").is_file():
        raise UserError(f"run {run_dir} has no ckpt.pt: it stopped before its first checkpoint, so there is "
                        f"nothing to resume; start it again with `l2l-recipes run`")
    state = read_checkpoint(run_dir / "ckpt.pt")
    path = run_dir / "config.json"
    if path.is_file():
        try:
            written = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is unreadable ({e}): restore it to resume the run") from None
        recorded = json.loads(json.dumps(json_safe({"recipe": state.get("recipe"), **state.get("config", {})})))
        changed = sorted(k for k in {*written, *recorded} if written.get(k, ...) != recorded.get(k, ...)) \
            if isinstance(written, dict) else ["everything"]
        if changed:
            raise UserError(f"{path} disagrees with {run_dir / 'ckpt.pt'} on {', '.join(changed)}: a run resumes "
                            f"with its checkpoint's recipe and config; restore config.json, or start a new run")
    return state


def _claim_resumable(run_dir):
    """hold_run_dir, then _resumable: a run another process trains is neither read nor touched."""
    hold_run_dir(run_dir)
    return _resumable(run_dir)


def _note_continuation(run_dir, iteration, device):
    """Add to env.json's `continued` list where, when and with what the run continues after
    `iteration` (it may be another machine and device than the one that started it). An env.json
    lost or damaged is set aside (env.json.unreadable) and started again from this machine."""
    here = environment(device)
    try:
        env = read_json(run_dir / "env.json", "")
    except UserError as e:
        if (run_dir / "env.json").exists():
            os.replace(run_dir / "env.json", run_dir / "env.json.unreadable")
        tqdm.write(f"note: {str(e).rstrip(': ')}; a new env.json records this machine from iteration "
                   f"{iteration} on")
        env = {**here, "recreated_after_iteration": iteration}
    keep = ("device", "gpu", "processor", "cpu_count", "torch_threads", "world_size", "hostname", "torch",
            "git_commit", "command")
    env.setdefault("continued", []).append({"after_iteration": iteration,
                                            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                            **{key: here[key] for key in keep if key in here}})
    write_json(run_dir / "env.json", env)


def machines(env):
    """The machines a run trained on, in order, from its env.json: 'NVIDIA H200',
    'AMD EPYC (2 cores)' (each once)."""
    names = []
    for part in [env, *env.get("continued", [])]:
        name = part.get("gpu") or f"{part['processor']} ({part['cpu_count']} cores)"
        if name not in names:
            names.append(name)
    return names


def _recorded_root(state):
    """The --data-root a checkpoint's run was started with, if given and still a folder here."""
    root = state.get("data_root")
    return root if root and Path(root).is_dir() else None


def _config_of(state, path):
    """The recipe config stored in checkpoint `state` (read from `path`); a field the recipe gained
    after the run was written takes the value the run ran with (`config.as_ran`)."""
    name = state["recipe"]
    config = recipe_module(name).Config
    try:
        return config(**as_ran(config.__module__.rpartition(".")[2], state["config"]))
    except TypeError as e:
        raise UserError(f"checkpoint {path} does not match recipe {name}'s config ({e})") from None


def load(run_dir, device="auto", data_root=None):
    """The trained predictor of a run directory (best validation weights when recorded).

    Example:
        predictor = l2l_recipes.load("runs/protonet-omniglot-5w1s/20261122-101500-s42")
        logits = predictor.predict(support_x, support_y, query_x)
    """
    return _load(run_dir, device, data_root)[2]


def _read_run(run_dir):
    """(the recipe config.json names, the checkpoint's path, its state): best.pt when recorded."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    path = run_dir / "config.json"
    fix = "restore it from a copy of the run (or resume an unfinished run, which writes it again)"
    recipe = read_json(path, fix).get("recipe")
    if not isinstance(recipe, str):
        raise UserError(f"{path} names no recipe: {fix}")
    ckpt = run_dir / "best.pt"
    if not ckpt.is_file():
        ckpt = run_dir / "ckpt.pt"
    if not ckpt.is_file():
        raise UserError(f"run {run_dir} holds no weights (no best.pt or ckpt.pt): it stopped before its "
                        f"first checkpoint; train it again")
    state = read_checkpoint(ckpt)
    return recipe, ckpt, state


def _load(run_dir, device, data_root):
    """(the recipe config.json names, the checkpoint's path, the run's predictor), on the data
    root recorded with the run unless `data_root` is given; under torchrun rank 0 reads the
    files and sends them to every process (nodes need no shared disk)."""
    recipe, ckpt, state = distributed.on_main(_read_run, run_dir)
    name = state["recipe"]
    module = recipe_module(name)
    cfg = _config_of(state, ckpt)
    model = module.build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {ckpt} does not fit recipe {name}'s model "
                        f"({str(e).splitlines()[0]})") from None
    return recipe, ckpt, module.Predictor(cfg, model, plain.resolve_device(device), data_root or _recorded_root(state))


def publish(run_dir, dest):
    """Copy the tested model of `run_dir` to `dest` as a small run folder that `load`, `eval`
    and `predict` take: config.json, env.json, result.json and best.pt (weights, config,
    iteration; no optimizer or random number generator state)."""
    run_dir, dest = Path(run_dir), Path(dest)
    _, ckpt, state = _read_run(run_dir)
    if not (run_dir / "result.json").is_file():
        raise UserError(f"{run_dir} has no result.json: finish and test the run before publishing it")
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} is not empty: publish into a new folder")
    kept = {key: state[key] for key in ("format", "recipe", "config", "iteration", "model", "world_size")
            if key in state}
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "env.json", "result.json"):
            if (run_dir / name).is_file():
                (dest / name).write_text((run_dir / name).read_text())
        data.atomic_save({**kept, "published_from": str(run_dir), "checkpoint": ckpt.name}, dest / "best.pt")
    except OSError as e:
        raise UserError(f"cannot write {e.filename or dest} ({e.strerror}): publish into a folder you can "
                        f"write") from None
    return dest


def meta_test(run_dir, episodes=None, device="auto", data_root=None, progress=True, out_name=None,
              ways=None, shots=None, queries=None, steps=None, alone=False, **extra):
    """Meta-test a run's model on its fixed test tasks; writes the result to `out_name` and returns it.

    `ways` and `shots` test the model on other tasks than it was trained for (models that do
    not fix the number of ways: ProtoNet, Matching Networks, MetaOptNet, transfer; the others
    refuse other ways); `queries` scores another number of query images per class; `steps`
    adapts with another number of test-time steps (the gradient-based families); `alone` scores
    each query with the support images only (`Predictor.predict_each`; models with batch statistics
    at test time). `run` writes result.json; a later `eval` writes
    eval-[<ways>w<shots>s[<queries>q][<steps>steps]-][nontransductive-]<episodes>.json (<shots>s- for a
    recipe without ways), so it never replaces the run's recorded result.
    `extra` fields are added to the result; "checkpoint" names the one tested (best.pt, or
    ckpt.pt with a note on stderr where no validation wrote best.pt). Under torchrun every
    process evaluates its share of the tasks and returns the gathered result; rank 0 writes it.
    """
    recipe, ckpt, predictor = _load(run_dir, device, data_root)
    if ckpt.name != "best.pt" and distributed.is_main():
        print(f"note: {run_dir} has no best.pt (no validation finished): testing {ckpt.name}, "
              f"its last checkpoint", file=sys.stderr)
    data.PROGRESS["decoding"] = progress and distributed.is_main()
    options = {"ways": "w", "shots": "s", "queries": "q", "test_adaptation_steps": "steps"}  # -> the file's tag
    trained = {key: getattr(predictor.cfg, key) for key in options if hasattr(predictor.cfg, key)}
    asked = (("ways", ways), ("shots", shots), ("queries", queries), ("test_adaptation_steps", steps))
    setting = {key: value for key, value in asked if value is not None}
    if set(setting) - set(trained):
        missing = sorted(set(setting) - set(trained))
        raise UserError(f"recipe {recipe} has no {' or '.join(k.replace('_', ' ') for k in missing)} to change")
    if predictor.head and setting.get("ways", trained.get("ways")) != trained.get("ways"):
        raise UserError(f"this {predictor.head} model has a {trained['ways']}-way head: test it with --ways "
                        f"{trained['ways']}, or train a {setting['ways']}-way model (ProtoNet, Matching Networks, "
                        f"MetaOptNet and transfer models take any number of ways)")
    if alone and not predictor.transductive:
        raise UserError(f"{recipe} scores each query on its own already (no batch statistics at test time): "
                        f"test it without --non-transductive")
    predictor.alone = alone
    if setting:
        predictor.cfg = dataclasses.replace(predictor.cfg, **setting)
        extra = {**{f"trained_{key}": value for key, value in trained.items()}, **extra}
    cfg = predictor.cfg
    episodes = episodes or cfg.test_episodes
    try:
        tasks = predictor.test_tasks(episodes, cfg.test_seed)
    except UserError as e:  # data.taskset names --set's fix; here the setting is eval's
        if not setting:
            raise
        reason = str(e).split(": lower --set", 1)[0]
        raise UserError(f"{reason}: test with fewer {' or '.join(f'--{key}' for key in setting)}") from None
    started = time.time()
    result = {
        "recipe": recipe,
        "metric": predictor.metric, "higher_is_better": predictor.higher_is_better,
        **predictor.evaluate(tasks, desc="test", progress=progress),
        "episodes": episodes,
        **{key: getattr(cfg, key) for key in ("ways", "shots", "queries") if hasattr(cfg, key)},
        **({"test_adaptation_steps": cfg.test_adaptation_steps} if steps is not None else {}),
        **({"transductive": False} if alone else {}),
        "split": "test", "test_seed": cfg.test_seed, "seed": cfg.seed, "checkpoint": ckpt.name,
        "device": str(predictor.device), "eval_seconds": round(time.time() - started, 1),
        "run_dir": str(run_dir), **extra,
    }
    if distributed.is_main():
        tagged = [key for key in trained if key in ("ways", "shots") or key in setting]
        tag = "".join(f"{getattr(cfg, key)}{options[key]}" for key in tagged) + "-" if setting else ""
        tag += "nontransductive-" * alone
        path = Path(run_dir) / (out_name or f"eval-{tag}{episodes}.json")
        try:
            write_json(path, result)
        except OSError as e:
            if out_name:  # the run's own record (run, bench): it must be written
                raise UserError(f"cannot write {path} ({e.strerror}): free space or make {run_dir} writable, "
                                f"then test the run again with `l2l-recipes eval`") from None
            # `eval` of a run in a folder one cannot write (a read-only mount, another user's models)
            print(f"note: cannot write {path} ({e.strerror}): the result is printed, not saved",
                  file=sys.stderr)
    return result
