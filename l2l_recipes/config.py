"""`--set key=value` overrides onto a recipe's flat config dataclass.

Order: dataclass defaults < variant < each `--set`, left to right. Values are parsed
with `ast.literal_eval` (falling back to a plain string) and must match the field's
type (an int is accepted for a float). Configs are never mutated: `dataclasses.replace`.
A config stored before its recipe gained a field is read with the value it ran with (`as_ran`).
"""
import ast
import dataclasses
import math
import typing

from l2l_recipes.errors import UserError

# Fields a recipe family gained after runs had been written without them, with the value those
# runs ran with: a stored config (config.json, a checkpoint, a bench record) without the field is
# read with it, when a run is loaded or resumed and when bench-table compares a record's config.
OLDER_RUNS = {
    "matchingnet": {"distance": "cosine", "cosine_scale": 1.0},  # 2026-12-04: the attention's options
    "reptile": {"carry_adam": False},  # 2026-12-05: the inner Adam's carried state (a fresh Adam before)
}


def as_ran(family, stored):
    """The stored config dict `stored` of a `family` run, with the fields added since filled in."""
    return {**OLDER_RUNS.get(family, {}), **stored}


def parse_assignment(text):
    """'key=value' -> (key, parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key=value, got '{text}'")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


def _coerce(name, value, kind):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if type(value) is not kind:
        raise UserError(f"--set {name}={value!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def apply_overrides(cfg, assignments):
    """A copy of `cfg` with each 'key=value' of `assignments` applied; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for text in assignments:
        key, value = parse_assignment(text)
        if key not in fields:
            raise UserError(f"unknown config key '{key}'; valid keys: {', '.join(fields)}")
        changes[key] = _coerce(key, value, hints[key])
    return dataclasses.replace(cfg, **changes)


# Range rules by field name, shared by every recipe's config (its __post_init__; an exported file's override).
AT_LEAST_2 = ("ways", "train_ways", "val_episodes", "test_episodes")
AT_LEAST_1 = ("shots", "queries", "train_shots", "train_queries", "iterations", "hidden_size",
              "meta_batch_size", "adaptation_steps", "test_adaptation_steps", "val_interval",
              "log_interval", "inner_batch_size", "test_batch_size", "lr_step")
POSITIVE = ("lr", "meta_lr", "fast_lr", "inner_lr", "outer_lr")
SEEDS = ("seed",)  # NumPy's seeds: 0 <= seed < 2**32
CHOICES = {"engine": ("fast", "reference")}


def validate(cfg):
    """Raise a one-line UserError for the first field of `cfg` outside its range (every float
    must be finite)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            check(False, f"{f.name}={value!r} is out of range: {f.name} must be a finite number")
        elif f.name in AT_LEAST_2:
            check(value >= 2, f"{f.name}={value!r} is out of range: {f.name} must be at least 2")
        elif f.name in AT_LEAST_1:
            check(value >= 1, f"{f.name}={value!r} is out of range: {f.name} must be at least 1")
        elif f.name in POSITIVE:
            check(value > 0, f"{f.name}={value!r} is out of range: {f.name} must be > 0")
        elif f.name in CHOICES:
            check(value in CHOICES[f.name], f"{f.name}={value!r} is out of range: use {' or '.join(CHOICES[f.name])}")
        elif f.name in SEEDS:
            check(0 <= value < 2 ** 32, f"{f.name}={value!r} is out of range: {f.name} must be in 0..{2 ** 32 - 1}")
    check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
          f"device={cfg.device!r} is out of range: use auto, cpu or cuda")


def check(condition, message):
    """Raise a UserError with `message` unless `condition` (validate, and recipes' __post_init__ checks)."""
    if not condition:
        raise UserError(message)
