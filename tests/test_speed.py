"""The speed benchmark runs end to end in a tiny configuration (timings belong to the benchmark)."""
import json

from click.testing import CliRunner

from l2l_recipes import cli
from l2l_recipes.lab import recipe_speed, speed


def test_speed_benchmark_tiny(tmp_path):
    result = CliRunner().invoke(cli.cli, ["speed", "--tiny", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "speed-up over the learn2learn loop" in result.output
    assert "GFLOP/s" in result.output and "matmul" in result.output
    (path,) = tmp_path.glob("speed-*.json")
    record = json.loads(path.read_text())
    assert record["settings"] == speed.TINY.__dict__
    for loop in ("reference_png", "reference_default_malloc", "reference", "fast"):
        assert record[loop]["maml_seconds"] > 0 and record[loop]["proto_seconds"] > 0
        assert record[loop]["maml_gflops"] > 0
    assert record["maml_gflop_per_iteration"] > 0 and record["proto_gflop_per_episode"] > 0
    # the two MAML loops computed the same meta-gradient on the same tasks (conv biases before batch
    # norm have an exact meta-gradient of 0, where both loops return rounding noise)
    assert record["maml_max_abs_grad_difference_without_conv_biases"] <= 1e-5
    assert set(record["maml_grad_difference_by_parameter"]) >= {"classifier.weight", "base.0.conv.bias"}
    # judged by the float64 meta-gradient: the fast path within the 1e-5, and no worse than
    # learn2learn's own float32 loop by more than rounding
    assert record["maml_fast_max_abs_error"] <= 1e-5
    assert record["maml_fast_max_abs_error"] <= record["maml_reference_max_abs_error"] + 1e-6
    # ProtoNet's fast path reorders ReLU and max-pool: the same gradient, bit for bit
    assert record["proto_max_abs_grad_difference"] == 0
    assert record["environment"]["git_commit"] is not None


def test_recipe_speed_times_both_engines_in_turns(tmp_path, data_root):
    """`speed --recipes`: each engine's own loop timed (warm-up, timed and validating iterations),
    the paper budget projected from them; a recipe without engines has the one loop; ProtoNet
    (early stopping) runs too."""
    result = CliRunner().invoke(cli.cli, ["speed", "--recipes", "maml-omniglot-5w1s", "--tiny", "--iterations", "2",
                                          "--data-root", str(data_root), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("recipes-*.json")
    (row,) = json.loads(path.read_text())["recipes"]
    assert row["recipe"] == "maml-omniglot-5w1s" and row["budget_iterations"] == 60000
    assert set(row["engines"]) == {"fast", "reference"}
    for engine in row["engines"].values():
        assert engine["timed_iterations"] == 2 and engine["seconds_per_iteration"] > 0
        # both rounded in the record (hours to 0.01, seconds to 1e-4)
        assert engine["projected_hours"] >= round(engine["seconds_per_iteration"] * 60000 / 3600, 2) - 0.01
    assert "| `maml-omniglot-5w1s` | 60,000 |" in result.output
    seconds = recipe_speed.time_recipe("protonet-omniglot-5w1s", warmup=1, iterations=3, changes=recipe_speed.TINY,
                                       data_root=data_root)
    assert set(seconds) == {"fast", "reference"} and len(seconds["fast"]) == 1 + 3 + 1
    # a recipe whose length a stopping rule decides is projected at that length, not its cap
    assert recipe_speed.phases("protonet-omniglot-5w1s") == [(60_000, {})]
    seconds = recipe_speed.time_recipe("matchingnet-omniglot-5w1s", warmup=1, iterations=1, changes=recipe_speed.TINY,
                                       data_root=data_root)
    assert set(recipe_speed.summary("matchingnet-omniglot-5w1s", [(20_000, seconds)], 1)["engines"]) == {"plain"}


def test_recipe_speed_projects_each_phase_of_a_changing_schedule():
    """MAML++ costs more per step once second order: each part of its schedule timed apart and
    projected at its length; the validation's cost is the last iteration's excess."""
    assert recipe_speed.phases("mamlpp-omniglot-5w1s") == [
        (5_000, {}), (20_000, {"msl_iterations": 0}), (25_000, {"msl_iterations": 0, "first_order_iterations": 0})]
    timed = [(5_000, {"fast": [9.0, 0.5, 0.5, 0.5, 20.5]}), (20_000, {"fast": [9.0, 0.3, 0.3, 0.3, 9.0]}),
             (25_000, {"fast": [9.0, 1.0, 1.0, 1.0, 9.0]})]
    fast = recipe_speed.summary("mamlpp-omniglot-5w1s", timed, 1)["engines"]["fast"]
    train = 5_000 * 0.5 + 20_000 * 0.3 + 25_000 * 1.0
    assert fast["seconds_per_iteration"] == round(train / 50_000, 4) and fast["validation_seconds"] == 20.0
    validations, test = 50_000 // 500, 20.0 * 1000 / 200  # val_interval 500, 200 validation and 1000 test tasks
    assert fast["projected_hours"] == round((train + 20.0 * validations + test) / 3600, 2)
    assert [p["seconds_per_iteration"] for p in fast["phases"]] == [0.5, 0.3, 1.0]


def test_recipe_speed_refuses_an_empty_pattern():
    result = CliRunner().invoke(cli.cli, ["speed", "--recipes", "nothing-*"])
    assert result.exit_code == 1 and "no recipe matches 'nothing-*'" in result.output
