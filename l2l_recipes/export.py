"""`l2l-recipes export NAME DEST`: a registered recipe as one Python file that needs only
learn2learn, torch and torchvision (and numpy, PIL, tqdm, which they bring).

The file, in order: the recipe's title and summary (with --fast its whole docstring) plus one
line saying what it was exported from; the imports; `RECIPE` and the recipe's Config dataclass
with the variant's values as its defaults; the support code inlined from l2l_recipes; the
recipe's code; `main()`, which takes --data-root, --download, --device, --out and --set (with
--fast also --seed, --progress and --resume). By default the file is the recipe's plain loop in
one process (`l2l_recipes.plain`: it logs, validates keeping the best weights and tests them),
reading its dataset's class splits from `splits/` beside it and decoding its images without a
cache (`plain.load_split` for `data.load_split`); its Config keeps no `__post_init__` checks.
With --fast it keeps the fast path and `l2l-recipes run`'s whole run machinery: torchrun, the
same run directory (a stopped run says to resume it with `python FILE --resume RUN_DIR`), the
splits written into the file.

How it is built, with `ast` and source positions (no source strings run, no import tricks):
- Unless `fast`, the recipe's fast path is taken out first (`plain_source`): the file holds
  the loop `--set engine=reference` runs.
- The recipe module's source is kept verbatim with its comments, minus its l2l_recipes
  imports, its registered variants (and helpers only they use) and its `__main__` block.
  Uses of the package (`data.taskset`, an import alias such as `_Predictor`) are rewritten
  to the names of the inlined definitions by editing the text at the positions ast gives,
  each checked against the source first, so comments survive.
- From l2l_recipes, only the top-level functions, classes and constants the recipe reaches
  are inlined: the closure over names, following module-qualified uses (`data.taskset`,
  `models.conv4_classifier`) into what those reach in turn. Each is copied verbatim with the
  comment lines directly above it, grouped by module, in an order where every name is
  defined before its top-level use (base classes, decorators, default arguments, constants).
- Where two inlined modules define the same name (each dataset module's `load_split`), the
  one the recipe itself uses keeps it and the others become `<module>_<name>`; a name the
  recipe imports under an alias (`Predictor as _Predictor`) takes the alias. No new name
  collides with a builtin, an import, a recipe name or a local variable where it is used,
  and every reference is rewritten.
- In the plain file, the harness's Predictor is `plain.Predictor` (its base, evaluating task
  by task in one process).
- Three package functions that look outside the file are written anew for it (a plain
  file reaches only the first: it reads the split files beside it and tests by itself):
  `data.dataset_module` (an importlib of l2l_recipes.<dataset>) becomes a table of the
  inlined loaders of the datasets the file includes: the variant's dataset or, with
  `all_datasets`, every dataset the family's variants use; `data.read_split` reads the
  shipped split files, which are written into the file as brace patterns; and
  `harness.recipe_module` (the registry lookup behind `load` and `meta_test`) returns the
  file's own Config, build_model, Predictor and train.
- The result is parsed and checked before it is written: every name is defined, and
  defined before its top-level uses, and nothing imports l2l_recipes or recipes.
"""
import ast
import builtins
import dataclasses
import functools
import importlib.util
import io
import json
import os
import pkgutil
import re
import sys
import textwrap
import tokenize
from pathlib import Path

from l2l_recipes import data, harness, registry
from l2l_recipes.errors import UserError

PACKAGE = "l2l_recipes"
RULE = "# " + "-" * 77  # the house section header: RULE + " name"
BUILTIN_NAMES = frozenset(dir(builtins)) | {"__file__"}
# What a dataset module offers (data.DATASETS); uses found in the package are added.
DATASET_INTERFACE = ("CHANNELS", "SIZE", "transform", "classes", "load_split")
PLAIN_MODULES = ("models", "plain")  # the package modules a plain loop reaches for its data


class ExportError(UserError):
    """The recipe uses something the exporter cannot turn into plain code."""


def export_recipe(name, dest, force=False, all_datasets=False, fast=False):
    """Write recipe `name` as one Python file; returns its path.

    `dest` is a .py path or an existing directory (then `dest/<name with - as _>.py`); an
    existing file is replaced only with `force`. Without `fast` the file holds the plain loop
    (`plain_source`) and reads the class splits of its dataset from `splits/<split>/` beside
    it, written too (the package's own files, l2l_recipes/splits); with `fast`, the recipe's
    fast path and the resume machinery too, and the splits inside the file.

    Example:
        path = export_recipe("protonet-omniglot-5w1s", "my_project/")
    """
    registry.get_recipe(name)  # an unknown name: the registry's error, with close names
    dest = Path(dest)
    path = dest / f"{name.replace('-', '_')}.py" if dest.is_dir() else dest
    if path.suffix != ".py":
        raise UserError(f"{dest} is neither a .py file nor an existing directory: pass DEST as a .py path")
    if path.exists() and not force:
        raise UserError(f"{path} exists: pass --force to overwrite it")
    if not path.parent.is_dir():
        raise UserError(f"no directory {path.parent}: create it first")
    command = f"l2l-recipes export {name} {dest}" + " --all-datasets" * all_datasets + " --fast" * fast
    exporter = _Exporter(registry.get_recipe(name), all_datasets, command, fast)
    files = {path: exporter.build()}
    if not fast:
        for split in exporter.split_names():
            for file in sorted((data.SPLITS_DIR / split).glob("*.txt")):
                copy = path.parent / "splits" / split / file.name
                if copy.is_file() and copy.read_text() != file.read_text() and not force:
                    raise UserError(f"{copy} exists and differs from the shipped split: pass --force to "
                                    f"overwrite it")
                files[copy] = file.read_text()
    for file, text in files.items():
        tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, file)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write {file} ({e.strerror}): pass a DEST you can write") from None
    return path


def export_source(name, all_datasets=False, command=None, fast=False):
    """The text of the exported file of recipe `name` (see the module docstring)."""
    recipe = registry.get_recipe(name)
    return _Exporter(recipe, all_datasets, command or f"l2l-recipes export {name} DEST", fast).build()


# ----------------------------------------------------------------------------- the plain loop

FAST_ONLY_METHODS = ("predict_tasks", "all_images")  # a Predictor's batched evaluation; a split on the device


def _is_fast_test(node):
    """`cfg.engine == "fast"` (or `self.cfg.engine == ...`): the test of a recipe's fast-path branch."""
    return (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq)
            and isinstance(node.left, ast.Attribute) and node.left.attr == "engine"
            and isinstance(node.comparators[0], ast.Constant) and node.comparators[0].value == "fast")


def _dedent(lines, by):
    return [line[min(by, len(line) - len(line.lstrip(" "))):] for line in lines]


