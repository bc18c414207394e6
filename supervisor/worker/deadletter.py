"""Dead-lettering: a poison frame (one that crashed the node too often) is skipped, and a copy
of it kept when the pipeline has a dead-letter directory."""

from __future__ import annotations

import json
import logging
import os
import secrets
from typing import Any, List, Optional, Sequence, Tuple

log = logging.getLogger("remotemedia.worker")


def dead_letter(node_name: str, directory: Optional[str], port: Any, sample: Any, skip: int = 0) -> Optional[str]:
    """Keep a copy of ``sample`` (a frame of ``port``) in ``directory`` if set; returns its
    path (None without a directory). ``skip``: bytes in front of the meta that are the
    runtime's, not the frame's (a replica's input: its dispatch number), left out of the
    header's meta range."""
    path = None
    if directory:
        m0, m1 = sample.meta
        header = {
            "node": node_name,
            "edge": port.spec.index,
            "from": port.spec.src,
            "seq": sample.seq,
            "origin": sample.origin,
            "meta": [m0 + skip, m1],
            "buffers": [list(b) for b in sample.buffers],
        }
        path = write_private(
            directory,
            f"{node_name}-e{port.spec.index}-s{sample.seq}",
            ((".frame", memoryview(sample)), (".json", json.dumps(header).encode())),
        )
    log.error("dead-lettered poison frame %d from %s%s", sample.seq, port.spec.src, f" to {path}" if path else "")
    return path


def write_private(directory: str, stem: str, parts: Sequence[Tuple[str, Any]]) -> str:
    """Write the files ``stem + suffix`` (one per part) into ``directory`` and nowhere else;
    returns the path of the first. Each is created new, 0600, never through a symlink
    (O_CREAT|O_EXCL|O_NOFOLLOW), so a planted file or link is neither overwritten nor
    followed: on a collision (also the same frame dead-lettered again after a restart) the
    stem gets a fresh unpredictable suffix. A missing directory is created 0700."""
    if not stem or os.sep in stem or "\0" in stem or stem in (".", ".."):
        raise ValueError(f"file name {stem!r} would not stay inside {directory}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        name = stem
        for _ in range(16):
            created: List[str] = []
            try:
                for suffix, data in parts:
                    fd = os.open(name + suffix, flags, 0o600, dir_fd=dfd)
                    created.append(name + suffix)
                    with open(fd, "wb") as f:
                        f.write(data)
            except FileExistsError:
                for done in created:  # (unlink removes our entry; it follows nothing)
                    os.unlink(done, dir_fd=dfd)
                name = f"{stem}-{secrets.token_hex(8)}"
                continue
            return os.path.join(directory, name + parts[0][0])
        raise FileExistsError(f"no free name for {stem!r} in {directory}")
    finally:
        os.close(dfd)
