"""The Rust bridge (remotemedia._ipc_bridge) used directly, in one process."""

from __future__ import annotations

import collections
import ctypes
import os
import pickle
import threading
import time

import numpy as np
import pytest

from remotemedia import _ipc_bridge as b
from remotemedia.errors import ServiceError, TransportError
from remotemedia.frames import decode, encode

from conftest import shm_mapping_of


def pair(node, name="e/data", **kw):
    return b.Publisher(node, name, **kw), b.Subscriber(node, name, **kw)


def test_version_pinned_to_python_package():
    import importlib.metadata

    assert b.__iceoryx2_version__ == importlib.metadata.version("iceoryx2") == "0.10.0"


def test_roundtrip_header_and_zero_copy(node):
    pub, sub = pair(node)
    arr = np.arange(1 << 20, dtype=np.float32)
    meta, bufs = encode({"a": arr, "t": "hi"})
    assert pub.send(7, 0, meta, bufs, origin=3, stream_id=9, created_ns=123) == 1
    s = sub.receive()
    assert (s.seq, s.kind, s.origin, s.stream_id, s.created_ns) == (7, 0, 3, 9, 123)
    assert s.sent_ns <= time.monotonic_ns()
    obj = decode(s)
    assert obj["t"] == "hi" and np.array_equal(obj["a"], arr)
    # the array is a view on the sample's shared memory, 64-byte aligned, read-only
    assert obj["a"].ctypes.data == s.address + s.buffers[0][0]
    assert obj["a"].ctypes.data % b.BUFFER_ALIGN == 0
    assert shm_mapping_of(obj["a"].ctypes.data).startswith(os.path.join(node.root, node.prefix))
    assert not obj["a"].flags.writeable
    with pytest.raises((BufferError, TypeError)):
        (ctypes.c_char * 4).from_buffer(s)  # a writable view of a received frame is refused
    get_buffer = ctypes.pythonapi.PyObject_GetBuffer  # (the C call, error as raised)
    get_buffer.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
    view = (ctypes.c_byte * 256)()  # (room for a Py_buffer)
    with pytest.raises(BufferError, match="read-only shared memory; copy it"):
        get_buffer(s, ctypes.addressof(view), 1)  # PyBUF_WRITABLE
    assert sub.receive() is None


def test_sample_released_when_last_view_is_gone(node):
    pub, sub = pair(node)
    meta, bufs = encode(np.ones(1000))
    pub.send(0, 0, meta, bufs)
    s = sub.receive()
    arr = decode(s)
    assert sub.borrowed == 1
    del s
    assert sub.borrowed == 1  # the array still references the chunk
    view = arr[10:20]
    del arr
    assert sub.borrowed == 1
    del view
    assert sub.borrowed == 0


def test_copy_decode_releases_chunk(node):
    pub, sub = pair(node)
    meta, bufs = encode(np.arange(10))
    pub.send(0, 0, meta, bufs)
    s = sub.receive()
    arr = decode(s, copy=True)
    del s
    assert sub.borrowed == 0 and np.array_equal(arr, np.arange(10))


def test_borrow_limit_is_a_typed_error(node):
    from remotemedia.errors import ReceiveError

    pub, sub = pair(node, max_borrowed=2, buffer_size=4)
    for i in range(3):
        pub.send(i, 0, b"x")
    held = [sub.receive(), sub.receive()]
    with pytest.raises(ReceiveError, match="2 of 2"):
        sub.receive()
    del held
    assert sub.receive().seq == 2


def test_full_queue_discards_instead_of_blocking(node):
    pub, sub = pair(node, buffer_size=2)
    assert [pub.send(i, 0, b"x") for i in range(3)] == [1, 1, 0]
    assert [sub.receive().seq, sub.receive().seq] == [0, 1]


def test_no_subscriber_returns_zero(node):
    pub = b.Publisher(node, "lonely")
    assert pub.send(0, 0, b"x") == 0


def test_mismatched_settings_raise_service_error(node):
    keep = b.Publisher(node, "svc", buffer_size=4)  # noqa: F841 - keeps the service alive
    with pytest.raises(ServiceError, match="DoesNotSupportRequestedMinBufferSize"):
        b.Subscriber(node, "svc", buffer_size=8)
    assert issubclass(ServiceError, TransportError)


