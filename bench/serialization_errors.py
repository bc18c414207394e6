"""How long a node that does not pickle takes to get its SerializationError (issue 11, SC-005:
an error naming the attribute within 2 s for any state up to the size limit).

    python bench/serialization_errors.py            # each case 3 times, median and max

Cases (the issue's own):
    list_1M_ints_then_lock      a list of 1,000,000 ints, then a lock attribute
    list_1M_ints_lock_in_list   a list of 1,000,000 ints and, as its last item, a lock
    100k_objects_lock_in_last   100,000 small objects, a lock in the last one
    cycle                       a.b.a is a, a.b.lk is a lock (the path must read a.b.lk)
    unsendable_output           encode() of an output holding 100,000 small objects and a lock
                                (the error of an output that cannot be sent)

The time is from serialize_node() (or the output's search) to the exception, attribute path
included. Printed as a table; nothing is asserted (the tests do not assert wall-clock times).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from remotemedia import Node  # noqa: E402
from remotemedia.errors import SerializationError  # noqa: E402
from remotemedia.serialization import find_unpicklable, serialize_node  # noqa: E402


class Holder(Node):
    def process(self, data: Any) -> Any:
        return data


class Small:
    def __init__(self, i: int) -> None:
        self.i = i
        self.label = f"item {i}"


class A:
    pass


def list_then_lock() -> Node:
    n = Holder(name="n")
    n.data = list(range(1_000_000))
    n.lk = threading.Lock()
    return n


def list_with_lock() -> Node:
    n = Holder(name="n")
    n.data = list(range(1_000_000)) + [threading.Lock()]
    return n


def objects_lock_last() -> Node:
    n = Holder(name="n")
    n.items = [Small(i) for i in range(100_000)]
    n.items[-1].lk = threading.Lock()
    return n


def cycle() -> Node:
    n = Holder(name="n")
    n.a = A()
    n.a.b = A()
    n.a.b.a = n.a
    n.a.b.lk = threading.Lock()
    return n


def _node_error(make: Callable[[], Node]) -> Tuple[float, str]:
    node = make()
    t0 = time.perf_counter()
    try:
        serialize_node(node, call_cleanup=False)
    except SerializationError as e:
        return time.perf_counter() - t0, str(e.attribute_path)
    raise AssertionError("pickled")


def _output_error() -> Tuple[float, str]:
    from remotemedia.frames import encode

    value = {"items": [Small(i) for i in range(100_000)]}
    value["items"][-1].lk = threading.Lock()
    t0 = time.perf_counter()
    try:
        encode(value)
    except Exception as e:
        path, _ = find_unpicklable(value, error=e)  # as the worker does
        return time.perf_counter() - t0, path.lstrip(".")
    raise AssertionError("pickled")


CASES: Dict[str, Callable[[], Tuple[float, str]]] = {
    "list_1M_ints_then_lock": lambda: _node_error(list_then_lock),
    "list_1M_ints_lock_in_list": lambda: _node_error(list_with_lock),
    "100k_objects_lock_in_last": lambda: _node_error(objects_lock_last),
    "cycle": lambda: _node_error(cycle),
    "unsendable_output": _output_error,
}


def main() -> None:
    rows: List[str] = []
    for label, run in CASES.items():
        times = []
        path = ""
        for _ in range(3):
            t, path = run()
            times.append(t)
        rows.append(f"{label:28s} median {statistics.median(times):7.3f} s  max {max(times):7.3f} s  path {path}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
