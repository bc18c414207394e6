"""The node-type registry used by manifests: ``node_type`` name -> Node class.

Example::

    from remotemedia import Node, register_node

    @register_node                      # registered as "Upper"
    class Upper(Node):
        def process(self, data):
            return data.upper()

    @register_node("text.Lower")        # or under an explicit name
    class Lower(Node):
        def process(self, data):
            return data.lower()

    manifest = {"version": "v1", "nodes": [{"id": "u", "node_type": "Upper", "params": {}}]}
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Type, TypeVar, Union, overload

from .errors import NodeTypeError, UnknownNodeTypeError

__all__ = ["register_node", "get_node_class", "registered_types", "type_name_of", "unregister_node"]

_REGISTRY: Dict[str, type] = {}

T = TypeVar("T", bound=type)


def _register(cls: T, name: Optional[str]) -> T:
    from .node import Node

    if not (isinstance(cls, type) and issubclass(cls, Node)):
        raise NodeTypeError(f"@register_node expects a Node subclass, got {cls!r}")
    key = name or cls.__name__
    existing = _REGISTRY.get(key)
    if existing is not None and existing is not cls and (
        existing.__module__,
        existing.__qualname__,
    ) != (cls.__module__, cls.__qualname__):
        raise NodeTypeError(
            f"node_type {key!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
            f"register {cls.__module__}.{cls.__qualname__} under another name: @register_node('other.Name')"
        )
    _REGISTRY[key] = cls
    cls._remotemedia_type_name = key  # type: ignore[attr-defined]
    return cls


@overload
def register_node(arg: T) -> T: ...
@overload
def register_node(arg: Optional[str] = None) -> Callable[[T], T]: ...


def register_node(arg: Union[T, str, None] = None) -> Union[T, Callable[[T], T]]:
    """Register a Node class under its class name, or under an explicit name."""
    if isinstance(arg, type):
        return _register(arg, None)
    if arg is not None and (not isinstance(arg, str) or not arg):
        raise NodeTypeError(f"@register_node name must be a non-empty string, got {arg!r}")

    def deco(cls: T) -> T:
        return _register(cls, arg)

    return deco


def unregister_node(name: str) -> None:
    """Remove a registration (mainly for tests)."""
    _REGISTRY.pop(name, None)


def registered_types() -> List[str]:
    """The registered node_type names, sorted."""
    return sorted(_REGISTRY)


#: Node types of the optional extras, registered when their module is imported: a manifest may
#: name them without importing anything (tests/test_media.py checks this list against what
#: the modules register).
EXTRA_TYPES: Dict[str, str] = {
    **dict.fromkeys(
        ("AudioFileSource", "AudioFileSink", "AudioResampleNode", "VideoFileSource", "VideoFileSink", "VideoResizeNode"),
        "remotemedia.media",
    ),
    "VADNode": "remotemedia.ml",
}


def get_node_class(node_type: str, where: Optional[str] = None) -> Type:
    """The class registered as ``node_type`` (a type of an extra is imported on first use;
    ImportError naming the extra when it is not installed); raises UnknownNodeTypeError
    listing the others."""
    if node_type not in _REGISTRY and node_type in EXTRA_TYPES:
        import importlib

        importlib.import_module(EXTRA_TYPES[node_type])
    try:
        return _REGISTRY[node_type]
    except KeyError:
        raise UnknownNodeTypeError(node_type, list(_REGISTRY), where) from None


def type_name_of(cls: type) -> str:
    """The name a class is registered under (its class name when it is not registered)."""
    name = cls.__dict__.get("_remotemedia_type_name")
    return name if name is not None else cls.__name__
