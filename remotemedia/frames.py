"""Frames: what travels between stages, and how a Python object becomes shared memory.

A frame is a small fixed header (in the iceoryx2 user header, see
``rust/ipc_bridge/src/pubsub.rs``) plus a payload::

    header : seq | origin | stream_id | created_ns | sent_ns | kind | flags | meta_len | nbufs
    payload: [buffer table][meta = pickle protocol 5][buf 0][buf 1]...   (64-byte aligned)

``seq`` and ``origin`` mean what :class:`FrameInfo` says, except in an ack frame, which has no
payload and carries two counts in them instead (see :attr:`Kind.ACK`).

Any picklable object can be a frame. ``pickle`` protocol 5 moves the memory of numpy arrays
(alone or inside dicts, tuples, lists, dataclasses) *out of band*: the sender copies each array
once into the shared-memory chunk, and the receiver rebuilds the arrays as read-only views on
that chunk, with no copy. Objects the standard pickler rejects (lambdas, local classes) fall
back to cloudpickle.

A received view keeps its chunk borrowed until the last reference to it is gone. A subscriber
may only hold ``max_borrowed`` chunks; :func:`decode` copies a frame out of shared memory
(and releases the chunk at once) when the caller says so, which is how the runtime keeps a
node that hoards frames from stalling its upstream.

Example::

    >>> import numpy as np
    >>> meta, bufs = encode({"audio": np.zeros(4, np.float32), "rate": 16000})
    >>> len(bufs)          # the array travels out of band
    1
"""

from __future__ import annotations

import enum
import pickle
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import cloudpickle
import numpy as np

__all__ = ["Kind", "Frame", "FrameInfo", "encode", "decode", "decode_bytes"]


class Kind(enum.IntEnum):
    """Frame kinds (the ``kind`` header field).

    This is their one definition: ``supervisor.channels`` derives its plain-int copies from it,
    and the bridge's ``KIND_DATA`` (``rust/ipc_bridge/src/pubsub.rs``, which recognises data
    frames on its fast paths) is checked against it by ``tests/test_ports.py``.
    """

    DATA = 0
    #: End of stream on this edge; no frame follows.
    EOS = 1
    #: Cumulative acknowledgement, sent back on an edge's ack service, with no payload. Its
    #: header carries two counts in fields named for data frames: ``seq`` is the number of
    #: frames the consumer has *processed* (flow control), ``origin`` the number it has
    #: *committed* (the producer may forget them). The other fields are 0.
    ACK = 2
    #: An idle consumer's ack, on the ack service: its queue on this edge is empty and it waits
    #: for frame ``stream_id``, as of ``created_ns`` (``time.monotonic_ns``; one clock for the
    #: host). ``seq`` and ``origin`` are an ack's. A producer that had published that frame
    #: before it read an earlier probe for it knows the transport lost it, and resends.
    PROBE = 3


@dataclass
class Frame:
    """Wraps a value to set frame metadata when a node emits it.

    A node normally returns plain values; return ``Frame(value, stream_id=2)`` to tag the
    output with a stream id (downstream outputs inherit the id of their input).

    Example::

        class Splitter(Source):
            def generate(self):
                for i in range(10):
                    yield Frame(f"chunk {i}", stream_id=i % 2)
    """

    value: Any
    stream_id: Optional[int] = None


class FrameInfo(NamedTuple):
    """Header of the frame a node is processing, available as ``node.current_frame``.

    Attributes:
        seq: sequence number on the edge it arrived on.
        origin: index of the pipeline input (or source item) it derives from.
        stream_id: stream id (0 unless a node set one).
        created_ns: ``time.monotonic_ns()`` when the originating input entered the pipeline.
        sent_ns: ``time.monotonic_ns()`` when the upstream stage published it.
        source: name of the upstream node (``"__input__"`` for pipeline inputs).
    """

    seq: int
    origin: int
    stream_id: int
    created_ns: int
    sent_ns: int
    source: str


#: The pickle protocol of every frame (5: out-of-band buffers).
PROTOCOL = _PROTOCOL = 5
# A bare contiguous numpy array (the common media frame) skips pickle: its meta is this tag,
# the dtype and the shape. Pickle streams start with b"\x80", so the tag cannot collide.
ND_TAG = _ND_TAG = b"RMND"
_ND_HEAD = struct.Struct("<4sBB")  # tag, len(dtype str), ndim