@functools.lru_cache(maxsize=None)
def plain_source(text):
    """A recipe's source with its fast path taken out: each `if cfg.engine == "fast": A else: B`
    becomes B, each `A if cfg.engine == "fast" else B` becomes B, and the methods only the fast
    path calls (FAST_ONLY_METHODS) and the comment lines about engine=fast go. What is left is
    the engine=reference loop (applied to the package's modules too)."""
    while True:
        tree = ast.parse(text)
        lines = text.splitlines(keepends=True)
        edit = None  # the last candidate in the file: editing from the end keeps earlier positions
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_fast_test(node.test):
                if node.orelse and isinstance(node.orelse[0], ast.If) and node.orelse[0].col_offset == node.col_offset:
                    raise ExportError(f"line {node.lineno}: an `elif` after the fast-path test cannot be exported "
                                      f"plain: use --fast")
                body = (_dedent(lines[node.orelse[0].lineno - 1:node.orelse[-1].end_lineno],
                                node.orelse[0].col_offset - node.col_offset) if node.orelse else [])
                candidate = (node.lineno - 1, 0, node.end_lineno - 1, None, "".join(body))
            elif isinstance(node, ast.IfExp) and _is_fast_test(node.test):
                start, end = lines[node.lineno - 1], lines[node.end_lineno - 1]
                candidate = (node.lineno - 1, _char_col(start, node.col_offset), node.end_lineno - 1,
                             _char_col(end, node.end_col_offset), ast.get_source_segment(text, node.orelse))
            elif isinstance(node, ast.FunctionDef) and node.name in FAST_ONLY_METHODS and node.col_offset > 0:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                last = node.end_lineno
                if last < len(lines) and not lines[last].strip():  # and the blank line after it
                    last += 1
                candidate = (first - 1, 0, last - 1, None, "")
            else:
                continue
            if edit is None or candidate[:2] > edit[:2]:
                edit = candidate
        if edit is None:  # and the comment lines that explain the fast path
            return "".join(line for line in text.splitlines(keepends=True)
                           if not (line.lstrip().startswith("#") and "engine=fast" in line))
        first, col, last, end_col, replacement = edit
        if end_col is None:  # whole lines
            lines[first:last + 1] = [replacement]
        else:
            lines[first:last + 1] = [lines[first][:col] + replacement + lines[last][end_col:]]
        text = "".join(lines)


def without_method(text, class_name, method):
    """`text` without top-level class `class_name`'s method `method` (and the blank lines after it)."""
    (cls,) = [n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == class_name]
    found = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method]
    if not found:
        return text
    lines = text.splitlines(keepends=True)
    first, last = min([found[0].lineno] + [d.lineno for d in found[0].decorator_list]) - 1, found[0].end_lineno
    while first > 0 and not lines[first - 1].strip():
        first -= 1
    return "".join(lines[:first] + lines[last:])


def _only_validates(text, class_name):
    """Whether top-level class `class_name`'s `__post_init__` in `text` calls `validate(self)` alone."""
    (cls,) = [n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == class_name]
    body = [n.body for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__post_init__"]
    return bool(body) and [ast.unparse(stmt) for stmt in body[0]] == ["validate(self)"]


CALLED_BY_TORCH = frozenset({"forward", "backward", "extra_repr", "reset_parameters"})  # never called by name


def without_unused_methods(text, keep_classes=()):
    """`text` without the methods of its classes (but `keep_classes`) that nothing in it calls by
    name: a plain file's support classes carry hooks only the package's harness calls."""
    while True:
        tree = ast.parse(text)
        called = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        unused = [(cls.name, f.name) for cls in tree.body
                  if isinstance(cls, ast.ClassDef) and cls.name not in keep_classes
                  for f in cls.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")
                  and f.name not in CALLED_BY_TORCH and f.name not in called]
        if not unused:
            return text
        for class_name, method in unused:
            text = without_method(text, class_name, method)


# ----------------------------------------------------------------------------- brace patterns

def expand_braces(pattern):
    """The names a pattern stands for, in order: 'a{1..2}b{x,y}' -> a1bx, a1by, a2bx, a2by.

    `{first..last}` counts with the width of `first`; `{x,y,z}` lists the values.
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    first, dots, last = match.group(1).partition("..")
    values = ([str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)] if dots
              else match.group(1).split(","))
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for value in values for name in expand_braces(head + value + tail)]


def brace_patterns(names):
    """Patterns whose expand_braces, concatenated, give `names` in order: runs of three or more
    names that differ in one number stepping evenly (01, 02, 03 or 000, 090, 180) become a
    brace; a new brace always lies left of earlier ones, so it is the outer loop."""
    if any(c in n for n in names for c in "{}"):
        return list(names)
    patterns = [re.split(r"(\d+)", n) for n in names]  # digit runs at odd indices
    while True:
        merged, i = [], 0
        while i < len(patterns):
            run, j = _run_at(patterns, i)
            if len(run) >= 3:
                values = [p[j] for p in run]
                step = int(values[1]) - int(values[0])
                text = f"{{{values[0]}..{values[-1]}}}" if step == 1 else "{" + ",".join(values) + "}"
                merged.append(run[0][:j] + [text] + run[0][j + 1:])
                i += len(run)
            else:
                merged.append(patterns[i])
                i += 1
        if len(merged) == len(patterns):
            break
        patterns = merged
    result = ["".join(p) for p in patterns]
    if [n for p in result for n in expand_braces(p)] != list(names):
        return list(names)
    return result


@functools.lru_cache(maxsize=None)
def _split_patterns(name, split):
    return brace_patterns(data.read_split(name, split))


def _run_at(patterns, i):
    """The longest run from patterns[i] that differs in one number only, stepping evenly."""
    p = patterns[i]
    if i + 1 >= len(patterns) or len(patterns[i + 1]) != len(p):
        return [p], None
    diff = [k for k in range(len(p)) if p[k] != patterns[i + 1][k]]
    first_brace = next((k for k, part in enumerate(p) if part.startswith("{")), len(p))
    if len(diff) != 1 or diff[0] % 2 == 0 or diff[0] > first_brace:
        return [p], None
    j = diff[0]
    step = int(patterns[i + 1][j]) - int(p[j])
    run = [p]
    for q in patterns[i + 1:]:
        if (len(q) != len(p) or any(q[k] != p[k] for k in range(len(p)) if k != j) or not q[j].isdigit()
                or len(q[j]) != len(p[j]) or int(q[j]) - int(run[-1][j]) != step or step <= 0):
            break
        run.append(q)
    return run, j


# ----------------------------------------------------------------------------- scopes

def _bound_in(body, args=None):
    """Names bound in one function or class scope (its statements, not nested scopes), less
    those it declares global."""
    names, declared = set(), set()
    if args is not None:
        names |= {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a}
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            stack.extend(_outer_parts(node))
            continue
        if isinstance(node, ast.Lambda):
            stack.extend(_outer_parts(node))
            continue
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            stack.append(node.generators[0].iter)
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.Global):
            declared |= set(node.names)
        stack.extend(ast.iter_child_nodes(node))
    return names - declared


def _outer_parts(node):
    """The parts of a def, class or lambda evaluated in the enclosing scope, when it is defined."""
    if isinstance(node, ast.ClassDef):
        return [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]
    a = node.args
    parts = [*a.defaults, *(d for d in a.kw_defaults if d is not None)]
    if isinstance(node, ast.Lambda):
        return parts
    annotations = [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg)
                   if x is not None and x.annotation is not None]
    return [*node.decorator_list, *parts, *annotations, *([node.returns] if node.returns else [])]


@dataclasses.dataclass(frozen=True)
class Use:
    """A use of a module-level name in a top-level statement: `name`, or `name.attr`."""
    name: str
    attr: str | None
    node: ast.AST  # the Name, or the Attribute of name.attr
    deftime: bool  # evaluated when the statement runs (not inside a function body)
    local_names: frozenset  # names bound in the scopes around it: a new name must avoid them


def uses_of(stmt):
    """Every use of a module-level (global or builtin) name in top-level statement `stmt`."""
    out = []

    def visible(scopes):
        """The name sets of the scopes a use sees: a class body's names are not visible in its methods."""
        return [names for depth, (kind, names) in enumerate(reversed(scopes)) if kind != "class" or depth == 0]

    def is_local(name, scopes):
        return any(name in names for names in visible(scopes))

    def visit(node, scopes, deftime):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for part in _outer_parts(node):
                visit(part, scopes, deftime)
            inner = scopes + [("function", frozenset(_bound_in(
                node.body if isinstance(node.body, list) else [node.body], node.args)))]
            for child in (node.body if isinstance(node.body, list) else [node.body]):
                visit(child, inner, False)
        elif isinstance(node, ast.ClassDef):
            for part in _outer_parts(node):
                visit(part, scopes, deftime)
            inner = scopes + [("class", frozenset(_bound_in(node.body)))]
            for child in node.body:
                visit(child, inner, deftime)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            visit(node.generators[0].iter, scopes, deftime)
            targets = {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
            inner = scopes + [("comprehension", frozenset(targets))]
            for k, g in enumerate(node.generators):
                for child in [g.target, *g.ifs, *([g.iter] if k else [])]:
                    visit(child, inner, deftime)
            for child in ([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]):
                visit(child, inner, deftime)
        elif isinstance(node, ast.Name):
            if not is_local(node.id, scopes):
                out.append(Use(node.id, None, node, deftime, frozenset().union(*visible(scopes))))
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and not is_local(node.value.id, scopes)):
            out.append(Use(node.value.id, node.attr, node, deftime, frozenset().union(*visible(scopes))))
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, scopes, deftime)

    visit(stmt, [], True)
    return out


