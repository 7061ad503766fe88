"""`l2l-recipes predict`: a user's own image folders classified by a trained run, real images."""
import csv
import dataclasses
import json
import shutil
import zipfile

import pytest
import torch

import l2l_recipes
from conftest import REPO, cli
from l2l_recipes import harness, predict, registry
from l2l_recipes.datasets import mini_imagenet

CLASSIFIERS = ["protonet", "matchingnet", "maml", "fomaml", "anil", "metasgd", "reptile", "transfer",
               "mamlpp", "metaoptnet-svm", "metaoptnet-ridge", "snail"]


def untrained_run(path, name, **changes):
    """A run directory of recipe `name` with freshly initialised weights, written by the harness."""
    recipe = registry.get_recipe(name)
    cfg = dataclasses.replace(recipe.config(), device="cpu", **changes)
    torch.manual_seed(0)
    run = harness.Run(path, name, cfg, torch.device("cpu"), progress=False)
    run.save("best.pt", recipe.load_module().build_model(cfg), 0)
    return path


@pytest.fixture(scope="module")
def omniglot_folders(tmp_path_factory, data_root):
    """Five characters of the test alphabets laid out as a user would: support/<class>/ with three
    drawings each, queries/ with four other drawings each (named <class>-<file> for the check)."""
    base = tmp_path_factory.mktemp("omniglot-user")
    evaluation = data_root / "omniglot-py" / "images_evaluation"
    characters = sorted(evaluation.glob("*/character*"))[::131][:5]
    for character in characters:
        name = f"{character.parent.name}-{character.name}"
        drawings = sorted(character.glob("*.png"))
        (base / "support" / name).mkdir(parents=True)
        for png in drawings[:3]:
            shutil.copy(png, base / "support" / name / png.name)
        (base / "queries").mkdir(exist_ok=True)
        for png in drawings[10:14]:
            shutil.copy(png, base / "queries" / f"{name}-{png.name}")
    return base, characters


