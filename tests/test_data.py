"""Omniglot pipeline: standard split, preprocessing cache, rotations, episodes, and the
learn2learn `get_tasksets('omniglot')` failures we avoid (split leakage, random split,
late-bound rotations)."""
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from l2l_recipes import data
from l2l_recipes.datasets import omniglot
from l2l_recipes.errors import UserError


def _character(name):
    return name.rsplit("/", 1)[0]


# ----------------------------------------------------------------------------- split

def test_shipped_split_is_the_shared_standard_split(data_root):
    for split in ("train", "val", "trainval", "test"):
        shipped = (data.SPLITS_DIR / "omniglot-vinyals" / f"{split}.txt").read_bytes()
        shared = (data_root / "splits" / "omniglot-vinyals" / f"{split}.txt").read_bytes()
        assert shipped == shared, split


def test_uncached_decoding_gives_the_cached_items(data_root, monkeypatch):
    """decode_split (what an exported file reads: no cache, each drawing's PNG read when a task first
    needs it, once) gives load_split's items, on the real PNGs of two test characters in their
    four rotations."""
    cached = data.load_split("omniglot", "test", data_root)
    names = omniglot.classes("test")[:8]
    monkeypatch.setattr(omniglot, "classes", lambda split, root=None: names)
    decoded = omniglot.decode_split("test", data_root)
    reads = []
    monkeypatch.setattr(omniglot, "read_png",
                        lambda path, binary=False, read=omniglot.read_png: reads.append(path) or read(path, binary))
    assert decoded.classes == names and decoded.labels_to_indices == {c: cached.labels_to_indices[c] for c in range(8)}
    assert not decoded.decoded  # nothing read before a task asks for it
    for i in range(len(decoded)):
        assert torch.equal(decoded[i][0], cached[i][0]) and decoded[i][1] == cached[i][1]
    assert len(reads) == len(set(reads)) == 40  # each drawing read once, for its four rotations


def test_binary_omniglot_holds_the_official_codes_images(data_root):
    """Dataset omniglot-binary: omniglot's classes and items, each image the 1-bit PNG resized as
    the papers' codes resize it (MAML's resize_images.py asks Pillow for Lanczos, which resizes a
    1-bit image by nearest neighbour anyway), ink = 1: every pixel 0 or 1; its uncached loader (an
    exported file's) gives the cached items; MAML's network for it is the Omniglot one."""
    from l2l_recipes import models
    from l2l_recipes.datasets import omniglot_binary
    binary, grey = (data.load_split(name, "test", data_root) for name in ("omniglot-binary", "omniglot"))
    assert binary.classes == grey.classes and binary.labels_to_indices == grey.labels_to_indices
    c = next(i for i, name in enumerate(binary.classes) if name.endswith("/rot000"))
    png = omniglot.omniglot_sources(data_root)[binary.classes[c].rsplit("/", 1)[0]][0]
    with Image.open(png) as image:
        assert image.mode == "1"
        official = 1 - np.array(image.resize((28, 28), resample=Image.LANCZOS), dtype=np.float32)
    assert torch.equal(binary[c * omniglot.DRAWINGS][0][0], torch.from_numpy(official))
    assert torch.unique(binary.all_images()).tolist() == [0, 255] and len(torch.unique(grey.all_images())) > 100
    decoded = omniglot_binary.decode_split("test", data_root)
    for i in range(c * omniglot.DRAWINGS, (c + 1) * omniglot.DRAWINGS):
        assert torch.equal(decoded[i][0], binary[i][0]) and decoded[i][1] == binary[i][1]
    omniglot_cnn = type(models.conv4_classifier("omniglot", 5, 64))
    assert isinstance(models.conv4_classifier("omniglot-binary", 5, 64), omniglot_cnn)


def test_split_sizes_and_disjoint_characters(data_root):
    chars = {s: {_character(c) for c in data.read_split("omniglot-vinyals", s)} for s in data.SPLIT_NAMES}
    assert {s: len(c) for s, c in chars.items()} == {"train": 1028, "val": 172, "test": 423}
    assert not chars["train"] & chars["test"] and not chars["val"] & chars["test"]
    assert not chars["train"] & chars["val"]
    for s in data.SPLIT_NAMES:
        classes = data.read_split("omniglot-vinyals", s)
        assert len(classes) == 4 * len(chars[s])  # four rotations per character
        assert {c.rsplit("/", 1)[1] for c in classes} == {"rot000", "rot090", "rot180", "rot270"}
    evaluation = {f"{a.name}/{c.name}" for a in (data_root / "omniglot-py" / "images_evaluation").iterdir()
                  for c in a.iterdir()}
    assert chars["test"] <= evaluation


