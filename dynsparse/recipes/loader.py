"""Read recipes from YAML (the only place YAML is parsed), keeping line numbers for error messages."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .schema import Recipe, RecipeError, parse_recipe

__all__ = ["apply_overrides", "load_recipe", "recipe_to_dict"]


def _lines(node: yaml.Node, path: str, out: dict[str, int]) -> None:
    """Record the line of every field path under ``node`` in ``out``.

    Raises:
        RecipeError: A mapping gives a field twice (YAML would silently keep the last value).
    """
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for k, v in node.value:
            key = f"{path}.{k.value}" if path else str(k.value)
            line = k.start_mark.line + 1
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                if k.value in seen:
                    raise RecipeError(f"{key} (line {line}): given twice (first on line {seen[k.value]}); remove one")
                seen[k.value] = line
            out[key] = k.start_mark.line + 1
            _lines(v, key, out)
            out[key] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, f"{path}[{i}]", out)


def _parse_value(item: str, text: str) -> Any:
    """The YAML value of ``--set`` item ``item``; a `RecipeError` naming it when ``text`` is not YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"--set {item!r}: the value is not valid YAML ({problem})") from None


def _override_path(item: str, key: str) -> list[str | int]:
    parts: list[str | int] = []
    for part in key.split("."):
        while "[" in part:
            name, _, rest = part.partition("[")
            if name:
                parts.append(name)
            idx, closed, part = rest.partition("]")
            if not closed or not idx.strip().isdigit():
                raise RecipeError(f"--set {item!r}: [{idx}{closed} is not a list index like [0]")
            parts.append(int(idx))
        if part:
            parts.append(part)
    if not parts:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE")
    return parts


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (``stages[1].epochs=3``); values are parsed as YAML scalars.

    A missing mapping on the path is created (``model.kwargs.img_size=8`` on a recipe without ``kwargs``), so the
    recipe's schema then names an unknown field; a list index must exist.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        parts = _override_path(item, key)
        node: Any = data
        for i, p in enumerate(parts):
            where = "".join(f"[{q}]" if isinstance(q, int) else f".{q}" for q in parts[:i]).lstrip(".") or "the recipe"
            last = i == len(parts) - 1
            if isinstance(p, int):
                if not isinstance(node, list):
                    raise RecipeError(f"--set {item!r}: {where} is not a list, so it has no [{p}]")
                if p >= len(node):
                    raise RecipeError(f"--set {item!r}: {where} has {len(node)} entries, so no [{p}]")
            elif not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {where} is a {type(node).__name__}, not a mapping with {p!r}")
            elif not last and node.get(p) is None:
                node[p] = {}
            if last:
                node[p] = _parse_value(item, value)
            else:
                node = node[p]
    return data


def read_recipe_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a recipe file: its data (a mapping; ``{}`` when empty) and the line of every field path.

    Raises:
        RecipeError: The file cannot be read, is not valid YAML, or is not a mapping of fields.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except UnicodeDecodeError:  # a model file or another binary given as the recipe
        raise RecipeError(f"{path}: not a recipe (not UTF-8 text; a recipe is a YAML file)") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None
    lines: dict[str, int] = {}
    if node is not None:
        try:
            _lines(node, "", lines)
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of fields, got {type(data).__name__}")
    return data or {}, lines


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a YAML image recipe (``task`` left out or ``image-classification``); errors name the file,
    the field and its line. `dynsparse.recipes.tasks.load_task_recipe` loads a recipe of any task."""
    data, lines = read_recipe_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    task = data.pop("task", "image-classification")
    if task != "image-classification":
        line = f" (line {lines['task']})" if "task" in lines else ""
        raise RecipeError(
            f"{Path(path)}: task{line}: load_recipe reads image-classification recipes, not {task!r}; load this one "
            "with dynsparse.recipes.tasks.load_task_recipe"
        )
    try:
        return parse_recipe(data, lines)
    except RecipeError as e:
        raise RecipeError(f"{Path(path)}: {e}") from None


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain data of a recipe (for reports and checkpoints)."""
    import dataclasses

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(recipe)
