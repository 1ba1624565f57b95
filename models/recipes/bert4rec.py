"""Plain backbone training: cloze for bert4rec, next-item cross-entropy for sasrec."""

from models.recipes.base import Recipe


class Bert4Rec(Recipe):
    name = "bert4rec"