def test_split_datasets_hold_only_their_classes(splits):
    for name, ds in splits.items():
        assert ds.classes == data.read_split("omniglot-vinyals", name)
        assert len(ds) == 20 * len(ds.classes)


# ----------------------------------------------------------------------------- images and cache

def test_cache_holds_every_character_as_the_transform_sees_it(data_root, omniglot_images):
    names, images = omniglot_images
    assert len(names) == 1623 and images.shape == (1623, 20, 28, 28) and images.dtype == torch.uint8
    rng = random.Random(0)
    for i in rng.sample(range(len(names)), 5):
        png = sorted((data_root / "omniglot-py").glob(f"images_*/{names[i]}/*.png"))[3]
        with Image.open(png) as im:
            x = omniglot.transform(im)
        assert x.shape == (1, 28, 28)
        assert torch.equal(x, images[i, 3].float().div(255).unsqueeze(0))
    # ink is 1: the mean pixel is mostly background (0)
    assert 0.02 < images.float().div(255).mean() < 0.3


def test_second_load_comes_from_the_cache(data_root, omniglot_images):
    started = time.time()
    names, images = omniglot.load_omniglot(data_root, progress=False)
    assert time.time() - started < 10
    assert names == omniglot_images[0] and torch.equal(images, omniglot_images[1])


def _tiny_omniglot(root, characters=2, value=0):
    for c in range(characters):
        folder = root / "omniglot-py" / "images_background" / "Alpha" / f"character{c + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(20):
            pixels = np.ones((105, 105), dtype=bool)
            pixels[10 + j: 40 + j, 20 + 5 * c: 30 + 5 * c] = value  # ink stroke
            Image.fromarray(pixels).save(folder / f"{c:04d}_{j + 1:02d}.png")
    (root / "omniglot-py" / "images_evaluation").mkdir(parents=True, exist_ok=True)


