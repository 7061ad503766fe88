"""The command line end to end (click's runner), the run directory, and `load()` + `predict`."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import l2l_recipes
from conftest import cli
from l2l_recipes.errors import UserError

OMNIGLOT = [f"{family}-omniglot-{setting}" for family in ("maml", "protonet")
            for setting in ("5w1s", "5w5s", "20w1s", "20w5s")]


def test_list_in_natural_order_with_wildcards():
    result = cli("list")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert [n for n in names if n.startswith(("maml-omniglot", "protonet-omniglot"))] == OMNIGLOT  # 5w5s < 20w1s
    assert {f"{f}-{d}-{s}" for f in ("maml", "protonet") for d in ("mini-imagenet", "tiered-imagenet",
            "cifar-fs", "fc100") for s in ("5w1s", "5w5s")} <= set(names)
    assert "Published: 98.8% (Snell et al. 2017, Table 1)" in result.output
    assert [line.split()[0] for line in cli("list", "maml-o*").output.splitlines()] == OMNIGLOT[:4]


def test_show_prints_description_and_resolved_config():
    result = cli("show", "maml-omniglot-20w1s")
    assert result.exit_code == 0
    assert "published: 95.8 ± 0.3% (Finn et al. 2017, Table 1)" in result.output
    assert "ways = 20" in result.output
    assert "adaptation_steps = 5" in result.output and "fast_lr = 0.1" in result.output


def test_unknown_recipe_suggests_close_names():
    result = cli("run", "protonet-omniglot-5w1")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: unknown recipe 'protonet-omniglot-5w1'; did you mean protonet-omniglot-5w1s, "
        "protonet-omniglot-5w5s, protonet-omniglot-20w1s?"]


def test_run_writes_a_complete_run_directory(protonet_run):
    run_dir, output = protonet_run
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json", "env.json", "metrics.jsonl", "ckpt.pt", "best.pt", "result.json"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"] == "protonet-omniglot-5w1s" and config["iterations"] == 80
    assert config["train_ways"] == 20 and config["device"] == "cpu"
    env = json.loads((run_dir / "env.json").read_text())
    assert env["learn2learn"] == "0.2.0" and env["device"] == "cpu" and env["torch"].startswith("2.")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "val_accuracy" in m] == [40, 80]
    assert all(m["loss"] > 0 for m in metrics if "loss" in m)
    res = json.loads((run_dir / "result.json").read_text())
    assert res["ways"] == 5 and res["shots"] == 1 and res["split"] == "test" and 0 <= res["ci95"] < 0.05
    assert f"{100 * res['accuracy']:.2f}%" in output
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert ckpt["iteration"] == 80 and ckpt["config"]["iterations"] == 80 and ckpt["optimizer"]


def test_eval_reproduces_the_run_result_and_keeps_it(protonet_run, data_root):
    run_dir, _ = protonet_run
    recorded = (run_dir / "result.json").read_text()
    result = cli("eval", run_dir, "--data-root", data_root, "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    again = json.loads(result.output.splitlines()[0])
    # the same fixed test tasks and weights give the same accuracy
    assert again["accuracy"] == pytest.approx(json.loads(recorded)["accuracy"], abs=1e-9)
    assert json.loads((run_dir / "eval-200.json").read_text())["accuracy"] == again["accuracy"]
    short = cli("eval", run_dir, "--episodes", 30, "--data-root", data_root, "--device", "cpu")
    assert short.exit_code == 0 and json.loads((run_dir / "eval-30.json").read_text())["episodes"] == 30
    assert (run_dir / "result.json").read_text() == recorded
    # more shots than an Omniglot class has images (20, with 15 queries): the fix is eval's option
    many = cli("eval", run_dir, "--shots", 10, "--episodes", 5, "--data-root", data_root, "--device", "cpu")
    assert many.exit_code == 1 and many.output.strip().splitlines()[-1] == (
        "Error: shots + queries = 25 but each class has only 20 images: test with fewer --shots")


def test_load_and_predict_a_hand_built_task(protonet_run, data_root, splits):
    """What a user does: read PNGs, apply predictor.transform, adapt to a support set."""
    run_dir, _ = protonet_run
    predictor = l2l_recipes.load(run_dir, device="cpu")
    assert predictor.test_classes == splits["test"].classes and len(predictor.test_classes) == 1692
    assert all(c.count("/") == 2 and c.rsplit("/", 1)[1].startswith("rot") for c in predictor.test_classes)
    # five upright characters from five different alphabets
    classes = [c for c in predictor.test_classes if c.endswith("rot000")][::85][:5]
    assert len({c.split("/")[0] for c in classes}) == 5
    support, query = [], []
    for c in classes:
        files = sorted((Path(data_root) / "omniglot-py").glob(f"images_*/{c.rsplit('/', 1)[0]}/*.png"))
        images = []
        for f in files[:16]:
            with Image.open(f) as im:
                images.append(predictor.transform(im))
        support.append(images[0])
        query.extend(images[1:])
        # the transform gives exactly the training inputs
        c_index = splits["test"].classes.index(c)
        assert torch.equal(images[5], splits["test"][c_index * 20 + 5][0])
    support_y = torch.arange(5)
    query_y = torch.arange(5).repeat_interleave(15)
    logits = predictor.predict(torch.stack(support), support_y, torch.stack(query))
    assert logits.shape == (75, 5)
    assert (logits.argmax(1) == query_y).float().mean() >= 0.6


@pytest.mark.parametrize("args, message", [
    (["--set", "ways=2000"], "Error: ways=2000 but this split has only 688 classes: lower --set ways"),
    (["--set", "queries=20"], "Error: shots + queries = 21 but each class has only 20 images"),
    (["--set", "wayz=5"], "Error: unknown config key 'wayz'; valid keys: dataset, ways, shots"),
    (["--set", "ways=five"], "Error: --set ways='five': expected int, got str"),
    (["--set", "lr=-1"], "Error: lr=-1.0 is out of range: lr must be > 0"),
    (["--set", "ways=1"], "Error: ways=1 is out of range: ways must be at least 2"),
    (["--set", "shots=0"], "Error: shots=0 is out of range: shots must be at least 1"),
])
def test_bad_input_is_one_clear_line(tmp_path, data_root, args, message):
    result = cli("run", "protonet-omniglot-5w1s", "--data-root", data_root, "--device", "cpu",
                 "--out", tmp_path / "runs", *args)
    assert result.exit_code == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_missing_data_root_names_the_fix(tmp_path):
    result = cli("run", "maml-omniglot-5w1s", "--data-root", tmp_path / "nowhere", "--device", "cpu",
                 "--out", tmp_path / "runs")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: Omniglot not found") and "--data-root" in line and "--download" in line
    assert not (tmp_path / "runs").exists()


def test_not_a_run_directory_is_a_clear_error(tmp_path):
    result = cli("eval", tmp_path)
    assert result.exit_code == 1 and "is not a run directory" in result.stderr
    # a run stopped before its first checkpoint: eval and publish said "no checkpoint at .../ckpt.pt"
    (tmp_path / "config.json").write_text(json.dumps({"recipe": "protonet-omniglot-5w1s"}))
    for command in (["eval", tmp_path], ["publish", tmp_path, tmp_path / "published"]):
        result = cli(*command)
        assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
            f"Error: run {tmp_path} holds no weights (no best.pt or ckpt.pt): it stopped before its first "
            f"checkpoint; train it again"], command
    assert not (tmp_path / "published").exists()
    result = cli("run", "--resume", tmp_path)
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"Error: run {tmp_path} has no ckpt.pt: it stopped before its first checkpoint, so there is nothing to "
        f"resume; start it again with `l2l-recipes run`"]


def test_cuda_without_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cli("run", "protonet-omniglot-5w1s", "--device", "cuda", "--out", tmp_path)
    assert result.exit_code == 1 and "no CUDA GPU" in result.stderr


def test_device_choice_is_honoured(monkeypatch):
    from l2l_recipes.plain import resolve_device
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda" and resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # two GPUs: cuda:0 and cuda:1, no other
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    for name in ("cuda:2", "cuda:x", "cuda:"):
        with pytest.raises(UserError, match=f"unknown device '{name}': this machine's GPUs are cuda:0 to cuda:1"):
            resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


def test_recipe_file_runs_as_a_script():
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "recipes" / "maml.py"), "maml-omniglot-5w1", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "did you mean maml-omniglot-5w1s" in out.stderr


def test_corrupt_or_foreign_checkpoint_is_one_clear_line(protonet_run, tmp_path):
    import shutil
    run_dir = tmp_path / "copy"
    shutil.copytree(protonet_run[0], run_dir)
    best = run_dir / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])  # truncated
    result = cli("eval", run_dir, "--device", "cpu")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: checkpoint {best} is corrupt or not a checkpoint")
    assert line.endswith("restore it from a copy, or train again with `l2l-recipes run`")  # the fix
    torch.save({"weights": 1}, best)  # some other program's file
    result = cli("eval", run_dir, "--device", "cpu")
    assert result.stderr.strip() == (f"Error: checkpoint {best} is not an l2l-recipes checkpoint of format 1: "
                                     f"pass a run folder that `l2l-recipes run` wrote")
    assert (run_dir / "ckpt.pt").is_file()  # nothing else touched


def test_run_time_budget(tmp_path, data_root):
    """--max-minutes stops training once the budget is spent, validates that iteration, tests the
    best validation weights and records the budget in result.json."""
    result = cli("run", "protonet-omniglot-5w1s", "--data-root", data_root, "--device", "cpu", "--out", tmp_path,
                 "--no-progress", "--max-minutes", 0.001, "--set", "train_ways=10", "--set", "val_episodes=10",
                 "--set", "test_episodes=20")
    assert result.exit_code == 0, result.output
    assert "time budget of 0.001 minutes spent after iteration 1" in result.output
    (run_dir,) = (tmp_path / "protonet-omniglot-5w1s").iterdir()
    record = json.loads((run_dir / "result.json").read_text())
    assert record["iterations_done"] == 1 and record["max_minutes"] == 0.001 and record["episodes"] == 20
    assert (run_dir / "best.pt").is_file()
