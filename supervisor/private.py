"""Directories and files that only this user can reach.

Everything the runtime creates on the file system lives in a directory that
:func:`ensure_private_dir` checked: a real directory (never a symlink), owned by our
effective uid, writable by nobody else. Names inside such a directory cannot be planted,
replaced or read by another user, whatever they are. Files the runtime creates elsewhere go
through :func:`create_private_file` (``O_CREAT|O_EXCL|O_NOFOLLOW``, 0600, a random name part):
an existing name is an error, never reused or followed.

Checks go through a descriptor opened with ``O_NOFOLLOW``, never through a path that could be
swapped, and nothing is ever chmod-ed or chown-ed through a symlink.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from typing import Tuple

from remotemedia.errors import UnsafeDirectoryError

__all__ = ["ensure_private_dir", "create_private_file", "sealed_memfd"]


def ensure_private_dir(path: str, what: str, fix: str, *, create: bool = True) -> None:
    """Make ``path`` a private directory of ours, or refuse.

    Created 0700 when missing (its parents with the default mode). An existing ``path`` must
    be a directory, not a symlink, owned by our effective uid and not writable by group or
    others; read/search bits of group and others are removed (through the checked
    descriptor). ``what`` names the directory in the error (``"shared-memory base directory"``),
    ``fix`` says how to choose another one. Raises :class:`UnsafeDirectoryError`.

    ``create=False`` only checks an existing directory (a reader's view: nothing is created
    and no mode is changed, which could lock out a service that shares the directory's
    parent).
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if create:
        try:
            if not os.path.isdir(parent):
                os.makedirs(parent, exist_ok=True)
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise UnsafeDirectoryError(f"cannot create the {what} {path}: {e.strerror or e}; {fix}") from e
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            problem = "is a symlink"
        elif e.errno in (errno.ENOTDIR, errno.ELOOP):
            problem = "is not a directory"
        else:
            problem = f"cannot be opened ({e.strerror or e})"
        raise UnsafeDirectoryError(
            f"the {what} {path} {problem}; refusing to use it (remove it, or {fix})"
        ) from e
    try:
        st = os.fstat(fd)
        euid = os.geteuid()
        if st.st_uid != euid:
            raise UnsafeDirectoryError(
                f"the {what} {path} belongs to uid {st.st_uid}, not to us (uid {euid}); "
                f"another user may have created it to read or plant files; refusing to use it "
                f"(remove it, or {fix})"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise UnsafeDirectoryError(
                f"the {what} {path} is writable by group or others (mode {mode:04o}); files may "
                f"have been planted in it; refusing to use it (remove it, or chmod 0700 it after "
                f"checking its contents, or {fix})"
            )
        if mode & 0o077 and create:
            os.fchmod(fd, 0o700)  # only readable/searchable by others: closing that is safe
    finally:
        os.close(fd)


def sealed_memfd(name: str, size: int) -> int:
    """A zeroed anonymous file of ``size`` bytes whose size is sealed (shared with the run's
    processes by descriptor: no name anybody could open, and nobody can shrink it under a
    mapping). Close-on-exec; pass it with ``pass_fds``."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_private_file(directory: str, stem: str, suffix: str = "") -> Tuple[int, str]:
    """Create a new file ``<directory>/<stem>.<random><suffix>``, 0600, with
    ``O_CREAT|O_EXCL|O_NOFOLLOW``: never an existing name, never through a symlink. Returns
    ``(fd, path)``; the descriptor is close-on-exec and opened for writing."""
    path = os.path.join(directory, f"{stem}.{secrets.token_hex(8)}{suffix}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return fd, path
