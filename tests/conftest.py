"""Shared fixtures.

The whole session runs with ``REMOTEMEDIA_SHM_DIR`` set to a fresh private directory (removed
at the end), so every run directory a test makes (see :mod:`supervisor.resources`) is this
session's own, and concurrent sessions on one host never see each other's runs.

``no_leaks`` (autouse) checks after every test that it left no worker process and no run
behind: no child process of the test runner, and no new entry in the session's directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import List, Set

import psutil
import pytest

from supervisor import resources

SESSION_SHM_DIR = ""


def pytest_configure(config: pytest.Config) -> None:
    # A hook, not import time: workers import this module too (to unpickle test helpers).
    global SESSION_SHM_DIR
    SESSION_SHM_DIR = tempfile.mkdtemp(prefix="rmt-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.environ[resources.ENV_BASE] = SESSION_SHM_DIR  # before any test, and any process it starts


def pytest_unconfigure(config: pytest.Config) -> None:
    if SESSION_SHM_DIR:
        shutil.rmtree(SESSION_SHM_DIR, ignore_errors=True)


def _runs() -> Set[str]:
    """Every entry (run directory) in the session's shared-memory directory."""
    try:
        return {os.path.join(SESSION_SHM_DIR, f) for f in os.listdir(SESSION_SHM_DIR)}
    except FileNotFoundError:
        return set()


def _children() -> List[psutil.Process]:
    try:
        return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def no_leaks():
    before_files = _runs()
    before_children = {p.pid for p in _children()}
    yield
    deadline = time.monotonic() + 10.0
    while True:
        left = [p for p in _children() if p.pid not in before_children]
        new_files = _runs() - before_files
        if (not left and not new_files) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in left:  # do not let one failure cascade into every later test
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not left, f"worker processes left behind: {[(p.pid, p.cmdline()) for p in left]}"
    assert not new_files, f"run directories left behind: {sorted(new_files)}"


def shm_mapping_of(address: int) -> str:
    """Path of the mapping of this process that contains ``address`` ('' when anonymous)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5] if len(parts) > 5 else ""
    return ""


def in_run_dir(path: str) -> bool:
    """Whether ``path`` (a mapping's file) is an iceoryx2 segment inside a run directory of
    this session."""
    base = os.environ[resources.ENV_BASE].rstrip("/") + "/"
    return path.startswith(base) and os.path.basename(path).startswith(resources.PREFIX)


class OnceFile:
    """True the first time it is asked, across processes (a marker file)."""

    def __init__(self, path: str):
        self.path = path

    def first(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True
