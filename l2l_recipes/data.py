"""Few-shot data: where datasets live, their caches and splits, and learn2learn episodes.

Each dataset (a module named in DATASETS) decodes its images once into a tensor cache
keyed on its source files, so a second start loads in seconds. Episodes are built from
learn2learn's `MetaDataset`, `Taskset` and task transforms over one split's classes only,
so no other split's class can reach a task.
"""
import fcntl
import hashlib
import importlib
import os
import random
import re
import warnings
import zipfile
from pathlib import Path

import learn2learn as l2l
import numpy as np
import torch
from PIL import Image

from l2l_recipes.config import check
from l2l_recipes.errors import UserError

SPLITS_DIR = Path(__file__).parent / "splits"
SPLIT_NAMES = ("train", "val", "test")


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
    if not path.is_file():  # an exported file copied without the splits/ folder `export` wrote beside it
        raise UserError(f"no split file {path}: the class splits are read from the {SPLITS_DIR.name}/ folder "
                        f"beside {Path(__file__).name}; copy that folder along with it")
    return path.read_text().split()


# ----------------------------------------------------------------------------- datasets

# name -> module holding load_split(split, root, download), transform(pil_image),
# classes(split) and CHANNELS; imported on first use.
DATASETS = {
    "omniglot": "l2l_recipes.datasets.omniglot",
    "omniglot-binary": "l2l_recipes.datasets.omniglot_binary",  # the official codes' binary images
    "mini-imagenet": "l2l_recipes.datasets.mini_imagenet",
    "tiered-imagenet": "l2l_recipes.datasets.tiered_imagenet",
    "cifar-fs": "l2l_recipes.datasets.cifar_fs",
    "fc100": "l2l_recipes.datasets.fc100",
}


def rgb_pixels(image, size):
    """A PIL image -> uint8 [3, size, size] (resized with Lanczos only if it is not that size)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def rgb_transform(size):
    """The transform of an RGB dataset: PIL image as read -> float [3, size, size] in [0, 1]."""
    def transform(image):
        return rgb_pixels(image, size).float().div_(255)
    return transform


def labelled(images, names):
    """{'images', 'targets', 'classes'} for a cache: classes in order of first appearance in `names`."""
    order = list(dict.fromkeys(names))
    index = {n: i for i, n in enumerate(order)}
    return {"images": images, "targets": torch.tensor([index[n] for n in names]), "classes": order}


class ClassImages(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] with class indices; item i -> (float image in [0, 1], class)."""

    def __init__(self, images, targets, classes):
        self.images, self.targets, self.classes = images, targets, list(classes)
        self.labels_to_indices = {c: [] for c in range(len(self.classes))}
        for i, c in enumerate(targets.tolist()):
            self.labels_to_indices[c].append(i)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i].float().div_(255), int(self.targets[i])

    def all_images(self):
        """Every item's image as one uint8 tensor [items, C, H, W], in item order."""
        return self.images


# Whether the loaders show their decoding bars (once per cache): harness.Run and meta_test set it
# from their `progress`, as recipes call load_split without one.
PROGRESS = {"decoding": True}


def dataset_module(name):
    """The module of dataset `name` (see DATASETS), or a UserError naming the known datasets."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': known datasets are {', '.join(DATASETS)}")
    return importlib.import_module(DATASETS[name])


def load_split(dataset, split, root=None, download=False):
    """The classes of `split` ('train', 'val', 'test'; Omniglot also 'trainval') of `dataset`
    as a torch Dataset whose `labels_to_indices` maps each class index to its items."""
    if split == "trainval" and not dataset.startswith("omniglot"):
        raise UserError(f"the trainval split (train + val) is shipped for omniglot only, not {dataset}")
    if split not in (*SPLIT_NAMES, "trainval"):
        raise UserError(f"unknown split '{split}': use one of {', '.join(SPLIT_NAMES)}")
    return dataset_module(dataset).load_split(split, data_root(root), download, PROGRESS["decoding"])


# ----------------------------------------------------------------------------- episodes

def taskset(dataset, ways, shots, queries, num_tasks=-1):
    """learn2learn Taskset of `ways`-way tasks of `shots + queries` images per class, labels 0..ways-1
    in random order, grouped by class; with num_tasks=-1 each draw is new (Python's `random`)."""
    classes, per_class = len(dataset.labels_to_indices), min(map(len, dataset.labels_to_indices.values()))
    check(ways <= classes, f"ways={ways} but this split has only {classes} classes: lower --set ways (or train_ways)")
    check(shots + queries <= per_class, f"shots + queries = {shots + queries} but each class has only "
                                        f"{per_class} images: lower --set shots or queries")
    meta, t = l2l.data.MetaDataset(dataset, labels_to_indices=dataset.labels_to_indices), l2l.data.transforms
    transforms = [t.NWays(meta, n=ways), t.KShots(meta, k=shots + queries),  # without replacement
                  t.LoadData(meta), t.RemapLabels(meta), t.ConsecutiveLabels(meta)]
    return l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=num_tasks)


