"""Shared fixtures.

``no_leaks`` (autouse) checks after every test that it left no worker process and no
iceoryx2 resource behind: no child process of the test runner, and no ``rm_*`` file (the
prefix of every supervisor run) in /dev/shm or under /tmp/iceoryx2 that was not there before.
"""

from __future__ import annotations

import os
import time
from typing import List, Set

import psutil
import pytest

from supervisor import resources


def _rm_files() -> Set[str]:
    out: Set[str] = set()
    if os.path.isdir(resources.SHM_DIR):
        out |= {os.path.join(resources.SHM_DIR, f) for f in os.listdir(resources.SHM_DIR) if f.startswith("rm_")}
    for dirpath, _dirs, files in os.walk(resources.IOX_ROOT):
        out |= {os.path.join(dirpath, f) for f in files if f.startswith("rm_")}
    return out


def _children() -> List[psutil.Process]:
    try:
        return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def no_leaks():
    before_files = _rm_files()
    before_children = {p.pid for p in _children()}
    yield
    deadline = time.monotonic() + 10.0
    while True:
        left = [p for p in _children() if p.pid not in before_children]
        new_files = _rm_files() - before_files
        if (not left and not new_files) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in left:  # do not let one failure cascade into every later test
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not left, f"worker processes left behind: {[(p.pid, p.cmdline()) for p in left]}"
    assert not new_files, f"iceoryx2 resources left behind: {sorted(new_files)}"


def shm_mapping_of(address: int) -> str:
    """Path of the mapping of this process that contains ``address`` ('' when anonymous)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5] if len(parts) > 5 else ""
    return ""
