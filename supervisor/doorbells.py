"""The run's doorbells: wake-ups that cost a syscall only when the woken process sleeps.

Every process of a run waits in one place, its inbox (an iceoryx2 event service: a worker's
``in/w<i>``, the caller's gateway ``in/gw``), and every frame or ack sent to it notifies that
inbox. A notification is a datagram (``sendto`` for the sender, ``recvfrom`` for the woken),
which a consumer that is busy anyway does not need: it looks at its queues before it sleeps.
So each inbox also has a doorbell, one cache line in a memfd the supervisor creates and every
process of the run maps: a sender marks it *pending* and sends the datagram only when the
listener says it *sleeps*. A listener with nothing else to watch sleeps on a futex in its slot,
which a sender wakes more cheaply than a datagram ends a ``ppoll()``; a worker waits on its
control channel too, so the supervisor rings the slot's *control* word after each control
message it sends (``WorkerProcess.send``). The protocol and why no wake-up is lost: the
bridge's ``doorbell.rs``.

::

    supervisor                      worker i                   producers of worker i
    ----------                      --------                   ---------------------
    RunDoorbells(1 + workers)  -->  pass_fds, Doorbells(fd)    Notifier(in/w<i>, slot i + 1)
      slot 0: the gateway           Listener(in/w<i>,
      slot i + 1: worker i                   slot i + 1)

Like the status blocks (:mod:`supervisor.scoreboard`) the memfd has no name: nobody outside
the run can open it, and its size is sealed.
"""

from __future__ import annotations

import os

from remotemedia import _ipc_bridge as bridge

from .private import sealed_memfd

__all__ = ["RunDoorbells", "GATEWAY_SLOT", "worker_slot"]

#: The gateway's slot (the caller's inbox).
GATEWAY_SLOT = 0

_SLOT_BYTES = 64  # one cache line (doorbell.rs SLOT_BYTES)


def worker_slot(index: int) -> int:
    """The slot of the inbox of worker number ``index``."""
    return index + 1


class RunDoorbells:
    """The doorbells memfd of one run, with ``slots`` slots, and the supervisor's mapping of
    it (``bells``, for the gateway). ``fd`` is passed to every worker; :meth:`close` it when
    the run is over."""

    def __init__(self, slots: int) -> None:
        fd = sealed_memfd("remotemedia-doorbells", _SLOT_BYTES * max(1, slots))
        try:
            self.bells = bridge.Doorbells(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def close(self) -> None:
        """Close the descriptor (mappings made from it stay valid). Idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
