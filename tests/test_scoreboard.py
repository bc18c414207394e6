"""The worker status block's commit area: what a restart resumes from."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from supervisor.scoreboard import Scoreboard


def test_commit_round_trip_between_processes_views():
    writer = Scoreboard.create(commit_slots=3)
    writer.reset()
    reader = Scoreboard.from_fd(os.dup(writer.fd))  # a second mapping, as in the worker
    try:
        assert reader.commit_slots == 3
        assert reader.read_commit() is None  # this incarnation committed nothing yet
        writer.write_commit(7, [1, 2, 30])
        assert reader.read_commit() == (7, [1, 2, 30])
        writer.write_commit(8, [2, 3, 31])
        assert reader.read_commit() == (8, [2, 3, 31])
        writer.reset()  # a restart starts from the supervisor's copy, not from the board
        assert reader.read_commit() is None
    finally:
        reader.close()
        writer.close()


def test_a_write_torn_by_a_crash_leaves_the_previous_commit():
    board = Scoreboard.create(commit_slots=2)
    board.reset()
    try:
        board.write_commit(0, [10, 20])
        board.write_commit(0, [11, 21])
        # A worker killed in the middle of its next write has filled part of the buffer the
        # next generation would use, but not moved the generation count.
        q = board._q
        spare = 8 + 1 + ((q[8] + 1) & 1) * board._width
        q[spare + 1] = 999
        assert board.read_commit() == (0, [11, 21])
    finally:
        board.close()


def test_the_other_fields_are_untouched_by_commits():
    board = Scoreboard.create(commit_slots=1)
    board.reset()
    try:
        board.busy(2, 41)
        board.idle(5)
        board.write_commit(3, [4])
        state = board.read()
        assert state["frames_in"] == 5 and state["busy_edge"] == 2 and state["busy_seq"] == 41
        assert state["busy_since_ns"] == 0
    finally:
        board.close()


def test_order_ring_of_a_fanin_worker():
    supervisor = Scoreboard.create(commit_slots=3, order_slots=8)
    supervisor.reset()
    worker = Scoreboard.from_fd(os.dup(supervisor.fd))  # the worker finds the layout in the block itself
    try:
        assert (worker.order_capacity, worker.commit_slots) == (8, 3)
        worker.write_commit(0, [4, 5, 9])
        for count, position in enumerate([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 0], start=0):
            worker.record_order(count, position)  # 13 frames through a ring of 8
        assert supervisor.read_commit() == (0, [4, 5, 9])  # the ring does not touch commits
        assert supervisor.read_order(13) == []
        assert supervisor.read_order(6) == [0, 1, 1, 1, 0, 1, 0]
        assert supervisor.read_order(5) == [0, 0, 1, 1, 1, 0, 1, 0]
        with pytest.raises(RuntimeError, match="more than its capacity 8"):
            supervisor.read_order(4)  # would read overwritten entries
        # a restart: the predecessor's order goes in before the new worker exists
        order = supervisor.read_order(9)
        supervisor.reset()
        assert supervisor.order_capacity == 8 and worker.read_order(0) == []
        supervisor.write_order(9, order)
        assert worker.read_order(9) == [1, 0, 1, 0]
        with pytest.raises(ValueError, match="do not fit"):
            supervisor.write_order(0, [0] * 9)
    finally:
        worker.close()
        supervisor.close()


def test_nodes_with_one_input_have_no_ring():
    board = Scoreboard.create(commit_slots=2)
    try:
        assert board.order_capacity == 0 and board.read_order(0) == []
        assert os.fstat(board.fd).st_size == 64 + 8 + 2 * 8 * 3  # the layout of before
    finally:
        board.close()


def test_the_board_has_no_name_and_a_sealed_size():
    """Issue 10, item 1: boards were files at predictable /dev/shm names, opened with
    O_CREAT|O_TRUNC through planted symlinks. A memfd has no name to plant, and its sealed
    size cannot be truncated under the supervisor's mapping."""
    board = Scoreboard.create(commit_slots=2)
    try:
        assert os.readlink(f"/proc/self/fd/{board.fd}").startswith("/memfd:remotemedia-board")
        with pytest.raises(PermissionError):
            os.ftruncate(board.fd, 8)
        # a child process inherits it (pass_fds), maps it and reports through it
        code = (
            "import sys; from supervisor.scoreboard import Scoreboard; "
            "b = Scoreboard.from_fd(int(sys.argv[1])); b.set('pid', 4242); b.write_commit(5, [6, 7]); b.close()"
        )
        subprocess.run([sys.executable, "-c", code, str(board.fd)], pass_fds=(board.fd,), check=True, timeout=60)
        assert board.get("pid") == 4242 and board.read_commit() == (5, [6, 7])
    finally:
        board.close()
    assert board.fd == -1


def test_rings_of_a_worker_feeding_replicas_are_independent():
    # a fan-in worker (ring 0: its input order) feeding two nodes with replicas (rings 1, 2:
    # the replica each frame went to)
    supervisor = Scoreboard.create(commit_slots=4, order_slots=8, rings=3)
    worker = Scoreboard.from_fd(os.dup(supervisor.fd))
    try:
        assert (worker.rings, worker.order_capacity, worker.commit_slots) == (3, 8, 4)
        worker.write_commit(7, [1, 2, 3, 4])
        for k, replica in enumerate([0, 1, 1, 0, 2]):
            worker.record_order(k, replica, ring=2)
        worker.record_order(0, 1, ring=0)
        assert supervisor.read_commit() == (7, [1, 2, 3, 4])
        assert supervisor.read_order(0, ring=0) == [1] and supervisor.read_order(0, ring=1) == []
        assert supervisor.read_order(2, ring=2) == [1, 0, 2]
        supervisor.reset()
        assert worker.rings == 3 and worker.read_order(0, ring=2) == []
        supervisor.write_order(2, [1, 0, 2], ring=2)  # (a restart: before the new worker exists)
        assert worker.read_order(2, ring=2) == [1, 0, 2] and worker.read_order(0, ring=1) == []
    finally:
        worker.close()
        supervisor.close()
