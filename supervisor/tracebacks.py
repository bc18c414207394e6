"""Errors that must not keep a finished run alive through their tracebacks."""

from __future__ import annotations

import inspect
import types
from typing import Optional

__all__ = ["forget_locals"]

_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def forget_locals(err: Optional[BaseException]) -> None:
    """Clear the local variables of the finished frames an error of the arbiter thread holds:
    those of its traceback and of its causes, and their callers. The lines stay for the
    report; the locals (the Supervisor, ports, received frames) would otherwise live as long
    as the error does, in a reference cycle through the Supervisor that only the garbage
    collector frees."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
        tb = e.__traceback__
        while tb is not None:
            frame: Optional[types.FrameType] = tb.tb_frame
            # (a generator's frame is not cleared: that would close the generator)
            while frame is not None and not frame.f_code.co_flags & _GENERATOR_FLAGS:
                try:
                    frame.clear()
                except RuntimeError:
                    pass  # still executing (the arbiter's own frame): freed when it returns
                frame = frame.f_back
            tb = tb.tb_next

