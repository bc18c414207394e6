"""How a worker unwinds and how it describes an exception to the supervisor."""

from __future__ import annotations

import traceback
from typing import Optional, Tuple

import cloudpickle


class Aborted(Exception):
    """Unwinds the worker when the supervisor says Abort or disappears."""


def format_exc(e: BaseException) -> Tuple[str, str, str, Optional[bytes]]:
    """(type name, message, traceback, pickled exception or None) of ``e``."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        blob: Optional[bytes] = cloudpickle.dumps(e)
    except Exception:
        blob = None
    mod = type(e).__module__
    name = type(e).__qualname__ if mod == "builtins" else f"{mod}.{type(e).__qualname__}"
    return name, str(e), tb, blob
