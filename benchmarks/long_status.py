"""Where the long runs of benchmarks/long_runs.sh stand: one line per seed of every bench.

    python benchmarks/long_status.py [LONG]      (default /root/l2l-long)

Each line: the bench folder, the seed, its last logged iteration of the recipe's budget (under
early stopping: where training ends if the validation loss does not improve again), the seconds
per iteration over its last 1,000 logged iterations (validations included, pauses left out), its
last and best validation, and whether it is tested (result.json), training (a bench process
holds it) or stopped, with the hours its budget still needs at that pace.
Then the records written, and the last line of each bench log that reports an error.
"""
import fcntl
import json
import signal
import statistics
import sys
from pathlib import Path


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def held(seed_dir):
    """Whether a bench process holds the seed's lock (l2l_recipes.bench._locked) now."""
    lock = seed_dir.parent / f"{seed_dir.name}.lock"
    if not lock.is_file():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def recent_pace(rows):
    """Seconds per iteration over `rows` (logged training rows), validations included; a step between
    two rows over 5x the median pace and over two minutes longer than it is a pause (the process
    stopped with SIGSTOP, or killed and resumed: the time lost and the start), left out. nan for
    fewer than two rows."""
    steps = [(b["time"] - a["time"], b["iteration"] - a["iteration"]) for a, b in zip(rows, rows[1:])
             if b["iteration"] > a["iteration"]]
    if not steps:
        return float("nan")
    typical = statistics.median(seconds / its for seconds, its in steps)
    kept = [(seconds, its) for seconds, its in steps if seconds <= max(5 * typical * its, typical * its + 120)]
    return sum(seconds for seconds, _ in kept) / sum(its for _, its in kept)


def last_iteration(config, metrics):
    """The iteration training ends at: the recipe's budget, or under early stopping (ProtoNet's
    patience) the retraining's end once it started, else the end if the validation loss does not
    improve again (the stop at best + patience + 1 validations, then as long a retraining on
    train+val as the recipe does: best + patience - 1 validations)."""
    retrain = [r["retrain_until"] for r in metrics if "retrain_until" in r]
    losses = [r for r in metrics if "val_loss" in r]
    if retrain or not config.get("patience") or not losses:
        return retrain[-1] if retrain else config.get("iterations", "?")
    best = min(losses, key=lambda r: r["val_loss"])["iteration"]
    every, patience = config["val_interval"], config["patience"]
    stop = best + (patience + 1) * every
    return min(config["iterations"], stop + (best + (patience - 1) * every if config.get("trainval") else 0))


def seed_line(seed_dir):
    metrics = rows(seed_dir / "metrics.jsonl") if (seed_dir / "metrics.jsonl").is_file() else []
    budget = last_iteration(json.loads((seed_dir / "config.json").read_text()), metrics)
    train = [r for r in metrics if "time" in r and not any(k.startswith("val_") for k in r)]
    vals = [r for r in metrics if "val_accuracy" in r]
    last = train[-1] if train else {"iteration": 0, "time": 0}
    pace = recent_pace([r for r in train if r["iteration"] >= last["iteration"] - 1000])
    val = (f"val {vals[-1]['val_accuracy']:.4f} (best {max(r['val_accuracy'] for r in vals):.4f} at "
           f"{max(vals, key=lambda r: r['val_accuracy'])['iteration']})" if vals else "no validation yet")
    state = "tested" if (seed_dir / "result.json").is_file() else "training" if held(seed_dir) else "stopped"
    if state != "tested" and isinstance(budget, int) and pace == pace:  # pace not nan
        state += f", ~{(budget - last['iteration']) * pace / 3600:.1f} h left at that pace"
    return (f"{seed_dir.parent.parent.name}/{seed_dir.parent.name}/{seed_dir.name}: iteration {last['iteration']} "
            f"of {budget}, {pace:.3f} s/it lately, {val}, {state}")


def main(long=Path("/root/l2l-long")):
    for seed_dir in sorted(Path(long, "bench").glob("*/bench-*/seed-*")):
        if seed_dir.is_dir():
            print(seed_line(seed_dir))
    for record in sorted(Path(long, "results").glob("*.json")):
        print("record:", record.name)
    for log in sorted(Path(long, "logs").glob("*.log")):
        errors = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(("Error", "Trace"))]
        if errors:
            print(f"{log.name}: {errors[-1]}")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the output quietly
    main(*map(Path, sys.argv[1:2]))
