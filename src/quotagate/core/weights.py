"""Per-model weights: cost = ceil(prompt x input weight + completion x output weight)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

from quotagate.core.model import ModelWeight

DEFAULT_WEIGHT = ModelWeight(pattern="*", input=1.0, output=1.0)


def weight_for(model: str, *tables: Sequence[ModelWeight]) -> ModelWeight:
    """The first matching pattern of the first table that has one (plan table before the global one)."""
    for table in tables:
        for weight in table:
            if fnmatchcase(model, weight.pattern):
                return weight
    return DEFAULT_WEIGHT


def weighted_cost(prompt_tokens: int, completion_tokens: int, weight: ModelWeight) -> int:
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts must not be negative")
    # Round to 9 places first so 0.1-style float noise does not push an exact product up by one.
    raw = round(prompt_tokens * weight.input + completion_tokens * weight.output, 9)
    return math.ceil(raw)
