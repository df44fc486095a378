"""Methods are recipes: which teacher outputs they need, how a training row and an
inference prompt look. The runner composes the shared stages from a recipe."""
from .registry import get_recipe, recipe_names

__all__ = ["get_recipe", "recipe_names"]
