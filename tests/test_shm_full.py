"""A shared-memory filesystem too small for the pipeline is a clear error, not a SIGBUS.

Frames live in sparse files on a tmpfs (/dev/shm). Without a reservation, the first write into
a page the full tmpfs cannot back killed the writer with SIGBUS: the caller exited 135 with no
exception and nothing cleaned up (issue 10, item 10). Each case runs a child Python in a private
mount namespace whose /dev/shm is a small tmpfs (64 MiB: a container's default); the child
reports what it caught and whether any of its worker processes is left, then the namespace's
shell lists what is left in /dev/shm.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from typing import Dict, Tuple

import pytest

from remotemedia.errors import RemoteMediaError, SharedMemoryFullError, TransportError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The namespace's shell: private /dev/shm of $SHM_SIZE, /tmp/iceoryx2 and /run/remotemedia (so a
# child killed by SIGBUS leaves nothing outside), the child, then what is left in the tmpfs.
_SHELL = r"""
set -u
mount -t tmpfs -o size="$SHM_SIZE",mode=1777 tmpfs /dev/shm || exit 97
mkdir -p /tmp/iceoryx2 && mount -t tmpfs -o mode=1777 tmpfs /tmp/iceoryx2 || exit 97
if [ -d /run/remotemedia ]; then mount -t tmpfs -o mode=0755 tmpfs /run/remotemedia || exit 97; fi
"$CHILD_PYTHON" -c "$CHILD_CODE"
echo "CHILD_EXIT $?"
# (the user's base directory stays, as it does on a host; its run directories must not)
echo "SHM_LEFT [$(find /dev/shm -mindepth 1 \( -type f -o -path '/dev/shm/*/*' \) | tr '\n' ' ')]"
"""

# Shared by every child: run `pipeline()` with `inputs`, report the error (and the error's
# SharedMemoryFullError, directly or as a NodeError's original), restarts, and descendants.
_PRELUDE = r"""
import sys
import numpy as np
import psutil
from remotemedia import Node, Supervisor, errors
from remotemedia.nodes import PassThroughNode

def report_run(nodes, inputs, **options):
    sup = Supervisor(nodes, **options)
    try:
        sup.run(inputs)
        print("RESULT no error")
        return
    except errors.RemoteMediaError as e:
        full = getattr(errors, "SharedMemoryFullError", None)
        shm = e if full is not None and isinstance(e, full) else getattr(e, "original", None)
        print("RESULT", type(e).__name__)
        print("NODE", getattr(e, "node", None))
        print("SHMFULL", full is not None and isinstance(shm, full))
        print("MESSAGE", str(e).replace("\n", " "))
    restarts = {name: w.restarts for name, w in sup.workers.items()}
    print("RESTARTS", sum(restarts.values()), restarts)
    alive = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    print("DESCENDANTS", len(alive))
    sys.exit(3)