# A media frame as it is (a flat dict, tuple or list holding arrays next to a little metadata:
# {"t": ts, "rate": 16000, "data": samples}) skips pickle too. The workers' loop encodes it in
# the bridge (rust/ipc_bridge/src/container.rs, where the layout is drawn) and the bridge
# decodes it on receipt; decode() below reads it wherever Python meets one.
CT_TAG = _CT_TAG = b"RMC1"
_CT_HEAD = struct.Struct("<4sBI")  # tag, kind (0 dict, 1 tuple, 2 list), count
_CT_KINDS = (dict, tuple, list)
_CT_MAX_ENTRIES = 64  # (as the bridge's MAX_ENTRIES: more is pickled)


def _decode_container(meta: Any, bufs: List[Any]) -> Any:
    """A container frame (see CT_TAG) from its meta and out-of-band buffers; a ValueError
    naming it malformed when its bytes are not one, as the bridge's decoder refuses them."""
    try:
        return _read_container(bytes(meta), bufs)
    except (struct.error, IndexError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"malformed container frame meta: {e}") from e


def _plain_dtype(text: bytes) -> np.dtype:
    """The dtype named by a received ``.str``: only what the encoder sends (no Python
    objects, which would be another process's pointers; no records or sub-arrays)."""
    try:
        dtype = np.dtype(text.decode())
    except Exception as e:  # (numpy's parser raises TypeError, SyntaxError, ...)
        raise ValueError(f"dtype {text!r}: {e}") from None
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        raise ValueError(f"dtype {text!r} is not a plain one")
    return dtype


def _read_container(meta: bytes, bufs: List[Any]) -> Any:
    _, kind, n = _CT_HEAD.unpack_from(meta)
    if n > _CT_MAX_ENTRIES or kind >= len(_CT_KINDS):
        raise ValueError(f"kind {kind} with {n} entries")
    i = _CT_HEAD.size

    def take(k: int) -> bytes:
        nonlocal i
        if i + k > len(meta):
            raise ValueError(f"{k} bytes at {i} of a {len(meta)}-byte meta")
        i += k
        return meta[i - k : i]

    keys: List[str] = []
    values: List[Any] = []
    for _ in range(n):
        if kind == 0:
            (klen,) = struct.unpack("<H", take(2))
            keys.append(take(klen).decode())
        tag = take(1)[0]
        if tag == 0:
            v: Any = None
        elif tag in (1, 2):
            v = tag == 2
        elif tag == 3:
            (v,) = struct.unpack("<q", take(8))
        elif tag == 4:
            (v,) = struct.unpack("<d", take(8))
        elif tag in (5, 6):
            (ln,) = struct.unpack("<I", take(4))
            raw = take(ln)
            v = raw.decode() if tag == 5 else raw
        elif tag == 7:
            dtype = _plain_dtype(take(take(1)[0]))
            ndim = take(1)[0]
            shape = struct.unpack(f"<{ndim}q", take(8 * ndim))
            if min(shape, default=0) < 0:
                raise ValueError(f"shape {shape}")
            (index,) = struct.unpack("<I", take(4))
            v = np.frombuffer(bufs[index], dtype=dtype).reshape(shape)
        else:
            raise ValueError(f"value tag {tag}")
        values.append(v)
    if kind == 0:
        return dict(zip(keys, values))
    return _CT_KINDS[kind](values)


# A stream repeats the same dtype and shape frame after frame: both directions are cached.
_ENC_CACHE: Dict[Tuple[Any, Tuple[int, ...]], bytes] = {}
_DEC_CACHE: Dict[bytes, Tuple[np.dtype, Tuple[int, ...]]] = {}


def _encode_ndarray(a: np.ndarray) -> Tuple[bytes, List[memoryview]]:
    key = (a.dtype, a.shape)
    meta = _ENC_CACHE.get(key)
    if meta is None:
        dt = a.dtype.str.encode()
        meta = _ND_HEAD.pack(_ND_TAG, len(dt), a.ndim) + dt + struct.pack(f"<{a.ndim}q", *a.shape)
        if len(_ENC_CACHE) > 256:
            _ENC_CACHE.clear()
        _ENC_CACHE[key] = meta
    try:
        view = memoryview(a).cast("B")
    except (TypeError, ValueError):  # zero-size, or a dtype the buffer protocol cannot name
        view = memoryview(a.reshape(-1).view(np.uint8))
    return meta, [view]


