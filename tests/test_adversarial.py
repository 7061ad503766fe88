"""What an adversarial user of the command line found, kept fixed: damaged or missing run files,
two processes on one run, folders that cannot be written, damaged benchmark records, images of
unusual modes. Each gets one clear line (or goes on safely) and nothing of the user's is lost."""
import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli
from test_reliability import NAME, TINY, copy_of, finished, one_line  # noqa: F401 (finished: a fixture)
from l2l_recipes import bench, harness, predict, registry
from l2l_recipes.datasets import omniglot
from l2l_recipes.errors import UserError


def unfinished(finished, tmp_path):  # noqa: F811
    """A copy of the finished tiny run as a killed one leaves it: a checkpoint, no result.json."""
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "result.json").unlink()
    return run_dir


# ----------------------------------------------------------------------------- damaged run files

@pytest.mark.parametrize("content", [b'{"recipe": "protonet-omn', b"[]", b"{}", b"\xff\xfe\x00"],
                         ids=["cut short", "a list", "no recipe", "not text"])
def test_a_damaged_config_json_is_one_line(finished, tmp_path, content):  # noqa: F811
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "config.json").write_bytes(content)
    for args in (["eval", run_dir, "--episodes", 2, "--device", "cpu"], ["publish", run_dir, tmp_path / "pub"]):
        line = one_line(cli(*args))
        assert str(run_dir / "config.json") in line and "restore it" in line
    assert not (tmp_path / "pub").exists()


@pytest.mark.parametrize("env", ["cut short", "missing"])
def test_resume_after_a_crash_cut_metrics_short_and_files_went_missing(finished, tmp_path, data_root, env):  # noqa: F811
    """Appends to metrics.jsonl are not synced: a power cut can leave half a line. A lost
    config.json is written again from the checkpoint; a damaged env.json is set aside, not lost."""
    run_dir = unfinished(finished, tmp_path)
    config = (run_dir / "config.json").read_text()
    saved = harness.read_checkpoint(run_dir / "ckpt.pt")["iteration"]
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(f'{{"iteration": {saved}, "lo')
    (run_dir / "config.json").unlink()
    if env == "missing":
        (run_dir / "env.json").unlink()
    else:
        (run_dir / "env.json").write_text('{"python": "3.1')
    result = cli("run", "--resume", run_dir, "--data-root", data_root, "--no-progress")
    assert result.exit_code == 0, result.output + result.stderr
    assert "1 unreadable line(s)" in result.stdout and "env.json" in result.stdout
    assert json.loads((run_dir / "result.json").read_text())["episodes"] == 5
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row["iteration"] <= saved for row in rows)
    assert json.loads((run_dir / "env.json").read_text())["recreated_after_iteration"] == saved
    assert (run_dir / "env.json.unreadable").is_file() == (env == "cut short")


# ----------------------------------------------------------------------------- two processes, one run

def test_a_run_another_process_trains_is_not_resumed_beside_it(finished, tmp_path, data_root):  # noqa: F811
    """Two `run --resume` of one run (or one beside the bench that trains it) would both train,
    interleave metrics.jsonl and overwrite each other's checkpoints; the second must leave the
    run untouched, the other's checkpoint being written included."""
    run_dir = unfinished(finished, tmp_path)
    (run_dir / ".ckpt.pt.tmp999").write_bytes(b"the other process writes its checkpoint")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    other = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)  # what the training process holds
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = one_line(cli("run", "--resume", run_dir, "--data-root", data_root, "--no-progress"))
    finally:
        os.close(other)
    assert f"run {run_dir} is being trained by another process right now" in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    resumed = cli("run", "--resume", run_dir, "--data-root", data_root, "--no-progress")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert (run_dir / "result.json").is_file() and not (run_dir / ".ckpt.pt.tmp999").exists()



def test_a_resumed_run_keeps_its_time_budget(tmp_path):
    """`make run` (an 8-minute budget) stopped with Ctrl-C and resumed with the printed
    `run --resume DIR` trained on without a budget: the recipe's full protocol, hours."""
    cfg = registry.get_recipe(NAME).config()
    run = harness.Run.create(tmp_path, NAME, cfg, torch.device("cpu"), max_minutes=8)
    run.track(torch.nn.Linear(2, 2))
    run.checkpoint(1)
    assert harness.Run.resume(run.path, torch.device("cpu")).max_minutes == 8
    assert harness.Run.resume(run.path, torch.device("cpu"), max_minutes=60).max_minutes == 60
    run.stopped_early = True  # its budget spent: resuming it means going on without one
    run.checkpoint(2)
    assert harness.Run.resume(run.path, torch.device("cpu")).max_minutes is None
    assert harness.Run.resume(run.path, torch.device("cpu"), max_minutes=60).max_minutes == 60

# ----------------------------------------------------------------------------- folders one cannot write