# ----------------------------------------------------------------------------- sources

@dataclasses.dataclass(eq=False)
class Item:
    """One top-level statement of a source that binds names: a def, a class, a constant."""
    src: "Source"
    node: ast.stmt
    names: tuple
    first: int  # first line (a decorator's, if any)
    index: int  # position among the source's items
    attached: list  # the comment lines directly above it
    gap: list  # every line between the previous statement and this one

    @property
    def uses(self):
        if not hasattr(self, "_uses"):
            self._uses = uses_of(self.node)
        return self._uses

    @property
    def label(self):
        return f"{self.src.label} line {self.node.lineno}"


class Source:
    """A parsed module: its imports (what each imported name means) and its top-level items."""

    def __init__(self, module, text, label, extern=()):
        self.module, self.text, self.label = module, text, label
        self.short = re.sub(r"\W", "", module.rsplit(".", 1)[-1])  # '<export>' -> export
        self.lines = text.splitlines(keepends=True)
        self.tree = ast.parse(text, filename=label)
        self.extern = set(extern)  # names defined elsewhere in the exported file (written code)
        self.bindings = {}  # name -> ("module", M) | ("item", M, attr) | ("import", spec)
        self.aliases = {}  # (M, attr) -> the name it is imported under, where that differs
        self.future = []  # `from __future__` names
        self.docstring = None
        self.items, self.defs = [], {}
        body = self.tree.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            self.docstring, body = body[0], body[1:]
        previous_end = self.docstring.end_lineno if self.docstring else 0
        for stmt in body:
            first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
            gap = self.lines[previous_end:first - 1]
            previous_end = stmt.end_lineno
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                self._bind_import(stmt)
            elif _is_main_block(stmt):
                continue  # a module's `if __name__ == "__main__":` block: the exported file writes its own
            else:
                attached = []
                for line in reversed(gap):
                    if not line.strip().startswith("#"):
                        break
                    attached.insert(0, line)
                item = Item(self, stmt, _top_level_names(stmt), first, len(self.items), attached, gap)
                self.items.append(item)
                for name in item.names:
                    self.defs[name] = item

    def _bind_import(self, stmt):
        if isinstance(stmt, ast.Import):
            for a in stmt.names:
                root = a.name.split(".")[0]
                if _is_recipe_module(a.name):
                    raise ExportError(f"{self.label} line {stmt.lineno} imports {a.name}: a recipe may not "
                                      f"import another recipe")
                bound = a.asname or root
                if root == PACKAGE:
                    if a.asname is None and a.name != PACKAGE:
                        raise ExportError(f"{self.label} line {stmt.lineno}: use `from {PACKAGE} import ...`")
                    self.bindings[bound] = ("module", a.name)
                else:
                    self.bindings[bound] = ("import", ("import", a.name, a.asname))
            return
        module = stmt.module or ""
        if stmt.level:  # relative: only inside the package
            module = ".".join(self.module.split(".")[:-stmt.level] + ([module] if module else []))
        if module == "__future__":
            self.future += [a.name for a in stmt.names]
            return
        root = module.split(".")[0]
        if _is_recipe_module(module) or (module == PACKAGE and "recipes" in [a.name for a in stmt.names]):
            raise ExportError(f"{self.label} line {stmt.lineno} imports {module}: a recipe may not import "
                              f"another recipe")
        for a in stmt.names:
            if a.name == "*":
                raise ExportError(f"{self.label} line {stmt.lineno}: `import *` cannot be exported")
            bound = a.asname or a.name
            if root != PACKAGE:
                self.bindings[bound] = ("import", ("from", module, a.name, a.asname))
            elif _is_submodule(module, a.name):
                self.bindings[bound] = ("module", f"{module}.{a.name}")
            else:
                self.bindings[bound] = ("item", module, a.name)
                if bound != a.name:
                    self.aliases[(module, a.name)] = bound


@functools.lru_cache(maxsize=None)
def parsed(module, text, label):
    """Source(module, text, label), parsed once: exporting every recipe reads the same modules."""
    return Source(module, text, label)


def _is_recipe_module(module):
    """Whether `module` is a recipe module (or their package): l2l_recipes.recipes[.x], or recipes[.x]."""
    return any(module == p or module.startswith(p + ".") for p in ("recipes", f"{PACKAGE}.recipes"))


def _is_submodule(package, name):
    """Whether `from package import name` imports a module (l2l_recipes.data, l2l_recipes.datasets.omniglot)."""
    return (hasattr(importlib.import_module(package), "__path__")
            and importlib.util.find_spec(f"{package}.{name}") is not None)


def _is_main_block(stmt):
    test = getattr(stmt, "test", None)
    return (isinstance(stmt, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def _top_level_names(stmt):
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return (stmt.name,)
    targets = {ast.Assign: lambda s: s.targets, ast.AnnAssign: lambda s: [s.target],
               ast.AugAssign: lambda s: [s.target]}.get(type(stmt), lambda s: [])(stmt)
    return tuple(dict.fromkeys(n.id for t in targets for n in ast.walk(t)
                               if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)))


def _def_name_site(src, node):
    """(line, start column, end column) of a def's or class's name, found with tokenize."""
    line = src.lines[node.lineno - 1]
    keyword = None
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line).readline):
            if tok.type == tokenize.NAME and keyword:
                return node.lineno, tok.start[1], tok.end[1]
            if tok.type == tokenize.NAME and tok.string in ("def", "class"):
                keyword = tok.string
    except tokenize.TokenError:
        pass
    raise ExportError(f"{src.label} line {node.lineno}: cannot find the name of `{node.name}`")