def test_loan_sends_without_copy(node):
    pub, sub = pair(node)
    loan = pub.loan(4096)
    view = np.frombuffer(loan, dtype=np.uint8)
    view[:] = 7
    meta = pickle.dumps("meta")
    assert loan.send(1, 0, meta) == 1
    assert not loan.pending
    with pytest.raises(BufferError):
        memoryview(loan)
    s = sub.receive()
    (off, n), = s.buffers
    assert n == 4096 and bytes(memoryview(s)[off : off + 4]) == b"\x07" * 4
    m0, m1 = s.meta
    assert pickle.loads(memoryview(s)[m0:m1]) == "meta"


@pytest.mark.slow
def test_wait_releases_gil_and_times_out(node):
    lis = b.Listener(node, "inbox")
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    t0 = time.monotonic()
    assert lis.wait(1.0) == (False, [])
    elapsed = time.monotonic() - t0
    stop.set()
    t.join()
    assert 0.98 <= elapsed < 30  # its timeout, not less (more only as much as the host is busy)
    # The other thread ran while we waited (~1000 ticks; holding the GIL would allow one).
    assert len(ticks) >= 10


def test_wait_wakes_on_notify_and_on_fd(node):
    lis = b.Listener(node, "inbox")
    nt = b.Notifier(node, "inbox")
    assert nt.notify() == 1
    assert lis.wait(60.0) == (True, [])  # True: woken by the notification, not by the timeout
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        assert lis.wait(5.0, [r]) == (False, [r])
    finally:
        os.close(r)
        os.close(w)


def test_idle_wait_uses_no_cpu(node):
    lis = b.Listener(node, "inbox")
    t0 = time.process_time()
    lis.wait(0.5)
    assert time.process_time() - t0 < 0.05


def test_list_nodes_and_stale_cleanup(node):
    states = b.list_nodes(node.prefix, node.root)
    assert ("alive", os.getpid(), "test") in states
    assert b.remove_stale_resources(node.prefix, node.root) == (0, 0)


def _learn_rx(sub, sample, arr):
    from remotemedia.frames import ndarray_meta

    sub.learn_array(ndarray_meta(sample), len(sample), arr.dtype, arr.size,
                    arr.shape if arr.ndim != 1 else None)


def test_send_array_needs_a_learned_array(node):
    pub, sub = pair(node)
    nt_listener = b.Listener(node, "e/inbox")
    nt = b.Notifier(node, "e/inbox")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert pub.send_array(0, a, notifier=nt) == -1  # nothing learned: nothing sent
    assert sub.receive() is None and nt_listener.drain() == 0
    meta, bufs = encode(a)
    pub.learn_array(np.ndarray, a.dtype, a.shape, meta, memoryview(bufs[0]).nbytes)
    assert pub.send_array(5, a + 1, origin=2, stream_id=3, created_ns=4, notifier=nt) == 1
    assert nt_listener.drain() == 1  # sent and notified in one call
    s = sub.receive()
    assert (s.seq, s.origin, s.stream_id, s.created_ns) == (5, 2, 3, 4)
    assert np.array_equal(decode(s), a + 1)  # the same bytes as the Python encoder's
    del s
    # anything unlike the learned array is refused, not mis-encoded
    unlike = [
        a.astype(np.float64),                 # dtype
        a.reshape(4, 3),                      # shape
        np.asfortranarray(a),                 # not C-contiguous
        a[:, ::2],                            # strided view
        np.ma.masked_array(a),                # subclass
        a.tolist(),                           # not an array
    ]
    for x in unlike:
        assert pub.send_array(6, x) == -1, x
    assert sub.receive() is None
    # a flexible dtype is a new object with every array: equal is enough
    u = np.array(["ab", "c"], dtype="<U4")
    meta, bufs = encode(u)
    pub.learn_array(np.ndarray, u.dtype, u.shape, meta, memoryview(bufs[0]).nbytes)
    v = np.array(["xy", "z"], dtype="<U4")
    assert v.dtype is not u.dtype and pub.send_array(7, v) == 1
    assert np.array_equal(decode(sub.receive()), v)
    assert pub.send_array(8, np.array(["xy", "z"], dtype="<U3")) == -1


