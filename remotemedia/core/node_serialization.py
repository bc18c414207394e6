"""The seed API's node serialization helpers, as thin wrappers over
:mod:`remotemedia.serialization` (what the runtime itself uses to send a node to a worker).

Same contract as upstream's ``remotemedia.core.node_serialization``:

* :func:`serialize_node_for_ipc` calls ``node.cleanup()`` on *your* object, then cloudpickles
  it, and returns the ``bytes``;
* :func:`deserialize_node_from_ipc` unpickles those bytes, calls ``initialize()`` on the new
  node and returns it.

Differences, all stricter: the size limit (:data:`MAX_SERIALIZED_SIZE_BYTES`) is enforced
while pickling; an attribute that does not pickle is named in the
:class:`~remotemedia.errors.SerializationError` (``attribute_path``); a ``cleanup()`` that
raises is reported instead of swallowed; an ``initialize()`` that raises propagates
unchanged (upstream wraps it in ``RuntimeError``). A non-Node raises
:class:`~remotemedia.errors.NodeTypeError` (a ``TypeError``, as upstream).

Example::

    >>> from remotemedia.nodes import MapNode
    >>> from remotemedia.core.node_serialization import serialize_node_for_ipc, deserialize_node_from_ipc
    >>> data = serialize_node_for_ipc(MapNode(lambda x: x + 1, name="inc"))
    >>> deserialize_node_from_ipc(data).process(1)
    2
"""

from __future__ import annotations

from typing import Any

from ..errors import SerializationError
from ..serialization import DEFAULT_MAX_SIZE, deserialize_node, serialize_node

__all__ = ["MAX_SERIALIZED_SIZE_BYTES", "SerializationError", "serialize_node_for_ipc", "deserialize_node_from_ipc"]

#: Largest pickled node accepted, in bytes (100 MB, as upstream).
MAX_SERIALIZED_SIZE_BYTES = DEFAULT_MAX_SIZE


def serialize_node_for_ipc(node: Any) -> bytes:
    """``node.cleanup()``, then cloudpickle: the bytes that recreate ``node`` in another process.

    Raises:
        NodeTypeError (a TypeError): ``node`` is not a Node.
        SerializationError: cleanup() raised, an attribute cannot be pickled (named in the
            message and in ``attribute_path``), or the pickle exceeds
            :data:`MAX_SERIALIZED_SIZE_BYTES`.
    """
    return serialize_node(node, MAX_SERIALIZED_SIZE_BYTES)


def deserialize_node_from_ipc(data: bytes) -> Any:
    """Unpickle bytes from :func:`serialize_node_for_ipc` and ``initialize()`` the node;
    returns the ready node.

    Raises:
        SerializationError: the bytes do not unpickle (missing module, version mismatch).
        Whatever ``initialize()`` raises, unchanged.
    """
    return deserialize_node(data)