def test_eval_of_a_run_in_a_read_only_folder_prints_its_result(finished, monkeypatch, data_root):  # noqa: F811
    """e.g. published models on a read-only mount: the test result is printed, not lost."""
    write_json = harness.write_json

    def read_only(path, obj):
        if Path(path).parent == finished:
            raise OSError(30, "Read-only file system", str(path))
        return write_json(path, obj)
    monkeypatch.setattr(harness, "write_json", read_only)
    result = cli("eval", finished, "--episodes", 3, "--device", "cpu", "--data-root", data_root, "--no-progress")
    assert result.exit_code == 0
    assert json.loads(result.stdout.splitlines()[0])["episodes"] == 3
    assert "test accuracy" in result.stdout.splitlines()[1]
    assert result.stderr.strip() == (f"note: cannot write {finished / 'eval-3.json'} (Read-only file system): "
                                     f"the result is printed, not saved")
    assert not (finished / "eval-3.json").exists()


def test_publish_into_a_folder_that_cannot_be_made_is_one_line(finished, tmp_path):  # noqa: F811
    (tmp_path / "file").write_text("")
    dest = tmp_path / "file" / "model"
    line = one_line(cli("publish", finished, dest))
    assert line == f"Error: cannot write {dest} (Not a directory): publish into a folder you can write"


# ----------------------------------------------------------------------------- benchmark records

def test_a_damaged_record_is_named_and_the_bench_writes_a_new_one(tmp_path, data_root):
    """A merge conflict in a committed record stopped bench and bench-table with a traceback."""
    results = tmp_path / "benchmarks" / "results"
    args = ["bench", NAME, "--seeds", 1, "--episodes", 5, "--iterations", 2, "--set", "train_ways=5",
            "--set", "val_episodes=5", "--device", "cpu", "--data-root", data_root,
            "--runs-dir", tmp_path / "runs", "--results-dir", results, "--no-progress"]
    assert cli(*args).exit_code == 0
    (record,) = results.glob("*.json")
    good = json.loads(record.read_text())
    record.write_text("<<<<<<< HEAD\n" + record.read_text())
    line = one_line(cli("bench-table", "--results-dir", results))
    assert str(record) in line and "merge conflict" in line and "l2l-recipes bench-table" in line
    again = cli(*args, "--resume")  # the seed is kept; the latest record is unreadable: a new one
    assert str(record) in one_line(again) and "1 seed" in again.stdout
    (new,) = set(results.glob("*.json")) - {record}
    assert json.loads(new.read_text())["seeds"][0]["accuracy"] == good["seeds"][0]["accuracy"]
    record.unlink()
    assert cli("bench-table", "--results-dir", results).exit_code == 0


def test_a_record_lacking_a_field_is_named_and_an_unmeasured_sine_row_costs_nothing(tmp_path):
    """A record that parses but lacks a field (a hand edit, a half-resolved merge) stopped
    bench-table with a KeyError; with no sine record, its speed row crashed the cost (no dataset)."""
    shutil.copytree(Path("benchmarks") / "speed", tmp_path / "benchmarks" / "speed")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir()
    assert cli("bench-table", "--results-dir", results).exit_code == 0  # every row unmeasured, sine's included
    assert "`maml-sine-5s`" in (tmp_path / "benchmarks" / "README.md").read_text()
    record = json.loads(next(Path("benchmarks/results").glob("maml-omniglot-5w1s-*.json")).read_text())
    del record["config"]
    (results / "maml-omniglot-5w1s-cpu-edited.json").write_text(json.dumps(record))
    table = (tmp_path / "benchmarks" / "README.md").read_text()
    line = one_line(cli("bench-table", "--results-dir", results))
    assert line.startswith(f"Error: {results / 'maml-omniglot-5w1s-cpu-edited.json'} is not a whole bench record")
    assert "KeyError: 'config'" in line and "l2l-recipes bench-table" in line
    assert (tmp_path / "benchmarks" / "README.md").read_text() == table  # left as it was


def test_bench_table_into_an_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    write_text = Path.write_text

    def refuse(self, *args, **kwargs):
        if self.name == "README.md":
            raise PermissionError(13, "Permission denied", str(self))
        return write_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", refuse)
    line = one_line(cli("bench-table", "--results-dir", results))
    assert str(tmp_path / "benchmarks" / "README.md") in line and "Permission denied" in line



def test_bench_table_of_a_missing_results_folder_leaves_the_readme_beside_it_alone(tmp_path, monkeypatch):
    """A mistyped --results-dir appended the (empty) generated table to the README.md of its
    parent folder: the user's own project README."""
    monkeypatch.chdir(tmp_path)
    Path("README.md").write_text("# my project\n")
    result = cli("bench-table", "--results-dir", "result")
    assert result.exit_code == 2 and "Directory 'result' does not exist" in result.stderr
    assert Path("README.md").read_text() == "# my project\n"

def test_a_recipe_named_twice_is_benched_once(tmp_path, monkeypatch):
    """(the second went on to 'this bench was started before' after the first's hours of training)"""
    benched = []

    def fake(name, *args, **kwargs):
        benched.append(name)
        raise bench.BenchPending(f"{name}: pending")
    monkeypatch.setattr(bench, "bench_recipe", fake)
    result = cli("bench", NAME, NAME, "--results-dir", tmp_path / "results")
    assert result.exit_code == 0 and benched == [NAME]



