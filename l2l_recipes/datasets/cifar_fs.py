"""CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's 100 classes split 64 / 16 / 20, 32x32 RGB.

Read as learn2learn's `CIFARFS` lays it out under `<root>/cifarfs/`: the extracted archive
`cifar100/data/<class>/*.png` with the split files `cifar100/splits/bertinetto/{train,val,test}.txt`
(one class name per line). Each split is decoded once into a uint8 tensor cache.
"""
import torch
from PIL import Image
from tqdm import tqdm

from l2l_recipes import data
from l2l_recipes.errors import UserError

CHANNELS = 3
SIZE = 32
CACHE_VERSION = 1
transform = data.rgb_transform(SIZE)  # PIL image as read -> float [3, SIZE, SIZE] in [0, 1]
URL = "https://zenodo.org/record/7978538/files/cifar100.zip"



def _base(root, download=False):
    base = root / "cifarfs" / "cifar100"
    if not (base / "splits" / "bertinetto").is_dir() and download:
        import zipfile

        from learn2learn.data.utils import download_file
        archive = root / "cifarfs.zip"
        root.mkdir(parents=True, exist_ok=True)
        download_file(URL, str(archive))
        with zipfile.ZipFile(archive) as z:
            z.extractall(root / "cifarfs")
        archive.unlink()
    if not (base / "splits" / "bertinetto").is_dir():
        raise UserError(f"CIFAR-FS not found: no {base / 'splits' / 'bertinetto'}. Pass --data-root DIR "
                        f"(the folder holding cifarfs/), set L2L_RECIPES_DATA, or add --download")
    return base


def classes(split, root=None):
    """The class names of one split of the Bertinetto split."""
    base = _base(data.data_root(root))
    return (base / "splits" / "bertinetto" / f"{split}.txt").read_text().split()


def _files(split, root, download=False):
    """{class name: its PNG files} of one split."""
    base = _base(root, download)
    files = {c: sorted((base / "data" / c).glob("*.png")) for c in classes(split, root)}
    empty = [c for c, fs in files.items() if not fs]
    if empty:
        raise UserError(f"CIFAR-FS class {empty[0]} has no images under {base / 'data' / empty[0]}")
    return files


def decoded(split, files, progress=False):
    """{'images', 'targets', 'classes'} of the split's `files`."""
    images, labels = [], []
    for name in tqdm(files, desc=f"decoding CIFAR-FS {split} (once)", disable=not progress):
        for f in files[name]:
            with Image.open(f) as im:
                images.append(data.rgb_pixels(im, SIZE))
            labels.append(name)
    return data.labelled(torch.stack(images), labels)


def load_split(split, root, download=False, progress=True):
    files = _files(split, root, download)
    sources = [_base(root) / "splits" / "bertinetto" / f"{split}.txt"] + [f for fs in files.values() for f in fs]
    key = data.files_key(f"cifar-fs v{CACHE_VERSION}", sources, root)
    cache = data.cached(f"cifar-fs-{split}", key, lambda: decoded(split, files, progress))
    return data.ClassImages(cache["images"], cache["targets"], cache["classes"])


def decode_split(split, root, download=False):
    """One split decoded from its files under `root` (no cache): the images of load_split."""
    return data.ClassImages(**decoded(split, _files(split, root, download)))
