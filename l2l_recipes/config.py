"""`--set key=value` overrides onto a recipe's flat config dataclass.

Order: dataclass defaults < variant < each `--set`, left to right. Values are parsed
with `ast.literal_eval` (falling back to a plain string) and must match the field's
type (an int is accepted for a float). Configs are never mutated: `dataclasses.replace`.
"""
import ast
import dataclasses
import typing

from l2l_recipes.errors import UserError


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


def check(condition, message):
    """Raise a UserError with `message` unless `condition` (for config __post_init__ checks)."""
    if not condition:
        raise UserError(message)
