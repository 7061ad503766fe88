"""How an Omniglot model fares on the rotated classes of the shared split's test set.

The shared split (Vinyals et al.) makes each rotation of a test character a class of its own,
so a test task may hold two rotations of one character; some papers' code (Reptile's, MAML's)
tests on upright characters only. For a run directory, prints as JSON lines: the accuracy on
the recipe's fixed test tasks, split into the tasks with two rotations of one character and
the others, then the accuracy on as many tasks of upright test characters only (same seed).

    python benchmarks/omniglot_rotations.py RUN_DIR [--device cpu]
"""
import argparse
import json
import time

import torch

import l2l_recipes
from l2l_recipes import data, harness, plain


class Upright(torch.utils.data.Dataset):
    """A test split with only its upright (rot000) classes left to draw tasks from."""

    def __init__(self, split, names):
        self.split = split
        self.labels_to_indices = {c: i for c, i in split.labels_to_indices.items() if names[c].endswith("/rot000")}

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split[i]


def accuracies(predictor, tasks):
    return [acc for acc, _ in harness.task_scores(predictor, tasks, list(range(len(tasks))), predictor.cfg.shots)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    started = time.time()
    predictor = l2l_recipes.load(args.run_dir, device=args.device)
    cfg, names = predictor.cfg, predictor.test_classes
    tasks = predictor.test_tasks(cfg.test_episodes, cfg.test_seed)
    groups = {"shared character": [], "distinct characters": []}
    for i, acc in enumerate(accuracies(predictor, tasks)):
        labels = {tasks.dataset.indices_to_labels[d.index] for d in tasks.sampled_descriptions[i]}
        characters = {names[label].rsplit("/rot", 1)[0] for label in labels}
        groups["shared character" if len(characters) < len(labels) else "distinct characters"].append(acc)
    every = [acc for accs in groups.values() for acc in accs]
    mean, ci95 = plain.mean_ci95(every)
    print(json.dumps({"tasks": len(every), "accuracy": mean, "ci95": ci95,
                      **{k: {"tasks": len(v), "accuracy": sum(v) / max(1, len(v))} for k, v in groups.items()}}),
          flush=True)
    upright = Upright(data.load_split(cfg.dataset, "test", predictor.data_root), names)
    tasks = data.fixed_taskset(upright, cfg.ways, cfg.shots, cfg.queries, cfg.test_episodes, cfg.test_seed)
    mean, ci95 = plain.mean_ci95(accuracies(predictor, tasks))
    print(json.dumps({"upright classes": len(upright.labels_to_indices), "tasks": len(tasks), "accuracy": mean,
                      "ci95": ci95, "seconds": round(time.time() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
