"""The run's state actor (backend ``ray``): what a restarted host agent resumes from.

One small actor, created and owned by the driver (it lives as long as the run): for each
host, the pickled nodes of its part, the incarnation of its agent and the agent's last
*checkpoint*, i.e. each of its nodes'
commit point (input positions, next output seqs, source position, snapshot) and each of its
cut edges' committed position. A host agent reports a commit to its senders only after the
checkpoint holding it was stored here (see :mod:`supervisor.ray.edges`): whatever a sender
forgot, a restarted agent never asks for again.

A checkpoint from an incarnation older than the host's newest is refused: a lost host's old
agent may still be running for a moment after Ray started its replacement.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

__all__ = ["RunState", "NO_SNAPSHOT_CHANGE"]

#: In a checkpoint's node entry: the snapshot is the one stored before (not sent again).
NO_SNAPSHOT_CHANGE = "unchanged"


class RunState:
    """The state of one run's hosts (made a Ray actor by the driver; a plain class here so
    that it is testable without Ray)."""

    def __init__(self) -> None:
        self.parts: Dict[str, Dict[str, bytes]] = {}
        self.incarnations: Dict[str, int] = {}
        self.checkpoints: Dict[str, Dict[str, Any]] = {}
        self.saves = 0

    def put_blobs(self, host: str, blobs: Dict[str, bytes]) -> None:
        """The pickled nodes of a host's part (the driver, before it creates the agent)."""
        self.parts[host] = blobs

    def blobs(self, host: str) -> Dict[str, bytes]:
        """What a host's agent runs: the pickled nodes of its part."""
        return self.parts[host]

    def register(self, host: str) -> Tuple[int, Optional[Dict[str, Any]]]:
        """A host's agent (re)starts: its new incarnation and the checkpoint to resume from
        (None on its first start)."""
        inc = self.incarnations.get(host, 0) + 1
        self.incarnations[host] = inc
        return inc, self.checkpoints.get(host)

    def save(self, host: str, incarnation: int, checkpoint: Dict[str, Any]) -> bool:
        """Store a host's checkpoint; False (nothing stored) from a stale incarnation."""
        if incarnation != self.incarnations.get(host):
            return False
        old = self.checkpoints.get(host)
        nodes = checkpoint.get("nodes", {})
        for name, entry in nodes.items():
            if entry.get("snapshot") is NO_SNAPSHOT_CHANGE or entry.get("snapshot") == NO_SNAPSHOT_CHANGE:
                entry["snapshot"] = (old or {}).get("nodes", {}).get(name, {}).get("snapshot")
        self.checkpoints[host] = checkpoint
        self.saves += 1
        return True

    def incarnation(self, host: str) -> int:
        return self.incarnations.get(host, 0)

    def ping(self) -> bool:
        return True
