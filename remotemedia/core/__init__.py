"""Compatibility names of the seed API (remotemedia-sdk's ``remotemedia.core``).

Only :mod:`remotemedia.core.node_serialization` lives here; the real implementations are in
the top-level modules (:mod:`remotemedia.serialization`).
"""