def test_cache_is_rebuilt_when_a_source_changes_and_the_stale_one_removed(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("L2L_RECIPES_CACHE", str(cache))
    _tiny_omniglot(tmp_path / "data")
    _tiny_omniglot(tmp_path / "copy")  # another data folder: its cache is its own
    names, images = omniglot.load_omniglot(tmp_path / "data", progress=False)
    assert names == ["Alpha/character01", "Alpha/character02"] and images[0].sum() > 0
    omniglot.load_omniglot(tmp_path / "copy", progress=False)
    (first, other) = sorted(cache.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    older_scheme = cache / "omniglot-28px-0123456789abcdef.pt"  # named before the folder was in the key
    older_scheme.write_bytes(b"")
    # redraw one file: the cache key changes, the new pixels are read, the stale cache goes
    png = tmp_path / "data/omniglot-py/images_background/Alpha/character01/0000_01.png"
    Image.fromarray(np.ones((105, 105), dtype=bool)).save(png)
    _, rebuilt = omniglot.load_omniglot(tmp_path / "data", progress=False)
    assert rebuilt[0, 0].sum() == 0 and torch.equal(rebuilt[0, 1:], images[0, 1:])
    kept = set(cache.glob("*.pt"))
    assert len(kept) == 2 and other in kept and first not in kept and older_scheme not in kept
    assert not (cache / f".{first.name}.lock").exists() and (cache / f".{other.name}.lock").exists()
    written = other.stat().st_mtime_ns
    omniglot.load_omniglot(tmp_path / "copy", progress=False)  # read, not rebuilt
    assert set(cache.glob("*.pt")) == kept and other.stat().st_mtime_ns == written


def test_a_cache_asked_for_twice_at_once_is_built_once(tmp_path, monkeypatch):
    """Two processes (here threads: flock locks each open file apart) wanting a missing cache
    file: the second waits for the first's build and reads its file."""
    monkeypatch.setenv("L2L_RECIPES_CACHE", str(tmp_path))
    builds, building, results = [], threading.Event(), []

    def build():
        builds.append(1)
        building.set()
        time.sleep(0.5)
        return {"x": torch.arange(3)}

    killed = tmp_path / ".t-k.pt.tmp12345"  # what a build killed while saving leaves
    killed.write_bytes(b"partial")
    first = threading.Thread(target=lambda: results.append(data.cached("t", "k", build)))
    first.start()
    building.wait()
    results.append(data.cached("t", "k", build))
    first.join()
    assert len(builds) == 1 and len(results) == 2 and all(torch.equal(r["x"], torch.arange(3)) for r in results)
    assert not killed.exists()


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="Omniglot not found.*--data-root.*L2L_RECIPES_DATA.*--download"):
        omniglot.load_omniglot(tmp_path)


def test_incomplete_data_is_a_clear_error_with_or_without_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("L2L_RECIPES_CACHE", str(tmp_path / "cache"))
    _tiny_omniglot(tmp_path / "data")
    (tmp_path / "data/omniglot-py/images_background/Alpha/character02/0001_20.png").unlink()
    monkeypatch.setattr(omniglot, "classes", lambda split, root=None: ["Alpha/character01/rot000",
                                                                       "Alpha/character02/rot000"])
    for load in (lambda: omniglot.load_omniglot(tmp_path / "data", progress=False),
                 lambda: omniglot.decode_split("test", tmp_path / "data")):
        with pytest.raises(UserError, match=r"incomplete: expected 20 drawings per character, found \[19, 20\]"):
            load()


def test_uncached_split_downloads_only_the_missing_set(tmp_path, monkeypatch):
    """--download in an exported file fetches through torchvision the sets not on disk, and only those."""
    import torchvision
    _tiny_omniglot(tmp_path / "data")
    (tmp_path / "data/omniglot-py/images_evaluation").rmdir()
    fetched = []

    def fake_omniglot(root, background, download):
        fetched.append((root, background, download))
        (Path(root) / "omniglot-py" / "images_evaluation").mkdir()

    monkeypatch.setattr(torchvision.datasets, "Omniglot", fake_omniglot)
    monkeypatch.setattr(omniglot, "classes", lambda split, root=None: ["Alpha/character01/rot090"])
    split = omniglot.decode_split("test", tmp_path / "data", download=True)
    assert fetched == [(str(tmp_path / "data"), False, True)] and len(split) == 20
    omniglot.decode_split("test", tmp_path / "data", download=True)
    assert len(fetched) == 1  # both sets on disk: nothing fetched


def test_a_truncated_png_read_without_the_cache_is_named_with_the_fix(tmp_path, monkeypatch):
    _tiny_omniglot(tmp_path / "data")
    png = tmp_path / "data/omniglot-py/images_background/Alpha/character02/0001_05.png"
    png.write_bytes(png.read_bytes()[:60])
    monkeypatch.setattr(omniglot, "classes", lambda split, root=None: ["Alpha/character01/rot000",
                                                                       "Alpha/character02/rot090"])
    split = omniglot.decode_split("test", tmp_path / "data")
    j = sorted(png.parent.iterdir()).index(png)  # the drawing's index in its character
    assert split[0][0].shape == split[20][0].shape == (1, 28, 28)  # the other drawings still read
    with pytest.raises(UserError, match=f"cannot decode {png} .*l2l-recipes data verify"):
        split[20 + j]


def test_rotation_classes_are_rotated_copies_of_their_character(splits, omniglot_images, data_root):
    ds = splits["test"]
    base = ds.classes.index(next(c for c in ds.classes if c.endswith("rot000")))
    character = _character(ds.classes[base])
    for k, rot in enumerate(("rot000", "rot090", "rot180", "rot270")):
        c = ds.classes.index(f"{character}/{rot}")
        x, label = ds[c * 20 + 7]
        assert label == c
        assert torch.equal(x, torch.rot90(ds[base * 20 + 7][0], k, dims=(1, 2)))
    # the direction matches PIL's Image.rotate (counter-clockwise); resizing before or after
    # the turn differs only by resampling rounding
    png = sorted((data_root / "omniglot-py").glob(f"images_*/{character}/*.png"))[7]
    with Image.open(png) as im:
        pil_rotated = omniglot.transform(im.convert("L").rotate(90))
    x90 = ds[ds.classes.index(f"{character}/rot090") * 20 + 7][0]
    x270 = ds[ds.classes.index(f"{character}/rot270") * 20 + 7][0]
    assert (pil_rotated - x90).abs().mean() < 0.01 < (pil_rotated - x270).abs().mean()


# ----------------------------------------------------------------------------- episodes

def _task_classes(ds, description):
    return [divmod(dd.index, omniglot.DRAWINGS)[0] for dd in description]


def test_episode_protocol(splits):
    ds = splits["train"]
    tasks = data.taskset(ds, ways=5, shots=2, queries=3)
    random.seed(0)
    for _ in range(20):
        description = tasks.sample_task_description()
        x, y = tasks.get_task(description)
        assert x.shape == (25, 1, 28, 28)
        assert sorted(torch.bincount(y).tolist()) == [5] * 5
        indices = [dd.index for dd in description]
        assert len(set(indices)) == 25  # every image drawn once
        classes = _task_classes(ds, description)
        # a remapped label stands for exactly one original class
        assert len({(int(a), b) for a, b in zip(y, classes)}) == 5
        sx, sy, qx, qy = data.split_support_query(x, y, shots=2)
        assert sorted(torch.bincount(sy).tolist()) == [2] * 5 and sorted(torch.bincount(qy).tolist()) == [3] * 5
        # support and query never share an image
        is_support = torch.zeros(25, dtype=torch.bool)
        for c in range(5):
            is_support[(y == c).nonzero().flatten()[:2]] = True
        support_idx = {indices[n] for n in range(25) if is_support[n]}
        query_idx = set(indices) - support_idx
        assert not support_idx & query_idx and len(support_idx) == 10 and len(query_idx) == 15
        assert torch.equal(sx, x[is_support]) and torch.equal(qx, x[~is_support])


def test_split_support_query_handles_any_order():
    y = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2])
    x = torch.arange(9)
    sx, sy, qx, qy = data.split_support_query(x, y, shots=1)
    assert sx.tolist() == [0, 1, 2] and sy.tolist() == [2, 0, 1]
    assert qx.tolist() == [3, 4, 5, 6, 7, 8] and qy.tolist() == [0, 2, 1, 1, 0, 2]


