"""mini-ImageNet (Vinyals et al. 2016), split of Ravi & Larochelle (2017): 64 / 16 / 20 classes.

Read from `<root>/mini-imagenet/` (or `<root>` itself) in either form users have:
- `images.zip` or an `images/` folder (`<wnid><8 digits>.jpg`) with `train.csv`, `val.csv`,
  `test.csv` (`filename,label`), the Ravi split files;
- learn2learn's pickles `mini-imagenet-cache-{train,validation,test}.pkl`
  (`{"image_data": uint8 [N, 84, 84, 3], "class_dict": {wnid: [indices]}}`).
Images are 84x84 RGB scaled to [0, 1] (other sizes are resized with Lanczos). Each split is
decoded once into a uint8 tensor cache keyed on its source files.
"""
import csv
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from l2l_recipes import data
from l2l_recipes.config import check
from l2l_recipes.errors import UserError

CHANNELS = 3
SIZE = 84
CACHE_VERSION = 1
transform = data.rgb_transform(SIZE)  # PIL image as read -> float [3, SIZE, SIZE] in [0, 1]
PICKLE_NAMES = {"train": "train", "val": "validation", "test": "test"}
ZENODO = "https://zenodo.org/record/7978538/files/mini-imagenet-cache-{}.pkl"



def read_csv(path):
    """[(filename, wnid), ...] of a Ravi split file."""
    with open(path, newline="") as f:
        rows = [(r["filename"], r["label"]) for r in csv.DictReader(f)]
    if not rows:
        raise UserError(f"{path} lists no images (expected a 'filename,label' header and rows)")
    return rows


def classes(split, root=None):
    """The wnids of one split of the Ravi split, in order of first appearance in its CSV."""
    return data.read_split("mini-imagenet-ravi", split)


def locate(root, split, download=False):
    """('csv', folder) or ('pickle', file) for `split` under `root`; downloads the pickle if asked."""
    for base in (root / "mini-imagenet", root):
        if (base / f"{split}.csv").is_file() and ((base / "images.zip").is_file() or (base / "images").is_dir()):
            return "csv", base
        pkl = base / f"mini-imagenet-cache-{PICKLE_NAMES[split]}.pkl"
        if pkl.is_file():
            return "pickle", pkl
    if download:
        from learn2learn.data.utils import download_file
        pkl = root / "mini-imagenet" / f"mini-imagenet-cache-{PICKLE_NAMES[split]}.pkl"
        pkl.parent.mkdir(parents=True, exist_ok=True)
        download_file(ZENODO.format(PICKLE_NAMES[split]), str(pkl))
        return "pickle", pkl
    raise UserError(
        f"mini-ImageNet {split} split not found under {root / 'mini-imagenet'}: expected images.zip "
        f"(or images/) with {split}.csv, or mini-imagenet-cache-{PICKLE_NAMES[split]}.pkl. Pass "
        f"--data-root DIR, set L2L_RECIPES_DATA, or add --download to fetch the pickles")


def read_pickle(path):
    """learn2learn's mini-ImageNet pickle as a dict, checked."""
    return data.load_pickle(path, "mini-ImageNet", keys=("image_data", "class_dict"))


def _decode_csv(base, rows, progress):
    images = torch.empty(len(rows), 3, SIZE, SIZE, dtype=torch.uint8)
    archive = zipfile.ZipFile(base / "images.zip") if (base / "images.zip").is_file() else None
    members = {Path(n).name: n for n in archive.namelist()} if archive else {}
    for i, (name, _) in enumerate(tqdm(rows, desc="decoding mini-ImageNet (once)", disable=not progress)):
        if archive:
            if name not in members:
                raise UserError(f"{base / 'images.zip'} has no image {name} (listed in the split CSV)")
            with archive.open(members[name]) as f, Image.open(f) as im:
                images[i] = data.rgb_pixels(im, SIZE)
        else:
            with Image.open(base / "images" / name) as im:
                images[i] = data.rgb_pixels(im, SIZE)
    return images


def load_split(split, root, download=False, progress=True):
    """One split as a data.ClassImages of uint8 [N, 3, 84, 84] images, via the cache."""
    kind, where = locate(root, split, download)
    if kind == "csv":
        sources, base = [where / f"{split}.csv"], where
        sources += [where / "images.zip"] if (where / "images.zip").is_file() else [
            where / "images" / n for n, _ in read_csv(where / f"{split}.csv")]
    else:
        sources, base = [where], where.parent
    key = data.files_key(f"mini-imagenet v{CACHE_VERSION} {kind} {split}", sources, base)
    cache = data.cached(f"mini-imagenet-{split}", key, lambda: decoded(kind, where, split, progress))
    return data.ClassImages(cache["images"], cache["targets"], cache["classes"])


class DecodedSplit(torch.utils.data.Dataset):
    """One split read from its files under `root` (no cache): load_split's items. From the CSV and
    images.zip (or images/), each image is decoded the first time a task asks for it, then kept."""

    def __init__(self, split, root, download=False):
        kind, where = locate(Path(root), split, download)
        if kind == "csv":
            rows = read_csv(where / f"{split}.csv")
            self.archive = zipfile.ZipFile(where / "images.zip") if (where / "images.zip").is_file() else None
            members = {Path(n).name: n for n in self.archive.namelist()} if self.archive else {}
            missing = next((n for n, _ in rows if self.archive and n not in members), None)
            check(missing is None, f"{where / 'images.zip'} has no image {missing} (listed in the split CSV)")
            self.files = [members[n] if self.archive else where / "images" / n for n, _ in rows]
            self.classes = list(dict.fromkeys(label for _, label in rows))
            targets = [self.classes.index(label) for _, label in rows]
        else:  # learn2learn's pickle: every image in memory already
            obj = read_pickle(where)
            self.pixels, self.classes, targets = obj["image_data"], list(obj["class_dict"]), [0] * len(obj["image_data"])
            for c, indices in enumerate(obj["class_dict"].values()):
                for i in indices:
                    targets[i] = c
        self.targets, self.decoded = torch.tensor(targets), {}
        self.labels_to_indices = {c: [] for c in range(len(self.classes))}
        for i, c in enumerate(targets):
            self.labels_to_indices[c].append(i)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        if i not in self.decoded:
            if hasattr(self, "pixels"):
                self.decoded[i] = torch.from_numpy(np.array(self.pixels[i])).permute(2, 0, 1)
            else:
                with (self.archive.open(self.files[i]) if self.archive else open(self.files[i], "rb")) as f:
                    with Image.open(f) as image:
                        self.decoded[i] = data.rgb_pixels(image, SIZE)
        return self.decoded[i].float().div_(255), int(self.targets[i])


def decode_split(split, root, download=False):
    """One split read from its files under `root` (no cache), as its tasks need them: load_split's items."""
    return DecodedSplit(split, root, download)


def decoded(kind, where, split, progress=False):
    """{'images', 'targets', 'classes'} of a split from its CSV and images, or from learn2learn's pickle."""
    if kind == "csv":
        rows = read_csv(where / f"{split}.csv")
        return data.labelled(_decode_csv(where, rows, progress), [label for _, label in rows])
    obj = read_pickle(where)
    images = torch.from_numpy(np.ascontiguousarray(obj["image_data"])).permute(0, 3, 1, 2).contiguous()
    targets = torch.full((len(images),), -1, dtype=torch.long)
    for c, indices in enumerate(obj["class_dict"].values()):
        targets[list(indices)] = c
    return {"classes": list(obj["class_dict"]), "images": images, "targets": targets}
