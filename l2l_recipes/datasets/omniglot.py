"""Omniglot (Lake et al. 2015) in torchvision's extracted layout, with the standard split.

`<root>/omniglot-py/images_{background,evaluation}/<Alphabet>/characterNN/*.png`: 105x105
binary PNGs, resized to 28x28 with PIL's Lanczos filter on the grayscale image, then
inverted so that ink = 1 and background = 0 (the papers' codes resize the 1-bit image, which
Pillow does by nearest neighbour: binary images; docs/data.md). Split: Vinyals et al. (2016) as published
with Prototypical Networks; each character's four rotations are four classes.
"""
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from l2l_recipes import data
from l2l_recipes.errors import UserError

CHANNELS = 1
SIZE = 28
SETS = ("images_background", "images_evaluation")
DRAWINGS = 20  # per character
CACHE_VERSION = 1


def omniglot_pixels(image, binary=False):
    """A PNG as read (PIL image) -> uint8 [28, 28] ink intensities (ink = 255): the grayscale
    image resized with Lanczos, or (`binary`) resized by nearest neighbour as the papers' codes
    resize the 1-bit PNGs, every pixel ink or not."""
    if binary:
        small = image.resize((SIZE, SIZE), Image.NEAREST).convert("L")
    else:
        small = image.convert("L").resize((SIZE, SIZE), Image.LANCZOS)
    return 255 - torch.from_numpy(np.array(small, dtype=np.uint8))


def read_png(path, binary=False):
    """One drawing's PNG file -> uint8 [28, 28]; an unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as image:
            return omniglot_pixels(image, binary)
    except OSError as e:  # PIL: truncated or not an image
        raise data.undecodable(path, e) from None


def transform(image, binary=False):
    """A PNG as read (PIL image) -> float [1, 28, 28] in [0, 1], exactly as in training."""
    return omniglot_pixels(image, binary).float().div_(255).unsqueeze(0)


def omniglot_sources(root, download=False):
    """{'<Alphabet>/characterNN': [png paths (str)]} for all 1623 characters under `root/omniglot-py`."""
    base = Path(root) / "omniglot-py"
    missing = [s for s in SETS if not (base / s).is_dir()]
    if missing and download:
        import torchvision
        for s in missing:  # only these: torchvision fetches a set again unless its zip is beside it
            torchvision.datasets.Omniglot(str(root), background=(s == "images_background"), download=True)
        missing = [s for s in SETS if not (base / s).is_dir()]
    if missing:
        raise UserError(
            f"Omniglot not found: no {base / missing[0]}. Pass --data-root DIR (the folder holding "
            f"omniglot-py/), set L2L_RECIPES_DATA, or add --download to fetch it")
    characters = {}  # os.scandir: a tenth of pathlib's time for the 32,460 files, at every load
    for alphabet in sorted(e.path for s in SETS for e in os.scandir(base / s) if e.is_dir()):
        for character in sorted(e.path for e in os.scandir(alphabet) if e.is_dir()):
            name = f"{os.path.basename(alphabet)}/{os.path.basename(character)}"
            characters[name] = sorted(e.path for e in os.scandir(character) if e.name.endswith(".png"))
    counts = {len(files) for files in characters.values()}
    if counts != {DRAWINGS}:
        raise UserError(f"Omniglot under {root} is incomplete: expected {DRAWINGS} drawings per "
                        f"character, found {sorted(counts)}; re-extract or re-download it")
    return characters


def load_omniglot(root=None, download=False, progress=True, binary=False):
    """All Omniglot characters as (names, uint8 tensor [characters, 20, 28, 28]), via the cache."""
    root = data.data_root(root)
    characters = omniglot_sources(root, download)

    def decode():
        names = list(characters)
        images = torch.empty(len(names), DRAWINGS, SIZE, SIZE, dtype=torch.uint8)
        for i, name in enumerate(tqdm(names, desc="decoding Omniglot (once)", disable=not progress)):
            for j, f in enumerate(characters[name]):
                images[i, j] = read_png(f, binary)
        return {"names": names, "images": images}

    files = [f for fs in characters.values() for f in fs]
    key = data.files_key(f"omniglot v{CACHE_VERSION} {SIZE}px {'nearest' if binary else 'lanczos'}", files, root)
    cache = data.cached(f"omniglot-{SIZE}px" + "-binary" * binary, key, decode)
    return cache["names"], cache["images"]


class OmniglotClasses(torch.utils.data.Dataset):
    """The classes `<Alphabet>/characterNN/rotDDD` of one split; item i -> (image, class index).

    `images[k, j]`: drawing j of character `names[k]`, uint8 [28, 28] (the cache's tensor, or
    Drawings). A character's rotations are classes of their own (Vinyals et al. 2016).
    """

    def __init__(self, names, images, classes):
        index = {n: i for i, n in enumerate(names)}
        unknown = [c for c in classes if c.rsplit("/", 1)[0] not in index]
        if unknown:
            raise UserError(f"split class {unknown[0]} has no images in the Omniglot data")
        self.images = images
        self.classes = list(classes)
        self.character = [index[c.rsplit("/", 1)[0]] for c in self.classes]
        self.quarter_turns = [int(c.rsplit("/rot", 1)[1]) // 90 for c in self.classes]
        self.labels_to_indices = {c: list(range(c * DRAWINGS, (c + 1) * DRAWINGS)) for c in range(len(self.classes))}

    def __len__(self):
        return len(self.classes) * DRAWINGS

    def __getitem__(self, i):
        c, j = divmod(i, DRAWINGS)
        # torch.rot90 turns counter-clockwise, as PIL's Image.rotate does.
        x = torch.rot90(self.images[self.character[c], j], self.quarter_turns[c], dims=(0, 1))
        return x.float().div_(255).unsqueeze(0), c

    def all_images(self):
        """Every item's image as one uint8 tensor [items, 1, H, W], in item order (rotations applied)."""
        turns = torch.tensor(self.quarter_turns)
        images = self.images[torch.tensor(self.character)]  # [classes, drawings, H, W]
        for q in (1, 2, 3):
            images[turns == q] = torch.rot90(images[turns == q], q, dims=(2, 3))
        return images.reshape(-1, 1, *images.shape[2:])


