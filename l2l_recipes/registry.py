"""The one place to look up a recipe by name (like timm's `list_models` / `create_model`).

A variant is a function decorated with `@register`; its name, with '_' read as '-',
is the registry key and it returns the family's config. Built-in families are the
modules of the `recipes/` folder, installed as the package `l2l_recipes.recipes`; other packages add families through the entry-point
group `l2l_recipes.recipes`.
"""
import difflib
import fnmatch
import importlib
import pkgutil
import re
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points

from l2l_recipes.errors import UserError

ENTRY_POINT_GROUP = "l2l_recipes.recipes"


@dataclass(frozen=True)
class Published:
    """A published accuracy (percent) and where it was published."""
    accuracy: float
    ci95: float | None
    source: str

    def __str__(self):
        def num(x):  # two decimals, or one where the second is 0: 98.8, 48.7, 96.0, 1.84
            text = f"{x:.2f}"
            return text[:-1] if text.endswith("0") else text
        ci = f" ± {num(self.ci95)}" if self.ci95 is not None else ""
        return f"{num(self.accuracy)}{ci}% ({self.source})"


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str  # the recipe module's short name, e.g. 'protonet'
    module: str  # import path of the module holding Config, build_model, train and Predictor
    make_config: object
    published: Published | None = None  # the paper's number
    learn2learn: Published | None = None  # learn2learn's own claim, where it makes one
    tested_from: str | None = None  # the recipe whose trained model this variant tests at its own ways/shots

    def config(self):
        return self.make_config()

    def load_module(self):
        return sys.modules.get(self.module) or importlib.import_module(self.module)


_RECIPES = {}
_discovered = False


def register(fn=None, *, published=None, learn2learn=None, tested_from=None):
    """Register the variant `fn` under its name with '_' -> '-'; duplicate names raise.

    Use as `@register` or `@register(published=Published(98.8, None, "Snell et al. 2017"))`.
    `tested_from="protonet-omniglot-5w1s"`: the paper tested that recipe's trained model at this
    variant's ways and shots, so `bench` trains that recipe and tests its model here.
    """
    if fn is None:
        return lambda f: register(f, published=published, learn2learn=learn2learn, tested_from=tested_from)
    if fn.__module__ == "__main__":
        return fn  # a recipe file run as a script registers through discovery instead
    name = fn.__name__.replace("_", "-")
    if name in _RECIPES:
        raise ValueError(f"recipe '{name}' is registered twice ({_RECIPES[name].module}, {fn.__module__})")
    family = fn.__module__.rsplit(".", 1)[-1]
    _RECIPES[name] = Recipe(name, family, fn.__module__, fn, published, learn2learn, tested_from)
    return fn


def _discover():
    global _discovered
    if _discovered:
        return
    _discovered = True
    from l2l_recipes import recipes
    for info in pkgutil.iter_modules(recipes.__path__):
        importlib.import_module(f"{recipes.__name__}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def natural_key(name):
    """Sort key reading digit runs as numbers: 5w5s sorts before 5w10s."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_recipes(pattern="*"):
    """Registered names matching the fnmatch `pattern`, in natural order (5w5s before 5w10s)."""
    _discover()
    return sorted((n for n in _RECIPES if fnmatch.fnmatchcase(n, pattern)), key=natural_key)


def get_recipe(name):
    """The Recipe registered as `name`; an unknown name raises a UserError suggesting close ones."""
    _discover()
    if name not in _RECIPES:
        if any(c in name for c in "*?["):
            raise UserError(f"'{name}' is a pattern, not a recipe name: `l2l-recipes list '{name}'` lists "
                            f"the recipes it matches")
        close = difflib.get_close_matches(name, list(_RECIPES), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `l2l-recipes list`"
        raise UserError(f"unknown recipe '{name}'{hint}")
    return _RECIPES[name]