def fixed_taskset(dataset, ways, shots, queries, num_tasks, seed):
    """A Taskset of `num_tasks` tasks drawn once from `seed` (the global `random` state kept)."""
    tasks, state = taskset(dataset, ways, shots, queries, num_tasks), random.getstate()
    random.seed(seed)
    tasks.sampled_descriptions.update({i: tasks.sample_task_description() for i in range(num_tasks)})
    random.setstate(state)
    return tasks


def draw(tasks):
    """The description of the task `tasks.sample()` would return, without its images (`tasks.get_task`)."""
    random.randint(0, len(tasks) - 1)  # Taskset.sample() picks an index first
    return tasks.sample_task_description()


def split_support_query(x, y, shots):
    """Per class, the first `shots` samples are the support set, the rest the query set; y is [n]
    or [tasks, n] (each task split on its own, keeping the task dimension)."""
    one_hot = torch.nn.functional.one_hot(y)
    support = (one_hot.cumsum(-2) * one_hot).sum(-1) <= shots  # each sample's 1-based rank in its class

    def part(t, mask):
        return t[mask].view(*y.shape[:-1], -1, *t.shape[y.dim():])

    return part(x, support), part(y, support), part(x, ~support), part(y, ~support)


def undecodable(path, error):
    """The UserError for an image file that cannot be decoded (truncated, corrupt)."""
    return UserError(f"cannot decode {path} ({error}): check the data with `l2l-recipes data verify "
                     f"--data-root DIR`, then re-extract or re-download the damaged files")


def files_key(tag, files, base):
    """'<folder>-<sources>': a hash of folder `base` (its absolute path), then one of `tag` and each
    file's path (relative to `base`), size and modification time."""
    h, prefix = hashlib.sha256(tag.encode()), f"{base}/"
    for f in map(str, files):  # strings: pathlib's relative_to and stat take 4x as long
        st = os.stat(f)
        relative = f[len(prefix):] if f.startswith(prefix) else Path(f).relative_to(base)
        h.update(f"{relative} {st.st_size} {st.st_mtime_ns}\n".encode())
    folder = hashlib.sha256(str(Path(base).resolve()).encode()).hexdigest()[:8]
    return f"{folder}-{h.hexdigest()[:16]}"


def cached(name, key, build):
    """`build()`'s dict of tensors, stored once as `<cache_dir>/<name>-<key>.pt`.

    The key covers the sources, so changed sources give a new file; an unreadable
    (truncated, corrupt) cache file is rebuilt; processes asking at once build it once.
    A new file replaces `name`'s files of the same source folder (files_key's first part:
    their sources have changed since, e.g. data extracted again) and those named before
    the folder was in the key, so stale caches do not pile up.
    """
    path = cache_dir() / f"{name}-{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a process building the same file first: wait, then read it
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except Exception as e:  # torch raises several types for a damaged file
                warnings.warn(f"cache {path} is unreadable ({type(e).__name__}); rebuilding it")
        for tmp in path.parent.glob(f".{path.name}.tmp*"):  # a build killed while saving (the lock is ours)
            tmp.unlink(missing_ok=True)
        value = build()
        atomic_save(value, path)
        folder = key.split("-")[0] if "-" in key else None
        stale = [p for p in path.parent.glob(f"{name}-*.pt") if p != path and (
            re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{16}}\.pt", p.name)
            or folder and re.fullmatch(rf"{re.escape(name)}-{folder}-[0-9a-f]{{16}}\.pt", p.name))]
        for p in stale:  # a reader that has it open keeps reading it (POSIX)
            p.unlink(missing_ok=True)
            p.with_name(f".{p.name}.lock").unlink(missing_ok=True)
        return value


def verify(root):
    """Check every file listed in each SHA256SUMS under `root` (inside images.zip where the
    file sits in that archive); returns {"checked": n, "bad": [...], "missing": [...]}."""
    report = {"checked": 0, "bad": [], "missing": [], "manifests": []}
    for sums in sorted(Path(root).rglob("SHA256SUMS")):
        report["manifests"].append(str(sums))
        base = sums.parent
        archive = zipfile.ZipFile(base / "images.zip") if (base / "images.zip").is_file() else None
        members = set(archive.namelist()) if archive else set()
        for line in sums.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if (base / name).is_file():
                with open(base / name, "rb") as f:
                    actual = hashlib.file_digest(f, "sha256").hexdigest()
            elif name in members:
                actual = hashlib.sha256(archive.read(name)).hexdigest()
            else:
                report["missing"].append(str(base / name))
                continue
            report["checked"] += 1
            if actual != digest:
                report["bad"].append(str(base / name))
    return report


def load_pickle(path, what, encoding="ASCII", keys=()):
    """Unpickle a downloaded data file; an HTML page (a failed download), junk, or a dict
    without `keys` is a UserError naming the file."""
    import pickle
    with open(path, "rb") as f:
        head = f.read(1024).lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
            raise UserError(f"{path} is an HTML page, not a pickle: its download failed (learn2learn "
                            f"issue #367); delete it and download it again")
        f.seek(0)
        try:
            obj = pickle.load(f, encoding=encoding)
        except Exception as e:
            raise UserError(f"{path} is not a readable {what} pickle ({type(e).__name__}: {e})") from None
    if keys and not (isinstance(obj, dict) and set(keys) <= set(obj)):
        raise UserError(f"{path} is not a {what} pickle: expected keys {', '.join(keys)}")
    return obj


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
