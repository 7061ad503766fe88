"""Few-shot data: Omniglot on disk, the standard class splits, and learn2learn episodes.

Images are decoded once into a tensor cache keyed on the source files, so a second
start loads in about a second. Episodes are built from learn2learn's `MetaDataset`,
`Taskset` and task transforms over one split's classes only, so no other split's
class can reach a task.
"""
import hashlib
import os
import random
from pathlib import Path

import learn2learn as l2l
import numpy as np
import torch
from PIL import Image

from l2l_recipes.errors import UserError

SPLITS_DIR = Path(__file__).parent / "splits"
SPLIT_NAMES = ("train", "val", "test")

# Omniglot: 105x105 binary PNGs resized to 28x28 with PIL's Lanczos filter on the
# grayscale image, then inverted so that ink = 1 and background = 0.
OMNIGLOT_SIZE = 28
OMNIGLOT_SETS = ("images_background", "images_evaluation")
OMNIGLOT_CACHE_VERSION = 1


def data_root(path=None):
    """`path`, else $L2L_RECIPES_DATA, else `<user cache>/data` (where downloads go)."""
    if path:
        return Path(path).expanduser()
    if os.environ.get("L2L_RECIPES_DATA"):
        return Path(os.environ["L2L_RECIPES_DATA"]).expanduser()
    return cache_dir() / "data"