def test_training_tasks_never_see_other_splits(splits):
    """learn2learn 0.2.0's get_tasksets('omniglot') samples training tasks from all 1623 characters."""
    ds = splits["train"]
    allowed = {_character(c) for c in ds.classes}
    others = {_character(c) for s in ("val", "test") for c in splits[s].classes}
    tasks = data.taskset(ds, ways=60, shots=1, queries=5)
    random.seed(1)
    seen = set()
    for _ in range(200):
        seen |= {_character(ds.classes[c]) for c in _task_classes(ds, tasks.sample_task_description())}
    assert seen <= allowed and not seen & others
    assert len(seen) > 900  # tasks do range over the split


def test_each_class_of_a_task_keeps_its_own_rotation(splits, omniglot_images):
    """learn2learn's RandomClassRotation binds its angle late: every class got the last one drawn."""
    ds = splits["train"]
    names, images = omniglot_images
    tasks = data.taskset(ds, ways=20, shots=1, queries=1)
    random.seed(2)
    turns_seen = set()
    for _ in range(10):
        description = tasks.sample_task_description()
        x, _ = tasks.get_task(description)
        for n, dd in enumerate(description):
            c, j = divmod(dd.index, omniglot.DRAWINGS)
            k = int(ds.classes[c][-3:]) // 90
            turns_seen.add(k)
            expected = torch.rot90(images[names.index(_character(ds.classes[c])), j], k)
            assert torch.equal(x[n, 0], expected.float().div(255))
    assert turns_seen == {0, 1, 2, 3}


def test_sampling_is_deterministic_under_a_seed(splits):
    ds = splits["train"]
    tasks = data.taskset(ds, ways=5, shots=1, queries=1)

    def draw(seed):
        random.seed(seed)
        return [tasks.sample() for _ in range(5)]

    a, b, c = draw(7), draw(7), draw(8)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_fixed_tasks_are_the_same_every_time_and_leave_random_alone(splits):
    ds = splits["test"]
    random.seed(123)
    before = random.getstate()
    one = data.fixed_taskset(ds, 5, 1, 15, num_tasks=10, seed=0)
    assert random.getstate() == before
    two = data.fixed_taskset(ds, 5, 1, 15, num_tasks=10, seed=0)
    other = data.fixed_taskset(ds, 5, 1, 15, num_tasks=10, seed=1)
    assert len(one) == 10
    for i in range(10):
        assert torch.equal(one[i][0], two[i][0]) and torch.equal(one[i][1], two[i][1])
        assert torch.equal(one[i][0], one[i][0])  # re-reading a task gives the same task
    assert not all(torch.equal(one[i][0], other[i][0]) for i in range(10))


def test_impossible_tasks_are_clear_errors(splits):
    with pytest.raises(UserError, match="ways=2000 but this split has only 1692 classes"):
        data.taskset(splits["test"], ways=2000, shots=1, queries=1)
    with pytest.raises(UserError, match="shots \\+ queries = 25 but each class has only 20 images"):
        data.taskset(splits["test"], ways=5, shots=5, queries=20)
