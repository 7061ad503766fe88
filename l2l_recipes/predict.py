"""Classify your own images with a trained run: what `l2l-recipes predict` does.

The support set is a folder with one subfolder of images per class (the subfolders' names are
the class names, labelled 0..ways-1 in sorted order); the queries are image files or folders of
them. Every image goes through the run's `transform`, as the dataset's files do in training.
The predictor adapts to the support set as in the recipe's evaluation and scores each query as
if it were the only one (MAML and its kin, which normalise with batch statistics at test time,
see each query in one batch with the support images); `transductive` scores all queries in one
batch, as those recipes' test tasks do. A query's probabilities are the softmax of its logits.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from l2l_recipes import harness
from l2l_recipes.errors import UserError

IMAGE_SUFFIXES = frozenset(ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN)


def image_files(folder):
    """The image files (by suffix: .png, .jpg, ...) under `folder` at any depth, sorted; hidden
    files and folders are skipped."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def as_8_bit(image):
    """`image` as the datasets' files are, 8 bits per channel and opaque: 16-bit pixels scaled to
    8 bits (PIL's own conversion clips them: a 16-bit scan would turn almost all white), and
    transparent pixels shown on white (else they turn black: ink, to an Omniglot model)."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        pixels = np.asarray(image, dtype=np.float64) / 257  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image


def read_image(path, transform):
    """Image file `path` through `transform` (after as_8_bit), turned upright as its EXIF orientation
    says (a phone stores a photo as the sensor saw it and tags how to show it; the datasets' files
    carry no such tag); an unreadable or corrupt file is a UserError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return transform(as_8_bit(ImageOps.exif_transpose(image)))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # foreign, damaged, huge
        reason = (str(e).splitlines() or [""])[0][:120]
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {reason}): replace or remove it") from None


def support_set(folder, transform):
    """(images [n, ...], labels [n], class names) of a folder holding one subfolder of images per class."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"support folder {folder} does not exist: pass --support DIR holding one subfolder "
                        f"of images per class")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"support folder {folder} has no class folders: put each class's images in a "
                        f"subfolder named after the class")
    if len(classes) == 1:
        raise UserError(f"support folder {folder} has one class folder ({classes[0].name}): give at least "
                        f"two classes to choose from")
    images, labels = [], []
    for label, class_dir in enumerate(classes):
        files = image_files(class_dir)
        if not files:
            raise UserError(f"class folder {class_dir} holds no image files: add images of the class or "
                            f"remove the folder")
        images += [read_image(f, transform) for f in files]
        labels += [label] * len(files)
    return torch.stack(images), torch.tensor(labels), [c.name for c in classes]


def query_files(paths):
    """The image files named by `paths`: files as given, folders expanded by image_files()."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise UserError(f"query folder {path} holds no image files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"query {path} does not exist")
    if not files:
        raise UserError("no query images: pass --query FILE_OR_FOLDER (several allowed)")
    return files


def load_classifier(run_dir, device="auto"):
    """The predictor of an image-classification run directory (its best.pt, else its ckpt.pt)."""
    recipe, _, predictor = harness._load(run_dir, device, None)
    if predictor.metric != "accuracy":
        raise UserError(f"{recipe} is measured by {predictor.metric}, not a classifier of images: predict "
                        f"needs a classification run (use `l2l-recipes eval` for this one)")
    return predictor


def classify(run_dir, support, queries, device="auto", transductive=False):
    """For each query image (files, or folders of them): {"query": path, "class": the predicted
    class (a subfolder name of `support`), "probability": its probability, "probabilities":
    {class: probability}}, in the order given (folders sorted); each query scored on its own
    (`Predictor.predict_each`), or all in one batch (`transductive`)."""
    predictor = load_classifier(run_dir, device)
    files = query_files(queries)
    support_x, support_y, classes = support_set(support, predictor.transform)
    query_x = torch.stack([read_image(f, predictor.transform) for f in files])
    to = predictor.device
    try:
        score = predictor.predict if transductive else predictor.predict_each
        logits = score(support_x.to(to), support_y.to(to), query_x.to(to))
    except UserError as e:  # what this model cannot do (e.g. a fixed number of ways)
        raise UserError(f"{e} (from the {len(classes)} class folders of {support})") from None
    probabilities = logits.detach().double().softmax(dim=1).cpu()
    results = []
    for path, p in zip(files, probabilities):
        best = int(p.argmax())
        results.append({"query": str(path), "class": classes[best], "probability": float(p[best]),
                        "probabilities": dict(zip(classes, p.tolist()))})
    return results