def test_take_decodes_learned_frames_only(node):
    pub, sub = pair(node, max_borrowed=4)
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    meta, bufs = encode(a)
    for seq in range(4):
        pub.send(seq, 0, meta, [memoryview(a + seq).cast("B")])
    s = sub.take(0, 3)
    assert isinstance(s, b.Sample)  # nothing learned yet
    _learn_rx(sub, s, decode(s))
    del s
    got = sub.take(1, 3)
    assert isinstance(got, tuple)
    arr, seq, origin, stream_id, created_ns, sent_ns = got
    assert seq == 1 and np.array_equal(arr, a + 1) and arr.shape == (2, 3) and arr.dtype == np.int16
    assert not arr.flags.writeable and sub.borrowed == 1  # a view on shared memory
    assert isinstance(sub.take(5, 3), b.Sample)  # not the frame expected: Python decides
    # at the borrow limit the frame is copied out, and its chunk goes back at once
    copied, seq = sub.take(3, 1)[:2]
    assert seq == 3 and np.array_equal(copied, a + 3) and copied.shape == (2, 3)
    assert not copied.flags.writeable and sub.borrowed == 1  # only `arr` still holds a chunk
    del arr, got
    assert sub.borrowed == 0 and np.array_equal(copied, a + 3)
    # another shape, or another kind, is not taken for the learned one
    other = np.arange(6, dtype=np.int16).reshape(3, 2)
    m2, b2 = encode(other)
    pub.send(4, 0, m2, b2)
    pub.send(5, 1, b"")
    assert isinstance(sub.take(4, 3), b.Sample) and isinstance(sub.take(5, 3), b.Sample)
    assert sub.take(6, 3) is None


def test_taken_arrays_are_views_owned_by_their_sample(node):
    # take() builds arrays through numpy's C API: the array's base is the Sample (the chunk
    # goes back when the last view is gone), read-only, any shape numpy has (0-d included).
    pub, sub = pair(node, max_borrowed=4)
    for a in (np.arange(24, dtype=">f8").reshape(2, 3, 4), np.array(7, dtype=np.int32), np.arange(5, dtype=np.uint8)):
        meta, bufs = encode(a)
        pub.send(0, 0, meta, bufs)
        s = sub.take(0, 3)
        _learn_rx(sub, s, decode(s))
        del s
        pub.send(1, 0, meta, [memoryview(np.ascontiguousarray(a)).cast("B")])
        got, seq = sub.take(1, 3)[:2]
        assert seq == 1 and got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
        assert type(got.base) is b.Sample and not got.flags.writeable and sub.borrowed == 1
        with pytest.raises(ValueError):
            got[...] = 0
        del got
        assert sub.borrowed == 0


def test_learn_array_refuses_what_cannot_be_a_view(node):
    _, sub = pair(node)
    with pytest.raises(ValueError, match="Python objects"):
        sub.learn_array(b"m", 64, np.dtype(object), 8)  # pointers of another process
    with pytest.raises(ValueError, match="does not fit"):
        sub.learn_array(b"m", 64, np.dtype(np.uint8), 6, (2, 2))  # the shape holds 4 items, not 6
    with pytest.raises(ValueError, match="does not fit"):
        sub.learn_array(b"m", 64, np.dtype(np.float64), 9)  # 72 bytes in a 64-byte payload


def _container(dtype: str, shape, nbytes: int) -> tuple:
    import struct

    from remotemedia.frames import CT_TAG

    dt = dtype.encode()
    meta = CT_TAG + struct.pack("<BI", 1, 1) + bytes([7, len(dt)]) + dt + bytes([len(shape)])
    meta += b"".join(struct.pack("<q", d) for d in shape) + struct.pack("<I", 0)
    return meta, [bytes(nbytes)]


def test_a_hostile_media_frame_is_refused_not_mapped(node):
    # A container's dtype and shape come from the sender: an object dtype over received bytes
    # would be pointers from another process, a shape beyond the buffer would read past it.
    pub, sub = pair(node)
    sub.learn_containers()
    for seq, (dtype, shape, nbytes) in enumerate([("|O", (8,), 64), ("<f4", (4, 4), 32), ("<f4", (-1, -4), 16)]):
        meta, bufs = _container(dtype, shape, nbytes)
        pub.send(seq, 0, meta, bufs)
        with pytest.raises(ValueError, match="malformed container"):
            sub.take(seq, 3)
    meta, bufs = _container("<f4", (2, 2), 16)  # (and a well-formed one still decodes)
    pub.send(3, 0, meta, bufs)
    (got,) = sub.take(3, 3)[0]
    assert got.shape == (2, 2) and type(got.base) is b.Sample and not got.any()


