"""Omniglot as the papers' official codes read it (MAML, Prototypical Networks, Reptile): the files,
split and classes of `omniglot`, each 1-bit PNG resized to 28x28 by nearest neighbour (what Pillow
does to a 1-bit image whatever filter is asked), so every pixel is ink or background; inverted as
`omniglot` (ink = 1). For measuring what the preprocessing changes: `--set dataset=omniglot-binary`
(docs/data.md)."""
from functools import partial

from l2l_recipes.datasets import omniglot

CHANNELS, SIZE, classes = omniglot.CHANNELS, omniglot.SIZE, omniglot.classes
load_split = partial(omniglot.load_split, binary=True)
decode_split = partial(omniglot.decode_split, binary=True)
transform = partial(omniglot.transform, binary=True)
