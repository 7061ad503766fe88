"""FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 60 / 20 / 20 classes, 32x32 RGB.

Read as learn2learn's `FC100` lays it out: `<root>/FC100_{train,val,test}.pickle`, each a
dict with `data` (uint8 [N, 32, 32, 3]) and `labels` (CIFAR-100 fine label per image),
pickled under Python 2 (read with latin1). Classes are named by their CIFAR-100 label.
"""
import numpy as np
import torch

from l2l_recipes import data
from l2l_recipes.errors import UserError

CHANNELS = 3
SIZE = 32
CACHE_VERSION = 1
transform = data.rgb_transform(SIZE)  # PIL image as read -> float [3, SIZE, SIZE] in [0, 1]
URL = "https://zenodo.org/record/7978538/files/fc100.zip"



def _path(root, split, download=False):
    path = root / f"FC100_{split}.pickle"
    if not path.is_file() and download:
        import zipfile

        from learn2learn.data.utils import download_file
        root.mkdir(parents=True, exist_ok=True)
        download_file(URL, str(root / "fc100.zip"))
        with zipfile.ZipFile(root / "fc100.zip") as z:
            z.extractall(root)
        (root / "fc100.zip").unlink()
    if not path.is_file():
        raise UserError(f"FC100 not found: no {path}. Pass --data-root DIR (the folder holding "
                        f"FC100_train.pickle), set L2L_RECIPES_DATA, or add --download")
    return path


def _read(path):
    return data.load_pickle(path, "FC100", encoding="latin1", keys=("data", "labels"))


def classes(split, root=None):
    """The CIFAR-100 labels (as strings) of one split, in order of first appearance (from the cache)."""
    root = data.data_root(root)
    return load_split(split, root).classes


def load_split(split, root, download=False, progress=True):
    """One split as a data.ClassImages (a pickle read whole: no decoding bar, `progress` is unused)."""
    path = _path(root, split, download)
    cache = data.cached(f"fc100-{split}", data.files_key(f"fc100 v{CACHE_VERSION}", [path], root),
                        lambda: decoded(path))
    return data.ClassImages(cache["images"], cache["targets"], cache["classes"])


def decode_split(split, root, download=False):
    """One split read from its pickle under `root` (no cache): the images of load_split."""
    return data.ClassImages(**decoded(_path(root, split, download)))


def decoded(path):
    """{'images', 'targets', 'classes'} of a split's pickle."""
    obj = _read(path)
    images = torch.from_numpy(np.ascontiguousarray(obj["data"], dtype=np.uint8)).permute(0, 3, 1, 2)
    return data.labelled(images.contiguous(), [str(label) for label in obj["labels"]])
