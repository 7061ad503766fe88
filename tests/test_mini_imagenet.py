"""mini-ImageNet in both on-disk forms (images folder or zip + split CSVs; learn2learn's
pickles), generated small in each real format, and the real dataset beside the checkout."""
import csv
import io
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from l2l_recipes import data
from l2l_recipes.datasets import mini_imagenet
from l2l_recipes.errors import UserError

WNIDS = {"train": ["n01000001", "n01000002", "n01000003"], "val": ["n02000001", "n02000002"],
         "test": ["n03000001", "n03000002"]}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("L2L_RECIPES_CACHE", str(tmp_path / "cache"))


def _jpeg(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _csv_form(base, zipped):
    base.mkdir(parents=True)
    files = {}
    for split, wnids in WNIDS.items():
        rows = [(f"{w}{i:08d}.jpg", w) for w in wnids for i in range(1, 5)]
        with open(base / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)
        files.update({name: _jpeg(len(files)) for name, _ in rows})
    if zipped:
        with zipfile.ZipFile(base / "images.zip", "w", zipfile.ZIP_STORED) as z:
            for name, blob in files.items():
                z.writestr(f"images/{name}", blob)
    else:
        (base / "images").mkdir()
        for name, blob in files.items():
            (base / "images" / name).write_bytes(blob)


def test_folder_and_zip_forms_give_the_same_split(tmp_path):
    _csv_form(tmp_path / "a" / "mini-imagenet", zipped=False)
    _csv_form(tmp_path / "b" / "mini-imagenet", zipped=True)
    folder = mini_imagenet.load_split("train", tmp_path / "a", progress=False)
    archive = mini_imagenet.load_split("train", tmp_path / "b", progress=False)
    assert folder.classes == archive.classes == WNIDS["train"]
    assert folder.images.shape == (12, 3, 84, 84) and folder.images.dtype == torch.uint8
    assert torch.equal(folder.images, archive.images) and torch.equal(folder.targets, archive.targets)
    assert folder.labels_to_indices == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [8, 9, 10, 11]}
    x, y = folder[5]
    assert y == 1 and x.shape == (3, 84, 84) and 0 <= x.min() and x.max() <= 1
    with Image.open(tmp_path / "a/mini-imagenet/images/n0100000200000002.jpg") as im:
        assert torch.equal(mini_imagenet.transform(im), x)


def test_learn2learn_pickle_form(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 84, 84, 3), dtype=np.uint8)
    (tmp_path / "mini-imagenet").mkdir()
    with open(tmp_path / "mini-imagenet" / "mini-imagenet-cache-validation.pkl", "wb") as f:
        pickle.dump({"image_data": pixels, "class_dict": {"n02000001": [0, 2, 4], "n02000002": [1, 3, 5]}}, f)
    ds = data.load_split("mini-imagenet", "val", tmp_path)
    assert ds.classes == ["n02000001", "n02000002"] and ds.targets.tolist() == [0, 1, 0, 1, 0, 1]
    assert torch.equal(ds.images[3], torch.from_numpy(pixels[3]).permute(2, 0, 1))
    tasks = data.taskset(ds, ways=2, shots=1, queries=2)
    x, y = tasks.sample()
    assert x.shape == (6, 3, 84, 84) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]


def test_html_instead_of_pickle_names_the_file(tmp_path):
    """learn2learn issue #367: a failed download saves an HTML page under the pickle's name."""
    (tmp_path / "mini-imagenet").mkdir()
    bad = tmp_path / "mini-imagenet" / "mini-imagenet-cache-train.pkl"
    bad.write_text("\n<!DOCTYPE html><html><head><title>Google Drive</title></head></html>")
    with pytest.raises(UserError, match=f"{bad} is an HTML page, not a pickle.*#367.*download it again"):
        data.load_split("mini-imagenet", "train", tmp_path)
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match=f"{bad} is not a readable mini-ImageNet pickle"):
        data.load_split("mini-imagenet", "train", tmp_path)


def test_missing_mini_imagenet_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="mini-ImageNet test split not found.*images.zip.*test.csv.*--data-root"):
        data.load_split("mini-imagenet", "test", tmp_path)


def test_shipped_class_lists_are_the_ravi_split(data_root):
    for split in ("train", "val", "test"):
        rows = mini_imagenet.read_csv(data_root / "mini-imagenet" / f"{split}.csv")
        assert mini_imagenet.classes(split) == list(dict.fromkeys(label for _, label in rows))
    sizes = {s: len(mini_imagenet.classes(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 64, "val": 16, "test": 20}
    assert not set(mini_imagenet.classes("train")) & set(mini_imagenet.classes("test"))


def test_real_test_split_from_the_zip(data_root, monkeypatch):
    monkeypatch.delenv("L2L_RECIPES_CACHE")  # the real cache, shared with training runs
    ds = data.load_split("mini-imagenet", "test", data_root)
    assert ds.images.shape == (12000, 3, 84, 84) and ds.classes == mini_imagenet.classes("test")
    assert all(len(v) == 600 for v in ds.labels_to_indices.values())
    name = mini_imagenet.read_csv(data_root / "mini-imagenet" / "test.csv")[1234][0]
    with zipfile.ZipFile(data_root / "mini-imagenet" / "images.zip") as z, z.open(f"images/{name}") as f:
        with Image.open(f) as im:
            assert torch.equal(mini_imagenet.transform(im), ds[1234][0])


def test_uncached_decoding_gives_the_cached_images(data_root, monkeypatch):
    """decode_split (what an exported file reads: no cache, each image decoded when a task first
    needs it) gives the cached split's items, on the real zip (two classes)."""
    monkeypatch.delenv("L2L_RECIPES_CACHE")  # the real cache, shared with training runs
    cached = data.load_split("mini-imagenet", "val", data_root)
    read_csv = mini_imagenet.read_csv
    monkeypatch.setattr(mini_imagenet, "read_csv", lambda path: read_csv(path)[:1200])
    decoded = mini_imagenet.decode_split("val", data_root)
    assert decoded.classes == cached.classes[:2] and torch.equal(decoded.targets, cached.targets[:1200])
    assert decoded.labels_to_indices == {c: cached.labels_to_indices[c] for c in range(2)} and not decoded.decoded
    for i in (0, 599, 600, 1199):
        assert torch.equal(decoded[i][0], cached[i][0]) and decoded[i][1] == cached[i][1]
    assert sorted(decoded.decoded) == [0, 599, 600, 1199]  # only what was asked for


@pytest.mark.parametrize("form", ["folder", "zip", "pickle"])
def test_uncached_decoding_of_each_form(tmp_path, form):
    if form == "pickle":
        pixels = np.random.default_rng(0).integers(0, 256, (6, 84, 84, 3), dtype=np.uint8)
        (tmp_path / "mini-imagenet").mkdir()
        with open(tmp_path / "mini-imagenet" / "mini-imagenet-cache-validation.pkl", "wb") as f:
            pickle.dump({"image_data": pixels, "class_dict": {"n02000001": [0, 2, 4], "n02000002": [1, 3, 5]}}, f)
    else:
        _csv_form(tmp_path / "mini-imagenet", zipped=form == "zip")
    cached, decoded = mini_imagenet.load_split("val", tmp_path, progress=False), mini_imagenet.decode_split("val", tmp_path)
    assert decoded.classes == cached.classes and torch.equal(decoded.targets, cached.targets)
    assert decoded.labels_to_indices == cached.labels_to_indices and len(decoded) == len(cached)
    for i in range(len(cached)):
        assert torch.equal(decoded[i][0], cached[i][0]) and decoded[i][1] == cached[i][1]