def test_a_stopped_bench_says_how_to_resume_the_bench(tmp_path, monkeypatch):
    """Ctrl-C in a bench printed its seed's `run --resume` command, which leaves the bench without
    its record; the command printed is the bench's own, with its folders and --resume."""
    def train_until_sigint(name, cfg, run_dir, device, *args):
        run = harness.Run(run_dir, name, cfg, device, progress=False)
        run.track(torch.nn.Linear(2, 2))
        for _ in run.iterations(10):
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(bench, "_train_seed", train_until_sigint)
    runs, results = tmp_path / "my runs", tmp_path / "results"
    line = one_line(cli("bench", NAME, "--seeds", 2, "--iterations", 10, "--device", "cpu", "--runs-dir", runs,
                        "--results-dir", results))
    assert line == (f"Error: stopped by SIGINT after iteration 1; checkpoint saved. Resume the bench with: "
                    f"l2l-recipes bench {NAME} --seeds 2 --iterations 10 --device cpu --runs-dir '{runs}' "
                    f"--results-dir {results} --resume")
    assert list(runs.glob("*/*/seed-1/ckpt.pt"))


@pytest.mark.parametrize("args, message", [
    (["--set", "seed=7"], "bench trains seeds 1..N (--seeds N, or FIRST-LAST): drop --set seed"),
    (["--iterations", 5, "--set", "iterations=10"],
     "--iterations and --set iterations=... both set the budget: give one")])
def test_bench_options_that_would_be_ignored_are_refused(tmp_path, args, message):
    """--set seed was replaced by each seed's own, yet listed in the record's overrides (and made
    its protocol 'modified'); --set iterations silently won over --iterations."""
    line = one_line(cli("bench", NAME, *args, "--runs-dir", tmp_path / "runs", "--results-dir", tmp_path / "r"))
    assert line == f"Error: {message}" and not (tmp_path / "runs").exists()

# ----------------------------------------------------------------------------- images of unusual modes

def test_16_bit_and_transparent_images_are_read_as_the_drawing_they_show(data_root, tmp_path):
    """PIL's own conversion clips 16-bit pixels (a 16-bit scan of a drawing turned almost all
    white) and shows transparent pixels black (ink, to an Omniglot model)."""
    png = sorted((data_root / "omniglot-py" / "images_evaluation").glob("*/character01/*.png"))[0]
    with Image.open(png) as image:
        drawing = np.array(image.convert("L"))
    expected = predict.read_image(png, omniglot.transform)
    Image.fromarray(drawing.astype(np.uint16) * 257).save(tmp_path / "16-bit.png")
    ink = np.zeros((*drawing.shape, 4), np.uint8)
    ink[..., 3] = 255 - drawing  # black strokes on a transparent background
    Image.fromarray(ink, "RGBA").save(tmp_path / "transparent.png")
    Image.fromarray(ink[..., [0, 3]], "LA").save(tmp_path / "transparent-la.png")
    for name in ("16-bit.png", "transparent.png", "transparent-la.png"):
        with Image.open(tmp_path / name) as image:
            assert image.mode in ("I;16", "RGBA", "LA")
        assert (predict.read_image(tmp_path / name, omniglot.transform) - expected).abs().max() <= 1 / 255, name


def test_a_photo_is_read_upright_as_its_exif_orientation_shows_it(data_root, tmp_path):
    """A phone stores a photo as the sensor saw it and tags how to show it: read as stored, a
    drawing photographed with the phone held sideways reached the model turned by 90 degrees."""
    png = sorted((data_root / "omniglot-py" / "images_evaluation").glob("*/character01/*.png"))[0]
    expected = predict.read_image(png, omniglot.transform)
    with Image.open(png) as image:
        upright = image.convert("L")
    # orientation 6: stored turned 90 degrees counter-clockwise, shown turned back clockwise (8: the other way)
    for orientation, stored in ((6, upright.transpose(Image.Transpose.ROTATE_90)),
                                (8, upright.transpose(Image.Transpose.ROTATE_270))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(tmp_path / f"photo-{orientation}.png", exif=exif)
        with Image.open(tmp_path / f"photo-{orientation}.png") as image:  # the tag is kept in the file
            assert image.getexif()[0x0112] == orientation
        assert torch.equal(predict.read_image(tmp_path / f"photo-{orientation}.png", omniglot.transform), expected)
    assert not torch.equal(omniglot.transform(stored), expected)  # the stored pixels alone are turned


def test_an_image_too_large_for_pil_is_one_line(tmp_path, monkeypatch):
    """PIL refuses images of more than twice MAX_IMAGE_PIXELS (a 14000x14000 scan) with its own
    exception, which went through as a traceback."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the limit lowered, not a 200-megapixel file
    Image.new("L", (28, 28), 255).save(tmp_path / "big.png")
    with pytest.raises(UserError) as e:
        predict.read_image(tmp_path / "big.png", omniglot.transform)
    assert str(e.value).startswith(f"cannot read image {tmp_path / 'big.png'} (DecompressionBombError: Image size "
                                   f"(784 pixels) exceeds limit of 200 pixels")
    assert str(e.value).endswith("replace or remove it")