def cache_dir():
    """$L2L_RECIPES_CACHE, else `$XDG_CACHE_HOME/l2l-recipes` (~/.cache/l2l-recipes)."""
    if os.environ.get("L2L_RECIPES_CACHE"):
        return Path(os.environ["L2L_RECIPES_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "l2l-recipes"


def read_split(name, split):
    """Class names of one split of a shipped split, e.g. read_split('omniglot-vinyals', 'test')."""
    path = SPLITS_DIR / name / f"{split}.txt"
    if not path.is_file():
        raise UserError(f"no split file {path}: split must be one of {', '.join(SPLIT_NAMES)}")
    return path.read_text().split()


# ----------------------------------------------------------------------------- Omniglot

def omniglot_pixels(image):
    """A PNG as read (PIL image) -> uint8 [28, 28] ink intensities (ink = 255)."""
    small = image.convert("L").resize((OMNIGLOT_SIZE, OMNIGLOT_SIZE), Image.LANCZOS)
    return 255 - torch.from_numpy(np.array(small, dtype=np.uint8))


def omniglot_transform(image):
    """A PNG as read (PIL image) -> float [1, 28, 28] in [0, 1], exactly as in training."""
    return omniglot_pixels(image).float().div_(255).unsqueeze(0)


def omniglot_sources(root, download=False):
    """{'<Alphabet>/characterNN': [png paths]} for all 1623 characters under `root/omniglot-py`."""
    base = Path(root) / "omniglot-py"
    missing = [s for s in OMNIGLOT_SETS if not (base / s).is_dir()]
    if missing and download:
        import torchvision
        for s in missing:
            torchvision.datasets.Omniglot(str(root), background=(s == "images_background"), download=True)
        missing = [s for s in OMNIGLOT_SETS if not (base / s).is_dir()]
    if missing:
        raise UserError(
            f"Omniglot not found: no {base / missing[0]}. Pass --data-root DIR (the folder holding "
            f"omniglot-py/), set L2L_RECIPES_DATA, or add --download to fetch it")
    characters = {}
    for s in OMNIGLOT_SETS:
        for alphabet in sorted(p for p in (base / s).iterdir() if p.is_dir()):
            for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                characters[f"{alphabet.name}/{character.name}"] = sorted(character.glob("*.png"))
    return characters


def _sources_key(characters):
    """Hash of every source file's path, size and mtime, and of the preprocessing."""
    h = hashlib.sha256(f"omniglot v{OMNIGLOT_CACHE_VERSION} {OMNIGLOT_SIZE} lanczos".encode())
    for name, files in characters.items():
        for f in files:
            st = f.stat()
            h.update(f"{name}/{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_omniglot(root=None, download=False, progress=True):
    """All Omniglot characters as (names, uint8 tensor [characters, 20, 28, 28]), via the cache."""
    characters = omniglot_sources(data_root(root), download)
    counts = {len(files) for files in characters.values()}
    if counts != {20}:
        raise UserError(f"Omniglot under {data_root(root)} is incomplete: expected 20 drawings per "
                        f"character, found {sorted(counts)}; re-extract or re-download it")
    path = cache_dir() / f"omniglot-{OMNIGLOT_SIZE}px-{_sources_key(characters)}.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        return cached["names"], cached["images"]
    from tqdm import tqdm
    names = list(characters)
    images = torch.empty(len(names), 20, OMNIGLOT_SIZE, OMNIGLOT_SIZE, dtype=torch.uint8)
    for i, name in enumerate(tqdm(names, desc="decoding Omniglot (once)", disable=not progress)):
        for j, f in enumerate(characters[name]):
            with Image.open(f) as im:
                images[i, j] = omniglot_pixels(im)
    atomic_save({"names": names, "images": images}, path)
    return names, images


class OmniglotClasses(torch.utils.data.Dataset):
    """The classes `<Alphabet>/characterNN/rotDDD` of one split; item i -> (image, class index).

    Each character's rotations are classes of their own (Vinyals et al. 2016), so the
    rotation belongs to the class, never drawn per task.
    """

    def __init__(self, names, images, classes):
        index = {n: i for i, n in enumerate(names)}
        unknown = [c for c in classes if c.rsplit("/", 1)[0] not in index]
        if unknown:
            raise UserError(f"split class {unknown[0]} has no images in the Omniglot data")
        self.images = images
        self.classes = list(classes)
        self.per_class = images.shape[1]
        self.character = [index[c.rsplit("/", 1)[0]] for c in self.classes]
        self.quarter_turns = [int(c.rsplit("/rot", 1)[1]) // 90 for c in self.classes]
        self.labels_to_indices = {c: list(range(c * self.per_class, (c + 1) * self.per_class))
                                  for c in range(len(self.classes))}

    def __len__(self):
        return len(self.classes) * self.per_class

    def __getitem__(self, i):
        c, j = divmod(i, self.per_class)
        # torch.rot90 turns counter-clockwise, as PIL's Image.rotate does.
        x = torch.rot90(self.images[self.character[c], j], self.quarter_turns[c], dims=(0, 1))
        return x.float().div_(255).unsqueeze(0), c


def omniglot_split(split, root=None, download=False):
    """One split of the standard Omniglot split (1028/172/423 characters x 4 rotations)."""
    names, images = load_omniglot(root, download)
    return OmniglotClasses(names, images, read_split("omniglot-vinyals", split))


DATASETS = {
    "omniglot": {"split": omniglot_split, "transform": omniglot_transform, "channels": 1,
                 "classes": lambda split: read_split("omniglot-vinyals", split)},
}


def dataset_info(name):
    """The entry of DATASETS for `name`, or a UserError naming the known datasets."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': known datasets are {', '.join(DATASETS)}")
    return DATASETS[name]


def load_split(dataset, split, root=None, download=False):
    """The classes of `split` ('train', 'val' or 'test') of `dataset` as a torch Dataset."""
    if split not in SPLIT_NAMES:
        raise UserError(f"unknown split '{split}': use one of {', '.join(SPLIT_NAMES)}")
    return dataset_info(dataset)["split"](split, root, download)


# ----------------------------------------------------------------------------- episodes

def taskset(dataset, ways, shots, queries, num_tasks=-1):
    """learn2learn Taskset of `ways`-way tasks with `shots + queries` distinct images per class.

    Labels are remapped to 0..ways-1 in random order; samples come grouped by class.
    With num_tasks=-1 every draw is a new task (sampled with Python's `random`).
    """
    per_class = min(len(v) for v in dataset.labels_to_indices.values())
    if ways > len(dataset.labels_to_indices):
        raise UserError(f"ways={ways} but this split has only {len(dataset.labels_to_indices)} "
                        f"classes: lower --set ways (or train_ways)")
    if shots + queries > per_class:
        raise UserError(f"shots + queries = {shots + queries} but each class has only {per_class} "
                        f"images: lower --set shots or queries")
    meta = l2l.data.MetaDataset(dataset, labels_to_indices=dataset.labels_to_indices)
    transforms = [
        l2l.data.transforms.NWays(meta, n=ways),
        l2l.data.transforms.KShots(meta, k=shots + queries),  # without replacement
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ]
    return l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=num_tasks)


def fixed_taskset(dataset, ways, shots, queries, num_tasks, seed):
    """A Taskset of `num_tasks` tasks drawn once from `seed`: every evaluation sees the same tasks.

    The global `random` state (which learn2learn's transforms use) is restored afterwards.
    """
    tasks = taskset(dataset, ways, shots, queries, num_tasks)
    state = random.getstate()
    random.seed(seed)
    try:
        for i in range(num_tasks):
            tasks.sampled_descriptions[i] = tasks.sample_task_description()
    finally:
        random.setstate(state)
    return tasks


def split_support_query(x, y, shots):
    """Per class, the first `shots` samples are the support set and the rest the query set."""
    order = torch.argsort(y, stable=True)
    y_sorted = y[order]
    first = torch.searchsorted(y_sorted, y_sorted)  # first position of each sample's class
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(y), device=y.device) - first
    support = rank < shots
    return x[support], y[support], x[~support], y[~support]


def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
