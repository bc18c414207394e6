"""The cross-host edge protocol: exactly-once, in order, over calls that Ray delivers at most
once each (a call to a dead actor fails; nothing is retried for us).

::

    sending host (EdgeSender)                            receiving host (EdgeReceiver)
    -------------------------                            -----------------------------
    add(frame)  seq contiguous per edge                  on_batch(sender_inc, frames, room)
    retained[committed .. next_seq)    -- Batch -->        sender_inc < newest seen: refused
    batch(): frames from the cursor                         seq <  expected: duplicate, dropped
                                                            seq == expected: taken (room allowing)
    on_reply(receiver_inc, committed,  <-- Reply --         seq >  expected: a gap, stop there
             expected)                                    reply() = (incarnation, committed,
      receiver_inc < newest seen: ignored                           expected)
      a new receiver incarnation: cursor = its expected   committed: what the host's last
      cursor = expected (what it took)                        checkpoint made durable
      drop retained < committed

A frame is ``(seq, kind, value, origin, stream_id, created_ns)``: the edge's own sequence
number, the frame kind (data or end of stream), the value, and the header the local runtime
carries (the input it derives from, its stream, when it was made).

Guarantees, and what they rest on:

* *No loss.* The sender forgets a frame only once the receiver reported it *committed*, and a
  receiving host reports a commit only after its checkpoint (the commit points of its nodes,
  with their snapshots) is stored outside it (the driver's state actor). A restarted receiver
  resumes at that checkpoint, and its new incarnation's ``expected`` rewinds the sender's cursor
  to it: the frames after it are sent again from the sender's retention.
* *No duplicates.* Every frame keeps its seq across restarts: a restarted sending host
  regenerates its outputs from its own checkpoint with the same seqs (the local runtime numbers
  outputs deterministically), and the receiver drops every seq below ``expected``.
* *Order.* The receiver takes only ``seq == expected``.
* *Stale incarnations.* A host's agent restarted by Ray gets a higher incarnation; the old one
  may still answer for a moment (a lost node's processes outlive its removal by about 0.5 s).
  Each end keeps the newest incarnation it has seen of the other and refuses anything older.

The classes are plain state machines (no Ray, no clock, no threads): the host agent and the
driver move frames with Ray calls, the unit tests with a fake transport
(``tests/test_ray_edges.py``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

from remotemedia.frames import Kind

__all__ = ["Frame", "Reply", "EdgeSender", "EdgeReceiver", "StaleIncarnation", "EdgeProtocolError"]

#: ``(seq, kind, value, origin, stream_id, created_ns)``
Frame = Tuple[int, int, Any, int, int, int]
#: ``(receiver incarnation, committed, expected)``
Reply = Tuple[int, int, int]


#: Frame kinds, as the local runtime's edges carry them.
DATA, EOS = int(Kind.DATA), int(Kind.EOS)
_EOS = EOS


class StaleIncarnation(Exception):
    """A message from an incarnation older than one already seen: refused."""


class EdgeProtocolError(RuntimeError):
    """A peer asked for frames the sender no longer has: the commit rule was broken (a bug,
    or a receiver whose checkpoint store was lost). The run fails rather than lose frames
    silently."""


class EdgeSender:
    """The sending end of one cross-host edge.

    ``next_seq``: the seq of the next frame :meth:`add` takes (0 on a first start; after a
    restart, where the producing node resumes). ``window``: frames sent but not yet taken by
    the receiver, at most (flow control; what is taken but not committed is retained without
    limit, as the local runtime's producers retain what is not committed).
    """

    def __init__(self, edge: int, incarnation: int, window: int, next_seq: int = 0, released: Optional[List[Frame]] = None) -> None:
        self.edge = edge
        #: when a list, the frames a commit releases go there, for the owner to drop when a
        #: frame is not waiting on it (a frame's value may be an object in Ray's store, which
        #: its last reference frees with a call into Ray)
        self.released = released
        self.incarnation = incarnation
        self.window = window
        self.next_seq = next_seq
        self.committed = next_seq  # frames the receiver has committed (what we know of)
        self.cursor = next_seq  # the next frame to send: the receiver's expected
        self.receiver_inc = 0  # the newest receiver incarnation seen
        self.retained: Deque[Frame] = deque()
        self.eos_seq: Optional[int] = None
        self.resent = 0  # frames sent again after a receiver restarted
        self.stale_replies = 0

    # -------------------------------------------------------------- the local side

    def room(self) -> bool:
        """True when the edge may take another frame (the window is not full)."""
        return self.next_seq - max(self.cursor, self.committed) < self.window

    def add(self, frame: Frame) -> None:
        """A frame from the producing node. Its seq must be the next one; a regenerated frame
        below what the receiver committed is dropped here."""
        seq = frame[0]
        if seq != self.next_seq:
            raise EdgeProtocolError(f"edge {self.edge}: frame {seq} added where {self.next_seq} was next")
        self.next_seq = seq + 1
        if frame[1] == _EOS:
            self.eos_seq = seq
        if seq < self.committed:
            return
        self.retained.append(frame)

    # -------------------------------------------------------------- to the receiver

    def pending(self) -> bool:
        """Frames not yet taken by the receiver are waiting."""
        return self.cursor < self.next_seq

    def uncommitted(self) -> bool:
        """Frames the receiver has not committed yet exist."""
        return self.committed < self.next_seq

    def batch(self, max_frames: int, max_bytes: int = 1 << 62, size: Any = None) -> List[Frame]:
        """The frames to send from the cursor on (at most ``max_frames``; and about
        ``max_bytes`` as measured by ``size(frame)``, at least one frame)."""
        out: List[Frame] = []
        if self.cursor >= self.next_seq or not self.retained:
            return out
        first = self.retained[0][0]
        if self.cursor < first:
            raise EdgeProtocolError(
                f"edge {self.edge}: the receiver expects frame {self.cursor}, but frames before {first} were "
                "already forgotten as committed"
            )
        total = 0
        i = self.cursor - first
        n = len(self.retained)
        while i < n and len(out) < max_frames:
            f = self.retained[i]
            if size is not None:
                total += size(f)
                if out and total > max_bytes:
                    break
            out.append(f)
            i += 1
        return out

    def on_reply(self, reply: Reply, took: bool = True) -> bool:
        """The receiver's answer ``(incarnation, committed, expected)``. ``took``: it answers
        frames we sent it (its ``expected`` is where the next batch starts); else it only
        reports its commit. False (and nothing changes) for a stale incarnation."""
        inc, committed, expected = reply
        if inc < self.receiver_inc:
            self.stale_replies += 1
            return False
        newer = inc > self.receiver_inc
        if (took or newer) and expected < self.committed:
            # Behind a commit that was durable: an incarnation older than the one that made it
            # (a restarted sender does not know which that was), answering late.
            self.stale_replies += 1
            return False
        if newer:
            if self.receiver_inc and expected < self.cursor:
                self.resent += self.cursor - expected
            self.receiver_inc = inc
            took = True  # a new incarnation: its expected is the truth, even backwards
        if committed > self.committed:
            committed = min(committed, self.next_seq)
            released = self.released
            while self.retained and self.retained[0][0] < committed:
                f = self.retained.popleft()
                if released is not None:
                    released.append(f)
            self.committed = committed
        if took:
            self.cursor = min(max(expected, self.committed), self.next_seq)
        elif self.cursor < self.committed:
            self.cursor = self.committed
        return True

    @property
    def finished(self) -> bool:
        """The end of the stream was sent and committed."""
        return self.eos_seq is not None and self.committed > self.eos_seq


class EdgeReceiver:
    """The receiving end of one cross-host edge.

    ``expected``: the seq of the next frame to take (the checkpoint's position after a
    restart); ``incarnation``: this end's, reported in every reply."""

    def __init__(self, edge: int, incarnation: int, expected: int = 0) -> None:
        self.edge = edge
        self.incarnation = incarnation
        self.expected = expected
        self.committed = expected  # made durable by the host's last checkpoint
        self.sender_inc = 0  # the newest sender incarnation seen
        self.duplicates = 0
        self.gaps = 0
        self.stale = 0
        self.eos = False

    def on_batch(self, sender_inc: int, frames: Sequence[Frame], room: Callable[[Frame], bool]) -> List[Frame]:
        """Take the in-order frames of a batch while ``room(frame)`` says the local side has
        room for it; returns those taken (the caller passes them on, in order). Raises
        StaleIncarnation for a batch of an older sender incarnation."""
        if sender_inc < self.sender_inc:
            self.stale += 1
            raise StaleIncarnation(f"edge {self.edge}: a batch of sender incarnation {sender_inc} after {self.sender_inc}")
        self.sender_inc = sender_inc
        taken: List[Frame] = []
        for f in frames:
            seq = f[0]
            if seq < self.expected:
                self.duplicates += 1
                continue
            if seq > self.expected:
                self.gaps += 1  # (the sender resends from our expected)
                break
            if not room(f):
                break
            taken.append(f)
            self.expected = seq + 1
            if f[1] == _EOS:
                self.eos = True
        return taken

    def check_sender(self, sender_inc: int) -> None:
        """Raise StaleIncarnation for a request of an older sender incarnation."""
        if sender_inc < self.sender_inc:
            self.stale += 1
            raise StaleIncarnation(f"edge {self.edge}: sender incarnation {sender_inc} after {self.sender_inc}")
        self.sender_inc = sender_inc

    def set_committed(self, committed: int) -> None:
        """The host's checkpoint made frames below ``committed`` durable."""
        if committed > self.committed:
            self.committed = min(committed, self.expected)

    def reply(self) -> Reply:
        return (self.incarnation, self.committed, self.expected)
