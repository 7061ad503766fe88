"""Data integrity: SHA256SUMS verification, damaged caches rebuilt; determinism under a seed."""
import hashlib
import zipfile

import pytest
import torch

from conftest import cli
from l2l_recipes.datasets import omniglot
from test_data import _tiny_omniglot
from test_resume import ARGS, _rows


def _manifest(folder, names_and_bytes, zipped=()):
    lines = []
    for name, blob in names_and_bytes.items():
        lines.append(f"{hashlib.sha256(blob).hexdigest()}  {name}")
        if name not in zipped:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(blob)
    if zipped:
        with zipfile.ZipFile(folder / "images.zip", "w") as z:
            for name in zipped:
                z.writestr(name, names_and_bytes[name])
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_data_verify_finds_mismatched_and_missing_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _manifest(tmp_path / "a", {"x/1.png": b"one", "x/2.png": b"two"})
    _manifest(tmp_path / "b", {"images/3.jpg": b"three"}, zipped=("images/3.jpg",))
    ok = cli("data", "verify", "--data-root", tmp_path)
    assert ok.exit_code == 0 and ok.output.strip() == (
        "3 files checked against 2 manifest(s): 0 mismatched, 0 missing")
    (tmp_path / "a" / "x" / "1.png").write_bytes(b"0ne")
    (tmp_path / "a" / "x" / "2.png").unlink()
    bad = cli("data", "verify", "--data-root", tmp_path)
    assert bad.exit_code == 1
    assert f"MISMATCH {tmp_path / 'a' / 'x' / '1.png'}" in bad.output
    assert f"MISSING  {tmp_path / 'a' / 'x' / '2.png'}" in bad.output
    assert bad.stderr.strip() == ("Error: 2 files checked against 2 manifest(s): 1 mismatched, 1 missing; "
                                  "re-extract or re-download the files listed")


def test_the_shared_data_matches_its_manifests(data_root):
    result = cli("data", "verify", "--data-root", data_root)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "92460 files checked against 2 manifest(s): 0 mismatched, 0 missing"


def test_a_truncated_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("L2L_RECIPES_CACHE", str(tmp_path / "cache"))
    _tiny_omniglot(tmp_path / "data")
    names, images = omniglot.load_omniglot(tmp_path / "data", progress=False)
    (cache,) = (tmp_path / "cache").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning, match="is unreadable .* rebuilding it"):
        again = omniglot.load_omniglot(tmp_path / "data", progress=False)
    assert again[0] == names and torch.equal(again[1], images)


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path, data_root):
    short = ["--set", "iterations=6", "--set", "val_interval=3", "--set", "log_interval=1"]  # later --set wins
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        result = cli("run", *ARGS, *short, "--seed", seed, "--data-root", data_root, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    a, b, c = (_rows(next((tmp_path / n).glob("*/*"))) for n in "abc")
    assert a == b and a != c