def _char_col(line, byte_col):
    """ast columns count UTF-8 bytes; text edits need characters."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8"))


# ----------------------------------------------------------------------------- the exporter

class _Exporter:
    def __init__(self, recipe, all_datasets, command, fast=False):
        self.recipe = recipe
        self.command = command
        self.module = recipe.load_module()
        self.cfg = recipe.config()
        self.sources = {}
        self._resolved = {}  # id(item) -> [(use, what it resolves to here)]: items are shared by exports
        path = Path(self.module.__file__)
        text = path.read_text(encoding="utf-8")
        self.plain = not fast
        if self.plain:  # the plain loop, which engine=reference runs in the package
            text = plain_source(text)
            if _only_validates(text, type(self.cfg).__name__):  # override() validates: a copy would repeat it
                text = without_method(text, type(self.cfg).__name__, "__post_init__")
            if hasattr(self.cfg, "engine"):  # its one value here, refused otherwise by main()
                self.cfg = dataclasses.replace(self.cfg, engine="reference")
                text = re.sub(r"^( +engine: str = [^#\n]*?) *#.*$", rf"\1  # {PLAIN_ENGINE}", text, count=1,
                              flags=re.M)
        self.rsrc = parsed(self.module.__name__, text, f"{path.parent.name}/{path.name}")
        self.datasets = self._datasets(all_datasets)

    # -- sources and lookups

    def source(self, module):
        if module not in self.sources:
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin is None:
                raise ExportError(f"cannot export: no source for module {module}")
            path = Path(spec.origin)
            label = module.replace(".", "/") + ".py" if module.startswith(PACKAGE) else module
            text = path.read_text(encoding="utf-8")
            self.sources[module] = parsed(module, plain_source(text) if self.plain else text, label)
        return self.sources[module]

    def lookup(self, module, name):
        """The item `module.name` stands for: a written replacement, a definition, or the
        definition a package import of that module points to."""
        if (module, name) in self.rewritten:
            return self.rewritten[(module, name)]
        src = self.source(module)
        if name in src.defs:
            return src.defs[name]
        binding = src.bindings.get(name)
        if binding and binding[0] == "item":
            return self.lookup(binding[1], binding[2])
        raise ExportError(f"cannot export: {module} has no top-level definition '{name}'")

    def resolve(self, src, use):
        """What `use` in `src` refers to: ("item", Item), ("import", spec), ("extern", name) or
        ("builtin", name); a package module only through `module.attr`."""
        binding = src.bindings.get(use.name) if use.name not in src.defs else None
        if binding and binding[0] == "module":
            if use.attr is None:
                raise ExportError(f"{src.label} line {use.node.lineno}: module {binding[1]} is used other than "
                                  f"as {use.name}.<name>")
            if not isinstance(use.node.ctx, ast.Load):
                raise ExportError(f"{src.label} line {use.node.lineno}: assigns to {use.name}.{use.attr}")
            return ("item", self.lookup(binding[1], use.attr))
        if use.name in src.defs:
            return ("item", self.rewritten.get((src.module, use.name), src.defs[use.name]))
        if binding and binding[0] == "item":
            return ("item", self.lookup(binding[1], binding[2]))
        if binding:
            return ("import", binding[1])
        if use.name in src.extern:
            return ("extern", use.name)
        if use.name in BUILTIN_NAMES:
            return ("builtin", use.name)
        raise ExportError(f"{src.label} line {use.node.lineno}: name '{use.name}' is not defined")

    def resolved(self, item):
        if id(item) not in self._resolved:
            self._resolved[id(item)] = [(use, self.resolve(item.src, use)) for use in item.uses]
        return self._resolved[id(item)]

    # -- what goes in

    def _datasets(self, all_datasets):
        if not isinstance(getattr(self.cfg, "dataset", None), str):
            return []
        names = {self.cfg.dataset}
        if all_datasets:
            for other in registry.list_recipes():
                r = registry.get_recipe(other)
                if r.module == self.recipe.module:
                    names.add(getattr(r.config(), "dataset", None))
        return [d for d in data.DATASETS if d in names]

    def _recipe_parts(self):
        """Sort the recipe's items into Config, kept code and what is dropped (variants, and
        helpers only dropped code uses)."""
        rsrc = self.rsrc
        config_name = type(self.cfg).__name__
        if type(self.cfg).__module__ != self.module.__name__ or config_name not in rsrc.defs:
            raise ExportError(f"{rsrc.label}: the config class {config_name} is not defined in the recipe file")
        self.config_item = rsrc.defs[config_name]
        dropped = {item for item in rsrc.items if self._is_variant(item)}
        protected = {self.config_item} | {rsrc.defs[n] for n in ("build_model", "Predictor", "train")
                                          if n in rsrc.defs}
        users = {item: set() for item in rsrc.items}
        for item in rsrc.items:
            for use, target in self.resolved(item):
                if target[0] == "item" and target[1].src is rsrc and target[1] is not item:
                    users[target[1]].add(item)
        changed = True
        while changed:
            changed = False
            for item in rsrc.items:
                if item not in dropped and item not in protected and users[item] <= dropped and (
                        users[item] or self.plain and item.node is not None and not isinstance(item.node, ast.Assign)):
                    dropped.add(item)
                    changed = True
        self.recipe_items = [item for item in rsrc.items if item not in dropped and item is not self.config_item]

    def _is_variant(self, item):
        """Decorated with the registry's `register` (`@register`, `@register(...)`, `@registry.register`)."""
        for d in getattr(item.node, "decorator_list", []):
            d = d.func if isinstance(d, ast.Call) else d
            if isinstance(d, ast.Name) and self.rsrc.bindings.get(d.id) == ("item", f"{PACKAGE}.registry", "register"):
                return True
            if isinstance(d, ast.Attribute) and isinstance(d.value, ast.Name) and d.attr == "register" and \
                    self.rsrc.bindings.get(d.value.id) == ("module", f"{PACKAGE}.registry"):
                return True
        return False

    def _closure(self, roots):
        seen, order = set(roots), list(roots)
        for item in order:
            for _, target in self.resolved(item):
                if target[0] == "item" and target[1] not in seen:
                    seen.add(target[1])
                    order.append(target[1])
        return order

    # -- written code

    def _written_sources(self):
        """The file's own dataset table, split reader and recipe lookup, as sources parsed like
        the package's modules (their package imports say what they refer to; RECIPE, Config and
        the like are the recipe's names)."""
        extern = set(self.rsrc.defs) | {"RECIPE"}
        texts = {"dataset_module": ("data.dataset_module", self._dataset_module_text()),
                 "read_split": ("data.read_split", self._read_split_text()),
                 "recipe_module": ("harness.recipe_module", self._recipe_module_text(extern))}
        return {name: Source("<export>", text, f"written for {original}", extern)
                for name, (original, text) in texts.items()}

    def _dataset_module_text(self):
        attrs = self._dataset_attrs()
        pairs = [data.DATASETS[d].rsplit(".", 1) for d in self.datasets]  # (package, module)
        modules = [m for _, m in pairs]
        lines = ["from types import SimpleNamespace", ""]
        for parent in dict.fromkeys(p for p, _ in pairs):
            lines.append(f"from {parent} import {', '.join(m for p, m in pairs if p == parent)}")
        lines += [f"from {PACKAGE}.errors import UserError", ""]
        if self.datasets:
            lines += ["DATASETS = {  # the datasets this file reads: name -> its loader's functions and constants"]
            for d, short in zip(self.datasets, modules):
                src = self.source(data.DATASETS[d])
                present = [a for a in attrs if a in src.defs or src.bindings.get(a, ("",))[0] == "item"]
                one_line = f'    "{d}": SimpleNamespace({", ".join(f"{a}={short}.{a}" for a in present)}),'
                lines += [one_line] if len(one_line) <= 120 else [
                    f'    "{d}": SimpleNamespace(', *(f"        {a}={short}.{a}," for a in present), "    ),"]
            lines.append("}")
        else:
            lines.append("DATASETS = {}  # this recipe reads no image dataset")
        lines += [
            "", "",
            "def dataset_module(name):",
            "    if name not in DATASETS:",
            "        raise UserError(f\"this file reads {', '.join(DATASETS) or 'no dataset'}, not {name}: export a \"",
            "                        f\"{name} recipe, or this one with --all-datasets\")",
            "    return DATASETS[name]"]
        return "\n".join(lines) + "\n"

    def _read_split_text(self):
        splits = {}
        for name in self.split_names():
            splits[name] = {s: _split_patterns(name, s) for s in (*data.SPLIT_NAMES, "trainval")
                            if (data.SPLITS_DIR / name / f"{s}.txt").is_file()}
        lines = [
            f"from {PACKAGE}.data import SPLIT_NAMES",
            f"from {PACKAGE}.errors import UserError",
            f"from {PACKAGE}.export import expand_braces",
            "",
            "# The shipped class splits (l2l_recipes/splits/<name>/<split>.txt) this file reads, written",
            "# as brace patterns: 'Angelic/character{01..20}/rot{000,090,180,270}' stands for 80 class",
            "# names (character01/rot000, character01/rot090, ..., character20/rot270), in that order.",
            f"SPLITS = {_format_splits(splits)}",
            "", "",
            "def read_split(name, split):",
            '    """Class names of one split of a shipped split, e.g. read_split(\'omniglot-vinyals\', \'test\')."""',
            "    if split not in SPLITS.get(name, {}):",
            "        raise UserError(f\"no split {name}/{split} in this file: split must be one of \"",
            "                        f\"{', '.join(SPLIT_NAMES)}\")",
            "    return [n for pattern in SPLITS[name][split] for n in expand_braces(pattern)]"]
        return "\n".join(lines) + "\n"

    def _recipe_module_text(self, extern):
        parts = ", ".join(f"{n}={n}" for n in ("Config", "build_model", "Predictor", "train") if n in extern)
        lines = [
            "from types import SimpleNamespace",
            "",
            f"from {PACKAGE}.errors import UserError",
            "", "",
            "def recipe_module(name):",
            '    """The recipe\'s Config, build_model and Predictor, for load() and meta_test(): this',
            '    file\'s own (in the package, the registry finds the recipe module)."""',
            "    if name != RECIPE:",
            "        raise UserError(f\"this file trains {RECIPE}, not {name}: export {name} with \"",
            "                        f\"`l2l-recipes export {name} DEST`\")",
            f"    return SimpleNamespace({parts})"]
        return "\n".join(lines) + "\n"

    def _dataset_attrs(self):
        """DATASET_INTERFACE plus every attribute the package and the recipe read from a
        `dataset_module(...)` result (directly, or through a variable holding it); for a plain
        file only those the recipe and the modules of a plain loop (PLAIN_MODULES) read."""
        if self.plain:
            attrs, modules = [], [f"{PACKAGE}.{m}" for m in PLAIN_MODULES]
        else:
            attrs, package = list(DATASET_INTERFACE), Path(data.__file__).parent
            modules = [m.name for m in pkgutil.walk_packages([str(package)], f"{PACKAGE}.")]
        sources = [self.rsrc] + [self.source(m) for m in modules]
        for src in sources:
            for stmt in src.tree.body:
                nodes = list(ast.walk(stmt))
                holders = {t.id for node in nodes if isinstance(node, ast.Assign) and _is_dataset_call(node.value)
                           for t in node.targets if isinstance(t, ast.Name)}
                for node in nodes:
                    if isinstance(node, ast.Attribute) and node.attr not in attrs and (_is_dataset_call(node.value) or (
                            isinstance(node.value, ast.Name) and node.value.id in holders)):
                        attrs.append(node.attr)
        return attrs

    def split_names(self):
        """The shipped splits (folders of l2l_recipes/splits) the file's datasets read."""
        return sorted({n for d in self.datasets for n in self._split_names(self.source(data.DATASETS[d]))})

    def _split_names(self, src):
        names = []
        for node in ast.walk(src.tree):
            if isinstance(node, ast.Call) and _callee(node) == "read_split":
                if not (node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    raise ExportError(f"{src.label} line {node.lineno}: read_split with a computed split name")
                names.append(node.args[0].value)
        return names

    # -- building

    def build(self):
        written = self._written_sources()
        self.rewritten = {(f"{PACKAGE}.{m}", n): written[n].defs[n] for m, n in
                          (("data", "dataset_module"), ("data", "read_split"), ("harness", "recipe_module"))}
        if self.plain:  # split files beside the file, images decoded without a cache, tasks evaluated one by one
            del self.rewritten[(f"{PACKAGE}.data", "read_split")]
            for module, name in (("harness", "Predictor"), ("data", "load_split")):
                self.rewritten[(f"{PACKAGE}.{module}", name)] = self.source(f"{PACKAGE}.plain").defs[name]
        self._recipe_parts()
        template = PLAIN_MAIN_TEMPLATE if self.plain else MAIN_TEMPLATE
        if self.plain and not hasattr(self.cfg, "engine"):
            template = template.replace(ENGINE_CHECK, "")
        main_src = Source("<main>", template, "main", extern=self._recipe_names() | {"RECIPE"})
        self.main_src = main_src
        roots = [self.config_item] + self.recipe_items + main_src.items
        closure = self._closure(roots)
        support = [item for item in closure if item.src is not self.rsrc and item.src is not main_src]
        self._check_no_package_imports(closure)
        support = self._order(support)
        imports = self._imports(closure)
        names = self._assign_names(support, closure, imports)
        text = self._render(support, names, imports)
        if self.plain:
            text = without_unused_methods(text, keep_classes={n for item in self.recipe_items for n in item.names})
        self._check(text)
        return text

    def _recipe_names(self):
        return {n for item in [self.config_item] + self.recipe_items for n in item.names}

    def _check_no_package_imports(self, items):
        for item in items:
            for node in ast.walk(item.node):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    modules = ["." * node.level + (node.module or "")]
                else:
                    continue
                bad = [m for m in modules if m.split(".")[0] in (PACKAGE, "recipes", "")]
                if bad:
                    raise ExportError(f"cannot export {self.recipe.name}: {item.label} imports {bad[0]} "
                                      f"inside `{(item.names or ('a statement',))[0]}`")

    def _rank(self, src):
        """Modules that import nothing from the package first; written code last."""
        if src.module == "<export>" or src.module == f"{PACKAGE}.export":
            return 1000
        if not hasattr(src, "_rank"):
            src._rank = 0
            deps = {b[1] for b in src.bindings.values() if b[0] in ("module", "item")}
            src._rank = 1 + max((self._rank(self.source(m)) for m in deps if m != src.module), default=-1)
        return src._rank

    def _order(self, support):
        """The support items in an order where each is defined before its top-level uses;
        otherwise by module (fewest package imports first) and by position in the module."""
        def key(item):
            return (self._rank(item.src), item.src.label, item.index, item.names)
        chosen = set(support)
        needs = {item: {t[1] for use, t in self.resolved(item) if use.deftime and t[0] == "item"
                        and t[1] in chosen and t[1] is not item} for item in support}
        done, ordered = set(), []
        pending = sorted(support, key=key)
        while pending:
            ready = next((item for item in pending if needs[item] <= done), None)
            if ready is None:
                raise ExportError(f"cannot export: circular top-level uses among {pending[0].label}, ...")
            pending.remove(ready)
            done.add(ready)
            ordered.append(ready)
        return ordered

    def _imports(self, items):
        by_name = {}
        for item in items:
            for use, target in self.resolved(item):
                if target[0] == "import":
                    by_name.setdefault(_spec_name(target[1]), set()).add(target[1])
        for name, options in by_name.items():
            if len(options) > 1 and not all(s[0] == "import" and s[2] is None for s in options):
                raise ExportError(f"cannot export: '{name}' is imported as different things "
                                  f"({', '.join(map(str, sorted(options)))})")
        clashes = set(by_name) & self._recipe_names()
        if clashes:
            raise ExportError(f"cannot export {self.recipe.name}: it defines {sorted(clashes)[0]}, a name the "
                              f"package code it uses imports")
        return {name: sorted(options) for name, options in by_name.items()}

    def _assign_names(self, support, closure, imports):
        """{(item, name): the name it gets in the file}; the recipe's names never change."""
        fixed = self._recipe_names() | {"RECIPE"} | {n for item in self.main_src.items for n in item.names}
        taken = set(BUILTIN_NAMES) | fixed | set(imports)
        uses_of_pair = {}
        direct = set()
        for item in closure:
            for use, target in self.resolved(item):
                if target[0] != "item":
                    continue
                pair = self._pair(item.src, use, target[1])
                uses_of_pair.setdefault(pair, []).append(use)
                if item.src in (self.rsrc, self.main_src):
                    direct.add(pair)
        pairs = [(item, n) for item in support for n in item.names]
        desired = {}
        for item, n in pairs:
            module = item.src.module
            desired[(item, n)] = self.rsrc.aliases.get((module, n), n)
        groups = {}
        for pair in pairs:
            groups.setdefault(desired[pair], []).append(pair)

        def captured(pair, candidate):
            return any(candidate in use.local_names for use in uses_of_pair.get(pair, []))

        names = {}
        for pair in sorted(pairs, key=lambda p: (p not in direct, self._rank(p[0].src), p[0].src.label, p[0].index)):
            want = desired[pair]
            group = groups[want]
            keeps = len(group) == 1 or [p for p in group if p in direct] == [pair]
            candidates = ([want] if keeps else []) + [_prefixed(pair[0].src.short, pair[1], k) for k in range(1, 100)]
            for candidate in candidates:
                if candidate not in taken and not captured(pair, candidate):
                    break
            taken.add(candidate)
            names[pair] = candidate
        for item in closure:
            if item in support:
                continue
            for n in item.names:
                names[(item, n)] = n
        return names

    def _is_module_use(self, src, use):
        binding = src.bindings.get(use.name) if use.name not in src.defs else None
        return bool(binding and binding[0] == "module")

    def _pair(self, src, use, target):
        """(target, the name of it that `use` refers to): an item may bind several names."""
        if len(target.names) == 1:
            return target, target.names[0]
        if self._is_module_use(src, use):
            return target, use.attr
        binding = src.bindings.get(use.name) if use.name not in src.defs else None
        return target, (binding[2] if binding and binding[0] == "item" else use.name)

    # -- rendering

    def _edits(self, item, names):
        """Text edits turning `item`'s package references and renamed names into the file's."""
        src, edits = item.src, []
        for use, target in self.resolved(item):
            if target[0] != "item":
                continue
            module_use = self._is_module_use(src, use)
            new = names[self._pair(src, use, target[1])]
            node = use.node if module_use else (use.node.value if isinstance(use.node, ast.Attribute) else use.node)
            old = f"{use.name}.{use.attr}" if module_use else use.name
            if new != old:
                edits.append((node, old, new))
        for n in item.names:
            new = names.get((item, n), n)
            if new == n:
                continue
            if isinstance(item.node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                line, start, end = _def_name_site(src, item.node)
                edits.append(((line, start, line, end), n, new))
        for node in ast.walk(item.node):  # `global X` names no node an edit could reach
            if isinstance(node, ast.Global) and any(names.get((src.defs.get(n), n), n) != n for n in node.names):
                raise ExportError(f"{src.label} line {node.lineno}: a renamed name is declared global")
        if item is self.config_item:
            edits += self._config_edits()
        return edits

    def _config_edits(self):
        """Defaults of the Config class replaced by the variant's values."""
        edits = []
        defaults = {f.name: f.default for f in dataclasses.fields(self.cfg)}
        for stmt in self.config_item.node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            field_name = stmt.target.id
            if field_name not in defaults:
                continue
            value = getattr(self.cfg, field_name)
            if stmt.value is not None and defaults[field_name] is not dataclasses.MISSING \
                    and type(value) is type(defaults[field_name]) and value == defaults[field_name]:
                continue
            text = repr(value)
            try:
                same = ast.literal_eval(text) == value
            except (ValueError, SyntaxError):
                same = False
            if not same:
                raise ExportError(f"cannot export {self.recipe.name}: its {field_name}={value!r} has no literal form")
            if stmt.value is None:
                line = self.rsrc.lines[stmt.target.end_lineno - 1]
                col = _char_col(line, stmt.annotation.end_col_offset)
                edits.append(((stmt.annotation.end_lineno, col, stmt.annotation.end_lineno, col), "", f" = {text}"))
            else:
                edits.append((stmt.value, ast.get_source_segment(self.rsrc.text, stmt.value), text))
        return edits

    def _text(self, item, names, comments=()):
        """The item's source lines, after its edits, with `comments` above. A continuation line
        aligned under an opening bracket moves with that bracket when an edit shifts it."""
        src = item.src
        lines = src.lines[item.first - 1:item.node.end_lineno]
        spans = []
        for where, old, new in self._edits(item, names):
            if isinstance(where, tuple):
                line, start, end_line, end = where
            else:
                line, end_line = where.lineno, where.end_lineno
                start = _char_col(src.lines[line - 1], where.col_offset)
                end = _char_col(src.lines[end_line - 1], where.end_col_offset)
            a, b = line - item.first, end_line - item.first
            segment = "".join(lines[a:b + 1])
            found = segment[start:len(segment) - len(lines[b]) + end]
            if re.sub(r"[\s\\]", "", found) != re.sub(r"\s", "", old):
                raise ExportError(f"{src.label} line {line}: expected '{old}' at column {start}, found '{found}'")
            spans.append((a, start, b, end, new))
        shifts = {} if any(a != b for a, _, b, _, _ in spans) else _alignment_shifts(lines, spans)
        lines = list(lines)
        for a, start, b, end, new in sorted(spans, reverse=True):
            segment = "".join(lines[a:b + 1])
            end_offset = len(segment) - len(lines[b]) + end
            lines[a:b + 1] = (segment[:start] + new + segment[end_offset:]).splitlines(keepends=True)
        for row, shift in shifts.items():
            indent = len(lines[row]) - len(lines[row].lstrip(" "))
            lines[row] = " " * max(0, indent + shift) + lines[row][indent:]
        return "".join(comments) + "".join(lines)

    def _docstring(self):
        commit = harness._git_commit() or "an unknown commit"
        line = textwrap.fill(f"Exported from l2l-recipes recipe {self.recipe.name} at {commit} by "
                             f"`{self.command}`.", width=100, break_long_words=False, break_on_hyphens=False)
        doc = self.rsrc.docstring
        if doc is None:
            return f'"""{self.recipe.name}.\n\n{line}\n"""\n'
        raw = "".join(self.rsrc.lines[doc.lineno - 1:doc.end_lineno]).rstrip()
        quote = raw[-3:]
        if quote not in ('"""', "'''"):
            raise ExportError(f"{self.rsrc.label}: the module docstring must be triple-quoted")
        if self.plain:  # its title and summary; the protocol notes stay in the package
            return "\n\n".join(raw[:-3].split("\n\n")[:2]) + "\n\n" + textwrap.fill(
                f"Run: python {self.recipe.name.replace('-', '_')}.py --data-root DIR [--set key=value ...], the "
                f"splits/ folder beside it (copy both). "
                f"Protocol and published numbers: `l2l-recipes show {self.recipe.name}`. {line}", width=100,
                break_long_words=False, break_on_hyphens=False) + f"\n{quote}\n"
        return raw[:-3].rstrip() + f"\n\n{line}\n{quote}\n"

    def _render(self, support, names, imports):
        chunks = []  # (text, blank lines before it)

        def add(text, blank=2):
            chunks.append((text.rstrip("\n"), blank))

        future = sorted({n for src in [self.rsrc, *self.sources.values()] for n in src.future})
        head = self._docstring() + (f"from __future__ import {', '.join(future)}\n" if future else "")
        add(head + _render_imports(imports), 0)
        add(f'RECIPE = "{self.recipe.name}"  # run directories: <--out>/<RECIPE>/<time>-s<seed>/')
        config_comments = [line for line in self.config_item.gap if line.strip()]
        add(f"# The config of recipe {self.recipe.name}: edit the values here, or override one for a run\n"
            "# with --set key=value (a Python literal of the field's type).\n"
            + self._text(self.config_item, names, config_comments))

        renamed = {}
        for (item, n), new in sorted(names.items(), key=lambda kv: (kv[0][0].src.short, kv[0][1].lower())):
            if item in support and new != n and item.src.module != "<export>":
                renamed.setdefault(item.src.short, []).append(f"{n} -> {new}")
        header = [f"{RULE} support code (from l2l_recipes)"] if self.plain else [
            f"{RULE} support code",
            "# Inlined from the l2l_recipes package: only what this recipe uses, each module's part in",
            "# the module's order."]
        if renamed:
            header.append("# Renamed where two modules define a name, or to the name the recipe imports it as:")
            header += [_comment_list(f"#   {module}: ", pairs) for module, pairs in renamed.items()]
        add("\n".join(header))
        previous = None
        for item in support:
            comments = list(item.attached)
            blank = 2
            group = "<export>" if item.src.module == "<export>" else item.src
            if previous is None or group != previous[0]:
                if item.src.module == "<export>":
                    title = ("---- written for this file: the dataset table" if self.plain else
                             "---- written for this file: the package's data.dataset_module, data.read_split and "
                             "harness.recipe_module look outside it")
                else:
                    summary = " ".join((ast.get_docstring(item.src.tree) or "").split("\n\n")[0].split())
                    title = f"---- {item.src.label}" + (f": {summary}" if summary and not self.plain else "")
                comments.insert(0, _comment(title) + "\n")
                blank = 1 if previous is None else 2
            elif previous[1].src is item.src and (item.index == previous[1].index + 1 or all(
                    isinstance(i.node, (ast.Assign, ast.AnnAssign)) for i in (previous[1], item))):  # constants
                blank = min(2, sum(1 for line in item.gap if not line.strip()))
            add(self._text(item, names, comments), blank)
            previous = (group, item)

        add(f"{RULE} recipe ({self.rsrc.label})")
        previous = None
        for item in self.recipe_items:
            gap = list(item.gap)
            while gap and not gap[0].strip():
                gap.pop(0)
            while gap and not gap[-1].strip():
                gap.pop()
            blank = 1 if previous is None else 2
            if previous is not None and item.index == previous.index + 1:
                lead = next((k for k, line in enumerate(item.gap) if line.strip()), len(item.gap))
                blank = min(2, max(1, lead))
            add(self._text(item, names, gap), blank)
            previous = item

        add(f"{RULE} command line")
        for item in self.main_src.items:
            add(self._text(item, names, item.attached), 1)
        add('if __name__ == "__main__":\n    main()')
        return "".join("\n" * (blank + 1) * bool(i) + text for i, (text, blank) in enumerate(chunks)) + "\n"

    def _check(self, text):
        """The file parses, every name it uses is defined (before its top-level uses), and it
        imports nothing from l2l_recipes or recipes."""
        try:
            tree = ast.parse(text)
        except SyntaxError as e:
            raise ExportError(f"cannot export {self.recipe.name}: the result does not parse ({e})") from None
        defined = set(BUILTIN_NAMES)
        everything = set(defined)
        statements = tree.body
        for stmt in statements:
            everything |= _bound_in([stmt])
        for stmt in statements:
            for node in ast.walk(stmt):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if any(m.split(".")[0] in (PACKAGE, "recipes") for m in modules) or getattr(node, "level", 0):
                        raise ExportError(f"cannot export {self.recipe.name}: the result imports {modules[0]}")
            for use in uses_of(stmt):
                if not isinstance((use.node.value if use.attr is not None else use.node).ctx, ast.Load):
                    continue  # a binding, not a use
                if use.deftime and use.name not in defined:
                    raise ExportError(f"cannot export {self.recipe.name}: '{use.name}' is used at line "
                                      f"{use.node.lineno} before it is defined")
                if use.name not in everything:
                    raise ExportError(f"cannot export {self.recipe.name}: '{use.name}' (line {use.node.lineno}) "
                                      f"is not defined")
            defined |= _bound_in([stmt])


def _alignment_shifts(lines, spans):
    """{row: columns to move it}: rows indented to line up under an opening bracket on an
    earlier row move as far as the edits before that bracket move it."""
    edits = {}
    for a, start, _, end, new in spans:
        edits.setdefault(a, []).append((start, end, new))
    openers, stack, previous_row = {}, [], -1
    try:
        for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
            row, col = tok.start[0] - 1, tok.start[1]
            if row != previous_row and stack and tok.type not in (tokenize.NL, tokenize.NEWLINE) \
                    and row < len(lines) and not lines[row][:col].strip():
                openers[row] = stack[-1]
            if tok.type == tokenize.OP and tok.string in "([{":
                stack.append((row, col))
            elif tok.type == tokenize.OP and tok.string in ")]}" and stack:
                stack.pop()
            previous_row = tok.end[0] - 1
    except (tokenize.TokenError, IndentationError):
        return {}
    shifts = {}
    for row in sorted(openers):
        row0, col0 = openers[row]
        if len(lines[row]) - len(lines[row].lstrip(" ")) != col0 + 1:
            continue  # a hanging indent: nothing to line up with
        shift = shifts.get(row0, 0) + sum(len(new) - (end - start) for start, end, new in edits.get(row0, [])
                                          if end <= col0)
        if shift:
            shifts[row] = shift
    return shifts


def _comment_list(head, entries, width=100):
    """Comment lines starting with `head`: the entries, comma-separated, none split across lines."""
    lines, line = [], head
    for k, entry in enumerate(entries):
        text = entry + ("," if k < len(entries) - 1 else "")
        if line.strip() != head.strip() and len(line) + 1 + len(text) > width:
            lines.append(line)
            line = "#" + " " * (len(head) - 1)
        line += ("" if line.endswith(" ") else " ") + text
    return "\n".join(lines + [line])


def _comment(text, width=100):
    """`text` as comment lines of at most `width` characters."""
    return "\n".join(textwrap.wrap(text, width=width, initial_indent="# ", subsequent_indent="# ",
                                   break_on_hyphens=False, break_long_words=False))


def _spec_name(spec):
    """The name an import binds: ("import", "torch.nn.functional", "F") -> F, ("import",
    "os.path", None) -> os, ("from", "tqdm", "tqdm", None) -> tqdm."""
    if spec[0] == "import":
        return spec[2] or spec[1].split(".")[0]
    return spec[3] or spec[2]


def _callee(call):
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _is_dataset_call(node):
    return isinstance(node, ast.Call) and _callee(node) == "dataset_module"


def _prefixed(short, name, k):
    """A module-qualified name in the name's own style: SIZE -> OMNIGLOT_SIZE, _base ->
    _cifar_fs_base, Classes -> OmniglotClasses, load_split -> omniglot_load_split."""
    suffix = "" if k == 1 else str(k)
    if name.isupper():
        return f"{short.upper()}_{name}{suffix}"
    if name.startswith("_"):
        return f"_{short}{name}{suffix}"
    if name[0].isupper():
        return "".join(p.title() for p in short.split("_")) + name + suffix
    return f"{short}_{name}{suffix}"


def _render_imports(imports):
    """Import lines in two groups, standard library then the rest, `import x` before `from`."""
    specs = {spec for options in imports.values() for spec in options}
    groups = {True: ([], {}), False: ([], {})}
    for spec in specs:
        stdlib = spec[1].split(".")[0] in sys.stdlib_module_names
        plain, froms = groups[stdlib]
        if spec[0] == "import":
            plain.append(f"import {spec[1]}" + (f" as {spec[2]}" if spec[2] else ""))
        else:
            froms.setdefault(spec[1], set()).add(spec[2] + (f" as {spec[3]}" if spec[3] else ""))
    out = []
    for stdlib in (True, False):
        plain, froms = groups[stdlib]
        lines = sorted(plain, key=lambda s: s.split()[1].lower())
        lines += [f"from {m} import {', '.join(sorted(names, key=str.lower))}"
                  for m, names in sorted(froms.items(), key=lambda kv: kv[0].lower())]
        if lines:
            out.append("\n".join(lines))
    return "\n\n".join(out)


def _format_splits(splits):
    if not splits:
        return "{}"
    out = ["{"]
    for name, parts in splits.items():
        out.append(f"    {json.dumps(name)}: {{")
        for split, patterns in parts.items():
            out.append(f"        {json.dumps(split)}: [")
            line = ""
            for p in map(json.dumps, patterns):
                if line and len(line) + len(p) + 14 > 100:
                    out.append(f"            {line.rstrip()}")
                    line = ""
                line += f"{p}, "
            if line:
                out.append(f"            {line.rstrip()}")
            out.append("        ],")
        out.append("    },")
    out.append("}")
    return "\n".join(out)


# The exported file's command line, parsed like a module: its package imports say which
# package code it reaches; RECIPE, Config and train are the file's own.
MAIN_TEMPLATE = '''\
import argparse
import shlex
import sys
import time

from l2l_recipes import cli, harness, plain
from l2l_recipes.config import apply_overrides
from l2l_recipes.errors import UserError


def main(argv=None):
    """Train RECIPE with the Config above, then meta-test it on its fixed test tasks.

    The options are those of `l2l-recipes run`; --set key=value overrides a Config field (a
    Python literal of the field's type), repeatable and applied left to right. The run
    directory <out>/<RECIPE>/<time>-s<seed>/ gets config.json, env.json, metrics.jsonl,
    ckpt.pt, best.pt and result.json; --resume RUN_DIR continues a stopped run.
    """
    parser = argparse.ArgumentParser(description=f"Train and meta-test {RECIPE}.")
    parser.add_argument("--data-root", help="folder holding the datasets (default: $L2L_RECIPES_DATA, "
                        "else ~/.cache/l2l-recipes/data)")
    parser.add_argument("--download", action="store_true", help="download the dataset into the data root "
                        "if missing")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: the "
                        "config's, normally auto)")
    parser.add_argument("--seed", type=int, help="random seed (default: the config's)")
    parser.add_argument("--out", default="runs", help="parent folder of run directories (default: runs)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field; repeatable, applied left to right")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: when stderr is a terminal)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this directory from its last "
                        "checkpoint, with its own config (and data root, unless --data-root is given)")
    args = parser.parse_args(argv)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    options = dict(data_root=args.data_root, download=args.download, progress=progress,
                   command=f"python {shlex.quote(sys.argv[0])}")
    try:
        if args.resume:
            if args.seed is not None or args.assignments:
                raise UserError("--resume continues a run with its own config: drop --seed and --set")
            run = harness.Run.resume(args.resume, plain.resolve_device(args.device or "auto"), **options)
        else:
            flags = [f"seed={args.seed}"] * (args.seed is not None) + [f"device='{args.device}'"] * bool(args.device)
            cfg = apply_overrides(Config(), flags + args.assignments)
            for text in args.assignments:
                print(f"override: {text}")
            run = harness.Run.create(args.out, RECIPE, cfg, plain.resolve_device(cfg.device), **options)
        print(f"run directory: {run.path}  (device {run.device})")
        harness.prepare_to_train(run.device)  # freed buffers kept; a step too large fails in one line
        try:
            train(run.cfg, run)
        except BaseException:
            if run.remove_if_empty():  # e.g. its data failed to load
                print(f"run directory {run.path} removed: the run stopped before writing anything")
            raise
        result = harness.meta_test(run.path, device=str(run.device), data_root=run.data_root, progress=progress,
                                   out_name="result.json", train_seconds=round(time.time() - run.started, 1))
    except UserError as e:
        sys.exit(f"Error: {e}")
    except (MemoryError, RuntimeError) as e:
        message = harness.out_of_memory(e)
        if message is None:
            raise
        sys.exit(f"Error: {message}")
    print(cli._result_line(result))
'''


# The plain file's command line: one process, no resuming (see MAIN_TEMPLATE). It holds the
# engine=reference loop alone: engine=fast is refused rather than run as reference.
PLAIN_ENGINE = "reference: the loop in this file (engine=fast: l2l-recipes export --fast)"
ENGINE_CHECK = '''\
        check(cfg.engine == "reference", f"engine={cfg.engine} is not in this file, which holds the reference "
                                         f"loop alone: use engine=reference, or export the recipe with --fast")
'''
PLAIN_MAIN_TEMPLATE = '''\
import argparse
import os
import sys
import time
from pathlib import Path

import torch

from l2l_recipes.config import check
from l2l_recipes.errors import UserError
from l2l_recipes.plain import PlainRun, override, resolve_device


def main(argv=None):
    """Train RECIPE with the Config above, test its best validation's weights; files in <out>/RECIPE/."""
    parser = argparse.ArgumentParser(description=f"Train and meta-test {RECIPE}.")
    parser.add_argument("--data-root", default=os.environ.get("L2L_RECIPES_DATA", "data"),
                        help="folder holding the dataset (default: $L2L_RECIPES_DATA, else data)")
    parser.add_argument("--download", action="store_true", help="download the dataset if missing")
    parser.add_argument("--device", help="auto, cpu or cuda (default: the config's)")
    parser.add_argument("--out", default="runs", help="parent folder of run directories (default: runs)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a Config field (a Python literal), e.g. --set seed=1; repeatable")
    args = parser.parse_args(argv)
    try:
        cfg = override(Config(), [f"device={args.device}"] * bool(args.device) + args.assignments)
''' + ENGINE_CHECK + '''\
        device = resolve_device(cfg.device)
        path = Path(args.out) / RECIPE / f"{time.strftime('%Y%m%d-%H%M%S')}-s{cfg.seed}"
        run = PlainRun(path, RECIPE, cfg, device, args.data_root, args.download)
        train(cfg, run)
        run.test(Predictor(cfg, build_model(cfg), device, args.data_root))
    except UserError as e:
        sys.exit(f"Error: {e}")
'''