"""


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -m (private mount namespace)")


def run_in_small_shm(body: str, size: str = "64m") -> Tuple[Dict[str, str], str]:
    """Run ``body`` (after the prelude) in a private mount namespace with a ``size`` tmpfs as
    /dev/shm. Returns the child's ``KEY value`` report lines and the whole output."""
    env = dict(
        os.environ,
        PYTHONPATH=ROOT,
        CHILD_PYTHON=sys.executable,
        CHILD_CODE=_PRELUDE + textwrap.dedent(body),
        SHM_SIZE=size,
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", _SHELL],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"namespace setup failed ({proc.returncode}):\n{out}"
    report = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        report.setdefault(key, value)
    return report, out


def check_clean_failure(report: Dict[str, str], out: str) -> str:
    """The child raised (no SIGBUS), the error is a SharedMemoryFullError that names the
    directory's size and what is needed, and nothing is left. Returns the message."""
    # 135 is bash's code for a child killed by SIGBUS: the bug
    assert report.get("CHILD_EXIT") == "3", f"the child did not fail with a Python error:\n{out[-4000:]}"
    assert report["SHMFULL"] == "True", out[-4000:]
    message = report["MESSAGE"]
    assert "of 64.0 MiB in all" in message, message  # the size of /dev/shm
    assert re.search(r"needs \d+\.\d MiB \(and 1\.0 MiB kept free\) in /dev/shm/\S*, which has \d+\.\d MiB free", message), message
    assert "mount -o remount,size=" in message and "--shm-size=" in message, message
    assert report["RESTARTS"].split()[0] == "0", report["RESTARTS"]  # no crash loop
    assert report["DESCENDANTS"] == "0", out[-4000:]
    assert report["SHM_LEFT"] == "[]", f"files left in the tmpfs: {report['SHM_LEFT']}"
    return message


@pytest.mark.slow
@needs_namespace
def test_1080p_frames_through_three_stages_in_64_mib_raise_in_the_caller():
    report, out = run_in_small_shm(
        """
        frames = [np.full((1080, 1920, 3), i, np.uint8) for i in range(24)]
        report_run([PassThroughNode(name="a"), PassThroughNode(name="b"), PassThroughNode(name="c")], frames)
        """
    )
    message = check_clean_failure(report, out)
    # the need of a frame, and of the pipeline: edges x frames an edge may hold x frame size
    assert "needs 5.9 MiB" in message, message
    assert "the pipeline's 4 edges" in message, message


@pytest.mark.slow
@needs_namespace
def test_send_raises_it_when_the_callers_frames_do_not_fit():
    report, out = run_in_small_shm(
        """
        frame = np.zeros((1080, 1920, 3), np.uint8)
        try:
            with Supervisor([PassThroughNode(name="a"), PassThroughNode(name="b")]) as sup:
                for _ in range(300):
                    sup.send(frame)
            print("RESULT no error")
        except errors.RemoteMediaError as e:
            print("RESULT", type(e).__name__)
            print("MESSAGE", str(e).replace("\\n", " "))
        alive = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        print("DESCENDANTS", len(alive))
        """
    )
    assert report.get("CHILD_EXIT") == "0", out[-4000:]
    # send() publishes from the caller's thread while the first node publishes its copies:
    # whichever finds the filesystem full first fails the run (the caller's send, or node
    # "a" as a NodeError whose cause is the same explained SharedMemoryFullError)
    assert report["RESULT"] == "SharedMemoryFullError" or (
        report["RESULT"] == "NodeError" and "SharedMemoryFullError: shared memory is full" in report["MESSAGE"]
    ), out[-4000:]
    assert "of 64.0 MiB in all" in report["MESSAGE"] and "the pipeline's 3 edges" in report["MESSAGE"], report["MESSAGE"]
    assert report["DESCENDANTS"] == "0", out[-4000:]
    assert report["SHM_LEFT"] == "[]", report["SHM_LEFT"]


@pytest.mark.slow
@needs_namespace
def test_a_node_allocating_more_than_fits_fails_the_pipeline():
    report, out = run_in_small_shm(
        """
        class Big(Node):
            def process(self, data):
                out = self.allocate((80 << 20,), np.uint8)
                out[:] = 1
                return out

        report_run([PassThroughNode(name="a"), Big(name="big")], [np.zeros(1024, np.uint8)] * 3)
        """
    )
    message = check_clean_failure(report, out)
    assert report["RESULT"] == "NodeError" and report["NODE"] == "big", out[-4000:]
    assert "Node.allocate()" in message and "needs 80.0 MiB" in message, message


@pytest.mark.slow
@needs_namespace
def test_a_node_returning_a_bigger_frame_than_fits_fails_the_pipeline():
    # on_error="skip" does not apply: a full /dev/shm is no bad frame, and skipping would lose
    # every frame after it
    report, out = run_in_small_shm(
        """
        class Big(Node):
            def process(self, data):
                return np.ones(80 << 20, np.uint8)

        report_run(
            [PassThroughNode(name="a"), Big(name="big", options={"on_error": "skip"})],
            [np.zeros(1024, np.uint8)] * 3,
        )
        """
    )
    message = check_clean_failure(report, out)
    assert report["RESULT"] == "NodeError" and report["NODE"] == "big", out[-4000:]
    assert "needs 80.0 MiB" in message, message


@needs_namespace
def test_a_full_shm_directory_is_refused_at_start():
    # /dev/shm already full (another program's file): not even iceoryx2's services fit
    report, out = run_in_small_shm(
        """
        with open("/dev/shm/filler", "wb") as f:
            f.write(b"x" * (63 << 20 | 900 << 10))
        report_run([PassThroughNode(name="a")], [1, 2, 3])
        """
    )
    assert report.get("CHILD_EXIT") == "3", out[-4000:]
    assert report["SHMFULL"] == "True" and report["RESULT"] == "SharedMemoryFullError", out[-4000:]
    assert "starting pipeline" in report["MESSAGE"] and "of 64.0 MiB in all" in report["MESSAGE"], report["MESSAGE"]
    assert report["DESCENDANTS"] == "0"
    assert report["SHM_LEFT"] == "[/dev/shm/filler ]", report["SHM_LEFT"]


def test_the_error_states_its_facts_and_survives_pickling():
    # (a worker's error reaches the supervisor pickled; the supervisor then adds the edges)
    e = SharedMemoryFullError("/dev/shm", 64 << 20, 3 << 20, 6 << 20, 1 << 20, "frame 4 on 'e0/data'", 6 << 20, "e0/data")
    assert isinstance(e, TransportError) and isinstance(e, RemoteMediaError)
    e.edge_frames, e.edges, e.pipeline_need = 40, 4, 4 * 40 * (6 << 20)
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e) and back.pipeline_need == e.pipeline_need
    assert "needs 6.0 MiB (and 1.0 MiB kept free) in /dev/shm, which has 3.0 MiB free of 64.0 MiB in all" in str(e)
    assert "the pipeline's 4 edges 960.0 MiB" in str(e) and "size=1G" in str(e)
    # room on the filesystem, yet no memory: the limit was elsewhere
    other = SharedMemoryFullError("/dev/shm", 64 << 20, 30 << 20, 6 << 20, 1 << 20, "frame 4")
    assert "memory limit" in str(other) and "remount" not in str(other)
