"""Text that can be stored anywhere: every free-text request field uses `Text`.

A NUL character (U+0000) is refused with a 400 naming the field: PostgreSQL cannot store it in a text
column, so it would otherwise fail only at the database, after generation, as a 500.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (U+0000)")
    return value


Text = Annotated[str, AfterValidator(no_nul)]
