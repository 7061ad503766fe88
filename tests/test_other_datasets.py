"""tiered-ImageNet, CIFAR-FS and FC100 in learn2learn's on-disk formats, generated small by
the tests (the real datasets are not on these machines), each run end to end by a recipe."""
import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli
from l2l_recipes import data
from l2l_recipes.errors import UserError

SPLITS = {"train": 4, "val": 2, "test": 2}  # classes per split
PER_CLASS = 8


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("L2L_RECIPES_CACHE", str(tmp_path / "cache"))


def _image(c, i, size):
    """A noisy image whose colour depends on its class, so there is something to learn."""
    rng = np.random.default_rng(1000 * c + i)
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    pixels[..., c % 3] += np.uint8(120 + 30 * (c // 3))
    return pixels


def _png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _classes():
    c = 0
    for split, n in SPLITS.items():
        yield split, list(range(c, c + n))
        c += n


def make_cifar_fs(root):
    base = root / "cifarfs" / "cifar100"
    (base / "splits" / "bertinetto").mkdir(parents=True)
    for split, classes in _classes():
        names = [f"class_{c:02d}" for c in classes]
        (base / "splits" / "bertinetto" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for c, name in zip(classes, names):
            (base / "data" / name).mkdir(parents=True)
            for i in range(PER_CLASS):
                Image.fromarray(_image(c, i, 32)).save(base / "data" / name / f"{name}_s_{i:03d}.png")


def make_fc100(root):
    root.mkdir(parents=True, exist_ok=True)
    for split, classes in _classes():
        images = np.stack([_image(c, i, 32) for c in classes for i in range(PER_CLASS)])
        labels = [10 + c for c in classes for _ in range(PER_CLASS)]
        with open(root / f"FC100_{split}.pickle", "wb") as f:
            pickle.dump({"data": images, "labels": labels}, f, protocol=2)


def make_tiered(root):
    base = root / "tiered-imagenet"
    base.mkdir(parents=True)
    for split, classes in _classes():
        blobs = [np.frombuffer(_png(_image(c, i, 84)), dtype=np.uint8) for c in classes for i in range(PER_CLASS)]
        with open(base / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump(blobs, f)
        specific = np.array([k for k in range(len(classes)) for _ in range(PER_CLASS)])
        with open(base / f"{split}_labels.pkl", "wb") as f:
            pickle.dump({"label_specific": specific, "label_general": specific // 2,
                         "label_specific_str": [f"n{c:08d}" for c in classes]}, f)


MAKERS = {"cifar-fs": (make_cifar_fs, 32), "fc100": (make_fc100, 32), "tiered-imagenet": (make_tiered, 84)}


@pytest.mark.parametrize("name", list(MAKERS))
def test_format_loads_every_split(tmp_path, name):
    make, size = MAKERS[name]
    make(tmp_path)
    module = data.dataset_module(name)
    for split, classes in _classes():
        ds = data.load_split(name, split, tmp_path)
        assert ds.images.shape == (len(classes) * PER_CLASS, 3, size, size)
        assert len(ds.classes) == len(classes) == len(module.classes(split, tmp_path))
        assert all(len(v) == PER_CLASS for v in ds.labels_to_indices.values())
        x, y = ds[PER_CLASS + 3]
        assert y == 1 and torch.equal(x, module.transform(Image.fromarray(_image(classes[1], 3, size))))


@pytest.mark.parametrize("recipe", ["protonet-cifar-fs-5w1s", "maml-cifar-fs-5w5s", "protonet-fc100-5w5s",
                                    "maml-fc100-5w1s", "protonet-tiered-imagenet-5w1s",
                                    "maml-tiered-imagenet-5w1s"])
def test_recipe_runs_end_to_end(tmp_path, recipe):
    dataset = next(d for d in MAKERS if f"-{d}-" in recipe)
    MAKERS[dataset][0](tmp_path / "data")
    shots = 1 if recipe.endswith("1s") else 2
    small = ["ways=2", f"shots={shots}", "queries=3", "train_queries=2", "iterations=3", "val_interval=3",
             "val_episodes=2", "test_episodes=4"]
    small += ["train_ways=3"] if recipe.startswith("protonet") else ["meta_batch_size=2",
                                                                       "adaptation_steps=1",
                                                                       "test_adaptation_steps=2"]
    out = cli("run", recipe, "--data-root", tmp_path / "data", "--device", "cpu", "--out", tmp_path / "runs",
              *[a for kv in small for a in ("--set", kv)])
    assert out.exit_code == 0, out.output + out.stderr
    (run_dir,) = (tmp_path / "runs" / recipe).iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["episodes"] == 4 and result["ways"] == 2 and 0 <= result["accuracy"] <= 1


def test_missing_dataset_names_the_fix(tmp_path):
    for name, words in [("cifar-fs", "CIFAR-FS not found"), ("fc100", "FC100 not found"),
                        ("tiered-imagenet", "tiered-ImageNet not found")]:
        with pytest.raises(UserError, match=f"{words}.*--data-root"):
            data.load_split(name, "train", tmp_path)
