"""Worker process: runs one node. Entry point ``python -m supervisor.worker``.

::

    supervisor ---Setup(spec)---> worker: read node blob (memfd) -> cloudpickle.loads
                                          -> restore(snapshot) -> initialize()
                                          -> open iceoryx2 ports -> Ready
    loop (Runner; one wait point: inbox listener + control socket):
        control messages (Replay, Start, Drain, Abort)
        acks from downstream -> drop retained frames -> commits -> acks upstream   (Ledger)
        resend undelivered frames
        the frames waiting, up to 16 (Runner.step_batch), each:
            next input frame (Runner.step_input / step_ordered)
                or next generate() item (SourceStepper)
                -> process() -> emit outputs                                       (Emitter)
                (a bare array like the edge's last one: InPort.take() decodes it and
                 OutPort.send_array() sends it, one bridge call each; then the books)
                -> processed[edge] = seq -> mark() -> advance()                    (Ledger)
        then the housekeeping above, once per batch
    end of stream on every input -> flush() -> EOS downstream -> wait for acks
        -> cleanup() -> Done -> exit 0

One object per job: :class:`~.runner.Runner` the loop (step, pump, wait, finish) and the
inputs; :class:`~.ledger.Ledger` the commit/ack bookkeeping (which frames are processed,
committed, reported; markers and snapshots; the commit report to the supervisor and the acks
upstream); :class:`~.source.SourceStepper` a source's ``generate()``; :class:`~.emitter.Emitter`
outputs and ``allocate()`` loans; :mod:`.deadletter` poison frames; :mod:`.process` the
process's start-up and exit.

The worker never decides policy: it reports (Ready, InitFailed, NodeFailed, Commit, Gap,
Heartbeat, Done, and commit points in its status block) and obeys. Exit codes are listed in
:mod:`supervisor.protocol`.
"""

from .process import PARENT_DEATH_SIGNAL, await_setup, main
from .runner import Runner

__all__ = ["PARENT_DEATH_SIGNAL", "Runner", "await_setup", "main"]
