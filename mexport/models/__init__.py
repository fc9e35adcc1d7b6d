"""Model families: one module per architecture, each registering a :class:`~mexport.models.base.ModelFamily`."""

from mexport.models import gemma2, llama, qwen2  # noqa: F401  (each registers its family)
from mexport.models.base import (
    FAMILIES,
    NORM_FORMS,
    NORM_ONE_PLUS_WEIGHT,
    NORM_WEIGHT,
    ModelFamily,
    SpecialTokens,
    family_for,
    family_of,
    fixture_families,
    supported_model_types,
)

__all__ = [
    "FAMILIES", "NORM_FORMS", "NORM_ONE_PLUS_WEIGHT", "NORM_WEIGHT", "ModelFamily", "SpecialTokens", "family_for",
    "family_of", "fixture_families", "supported_model_types",
]