def _decode_ndarray(meta: Any, buf: Any) -> np.ndarray:
    key = bytes(meta)
    hit = _DEC_CACHE.get(key)
    if hit is None:
        try:
            _, dlen, ndim = _ND_HEAD.unpack_from(key)
            off = _ND_HEAD.size
            if len(key) != off + dlen + 8 * ndim:
                raise ValueError(f"{len(key)} bytes for a {dlen}-byte dtype and {ndim} dimensions")
            hit = (_plain_dtype(key[off : off + dlen]), struct.unpack_from(f"<{ndim}q", key, off + dlen))
            if min(hit[1], default=0) < 0:
                raise ValueError(f"shape {hit[1]}")
        except (struct.error, ValueError) as e:
            raise ValueError(f"malformed array frame meta: {e}") from e
        if len(_DEC_CACHE) > 256:
            _DEC_CACHE.clear()
        _DEC_CACHE[key] = hit
    dtype, shape = hit
    try:
        return np.frombuffer(buf, dtype=dtype).reshape(shape)
    except ValueError as e:  # (a buffer of another size than the meta says)
        raise ValueError(f"malformed array frame: {e}") from e


def encode(obj: Any) -> Tuple[bytes, List[memoryview]]:
    """Serialize ``obj`` into meta bytes plus out-of-band buffers (raw byte views).

    The buffers reference the object's memory (no copy is made here); the transport copies
    them into shared memory.
    """
    if type(obj) is np.ndarray and obj.flags.c_contiguous and not obj.dtype.hasobject and obj.dtype.names is None:
        return _encode_ndarray(obj)
    bufs: List[pickle.PickleBuffer] = []
    try:
        meta = pickle.dumps(obj, protocol=_PROTOCOL, buffer_callback=bufs.append)
    except Exception:
        bufs = []
        meta = cloudpickle.dumps(obj, protocol=_PROTOCOL, buffer_callback=bufs.append)
    return meta, [b.raw() for b in bufs]


def decode(sample: Any, copy: bool = False, skip: int = 0) -> Any:
    """Rebuild the object of a received sample (an ``_ipc_bridge.Sample``).

    With ``copy=False`` numpy arrays are read-only views on the shared-memory chunk, which
    stays borrowed while any of them lives. With ``copy=True`` the payload is copied once into
    private memory (arrays stay read-only, like views) and the chunk is released immediately.
    ``skip``: bytes in front of the meta that are not the object's (the runtime's own tag).
    """
    m0, m1 = sample.meta
    m0 += skip
    if copy:
        # bytes, not bytearray: arrays decoded from a copy are read-only too, like views
        mv = memoryview(bytes(memoryview(sample)))
    else:
        mv = memoryview(sample)
    meta = mv[m0:m1]
    if meta[:4] == _ND_TAG:
        ((o, n),) = sample.buffers
        return _decode_ndarray(meta, mv[o : o + n])
    if meta[:4] == _CT_TAG:
        return _decode_container(meta, [mv[o : o + n] for o, n in sample.buffers])
    return pickle.loads(meta, buffers=[mv[o : o + n] for o, n in sample.buffers])


def ndarray_meta(sample: Any) -> Optional[bytes]:
    """The meta of a received sample when it carries a bare array (the fast-path encoding),
    else None."""
    m0, m1 = sample.meta
    if m1 - m0 < 4 or len(sample.buffers) != 1:
        return None
    meta = bytes(memoryview(sample)[m0:m1])
    return meta if meta[:4] == _ND_TAG else None


def decode_bytes(meta: bytes, buffers: List[Any]) -> Any:
    """Inverse of :func:`encode` for in-process use (tests, replay)."""
    if meta[:4] == _ND_TAG:
        return _decode_ndarray(memoryview(meta), buffers[0])
    if meta[:4] == _CT_TAG:
        return _decode_container(meta, buffers)
    return pickle.loads(meta, buffers=buffers)