def test_media_frames_with_random_damage_decode_or_are_refused_by_both_decoders(node):
    # A frame's meta is read from shared memory: whatever its bytes, each decoder (the bridge's
    # on receipt, Python's decode_bytes elsewhere) either makes an object of them or refuses
    # them with "malformed container", never another error, a crash or a read past the frame.
    import random

    from remotemedia.frames import decode_bytes

    pub, sub = pair(node, max_borrowed=4)
    sub.learn_containers()
    rng = random.Random(20261203)
    frames = [
        {"t": 1, "rate": 16000, "data": np.arange(16, dtype=np.int16)},
        (0.5, np.zeros((2, 3), np.float32), "x", b"yy", None, True),
        [np.arange(6, dtype=">f8").reshape(3, 2), np.array(3, np.int64)],
        {"a": np.ones(4, "U2"), "b": np.arange(3, dtype=np.uint64)},
    ]
    n_taken = refused = 0

    def taken(got):
        return decode(got) if isinstance(got, b.Sample) else got[0]

    for seq in range(1500):
        meta, bufs = b.encode_container(rng.choice(frames))
        meta = bytearray(meta)
        bufs = [memoryview(np.ascontiguousarray(a)).cast("B") for a in bufs]
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.5 and len(meta) > 4:  # a byte changed
                meta[rng.randrange(4, len(meta))] = rng.randrange(256)
            elif op < 0.7 and len(meta) > 5:  # cut short
                del meta[rng.randrange(5, len(meta)) :]
            elif op < 0.9:  # bytes inserted
                i = rng.randrange(4, len(meta) + 1)
                meta[i:i] = rng.randbytes(rng.randint(1, 9))
            else:  # other buffers
                bufs = [bytes(rng.randrange(64)) for _ in range(rng.randint(0, 3))]
        outcome = {}
        for decoder in ("bridge", "python"):
            try:
                if decoder == "bridge":
                    pub.send(seq, 0, bytes(meta), bufs)
                    # (one without buffers is not decoded on receipt: the runtime's decode reads it)
                    obj = taken(sub.take(seq, 3))
                else:
                    obj = decode_bytes(bytes(meta), bufs)
            except ValueError as e:
                assert "malformed container" in str(e), f"{decoder}: {e!r} for {bytes(meta)!r}"
                refused += 1
                outcome[decoder] = "refused"
                continue
            n_taken += 1
            values = list(obj.values() if isinstance(obj, dict) else obj)
            # (every array's bytes readable; the two decoders make the same object)
            outcome[decoder] = (
                type(obj),
                list(obj) if isinstance(obj, dict) else None,
                [(v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else (type(v), repr(v)) for v in values],
            )
        assert outcome["bridge"] == outcome["python"], f"the decoders disagree on {bytes(meta)!r}"
    assert n_taken > 100 and refused > 1000, (n_taken, refused)  # (both outcomes were exercised)
    obj = values = None  # (the last frame's arrays)
    assert sub.borrowed == 0


def test_bare_array_frames_with_random_damage_decode_or_are_refused():
    # The same for a bare array's meta (tag, dtype, shape), which Python decodes until the
    # bridge has learned it: an array of exactly what the meta says, or "malformed array".
    import random

    from remotemedia.frames import decode_bytes, encode

    rng = random.Random(20261203)
    arrays = [np.arange(16, dtype=np.int16), np.zeros((2, 3), ">f4"), np.array(3, np.int64), np.ones(2, "U2")]
    outcomes = collections.Counter()
    for _ in range(1500):
        meta, bufs = encode(rng.choice(arrays))
        meta, buf = bytearray(meta), bytes(bufs[0])
        for _ in range(rng.randint(0, 3)):  # (0: intact, as a control)
            op = rng.random()
            if op < 0.5 and len(meta) > 4:
                meta[rng.randrange(4, len(meta))] = rng.randrange(256)
            elif op < 0.7 and len(meta) > 5:
                del meta[rng.randrange(5, len(meta)) :]
            elif op < 0.9:
                i = rng.randrange(4, len(meta) + 1)
                meta[i:i] = rng.randbytes(rng.randint(1, 9))
            else:
                buf = bytes(rng.randrange(64))
        try:
            got = decode_bytes(bytes(meta), [buf])
        except ValueError as e:
            assert "malformed array" in str(e), f"{e!r} for {bytes(meta)!r}"
            outcomes["refused"] += 1
            continue
        assert got.nbytes == len(buf) and got.tobytes() == buf
        outcomes["decoded"] += 1
    assert outcomes["decoded"] > 200 and outcomes["refused"] > 1000, outcomes


def test_media_frames_in_a_row_decode_each_its_own_values(node):
    # The decoder reuses the objects of the last frame's entries whose bytes repeat (a stream's
    # keys, its rate, its codec name): each frame must still get exactly its own values,
    # whatever changes between frames (a value of the same length, a key over the same value,
    # the kind of container, a long str, -0.0 after 0.0).
    pub, sub = pair(node, max_borrowed=48, buffer_size=48)
    sub.learn_containers()
    a = np.arange(4, dtype=np.int16)
    long1, long2 = "x" * 100, "x" * 99 + "y"
    frames = [
        {"t": 1, "rate": 16000, "data": a, "codec": "pcm"},
        {"t": 2, "rate": 16000, "data": a, "codec": "pcm"},
        {"u": 2, "rate": 16000, "data": a, "codec": "pcm"},
        {"t": 3, "rate": 8000, "data": a, "codec": long1},
        {"t": 3, "rate": 8000, "data": a, "codec": long2},
        (0.0, a, True),
        (-0.0, a, 1),
        [-0.0, a, None, b"raw"],
        {"t": 1, "rate": 16000, "data": a, "codec": "pcm"},
        {"t": 1, "rate": 16000, "data": a, "codec": "pcm"},  # (the same dict again: its copy)
        {"t": 2, "rate": 16000, "data": a, "codec": "pcm"},
        {"t": 2, "rate": 16000, "data": a, "codec": "pcm"},
        {"t": 2, "rate": 44100, "data": a, "codec": long1},
        (3, 4, a, long2),  # (another kind at the same places...)
        {"t": 3, "rate": 4, "data": a, "codec": long2},  # (...then the dict with its values)
        {"t": 3, "rate": 4, "data": a, "codec": long2},
        {"t": 3, "data": a, "rate": 4, "codec": long2},  # (the same keys in another order)
        {"t": 3, "data": a, "rate": 4},
        {"t": 3, "data": a, "rate": 4},
        {"x": 1, "d": a},
        {"x": 1, "d": a},
        (2, a),  # (changes what the last dicts held at place 0...)
        {"x": 2, "d": a},  # (...which this dict's copy must not keep)
        {"x": 2, "d": a},
        {"x": 3, "d": a},  # (a value that changes...)
        {"x": 3, "d": a},  # (...then repeats: the dicts copied after hold it)
        {"x": 3, "d": a},
        {"x": 3, "d": a.astype(np.float32)},  # (another dtype at the same place)
        {"x": a, "d": 3},  # (an array where a scalar was, and back)
        {"x": 3, "d": a},
        {"x": None, "d": a},
        {"x": None, "d": a},
        {"x": 3, "d": a},
    ]
    got = []
    for seq, f in enumerate(frames):
        meta, bufs = b.encode_container(f)
        pub.send(seq, 0, meta, bufs)
        d = sub.take(seq, 48)[0]
        got.append(dict(d) if isinstance(d, dict) else d)
        if isinstance(d, dict):  # (what a node does to its frame changes no later frame)
            d["t"], d["added"] = -1, True
    for g, f in zip(got, frames):
        assert type(g) is type(f)
        gv, fv = (list(g.items()), list(f.items())) if isinstance(f, dict) else (list(enumerate(g)), list(enumerate(f)))
        assert [k for k, _ in gv] == [k for k, _ in fv]
        for (_, x), (_, y) in zip(gv, fv):
            if isinstance(y, np.ndarray):
                assert np.array_equal(x, y) and x.dtype == y.dtype
            else:
                assert type(x) is type(y) and x == y and str(x) == str(y), (x, y)  # (str: -0.0)
    assert got[1]["rate"] is got[0]["rate"] and got[1]["codec"] is got[0]["codec"]  # (reused)
    assert got[0]["data"] is not got[1]["data"]  # (arrays never: each views its own frame)


def test_a_media_frame_naming_a_key_twice_decodes_as_a_dict_literal_would(node):
    # (not what an encoder of a dict writes, but a sender may: the last value wins, as in
    # {"k": 1, "k": 2}, frame after frame)
    import struct

    from remotemedia.frames import CT_TAG

    pub, sub = pair(node)
    sub.learn_containers()

    def entry(key: bytes, value: int) -> bytes:
        return struct.pack("<H", len(key)) + key + bytes([3]) + struct.pack("<q", value)

    array = struct.pack("<H", 1) + b"d" + bytes([7, 3]) + b"<i2" + bytes([1]) + struct.pack("<qI", 4, 0)
    for seq, (x, y) in enumerate([(1, 2), (1, 2), (1, 5), (7, 5)]):
        meta = CT_TAG + struct.pack("<BI", 0, 3) + entry(b"k", x) + entry(b"k", y) + array
        pub.send(seq, 0, meta, [np.arange(4, dtype=np.int16).tobytes()])
        got = sub.take(seq, 3)[0]
        assert list(got) == ["k", "d"] and got["k"] == y and got["d"].tolist() == [0, 1, 2, 3]
        del got


def test_notify_may_yield_and_still_wakes(node):
    pub, sub = pair(node)
    listener = b.Listener(node, "e/inbox")
    nt = b.Notifier(node, "e/inbox")
    nt.yield_unless_queued([sub])
    assert nt.notify() == 1  # nothing queued: notifies, then yields
    pub.send(0, 0, b"x")
    assert nt.notify() == 1  # a frame queued: notifies without yielding
    assert listener.drain() >= 1


@pytest.mark.slow
def test_two_threads_sending_big_frames_do_not_deadlock(node):
    # A big copy releases the GIL; it used to do so while holding the port's lock, so a second
    # thread sending on the same port (GIL held, waiting for the lock) deadlocked both. Run in
    # a child process: a deadlock would take the GIL with it.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import threading
        import numpy as np
        from remotemedia import _ipc_bridge as b
        n = b.Node({node.prefix!r}, "threads", {node.root!r})
        pub = b.Publisher(n, "mt", buffer_size=8, max_loaned=4)
        sub = b.Subscriber(n, "mt", buffer_size=8)
        frame = np.zeros(1 << 20, np.uint8)
        done = []
        def send():
            for i in range(300):
                pub.send(i, 0, b"", [frame])
            done.append(1)
        def drain():
            while len(done) < 2:
                s = sub.receive()
                del s
        ts = [threading.Thread(target=send) for _ in range(2)] + [threading.Thread(target=drain)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_take_unpickles_small_pickled_frames(node):
    pub, sub = pair(node)
    sub.learn_pickle(pickle.loads, 64)
    for seq, value in enumerate([42, "hi", {"k": [1, 2.5]}]):
        meta, bufs = encode(value)
        assert bufs == []
        pub.send(seq, 0, meta, bufs, origin=7, stream_id=3, created_ns=11)
    for seq, value in enumerate([42, "hi", {"k": [1, 2.5]}]):
        got = sub.take(seq, 4)
        assert type(got) is tuple and got[:5] == (value, seq, 7, 3, 11)
    assert sub.borrowed == 0  # nothing stays borrowed: the value was unpickled from a copy
    # Python decides for everything else: too big, with out-of-band buffers, not expected,
    # not data, not a pickle
    meta, bufs = encode("x" * 100)
    pub.send(3, 0, meta, bufs)
    meta, bufs = encode({"a": np.arange(4)})
    assert bufs
    pub.send(4, 0, meta, bufs)
    pub.send(9, 0, encode(1)[0])
    pub.send(6, 1, encode(1)[0])
    pub.send(7, 0, b"RMND")
    for expected in (3, 4, 5, 6, 7):
        assert isinstance(sub.take(expected, 4), b.Sample)
    # an unpickling error is raised, and the frame is consumed
    pub.send(8, 0, b"\x80\x05junk")
    with pytest.raises(pickle.UnpicklingError):
        sub.take(8, 4)
    assert sub.take(9, 4) is None
