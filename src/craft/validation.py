"""Input checks with one clear `UserError` instead of a bare ``TypeError`` deep in a host library.

* An unknown ``craft_*`` keyword, to a CRAFT config class (`reject_unknown_craft_keys`) or to a CRAFT trainer
  (`check_craft_keywords`), names the keyword and the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Iterable

from craft.errors import UserError


def check_craft_keywords(owner: str, given: Iterable[str], known: Iterable[str]) -> None:
    """A `UserError` for the first ``craft_*`` name of ``given`` that is not in ``known``."""
    known = sorted(set(known))
    for name in given:
        if name.startswith("craft_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known craft_* keys: {', '.join(known)}"
            raise UserError(f"{owner}: unknown keyword {name!r}{hint}")


def reject_unknown_craft_keys(cls: type) -> type:
    """Class decorator for a CRAFT config dataclass: an unknown ``craft_*`` keyword is a `UserError` naming it
    (instead of the dataclass's bare ``TypeError``). The known names are the class's fields."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        check_craft_keywords(type(self).__name__, kwargs, [f.name for f in dataclasses.fields(type(self))])
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls
