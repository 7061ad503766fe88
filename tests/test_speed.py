"""The speed benchmark runs end to end in a tiny configuration (timings belong to the benchmark)."""
import json

import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from l2l_recipes import cli
from l2l_recipes.lab import gpu_estimate, recipe_speed, speed


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
    # ... and both layouts' distances from the float64 gradient are recorded (float32 rounding)
    assert 0 < record["proto_grad_error"] < 1e-2 and 0 < record["proto_nchw_grad_error"] < 1e-2, record
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


def test_gpu_estimate_counts_operations_and_flops_of_a_recipes_own_loop(data_root):
    """`speed --recipes --gpu-estimate` counts operations (views apart) and FLOPs (a grouped
    convolution's gradients counted as grouped) and projects them at the measured GPU run's rate."""
    x = torch.randn(4, 6)
    with gpu_estimate.CountOps() as ops:
        y = x + 1
        y.t(), y.view(-1), torch.mm(x, x.t())
    assert ops.count == {"ops": 2, "views": 3}  # add, mm; t, view, t
    x, w = torch.randn(4, 64, 10, 10, requires_grad=True), torch.randn(64, 32, 3, 3, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping={
            torch.ops.aten.convolution_backward: gpu_estimate.conv_backward_flops}) as flops:
        F.conv2d(x, w, groups=2).sum().backward()
    forward = 2 * 4 * 64 * 8 * 8 * 32 * 9  # 2 x batch x output channels x output pixels x (inputs/group x 3 x 3)
    assert flops.get_flop_counts()["Global"] == {torch.ops.aten.convolution: forward,
                                                 torch.ops.aten.convolution_backward: 2 * forward}
    # ProtoNet's 60-way 1-shot 5-query training episode: 360 images through Conv4 (3x3, 64 filters,
    # padding 1, 2x2 max-pool) forward, the weights' gradients, the inputs' from the second layer on
    row = gpu_estimate.count_recipe("protonet-omniglot-5w1s", data_root)
    macs = [28 * 28 * 64 * 1 * 9, 14 * 14 * 64 * 64 * 9, 7 * 7 * 64 * 64 * 9, 3 * 3 * 64 * 64 * 9]
    convolutions = 360 * 2 * (2 * sum(macs) + sum(macs[1:]))
    (part,) = row["phases"]
    assert part["iterations"] == 60_000 and 0 <= part["flops"] - convolutions < 1e-3 * convolutions  # + distances
    assert part["ops"] > 50 and row["validation_task"]["ops"] > 10
    assert row["validation_tasks"] == 60_000 // 100 * 100 and row["test_tasks"] == 1000
    # the measured run's own interval (100 episodes and a validation) projects to its measured time
    c = gpu_estimate.seconds_per_op(row)
    interval = {**row, "phases": [{**part, "iterations": 100}], "validation_tasks": 100, "test_tasks": 0}
    assert abs(gpu_estimate.gpu_hours(interval, c) * 3600 - 100 / 28.0) < 1e-9


def test_gpu_estimate_needs_recipes():
    result = CliRunner().invoke(cli.cli, ["speed", "--gpu-estimate"])
    assert result.exit_code == 2 and "--gpu-estimate counts the recipes of --recipes PATTERN" in result.output
