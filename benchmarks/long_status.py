"""Where the long runs of benchmarks/long_runs.sh stand: one line per seed of every bench.

    python benchmarks/long_status.py [LONG]      (default /root/l2l-long)

Each line: the bench folder, the seed, its last logged iteration of the recipe's budget, the
seconds per iteration over its last 1,000 logged iterations (validations included), its last
and best validation, and whether it is tested (result.json), training (a bench process holds it) or stopped,
with the hours its budget still needs at that pace.
Then the records written, and the last line of each bench log that reports an error.
"""
import fcntl
import json
import signal
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


def seed_line(seed_dir):
    metrics = rows(seed_dir / "metrics.jsonl") if (seed_dir / "metrics.jsonl").is_file() else []
    budget = json.loads((seed_dir / "config.json").read_text()).get("iterations", "?")
    train = [r for r in metrics if "time" in r and not any(k.startswith("val_") for k in r)]
    vals = [r for r in metrics if "val_accuracy" in r]
    last = train[-1] if train else {"iteration": 0, "time": 0}
    recent = [r for r in train if r["iteration"] >= last["iteration"] - 1000]
    pace = ((recent[-1]["time"] - recent[0]["time"]) / (recent[-1]["iteration"] - recent[0]["iteration"])
            if len(recent) > 1 and recent[-1]["iteration"] > recent[0]["iteration"] else float("nan"))
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
