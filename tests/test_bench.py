"""`l2l-recipes bench`: real short runs, their records, curves, budgets and the generated table."""
import json

from conftest import REPO, cli


def test_bench_records_seeds_budget_and_table(tmp_path, data_root):
    results = tmp_path / "benchmarks" / "results"
    out = cli("bench", "protonet-omniglot-5w1s", "--seeds", 2, "--episodes", 40, "--iterations", 20,
              "--set", "train_ways=20", "--set", "val_interval=10", "--set", "val_episodes=20",
              "--device", "cpu", "--data-root", data_root, "--runs-dir", tmp_path / "runs",
              "--results-dir", results, "--no-progress")
    assert out.exit_code == 0, out.output
    (record_file,) = results.glob("*.json")
    assert record_file.name.startswith("protonet-omniglot-5w1s-cpu-torch2.")
    record = json.loads(record_file.read_text())
    assert [s["seed"] for s in record["seeds"]] == [1, 2]
    assert all(s["episodes"] == 40 and 0.4 < s["accuracy"] <= 1 and s["iterations_done"] == 20
               for s in record["seeds"])
    # different seeds train different models
    assert record["seeds"][0]["accuracy"] != record["seeds"][1]["accuracy"]
    assert record["budget"] == {"iterations": 20, "recipe_iterations": 1_000_000, "max_minutes": None,
                                "overrides": ["iterations=20", "train_ways=20", "val_interval=10",
                                              "val_episodes=20"], "reduced": True}
    assert record["published"]["accuracy"] == 98.8 and record["versions"]["learn2learn"] == "0.2.0"
    assert record["command"] == ("l2l-recipes bench protonet-omniglot-5w1s --seeds 2 --episodes 40 "
                                 "--iterations 20 --set train_ways=20 --set val_interval=10 "
                                 "--set val_episodes=20 --device cpu")
    assert (results / record["curve"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (results.parent / "README.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| `protonet-omniglot-5w1s`"))
    assert f"{100 * record['mean_accuracy']:.2f} ± {100 * record['mean_ci95']:.2f} (2 seeds" in row
    assert "**reduced**: 20 / 1000000 it" in row and "98.8% (Snell et al. 2017, Table 1)" in row
    assert record["protocol"] == "modified" and "not at the paper's protocol" in row
    assert "**0 of " in table and " rows with a published number reproduced**" in table
    assert "| `maml-omniglot-5w1s` |" in table and "not measured on this machine" in table
    # the table is rebuilt from the records alone
    (results.parent / "README.md").write_text("intro\n")
    assert cli("bench-table", "--results-dir", results).exit_code == 0
    assert (results.parent / "README.md").read_text().startswith("intro\n") and row in (
        results.parent / "README.md").read_text()
    # the same bench with fewer seeds (--resume): a record of those seeds, no training; again: the same record
    args = ["bench", "protonet-omniglot-5w1s", "--seeds", 1, "--episodes", 40, "--iterations", 20, "--set",
            "train_ways=20", "--set", "val_interval=10", "--set", "val_episodes=20", "--device", "cpu",
            "--data-root", data_root, "--runs-dir", tmp_path / "runs", "--results-dir", results, "--resume"]
    assert cli(*args).exit_code == 0 and cli(*args).exit_code == 0
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    assert sorted(len(r["seeds"]) for r in records) == [1, 2]
    (one,) = [r for r in records if len(r["seeds"]) == 1]
    assert one["seeds"][0]["accuracy"] == record["seeds"][0]["accuracy"]


def test_time_budget_stops_and_is_recorded(tmp_path, data_root):
    from l2l_recipes import bench
    results = tmp_path / "results"
    out = cli("bench", "protonet-omniglot-5w1s", "--seeds", 1, "--episodes", 10, "--max-minutes", 0.001,
              "--set", "train_ways=10", "--set", "val_episodes=10", "--set", "amp=bf16", "--device", "cpu",
              "--data-root", data_root, "--runs-dir", tmp_path / "runs", "--results-dir", results)
    assert out.exit_code == 0, out.output
    (record,) = [json.loads(p.read_text()) for p in results.glob("*.json")]
    (seed,) = record["seeds"]
    assert seed["stopped_by_time_budget"] and seed["iterations_done"] == 1
    assert seed["best_val_iteration"] == 1  # the last iteration reached was validated
    assert record["budget"]["reduced"] and record["budget"]["max_minutes"] == 0.001
    assert record["precision"] == "bf16" and "(1 seed, bf16 mixed precision)" in bench.summary(record)


def test_verdict_needs_the_papers_protocol_and_the_published_ci(tmp_path):
    from l2l_recipes import bench
    published = {"accuracy": 98.7, "ci95": 0.4, "source": "Finn et al. 2017, Table 1"}
    record = {"recipe": "maml-omniglot-5w1s", "published": published, "metric": "accuracy",
              "mean_accuracy": 0.9840, "mean_ci95": 0.0030, "protocol": "paper"}
    # 0.30 points short, within sqrt(0.30^2 + 0.40^2) = 0.50
    assert bench.verdict(record) == "**reproduced**"
    assert bench.verdict({**record, "mean_accuracy": 0.9900}) == "**reproduced**"
    short = {**record, "mean_accuracy": 0.9800}  # 0.70 points short
    assert bench.verdict(short) == "short by 0.70 points at the paper's protocol"
    (tmp_path / "maml-omniglot-5w1s.md").write_text("why\n")
    assert bench.verdict(short, tmp_path).endswith("([why](notes/maml-omniglot-5w1s.md))")
    # the same numbers from a cut-short run, or a record older than the protocol field, never count
    assert bench.verdict({**record, "protocol": "modified"}).startswith("short by 0.30 points not at the paper's")
    assert "reproduced" not in bench.verdict({k: v for k, v in record.items() if k != "protocol"})
    assert bench.verdict({**record, "published": None}) == "no published number"


def test_mixed_precision_is_named_but_is_no_change_of_protocol():
    """A bench in bf16 mixed precision (ProtoNet's amp) at the recipe's defaults is the paper's
    protocol, named as such in the table; any other override is a modified protocol."""
    import dataclasses
    from l2l_recipes import bench, registry
    recipe = registry.get_recipe("protonet-omniglot-5w1s")
    cfg = recipe.config()
    assert bench.protocol_changes(["amp=bf16", "engine=reference"], cfg, recipe) == []
    assert bench.protocol_changes(["amp=bf16", "lr=0.01"], cfg, recipe) == ["lr=0.01"]
    assert bench.precision(cfg) == "float32"
    assert bench.precision(dataclasses.replace(cfg, amp="bf16")) == "bf16"
    record = {"recipe": "protonet-omniglot-5w1s", "metric": "accuracy", "mean_accuracy": 0.9880,
              "mean_ci95": 0.0020, "seed_std": None, "seeds": [{}], "protocol": "paper", "precision": "bf16",
              "published": {"accuracy": 98.8, "ci95": None, "source": "Snell et al. 2017, Table 1"},
              "config": dataclasses.asdict(dataclasses.replace(cfg, amp="bf16"))}
    assert bench.changed_since(record) == [] and bench.verdict(record) == "**reproduced**"
    assert bench.summary(record) == "98.80 ± 0.20 (1 seed, bf16 mixed precision)"
    assert bench.summary({**record, "precision": "float32"}) == "98.80 ± 0.20 (1 seed)"


def test_the_budget_column_gives_the_seeds_range_of_iterations():
    """Seeds stopped early by the recipe's rule reach different iterations (ProtoNet's patience)."""
    from l2l_recipes import bench
    seeds = [{"iterations_done": n, "ended_by_stopping_rule": True} for n in (59200, 51600)]
    record = {"budget": {"recipe_iterations": 1_000_000, "max_minutes": None, "overrides": [], "reduced": False},
              "seeds": seeds}
    assert bench._budget(record) == "full: 51600-59200 it, early-stopped"
    seeds[1].update(iterations_done=59200, ended_by_stopping_rule=False)
    assert bench._budget(record) == "full: 59200 / 1000000 it"


def test_a_record_of_an_earlier_version_of_the_recipe_is_not_its_protocol():
    """Reptile's protocol gained the carried inner Adam state (carry_adam) after records had been
    made without it: such a record, at the paper's settings of its day, no longer counts as the
    paper's protocol; a field added since with the value the record ran with (config.OLDER_RUNS:
    Matching Networks' distance) changes nothing; JSON lists match tuple defaults."""
    import dataclasses
    from l2l_recipes import bench, registry
    published = {"accuracy": 97.68, "ci95": 0.04, "source": "Nichol et al. 2018, Table 1"}
    config = dataclasses.asdict(registry.get_recipe("reptile-omniglot-5w1s").config())
    record = {"recipe": "reptile-omniglot-5w1s", "published": published, "metric": "accuracy",
              "mean_accuracy": 0.98, "mean_ci95": 0.002, "protocol": "paper", "config": config}
    assert bench.changed_since(record) == [] and bench.verdict(record) == "**reproduced**"
    older = {**record, "config": {k: v for k, v in config.items() if k != "carry_adam"}}
    assert bench.changed_since(older) == ["carry_adam"] and not bench.is_paper_protocol(older)
    assert bench.verdict(older) == ("0.32 points above, from an earlier version of the recipe "
                                    "(defaults changed since: carry_adam)")
    # ANIL's inner step changed (2026-12-07) after its 5w1s row, which has no published number, ran
    assert bench.verdict({**older, "published": None}) == ("no published number; from an earlier version of "
                                                           "the recipe (defaults changed since: carry_adam)")
    matching = dataclasses.asdict(registry.get_recipe("matchingnet-omniglot-5w1s").config())
    before_options = {k: v for k, v in matching.items() if k not in ("distance", "cosine_scale")}
    paper = {"recipe": "matchingnet-omniglot-5w1s", "protocol": "paper"}
    assert bench.changed_since({**paper, "config": before_options}) == []
    assert bench.changed_since({**paper, "config": {**before_options, "hidden_size": 32}}) == ["hidden_size"]
    # a modified record's config differs by its overrides: not "changed since"
    modified = {**paper, "protocol": "modified", "config": {**before_options, "hidden_size": 32}}
    assert bench.changed_since(modified) == []
    metaoptnet = registry.get_recipe("metaoptnet-ridge-omniglot-5w1s").config()
    as_json = json.loads(json.dumps(dataclasses.asdict(metaoptnet)))
    assert bench.changed_since({"recipe": "metaoptnet-ridge-omniglot-5w1s", "protocol": "paper",
                                "config": as_json}) == []


def test_unmeasured_rows_cost_comes_from_speed_measurements(tmp_path):
    """A row without a record shows its cost from `speed --recipes` (its own projection, else a
    sibling's s/it x its budget), before any bench record of the family."""
    from l2l_recipes import bench
    timing = {"seconds_per_iteration": 0.1, "validation_seconds": 2.0, "projected_hours": 1.9}
    row = {"recipe": "maml-omniglot-5w1s", "budget_iterations": 60000, "engines": {"fast": timing}}
    folder = tmp_path / "speed"
    folder.mkdir()
    (folder / "recipes-x.json").write_text(json.dumps(
        {"tiny": False, "threads": 2, "environment": {"date": "2026-12-04T17:00:00"}, "recipes": [row]}))
    (folder / "recipes-tiny.json").write_text(json.dumps(
        {"tiny": True, "environment": {"date": "2026-12-05T17:00:00"}, "recipes": [row]}))
    speeds = bench.speed_rows(folder)
    assert len(speeds) == 1  # tiny runs only check the command
    own = bench._cost("maml-omniglot-5w1s", {}, speeds)
    assert own.startswith(": ~1.9 h on this machine (0.10 s/it x 60000 it + validation and test")
    assert "2026-12-04, 2 threads" in own
    sibling = bench._cost("maml-omniglot-5w5s", {}, speeds)
    assert sibling.startswith(": ~1.7 h on this machine (0.10 s/it of `maml-omniglot-5w1s` x 60000 it")
    assert bench._cost("protonet-omniglot-5w5s", {}, speeds) == ""  # another family, no record
    # of two siblings, the one whose config is closest: FOMAML 5w5s from FOMAML 5w1s, not MAML 5w1s
    fomaml = {**row, "recipe": "fomaml-omniglot-5w1s", "engines": {"fast": {**timing, "seconds_per_iteration": 0.05}}}
    (folder / "recipes-y.json").write_text(json.dumps(
        {"tiny": False, "environment": {"date": "2026-12-03T17:00:00"}, "recipes": [fomaml]}))
    speeds = bench.speed_rows(folder)
    assert "0.05 s/it of `fomaml-omniglot-5w1s` x 60000 it, `speed --recipes` 2026-12-03, 1 thread," in bench._cost(
        "fomaml-omniglot-5w5s", {}, speeds)
    assert "0.10 s/it of `maml-omniglot-5w1s`" in bench._cost("maml-omniglot-5w5s", {}, speeds)
    # with both recipes' FLOPs counted (`speed --recipes --gpu-estimate`), scaled by their ratio
    count = lambda n, gflop: {"recipe": n, "phases": [{"iterations": 60000, "ops": 1, "flops": gflop * 1e9}]}
    gpu = {"fomaml-omniglot-5w1s": count("fomaml-omniglot-5w1s", 5.0),
           "fomaml-omniglot-5w5s": count("fomaml-omniglot-5w5s", 25.0)}
    scaled = bench._cost("fomaml-omniglot-5w5s", {}, speeds, gpu)
    assert scaled.startswith(": ~4.2 h on this machine (0.05 s/it of `fomaml-omniglot-5w1s` x 25.0 / 5.0 GFLOP "
                             "per iteration x 60000 it, `speed --recipes` 2026-12-03")
    assert "the same cost per iteration assumed" in bench._cost("fomaml-omniglot-20w1s", {}, speeds, gpu)


def test_rows_show_the_gpu_estimate_of_the_papers_protocol(tmp_path):
    """An unmeasured row, and a row whose record was cut short, show the newest `speed --recipes
    --gpu-estimate` estimate of the recipe's paper budget; a row at the paper's protocol does not."""
    import dataclasses
    from l2l_recipes import bench, registry
    row = {"recipe": "maml-omniglot-5w5s", "phases": [{"iterations": 60000, "ops": 600, "flops": 2.5e10}],
           "gpu_hours": 1.25}
    folder = tmp_path / "speed"
    folder.mkdir()
    for stamp, hours in (("20261205-020000", 0.75), ("20261204-020000", 9.0)):  # the newer is taken
        (folder / f"gpu-estimate-vm-torch2.14.1-{stamp}.json").write_text(
            json.dumps({"recipes": [{**row, "gpu_hours": hours}]}))
    gpu = bench.gpu_estimates(folder)
    assert gpu["maml-omniglot-5w5s"]["gpu_hours"] == 0.75
    rows, _, _ = bench.table_rows([], speeds=(), gpu=gpu)
    (line,) = [r for r in rows if r.startswith("| `maml-omniglot-5w5s` |")]
    assert "| not measured: ~0.8 h on one GPU (estimate from 600 operations and 25.0 GFLOP per iteration" in line
    # a committed record, cut short of the paper's budget
    path = max((REPO / "benchmarks" / "results").glob("maml-omniglot-20w1s-*.json"))
    record = {**json.loads(path.read_text()), "recipe": "maml-omniglot-5w5s", "published": None}
    rows, _, _ = bench.table_rows([record], speeds=(), gpu=gpu)
    (line,) = [r for r in rows if r.startswith("| `maml-omniglot-5w5s` |")]
    assert "| no published number; the paper's protocol: ~0.8 h on one GPU (estimate from 600" in line
    defaults = dataclasses.asdict(registry.get_recipe("maml-omniglot-5w5s").config())
    rows, _, _ = bench.table_rows([{**record, "protocol": "paper", "config": defaults}], speeds=(), gpu=gpu)
    assert "on one GPU" not in [r for r in rows if r.startswith("| `maml-omniglot-5w5s` |")][0]


def test_seeds_trained_apart_merge_into_the_record_of_one_bench(tmp_path, data_root):
    """Where runs do not outlive a working session, each session trains one seed (`--seeds 2-2`);
    `bench-merge` makes of their records the record `--seeds 2` writes, and refuses records of
    other options or of the same seed in one line."""
    common = ["protonet-omniglot-5w1s", "--episodes", 10, "--iterations", 4, "--set", "train_ways=10",
              "--set", "val_interval=2", "--set", "val_episodes=10", "--device", "cpu", "--no-progress",
              "--data-root", data_root]
    apart, together = tmp_path / "apart", tmp_path / "together"
    for seeds, runs in (("1", "runs-a"), ("2-2", "runs-b")):  # two machines, one seed each
        out = cli("bench", *common, "--seeds", seeds, "--runs-dir", tmp_path / runs, "--results-dir", apart)
        assert out.exit_code == 0, out.output
    paths = sorted(apart.glob("*.json"), key=lambda p: json.loads(p.read_text())["seeds"][0]["seed"])
    first, second = (json.loads(p.read_text()) for p in paths)
    assert [s["seed"] for s in second["seeds"]] == [2] and " --seeds 2-2 " in second["command"]
    out = cli("bench-merge", *paths, "--results-dir", apart)
    assert out.exit_code == 0, out.output
    (merged,) = [r for r in (json.loads(p.read_text()) for p in apart.glob("*.json")) if len(r["seeds"]) == 2]
    assert [m["record"] for m in merged["merged_from"]] == [p.name for p in paths]
    assert merged["command"].startswith("l2l-recipes bench-merge ") and (apart / merged["curve"]).is_file()
    row = next(line for line in (tmp_path / "README.md").read_text().splitlines()
               if line.startswith("| `protonet-omniglot-5w1s`"))  # the table beside the results: the merged row
    assert "(2 seeds, sd" in row and "`l2l-recipes bench-merge " in row
    assert cli("bench", *common, "--seeds", 2, "--runs-dir", tmp_path / "runs-c", "--results-dir",
               together).exit_code == 0
    (both,) = [json.loads(p.read_text()) for p in together.glob("*.json")]
    kept = ("seed", "accuracy", "ci95", "iterations_done", "best_val_iteration", "val_curve")
    assert [{k: s[k] for k in kept} for s in merged["seeds"]] == [{k: s[k] for k in kept} for s in both["seeds"]]
    for key in ("mean_accuracy", "seed_std", "mean_ci95", "protocol", "budget", "config"):
        assert merged[key] == both[key], key
    # the same seed twice, or another bench's record: one line, nothing written
    count = len(list(apart.glob("*.json")))
    out = cli("bench-merge", paths[0], paths[0], "--results-dir", apart)
    assert out.exit_code != 0 and out.output.strip().splitlines()[-1].startswith("Error: seed 1 is in more than one")
    other = json.loads(paths[1].read_text())
    other["config"]["lr"] = 0.5
    (tmp_path / "other.json").write_text(json.dumps(other))
    out = cli("bench-merge", paths[0], tmp_path / "other.json", "--results-dir", apart)
    assert out.exit_code != 0 and "differs from" in out.output and "in config:" in out.output
    # a JSON file that is no bench record, or one cut short: one line naming what it lacks
    del other["seeds"][0]["ci95"]
    for record, lacking in (({}, "recipe"), ({**other, "budget": 3}, "budget.reduced"), (other, "seeds[0].ci95")):
        (tmp_path / "other.json").write_text(json.dumps(record))
        out = cli("bench-merge", paths[0], tmp_path / "other.json", "--results-dir", apart)
        assert out.exit_code == 1 and out.output.strip().splitlines()[-1] == (
            f"Error: {tmp_path / 'other.json'} is not a record of `l2l-recipes bench` (no {lacking}): pass the "
            f"JSON records that `l2l-recipes bench` wrote")
    assert len(list(apart.glob("*.json"))) == count
    assert cli("bench", *common, "--seeds", "3-2", "--results-dir", apart).exit_code == 2
