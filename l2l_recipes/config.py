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


# Range rules by field name, shared by every recipe's config (its __post_init__; an exported file's
# override): (fields, the test a value passes, what it must be); every float must also be finite.
RANGES = (
    (("ways", "train_ways", "val_episodes", "test_episodes"), lambda v: v >= 2, "{} must be at least 2"),
    (("shots", "queries", "train_shots", "train_queries", "iterations", "hidden_size", "meta_batch_size",
      "adaptation_steps", "test_adaptation_steps", "val_interval", "log_interval", "inner_batch_size",
      "test_batch_size", "lr_step"), lambda v: v >= 1, "{} must be at least 1"),
    (("lr", "meta_lr", "fast_lr", "inner_lr", "outer_lr"), lambda v: v > 0, "{} must be > 0"),
    (("seed",), lambda v: 0 <= v < 2 ** 32, f"{{}} must be in 0..{2 ** 32 - 1}"),  # NumPy's seeds
    (("engine",), lambda v: v in ("fast", "reference"), "use fast or reference"),
    (("device",), lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "use auto, cpu or cuda"),
)


def validate(cfg):
    """Raise a one-line UserError for the first field of `cfg` outside its range."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        finite = not isinstance(value, float) or math.isfinite(value)
        check(finite, f"{f.name}={value!r} is out of range: {f.name} must be a finite number")
        for names, test, must in RANGES:
            check(f.name not in names or test(value), f"{f.name}={value!r} is out of range: {must.format(f.name)}")


def check(condition, message):
    """Raise a UserError with `message` unless `condition` (validate, and recipes' __post_init__ checks)."""
    if not condition:
        raise UserError(message)