def test_a_trained_protonet_classifies_held_out_drawings(protonet_run, omniglot_folders):
    run_dir, _ = protonet_run
    base, _ = omniglot_folders
    result = cli("predict", run_dir, "--support", base / "support", "--query", base / "queries", "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.splitlines()]
    assert [r[0] for r in rows] == [str(p) for p in sorted((base / "queries").iterdir())]  # 20, in order
    classes = sorted(p.name for p in (base / "support").iterdir())
    assert all(r[1] in classes and 0.2 <= float(r[2]) <= 1 for r in rows)
    correct = sum(r[0].rsplit("/", 1)[1].startswith(r[1] + "-") for r in rows)
    # chance is 20%; an 80-iteration ProtoNet gets about 90% of 5-way 1-shot test tasks, more with 3 shots
    assert correct >= 0.6 * len(rows), rows


def test_json_output_and_queries_as_several_files(protonet_run, omniglot_folders):
    run_dir, _ = protonet_run
    base, _ = omniglot_folders
    files = sorted((base / "queries").iterdir())[::7]
    result = cli("predict", run_dir, "--support", base / "support", "--json", "--query", *files)
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [r["query"] for r in records] == [str(f) for f in files]
    for r in records:
        assert set(r["probabilities"]) == {p.name for p in (base / "support").iterdir()}
        assert sum(r["probabilities"].values()) == pytest.approx(1)
        assert r["probability"] == max(r["probabilities"].values()) == r["probabilities"][r["class"]]
    lines = cli("predict", run_dir, "--support", base / "support", "--query", *files).output.splitlines()
    assert [line.split("\t")[1] for line in lines] == [r["class"] for r in records]


def test_images_go_through_the_training_preprocessing(protonet_run, omniglot_folders, omniglot_images):
    """The PNGs a user gives become exactly the tensors training read from the cache of those files."""
    base, characters = omniglot_folders
    predictor = l2l_recipes.load(protonet_run[0], device="cpu")
    support_x, support_y, classes = predict.support_set(base / "support", predictor.transform)
    names, images = omniglot_images
    expected = torch.cat([images[names.index(f"{c.parent.name}/{c.name}"), :3] for c in characters])
    assert support_x.shape == (15, 1, 28, 28) and support_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    assert torch.equal(support_x, expected.float().div(255).unsqueeze(1))


def test_mini_imagenet_jpegs(tmp_path, data_root):
    """Real mini-ImageNet JPEGs as files (bytes from the zip), an untrained 5-way ProtoNet."""
    source = data_root / "mini-imagenet"
    with open(source / "test.csv", newline="") as f:
        rows = [(r["filename"], r["label"]) for r in csv.DictReader(f)]
    wnids = sorted({label for _, label in rows})[:3]
    chosen = [row for w in wnids for row in [r for r in rows if r[1] == w][:3]]
    with zipfile.ZipFile(source / "images.zip") as z:
        for i, (name, wnid) in enumerate(chosen):
            folder = tmp_path / ("queries" if i % 3 == 2 else f"support/{wnid}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(z.read(f"images/{name}"))
    run_dir = untrained_run(tmp_path / "run", "protonet-mini-imagenet-5w1s")
    result = cli("predict", run_dir, "--support", tmp_path / "support", "--query", tmp_path / "queries", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert len(records) == 3 and all(set(r["probabilities"]) == set(wnids) for r in records)
    assert all(sum(r["probabilities"].values()) == pytest.approx(1) for r in records)
    # the support images are those training decodes from the zip, as [3, 84, 84] floats
    support_x, _, _ = predict.support_set(tmp_path / "support", l2l_recipes.load(run_dir, "cpu").transform)
    training = mini_imagenet._decode_csv(source, [r for i, r in enumerate(chosen) if i % 3 != 2], False)
    assert support_x.shape == (6, 3, 84, 84) and torch.equal(support_x, training.float().div(255))


@pytest.mark.parametrize("model", ["maml-omniglot-5w1s", "reptile-omniglot-5w1s"])
def test_a_query_is_classified_as_if_it_were_the_only_one(model, omniglot_folders, tmp_path):
    """The committed MAML and Reptile models normalise with batch statistics at test time: by
    default each query takes those of a batch of the support images and itself (so alone or among
    others, the same logits), computed task by task as Reptile's official code does it; with
    --transductive all queries share one batch, the recipe's `predict`. Both classify the
    held-out drawings of a user's folders (one drawing per class in support)."""
    base, _ = omniglot_folders
    run_dir = REPO / "benchmarks" / "models" / model
    predictor = l2l_recipes.load(run_dir, "cpu")
    support_x, support_y, _ = predict.support_set(base / "support", predictor.transform)
    support_x, support_y = support_x[::3], support_y[::3]  # the models are 1-shot
    files = sorted((base / "queries").iterdir())
    query_x = torch.stack([predict.read_image(f, predictor.transform) for f in files])
    each = predictor.predict_each(support_x, support_y, query_x)  # the fast engine: all queries' tasks at once
    one_by_one = torch.cat([predictor.predict(support_x, support_y, torch.cat([support_x, q[None]]))[-1:]
                            for q in query_x])
    assert torch.allclose(each, one_by_one, rtol=1e-4, atol=1e-4)
    assert torch.allclose(predictor.predict_each(support_x, support_y, query_x[7:8]), each[7:8], rtol=1e-4, atol=1e-4)
    labels = torch.tensor([i // 4 for i in range(len(files))])
    assert (each.argmax(1) == labels).float().mean() >= 0.8
    together = predictor.predict(support_x, support_y, query_x)
    assert not torch.allclose(together, each, rtol=1e-2, atol=1e-2)  # the batch's statistics matter
    for c in (base / "support").iterdir():
        shutil.copytree(c, tmp_path / "one-shot" / c.name, ignore=lambda d, names: sorted(names)[1:])
    for flag, logits in (((), each), (("--transductive",), together)):
        out = cli("predict", run_dir, "--support", tmp_path / "one-shot", "--query", base / "queries", "--json",
                  "--device", "cpu", *flag)
        assert out.exit_code == 0, out.output
        records = json.loads(out.output)
        assert [r["probability"] for r in records] == pytest.approx(logits.double().softmax(1).max(1).values.tolist(),
                                                                    rel=1e-4)


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_every_classifier_recipe_predicts(family, tmp_path, omniglot_folders):
    base, _ = omniglot_folders
    for c in (base / "support").iterdir():  # one drawing per class: what every recipe reads (SNAIL: 1-shot)
        shutil.copytree(c, tmp_path / "support" / c.name, ignore=lambda d, files: sorted(files)[1:])
    run_dir = untrained_run(tmp_path / "run", f"{family}-omniglot-5w1s")
    queries = sorted((base / "queries").iterdir())[::5]
    results = predict.classify(run_dir, tmp_path / "support", queries, device="cpu")
    assert [r["query"] for r in results] == [str(q) for q in queries]
    assert all(sum(r["probabilities"].values()) == pytest.approx(1) for r in results)


def _bad_input(tmp_path, omniglot_folders, case):
    """(predict's arguments, the one-line error) for one kind of bad input."""
    base, _ = omniglot_folders
    run_dir = untrained_run(tmp_path / "run", "protonet-omniglot-5w1s")
    support, queries = tmp_path / "support", base / "queries"
    shutil.copytree(base / "support", support)
    classes = sorted(support.iterdir())
    if case == "missing support":
        return [run_dir, "--support", tmp_path / "nowhere", "--query", queries], (
            f"support folder {tmp_path / 'nowhere'} does not exist: pass --support DIR holding one "
            f"subfolder of images per class")
    if case == "empty support":
        (tmp_path / "empty").mkdir()
        return [run_dir, "--support", tmp_path / "empty", "--query", queries], (
            f"support folder {tmp_path / 'empty'} has no class folders: put each class's images in a "
            f"subfolder named after the class")
    if case == "class without images":
        for png in classes[2].iterdir():
            png.unlink()
        (classes[2] / "notes.txt").write_text("no image here")
        return [run_dir, "--support", support, "--query", queries], (
            f"class folder {classes[2]} holds no image files: add images of the class or remove the folder")
    if case == "one class":
        for c in classes[1:]:
            shutil.rmtree(c)
        return [run_dir, "--support", support, "--query", queries], (
            f"support folder {support} has one class folder ({classes[0].name}): give at least two classes "
            f"to choose from")
    if case == "six classes for a 5-way MAML":
        shutil.copytree(classes[0], support / "another")
        maml = untrained_run(tmp_path / "maml", "maml-omniglot-5w1s")
        return [maml, "--support", support, "--query", queries], (
            f"this MAML model has a 5-way head; got a 6-way task (from the 6 class folders of {support})")
    if case == "two shots for a 1-shot SNAIL":
        snail = untrained_run(tmp_path / "snail", "snail-omniglot-5w1s")
        for c in classes:
            for png in sorted(c.iterdir())[2:]:
                png.unlink()
        return [snail, "--support", support, "--query", queries], (
            f"this SNAIL model reads 1 support image(s) per class (5-way 1-shot sequences); got 2, 2, 2, 2, 2 "
            f"(from the 5 class folders of {support})")
    if case == "corrupt support image":
        bad = sorted(classes[1].iterdir())[0]
        bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
        return [run_dir, "--support", support, "--query", queries], (
            f"cannot read image {bad} (OSError: image file is truncated (0 bytes not processed)): replace or remove it")
    if case == "not an image query":
        (tmp_path / "q.jpg").write_text("not a picture")
        return [run_dir, "--support", support, "--query", tmp_path / "q.jpg"], (
            f"cannot read image {tmp_path / 'q.jpg'} (UnidentifiedImageError: cannot identify image file "
            f"'{tmp_path / 'q.jpg'}'): replace or remove it")
    if case == "no weights":
        (tmp_path / "stopped").mkdir()
        shutil.copy(run_dir / "config.json", tmp_path / "stopped")
        return [tmp_path / "stopped", "--support", support, "--query", queries], (
            f"run {tmp_path / 'stopped'} holds no weights (no best.pt or ckpt.pt): it stopped before its "
            f"first checkpoint; train it again")
    if case == "no queries":
        return [run_dir, "--support", support], "no query images: pass --query FILE_OR_FOLDER (several allowed)"
    if case == "empty query folder":
        (tmp_path / "none").mkdir()
        return [run_dir, "--support", support, "--query", tmp_path / "none"], (
            f"query folder {tmp_path / 'none'} holds no image files")
    if case == "not a classifier":
        sine = untrained_run(tmp_path / "sine", "maml-sine-5s")
        return [sine, "--support", support, "--query", queries], (
            "maml-sine-5s is measured by mse, not a classifier of images: predict needs a classification "
            "run (use `l2l-recipes eval` for this one)")
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing support", "empty support", "class without images", "one class", "six classes for a 5-way MAML",
    "two shots for a 1-shot SNAIL", "corrupt support image", "not an image query", "no weights", "no queries",
    "empty query folder", "not a classifier"])
def test_bad_input_is_one_line(case, tmp_path, omniglot_folders):
    args, message = _bad_input(tmp_path, omniglot_folders, case)
    result = cli("predict", *args, "--device", "cpu")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"Error: {message}"]
