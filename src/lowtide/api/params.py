"""Numbers in query strings, parsed strictly: ASCII digits only, nothing around them.

pydantic's lax mode reads " 24 ", "24.0" and (through int()) other scripts' digits as 24; a
client that sends those has a bug it should hear about, not a guess."""

from __future__ import annotations

from typing import Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError


def _ascii_digits(value: Any) -> Any:
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise PydanticCustomError("int_parsing", "Input should be a whole number in ASCII digits")
    return value


# Last in a query parameter's Annotated (after its Query(...)), so the document keeps its bounds:
# `limit: Annotated[int, Query(ge=1, le=100), ASCII_DIGITS] = 20`.
ASCII_DIGITS = BeforeValidator(_ascii_digits)
