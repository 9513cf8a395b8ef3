"""Which variant serves a request.

The logical model name (`model.name`) maps to the current default variant; a served variant's own
name pins it. (A/B splitting between champion and challenger lands here with the A/B issue.)
"""

from __future__ import annotations


class UnknownModel(LookupError):
    pass


def resolve_variant(requested: str, logical_name: str, served: list[str], default: str = "base") -> str:
    if requested == logical_name:
        return default
    if requested in served:
        return requested
    raise UnknownModel(
        f"The model '{requested}' does not exist. Use '{logical_name}' or one of: {', '.join(served)}."
    )
