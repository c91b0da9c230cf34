"""Miniature test-beds on which the evidence claims of the method cards are checked.

:mod:`tether.arena.testbeds.bandit` is test-bed T1 of the cards, the "prompt bandit". Recipes that
only a test-bed can run (their entries need inputs the language-model world does not provide, such
as DCPO's ``current_entropy``) live in ``testbeds/recipes/`` and are loaded by path.
"""

from pathlib import Path

TESTBED_RECIPES = Path(__file__).parent / "recipes"

__all__ = ["TESTBED_RECIPES"]
