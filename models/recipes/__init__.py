"""The one registry of recipes. A recipe exists because it is listed here."""

from __future__ import annotations

from pydantic import ValidationError

from models.errors import RecmergeError
from models.recipes.base import Recipe, RecipeOptions, TrainBatch
from models.recipes.bert4rec import Bert4Rec
from models.recipes.cl4srec import CL4SRec
from models.recipes.duorec import DuoRec, DuoRecSup, DuoRecUnsup
from models.recipes.ehrec import EHRecLearn, EHRecStat

RECIPES: dict[str, type[Recipe]] = {
    cls.name: cls for cls in (Bert4Rec, CL4SRec, DuoRecUnsup, DuoRecSup, DuoRec, EHRecStat, EHRecLearn)
}


def recipe_class(name: str) -> type[Recipe]:
    try:
        return RECIPES[name]
    except KeyError:
        raise RecmergeError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None


def recipe_options(name: str, options: dict | None = None) -> RecipeOptions:
    cls = recipe_class(name)
    try:
        return cls.Options(**(options or {}))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'options'}: "
            + ("not an option of this recipe" if err["type"] == "extra_forbidden" else err["msg"])
            for err in e.errors()
        )
        raise RecmergeError(f"recipe {name!r}: {problems}") from None


__all__ = ["RECIPES", "Recipe", "RecipeOptions", "TrainBatch", "recipe_class", "recipe_options"]
