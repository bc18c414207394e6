"""The one error hierarchy of remotemedia.

Every error the library raises on purpose derives from :class:`RemoteMediaError`, so
``except RemoteMediaError`` catches them all. Errors about bad input also derive from the
builtin a Python user would reach for first (``ValueError``, ``TypeError``, ``KeyError``), so
``except ValueError`` keeps working as well.

::

    RemoteMediaError
    +-- PipelineValidationError (ValueError)   empty pipeline, bad connections, cycles
    |   +-- ManifestError                      malformed manifest dict / JSON
    |   +-- UnknownNodeTypeError (KeyError)    node_type not in the registry
    |   +-- InvalidNodeNameError               a node name breaks the naming rule
    +-- NodeTypeError (TypeError)              wrong item types, missing process()/initialize()
    |   +-- MissingSuperInitError (AttributeError)  a Node subclass skipped super().__init__()
    +-- SerializationError                     a node could not be cloudpickled
    |   +-- FrameSerializationError (TypeError) an input frame could not be pickled
    |       +-- OutputSerializationError       a node's output could not be pickled (sent)
    +-- NodeError                              process() raised in a worker
    |   +-- NodeInitError                      unpickling or initialize() failed in a worker
    +-- WorkerError                            a worker process misbehaved
    |   +-- WorkerStartTimeout                 READY did not arrive in time
    |   +-- NodeFatalError                     a node gave up (restart limit, load failure)
    +-- EndOfStream                            recv() after the stream was closed and drained
    +-- SupervisorError                        misuse of a Supervisor (state, options)
    |   +-- UnsafeDirectoryError               a runtime directory others could reach or plant
    |   +-- RunOptionError (TypeError)         a keyword a run entry point refuses
    |   +-- OptionValueError (ValueError)      an option's value is out of its range
    |   +-- ReloadError                        a reload that cannot be applied in place
    +-- TransportError                         raised by the Rust bridge (iceoryx2)
        +-- ServiceError                       creating/opening a service failed
        +-- PortError                          creating a publisher/subscriber/listener failed
        +-- LoanError                          no shared-memory chunk could be loaned
        +-- SharedMemoryFullError              the shared-memory filesystem has no room
        +-- SendError                          publishing a frame failed
        +-- ReceiveError                       receiving a frame failed
        +-- WaitError                          waiting for an event failed

The transport errors are raised directly by ``remotemedia._ipc_bridge`` (PyO3's
``import_exception!``), so there is exactly one class per error, defined here.

A worker's traceback travels back to the parent as text and becomes the ``__cause__`` of the
raised :class:`NodeError`, as in :mod:`concurrent.futures.process`::

    try:
        pipeline.run([1, 2, 3])
    except NodeError as e:
        print(e.node, e.pid)      # which node, which worker process
        print(e.__cause__)        # the worker-side traceback
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

__all__ = [
    "RemoteMediaError",
    "PipelineValidationError",
    "ManifestError",
    "UnknownNodeTypeError",
    "InvalidNodeNameError",
    "NodeTypeError",
    "MissingSuperInitError",
    "SerializationError",
    "FrameSerializationError",
    "OutputSerializationError",
    "NodeError",
    "NodeInitError",
    "RemoteTraceback",
    "WorkerError",
    "WorkerStartTimeout",
    "NodeFatalError",
    "EndOfStream",
    "SupervisorError",
    "ExecutorOptionError",
    "UnsafeDirectoryError",
    "RunOptionError",
    "OptionValueError",
    "ReloadError",
    "TransportError",
    "ServiceError",
    "PortError",
    "LoanError",
    "SendError",
    "ReceiveError",
    "WaitError",
    "SharedMemoryFullError",
]


class RemoteMediaError(Exception):
    """Base class of every error raised by remotemedia.

    Every one pickles, whatever its constructor's arguments (a run's error crosses processes:
    backend ray raises a host's NodeError in the driver): rebuilt from its message and its
    attributes."""

    def __reduce__(self) -> Any:
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))


def _rebuild_error(cls: type, args: Tuple[Any, ...], state: Dict[str, Any]) -> BaseException:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


# --------------------------------------------------------------------------- validation


class PipelineValidationError(RemoteMediaError, ValueError):
    """The pipeline definition is invalid (empty, bad connection, cycle, duplicate id).

    Raised before any process is started.
    """


class ManifestError(PipelineValidationError):
    """A manifest (dict or JSON string) is malformed.

    ``where`` locates the problem inside the manifest, e.g. ``"nodes[2].params"``.
    """

    def __init__(self, message: str, where: Optional[str] = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class UnknownNodeTypeError(ManifestError, KeyError):
    """A manifest names a ``node_type`` that is not registered."""

    def __init__(self, node_type: str, registered: Sequence[str], where: Optional[str] = None) -> None:
        self.node_type = node_type
        self.registered = sorted(registered)
        msg = (
            f"unknown node_type {node_type!r}; registered types: {', '.join(self.registered) or '(none)'}. "
            "Register a class with @remotemedia.register_node or import the module that defines it."
        )
        super().__init__(msg, where)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return Exception.__str__(self)


class InvalidNodeNameError(PipelineValidationError):
    """A node name breaks the naming rule (``remotemedia.node.NODE_NAME_RULE``).

    A name becomes part of a worker's command line, memfd, logger and dead-letter file
    names, so it is checked before anything is started.

    Attributes:
        node_name: the offending name.
        origin: where it came from, e.g. ``"GainNode(name=...)"`` or ``"manifest nodes[2].id"``.
    """

    def __init__(self, node_name: Any, origin: str, rule: str) -> None:
        self.node_name = node_name
        self.origin = origin
        self.rule = rule
        shown = repr(node_name)
        if len(shown) > 60:
            shown = f"{shown[:50]}...' ({len(node_name)} characters)"
        super().__init__(f"invalid node name {shown} from {origin}: {rule}")

    def __reduce__(self) -> Any:
        return (type(self), (self.node_name, self.origin, self.rule))


class NodeTypeError(RemoteMediaError, TypeError):
    """An object handed to the runtime is not a usable Node (wrong type, missing methods)."""


class MissingSuperInitError(NodeTypeError, AttributeError):
    """A Node subclass's ``__init__`` did not call ``super().__init__()``, so the node has no
    name, config or options.

    Raised when such a node is put into a Pipeline, a Group or a Supervisor (before any
    process starts) and when one of those attributes is read. It is also an
    ``AttributeError``, so ``getattr(node, "name", default)`` and ``hasattr`` keep working.

    Attributes:
        node_class: the class whose ``__init__`` must call ``super().__init__(**kwargs)``.
    """

    def __init__(self, node_class: str, message: str) -> None:
        self.node_class = node_class
        super().__init__(message)

    def __reduce__(self) -> Any:
        return (type(self), (self.node_class, str(self)))


# --------------------------------------------------------------------------- serialization


class SerializationError(RemoteMediaError):
    """A node could not be serialized (cleanup-then-cloudpickle) or deserialized.

    Attributes:
        node_name: the node's name.
        attribute_path: dotted path of the attribute that failed, e.g. ``"model.session._lock"``
            (``None`` when the failure is not tied to one attribute).
        reason: what went wrong.
        suggestion: how to fix it.
    """

    def __init__(
        self,
        node_name: str,
        reason: str,
        suggestion: str = "",
        attribute_path: Optional[str] = None,
    ) -> None:
        self.node_name = node_name
        self.reason = reason
        self.suggestion = suggestion
        self.attribute_path = attribute_path
        where = f" (attribute {attribute_path!r})" if attribute_path else ""
        msg = f"Cannot serialize node {node_name!r}{where}: {reason}"
        if suggestion:
            msg += f"\nSuggestion: {suggestion}"
        super().__init__(msg)

    def __reduce__(self) -> Any:
        return (type(self), (self.node_name, self.reason, self.suggestion, self.attribute_path))


class FrameSerializationError(SerializationError, TypeError):
    """A frame handed to the pipeline (``send()``, or an item of ``run()``'s inputs) does not
    pickle. Raised in the caller's thread; nothing of that frame was sent.

    Attributes:
        what: which frame, e.g. ``"the value given to send()"`` or ``"item 3 of run()'s inputs"``.
        reason: what went wrong (the pickling error).
        attribute_path: path of the part that failed inside the value (``None``: the value itself).
    """

    def __init__(self, what: str, reason: str, attribute_path: Optional[str] = None) -> None:
        self.what = what
        self.node_name = None
        self.reason = reason
        self.attribute_path = attribute_path
        self.suggestion = (
            "frames must pickle (numpy arrays, bytes, str, numbers, lists/dicts of them, picklable "
            "objects): convert or leave out the part that does not"
        )
        where = f" (at {attribute_path!r})" if attribute_path else ""
        RemoteMediaError.__init__(self, f"Cannot serialize {what}{where}: {reason}\nSuggestion: {self.suggestion}")

    def __reduce__(self) -> Any:
        return (type(self), (self.what, self.reason, self.attribute_path))


class OutputSerializationError(FrameSerializationError):
    """A value a node returned or yielded does not pickle, so it could not be sent downstream.

    Raised in the worker; reaches the caller as :class:`NodeError` (its ``original``), whose
    message carries this one line.

    Attributes:
        node_name: the node whose output it was.
        seq: sequence number of the input frame whose processing produced it (``None``: an
            item of ``generate()`` or an output of ``flush()``).
        reason: the pickling error.
        attribute_path: path of the part that failed inside the value (``None``: the value itself).
    """

    def __init__(self, node_name: str, seq: Optional[int], reason: str, attribute_path: Optional[str] = None) -> None:
        self.what = f"the output of node {node_name!r}" + (f" for frame {seq}" if seq is not None else "")
        self.node_name = node_name
        self.seq = seq
        self.reason = reason
        self.attribute_path = attribute_path
        self.suggestion = (
            "return only values that pickle (numpy arrays, bytes, str, numbers, lists/dicts of them, "
            "picklable objects): convert or leave out that part"
        )
        at = f" at {attribute_path!r}" if attribute_path else ""
        RemoteMediaError.__init__(
            self, f"{self.what} could not be sent: it does not pickle{at} ({reason}); {self.suggestion}"
        )

    def __reduce__(self) -> Any:
        return (type(self), (self.node_name, self.seq, self.reason, self.attribute_path))


# --------------------------------------------------------------------------- runtime


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker process.

    Set as ``__cause__`` of :class:`NodeError` so that the worker's traceback is printed
    with the parent's.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


class NodeError(RemoteMediaError):
    """A node raised an exception in its worker process.

    Attributes:
        node: name of the node.
        pid: pid of the worker process (``None`` if unknown).
        seq: sequence number of the input frame being processed, when known.
        exc_type: qualified name of the original exception type.
        original: the original exception when it could be unpickled, else ``None``.

    The worker's formatted traceback is attached as ``__cause__`` (a :class:`RemoteTraceback`).
    """

    def __init__(
        self,
        node: str,
        message: str,
        pid: Optional[int] = None,
        seq: Optional[int] = None,
        exc_type: Optional[str] = None,
        original: Optional[BaseException] = None,
        traceback: Optional[str] = None,
    ) -> None:
        self.node = node
        self.pid = pid
        self.seq = seq
        self.exc_type = exc_type
        self.original = original
        self.traceback = traceback
        where = f"node {node!r}" + (f" (pid {pid})" if pid else "")
        at = f" on frame {seq}" if seq is not None else ""
        kind = f"{exc_type}: " if exc_type else ""
        super().__init__(f"{where} failed{at}: {kind}{message}")
        if traceback:
            self.__cause__ = RemoteTraceback(traceback)


class NodeInitError(NodeError):
    """A worker could not unpickle its node or the node's ``initialize()`` raised."""


class WorkerError(RemoteMediaError):
    """A worker process misbehaved (did not start, crashed, gave up)."""

    def __init__(self, node: str, message: str, pid: Optional[int] = None) -> None:
        self.node = node
        self.pid = pid
        where = f"node {node!r}" + (f" (pid {pid})" if pid else "")
        super().__init__(f"{where}: {message}")


class WorkerStartTimeout(WorkerError):
    """A worker did not report READY within ``init_timeout`` seconds."""


class NodeFatalError(WorkerError):
    """A node went FATAL: it will not be restarted and the pipeline stops.

    Attributes:
        exit_status: the worker's last exit code (negative: killed by that signal).
        last_traceback: the last traceback the worker reported, if any.
    """

    def __init__(
        self,
        node: str,
        message: str,
        pid: Optional[int] = None,
        exit_status: Optional[int] = None,
        last_traceback: Optional[str] = None,
    ) -> None:
        self.exit_status = exit_status
        self.last_traceback = last_traceback
        super().__init__(node, message, pid)
        if last_traceback:
            self.__cause__ = RemoteTraceback(last_traceback)


class EndOfStream(RemoteMediaError):
    """The output stream is closed and every frame has been received."""


class SupervisorError(RemoteMediaError):
    """A Supervisor was used wrongly (e.g. ``send()`` after ``close()``) or failed to start."""


class ExecutorOptionError(SupervisorError, ValueError):
    """A run's ``executor=`` / ``use_rust=`` is unknown or contradictory, or an option does
    not apply to the chosen executor (supervision options with ``executor="inline"``)."""


class UnsafeDirectoryError(SupervisorError):
    """A directory the runtime keeps its files in (shared memory, control sockets) is not
    private: a symlink, not a directory, owned by another user, or writable by others. The
    message names the path, what is wrong and how to fix it; nothing was written into it."""


class RunOptionError(SupervisorError, TypeError):
    """``execute_pipeline``, ``execute_pipeline_with_input`` or ``Pipeline.run`` got a keyword
    argument it does not know (the message lists the valid ones), or the inputs twice (as
    ``inputs`` and as its alias ``input_data``)."""


class ReloadError(SupervisorError):
    """A reload changes what cannot change while the pipeline runs: its nodes, its edges, or
    an option that shapes the edges. The running pipeline goes on unchanged; the message says
    what differs and that a restart of the pipeline applies it."""


class OptionValueError(SupervisorError, ValueError):
    """A runtime option (a Supervisor keyword or a per-node option, see
    :mod:`remotemedia.options`) has a value it does not allow.

    Attributes:
        where: who set it (``"Supervisor"``, ``"node 'a'"``, ...).
        key: the option.
        value: the value refused.
        allowed: what it allows (``"a positive int"``).
    """

    def __init__(self, message: str, where: str = "", key: str = "", value: Any = None, allowed: str = "") -> None:
        super().__init__(message)
        self.where = where
        self.key = key
        self.value = value
        self.allowed = allowed


# --------------------------------------------------------------------------- transport (Rust)


class TransportError(RemoteMediaError):
    """Base class of the errors raised by the iceoryx2 bridge ``remotemedia._ipc_bridge``."""


class ServiceError(TransportError):
    """Creating or opening an iceoryx2 service failed (incompatible settings or version,
    permissions, stale resources)."""


class PortError(TransportError):
    """Creating a publisher, subscriber, notifier or listener failed."""


class LoanError(TransportError):
    """No shared-memory chunk could be loaned (pool exhausted, too many loans)."""


class SendError(TransportError):
    """Publishing a frame failed."""


class ReceiveError(TransportError):
    """Receiving a frame failed (e.g. the subscriber's borrow limit is reached)."""


class WaitError(TransportError):
    """Waiting for an event failed."""


class SharedMemoryFullError(TransportError):
    """The shared-memory filesystem (a tmpfs, normally ``/dev/shm``) has no room for a frame.

    Frames live in files there whose pages are allocated when first written; on a full tmpfs
    that write would kill the process with SIGBUS. The bridge allocates a chunk's pages before
    writing into it and raises this error instead (it keeps ``SHM_RESERVE`` bytes free for
    iceoryx2's own use). The pipeline fails and is cleaned up; grow the filesystem or lower
    ``queue_depth`` / ``queue_bytes``.

    Attributes:
        directory: the directory of the shared-memory files.
        size: size of its filesystem in bytes (0: no size limit).
        free: bytes free there.
        needed: bytes the frame needed.
        reserve: bytes kept free besides (see above).
        what: the frame (or allocation) and the service it was for.
        frame_bytes: the frame's size in bytes.
        service: the iceoryx2 service of the frame.
        edge_frames: frames the frame's edge may hold in shared memory (set by the supervisor).
        edges: the pipeline's edges (set by the supervisor).
        pipeline_need: bytes all edges may hold with frames of this size (set by the supervisor).
    """

    def __init__(
        self,
        directory: str,
        size: int,
        free: int,
        needed: int,
        reserve: int = 0,
        what: str = "",
        frame_bytes: int = 0,
        service: str = "",
        edge_frames: int = 0,
        edges: int = 0,
        pipeline_need: int = 0,
    ) -> None:
        super().__init__(directory, size, free, needed, reserve, what, frame_bytes, service)
        self.directory = directory
        self.size = size
        self.free = free
        self.needed = needed
        self.reserve = reserve
        self.what = what
        self.frame_bytes = frame_bytes
        self.service = service
        self.edge_frames = edge_frames
        self.edges = edges
        self.pipeline_need = pipeline_need

    def __reduce__(self) -> Any:
        return (
            type(self),
            (
                self.directory,
                self.size,
                self.free,
                self.needed,
                self.reserve,
                self.what,
                self.frame_bytes,
                self.service,
                self.edge_frames,
                self.edges,
                self.pipeline_need,
            ),
        )

    def __str__(self) -> str:
        room = f"{_mib(self.free)} free of {_mib(self.size)} in all" if self.size else "no size limit"
        msg = (
            f"shared memory is full: {self.what or 'a frame'} needs {_mib(self.needed)}"
            + (f" (and {_mib(self.reserve)} kept free)" if self.reserve else "")
            + f" in {self.directory}, which has {room}."
        )
        memory_limit = not self.size or self.free >= self.needed + self.reserve
        if memory_limit:
            msg += " The filesystem had room: the memory limit of the process (its cgroup) or of the host ran out."
        if self.edge_frames and self.frame_bytes:
            msg += (
                f" Its edge holds up to {self.edge_frames} such frames in shared memory "
                f"(queue_depth, or fewer when queue_bytes is reached first, + max_borrowed): "
                f"{_mib(self.edge_frames * self.frame_bytes)}"
            )
            if self.pipeline_need:
                msg += f"; the pipeline's {self.edges} edges {_mib(self.pipeline_need)} if every edge carries such frames"
            msg += "."
        if memory_limit:
            return msg + " Raise that limit or lower queue_depth / queue_bytes."
        size = _size_arg(max(self.pipeline_need, 2 * self.size))
        return msg + (
            f" Grow the filesystem (as root: mount -o remount,size={size} {_mount_point(self.directory)}; "
            f"in a container: docker run --shm-size={size}) or lower queue_depth / queue_bytes."
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _size_arg(n: int) -> str:
    """``n`` bytes rounded up to 256 MiB, as mount and docker write sizes."""
    mib = -(-n // (256 << 20)) * 256
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def _mount_point(path: str) -> str:
    """The mount point of the filesystem that holds ``path`` (for the remount hint)."""
    try:
        path = os.path.realpath(path)
        while not os.path.ismount(path):
            path = os.path.dirname(path)
    except OSError:
        pass
    return path