def classes(split, root=None):
    """Class names `<Alphabet>/characterNN/rotDDD` of one split of the standard split."""
    return data.read_split("omniglot-vinyals", split)


def load_split(split, root=None, download=False, progress=True, binary=False):
    """One split of the standard Omniglot split (1028/172/423 characters x 4 rotations)."""
    names, images = load_omniglot(root, download, progress, binary)
    return OmniglotClasses(names, images, classes(split))


class DecodedSplit(torch.utils.data.Dataset):
    """One split read from the PNGs under `root/omniglot-py` (no cache): load_split's items, each
    drawing decoded the first time a task asks for it (a run starts at once), then kept."""

    def __init__(self, split, root, download=False, binary=False):
        self.files, self.classes, self.decoded = omniglot_sources(root, download), classes(split), {}  # PNG paths
        self.binary = binary
        self.labels_to_indices = {c: list(range(c * DRAWINGS, (c + 1) * DRAWINGS)) for c in range(len(self.classes))}

    def __len__(self):
        return len(self.classes) * DRAWINGS

    def __getitem__(self, i):
        c, j = divmod(i, DRAWINGS)
        character, rotation = self.classes[c].rsplit("/rot", 1)
        path = self.files[character][j]
        if path not in self.decoded:
            self.decoded[path] = read_png(path, self.binary)
        # torch.rot90 turns counter-clockwise, as PIL's Image.rotate does
        return torch.rot90(self.decoded[path], int(rotation) // 90).float().div_(255).unsqueeze(0), c


def decode_split(split, root, download=False, binary=False):
    """One split read from the PNGs under `root` (no cache), as its tasks need them: load_split's items."""
    return DecodedSplit(split, root, download, binary)
