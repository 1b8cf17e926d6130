"""Names users give their datasets and models: what a person types on a command line and a log shows unquoted."""

from __future__ import annotations

import re
from typing import Final

from aimass.runtime.errors import InvalidArgument

NAME_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_name(what: str, name: str) -> str:
    """``name`` when it is a valid ``what`` name, else INVALID_ARGUMENT saying the rule."""
    if not NAME_PATTERN.match(name):
        shown = name[:70] if name else "empty"
        raise InvalidArgument(
            f"{what} name {shown!r} is not valid: 1-63 characters, lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name
