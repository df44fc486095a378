"""Name -> recipe. Adding a method is one module and one line here."""
from __future__ import annotations

from . import answer_only, cascod, kard, mt_cot, std_cot
from . import nesycd, skintern, socratic
from .recipe import Recipe

_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        std_cot.RECIPE,
        answer_only.RECIPE,
        mt_cot.RECIPE,
        cascod.RECIPE,
        kard.RECIPE,
        skintern.RECIPE,
        nesycd.RECIPE,
        socratic.RECIPE,
    )
}


def recipe_names() -> list[str]:
    return sorted(_RECIPES)


def get_recipe(name: str) -> Recipe:
    try:
        return _RECIPES[name]
    except KeyError:
        raise ValueError(f"method.name: unknown method {name!r} (known: {', '.join(recipe_names())})") from None
