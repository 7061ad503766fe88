"""tiered-ImageNet (Ren et al. 2018): 351 / 97 / 160 ImageNet classes from 34 categories, 84x84 RGB.

Read as learn2learn's `TieredImagenet` lays it out under `<root>/tiered-imagenet/`:
`{train,val,test}_images_png.pkl` (a sequence of PNG-encoded images) and
`{split}_labels.pkl` (a dict whose `label_specific` gives each image's class index; class
names from `label_specific_str` where present). Each split is decoded once into a cache.
"""
import io

import torch
from PIL import Image
from tqdm import tqdm

from l2l_recipes import data
from l2l_recipes.errors import UserError

CHANNELS = 3
SIZE = 84
CACHE_VERSION = 1
transform = data.rgb_transform(SIZE)  # PIL image as read -> float [3, SIZE, SIZE] in [0, 1]



def _paths(root, split, download=False):
    base = root / "tiered-imagenet"
    images, labels = base / f"{split}_images_png.pkl", base / f"{split}_labels.pkl"
    if not images.is_file() and download:
        import learn2learn as l2l
        l2l.vision.datasets.TieredImagenet(str(root), mode={"val": "validation"}.get(split, split),
                                           download=True)
    for path in (images, labels):
        if not path.is_file():
            raise UserError(f"tiered-ImageNet not found: no {path}. Pass --data-root DIR (the folder "
                            f"holding tiered-imagenet/), set L2L_RECIPES_DATA, or add --download")
    return images, labels


def _labels(path):
    obj = data.load_pickle(path, "tiered-ImageNet labels", encoding="latin1", keys=("label_specific",))
    specific = [int(x) for x in obj["label_specific"]]
    names = obj.get("label_specific_str")
    return [str(names[i]) if names is not None else str(i) for i in specific]


def classes(split, root=None):
    """The class names of one split, in order of first appearance."""
    return list(dict.fromkeys(_labels(_paths(data.data_root(root), split)[1])))


def decoded(split, images_path, labels_path, progress=False):
    """{'images', 'targets', 'classes'} of the split's pickles."""
    labels = _labels(labels_path)
    blobs = data.load_pickle(images_path, "tiered-ImageNet images", encoding="latin1")
    if len(blobs) != len(labels):
        raise UserError(f"{images_path} holds {len(blobs)} images but {labels_path} {len(labels)} labels")
    images = torch.empty(len(blobs), 3, SIZE, SIZE, dtype=torch.uint8)
    for i, blob in enumerate(tqdm(blobs, desc=f"decoding tiered-ImageNet {split} (once)", disable=not progress)):
        with Image.open(io.BytesIO(bytes(blob))) as im:
            images[i] = data.rgb_pixels(im, SIZE)
    return data.labelled(images, labels)


def load_split(split, root, download=False, progress=True):
    paths = _paths(root, split, download)
    key = data.files_key(f"tiered-imagenet v{CACHE_VERSION}", list(paths), root)
    cache = data.cached(f"tiered-imagenet-{split}", key, lambda: decoded(split, *paths, progress))
    return data.ClassImages(cache["images"], cache["targets"], cache["classes"])


def decode_split(split, root, download=False):
    """One split decoded from its files under `root` (no cache): the images of load_split."""
    return data.ClassImages(**decoded(split, *_paths(root, split, download)))
