"""Recipes: named methods as data (YAML), composing catalogue entries with a paper's settings.

A recipe names an advantage estimator, a policy loss, regularizers and reward transforms (each
a registered catalogue entry with parameters), optional state wiring for stateful entries, and
trainer settings that belong to the method (e.g. DAPO's dynamic sampling). The trainers of
both worlds build a :class:`~tether.recipes.compose.Method` from it and never branch on names.
"""

from tether.recipes.compose import Component, Method, StateWiring
from tether.recipes.loader import Recipe, load_recipe, recipe_names

__all__ = ["Component", "Method", "Recipe", "StateWiring", "load_recipe", "recipe_names"]
