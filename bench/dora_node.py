"""The nodes of bench/run.py's `dora` system: one script, the role is the first argument.

dora-rs starts each node as `python dora_node.py ROLE OUTDIR [N SIZE INTERVAL IDLE]` from the
dataflow YAML that run.py writes (see run_dora there). Each node writes its pid to
OUTDIR/<role>.pid once connected (for the CPU probe) and, at the end, what it received to
OUTDIR/<role>.json. Frames are pyarrow UInt8Arrays: dora publishes them through zenoh shared
memory at 4 KiB and over (one copy into the node's pool per send), below that by copy.

    source  N frames of SIZE bytes, the CLOCK_MONOTONIC send time in the first 8 bytes, one
            every INTERVAL s (0: back to back) after IDLE s
    stage   sends on every frame it receives (the copy of this hop)
    sink    latency of every frame it receives
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
from dora import Node


def _write(outdir: str, name: str, data: object) -> None:
    tmp = os.path.join(outdir, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(outdir, name))  # run.py polls for these: never half written


def main() -> None:
    role, outdir = sys.argv[1], sys.argv[2]
    node = Node()  # returns once every node of the dataflow is connected
    _write(outdir, f"{role}.pid", os.getpid())
    if role == "source":
        n, size, interval, idle = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
        time.sleep(idle)
        frame = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)
        for _ in range(n):
            if interval:
                time.sleep(interval)
            frame[:8] = np.frombuffer(time.monotonic_ns().to_bytes(8, "little", signed=True), np.uint8)
            node.send_output("out", pa.array(frame))
        # like the raw iceoryx2 source: stay a moment so that exiting (which closes the output)
        # cannot cut off what is still in flight
        time.sleep(0.5)
        _write(outdir, f"{role}.json", {"sent": n})
    elif role != "sink":
        received = 0
        for event in node:
            if event["type"] == "INPUT":
                received += 1
                node.send_output("out", event["value"])
        _write(outdir, f"{role}.json", {"received": received})
    else:
        lat, first, last = [], None, 0
        for event in node:
            if event["type"] != "INPUT":
                continue  # INPUT_CLOSED, then STOP: the stream ends after the last frame
            t = time.monotonic_ns()
            stamp = int.from_bytes(event["value"].to_numpy(zero_copy_only=True)[:8].tobytes(), "little", signed=True)
            lat.append(t - stamp)
            first = stamp if first is None else first
            last = t
        _write(outdir, f"{role}.json", {"received": len(lat), "lat": lat, "first": first, "last": last})


if __name__ == "__main__":
    main()
