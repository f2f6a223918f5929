"""The one error of the model modules (zoo, builders, weights, files): a ValueError, so the CLI exits 2 with it."""
from __future__ import annotations


class ModelError(ValueError):
    """A model reference that cannot be turned into a model; the message names the fix."""
