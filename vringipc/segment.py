"""Shared-memory segments: create, attach, close, unlink.

Two backends:

* ``"shm"`` - a named POSIX shared-memory object (``posix_ipc``), reachable by
  name from unrelated processes.  Created with ``O_CREAT|O_EXCL`` and mode 0600
  by default, under a short unguessable name.  The creator unlinks it; attachers
  never do.  The first `reserve` bytes (default: all) are reserved with
  ``posix_fallocate`` so a full ``/dev/shm`` fails here, at create time, and
  never as SIGBUS later; the rest stays sparse until its user reserves it
  (the queue reserves arena chunks as data arrives, see _queue.pxi).
* ``"memfd"`` - an anonymous ``memfd_create`` file sealed against shrinking and
  growing, shared by fd (inheritance, pickling for spawn, SCM_RIGHTS).  Nothing
  to leak, and a consumer can verify the seals, so a producer cannot truncate
  the segment under it.

A Segment is the mapping; the layout inside it is vringipc.layout's business.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import secrets

import posix_ipc

__all__ = ["Segment", "SHM_DIR", "NAME_PREFIX", "validate_name", "make_name", "name_pid"]

SHM_DIR = "/dev/shm"
NAME_PREFIX = "/vr_"
MAX_NAME = 30                       # including the leading "/" (macOS's limit is 31)
_NAME_RE = re.compile(r"/[A-Za-z0-9_.\-]{1,29}")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def make_name() -> str:
    """A fresh unguessable name: '/vr_<creator pid hex>_<48 random bits hex>'
    (at most 23 characters).  The pid lets `vringipc gc` and the tests find
    segments whose creator is gone."""
    return f"{NAME_PREFIX}{os.getpid():x}_{secrets.token_hex(6)}"


def name_pid(name: str) -> int | None:
    """The creator pid embedded in a generated name, or None."""
    m = re.fullmatch(r"/vr_([0-9a-f]{1,8})_[0-9a-f]{12}", name)
    return int(m.group(1), 16) if m else None


def validate_name(name: str) -> str:
    """Return name if it is a valid segment name, else raise ValueError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"segment name {name!r} must be '/' followed by 1..{MAX_NAME - 1} of [A-Za-z0-9_.-]")
    return name


def _check_free_space(size: int, path: str = SHM_DIR) -> None:
    try:
        st = os.statvfs(path)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise OSError(errno.ENOSPC,
                      f"{path} has {free} bytes free but the segment needs {size}; "
                      f"enlarge {path} (e.g. docker --shm-size) or use backend='memfd'")


class Segment:
    """A mapped shared-memory segment.

    ``close()`` unmaps this process's view (per handle); ``unlink()`` removes the
    name (once, by the owner).  Class-level defaults let a half-built object be
    closed safely."""

    name: str | None = None
    size: int = 0
    backend: str = "shm"
    _owner_pid: int = 0
    _mmap: mmap.mmap | None = None
    _fd: int = -1

    def __init__(self, *, _mmap_obj, size, name, backend, owner, fd=-1):
        self._mmap = _mmap_obj
        self.size = size
        self.name = name
        self.backend = backend
        self._owner_pid = os.getpid() if owner else 0
        self._fd = fd

    @property
    def owner(self) -> bool:
        """True in the process that created the segment (not in its forked
        children, which inherit the object but must never unlink it)."""
        return self._owner_pid == os.getpid()

    # --- construction -------------------------------------------------------
    @classmethod
    def create(cls, size: int, *, name: str | None = None, mode: int = 0o600,
               backend: str = "shm", reserve: int | None = None) -> "Segment":
        """Create a new zero-filled segment of `size` bytes, the first
        `reserve` of them (default: all) committed now."""
        if size <= 0:
            raise ValueError("segment size must be positive")
        reserve = size if reserve is None else max(0, min(size, reserve))
        if backend == "memfd":
            return cls._create_memfd(size, reserve)
        if backend != "shm":
            raise ValueError(f"unknown backend {backend!r} (use 'shm' or 'memfd')")
        _check_free_space(reserve)
        explicit = name is not None
        for _ in range(100):
            nm = validate_name(name) if explicit else make_name()
            try:
                shm = posix_ipc.SharedMemory(nm, posix_ipc.O_CREX, mode=mode)
            except posix_ipc.ExistentialError:
                if explicit:
                    raise FileExistsError(errno.EEXIST, f"segment {nm} already exists") from None
                continue
            break
        else:  # pragma: no cover - 100 collisions of 64 random bits
            raise FileExistsError(errno.EEXIST, "could not find a free segment name")
        try:
            fd = shm.fd
            os.ftruncate(fd, size)
            # Reserve the pages now: ENOSPC here instead of SIGBUS on first touch.
            if reserve:
                os.posix_fallocate(fd, 0, reserve)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(nm)
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                raise OSError(e.errno, f"no room in {SHM_DIR} for a {reserve}-byte segment: {e.strerror}") from e
            raise
        shm.close_fd()
        return cls(_mmap_obj=m, size=size, name=nm, backend="shm", owner=True)

    @classmethod
    def _create_memfd(cls, size: int, reserve: int) -> "Segment":
        fd = os.memfd_create("vringipc", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            if reserve:
                os.posix_fallocate(fd, 0, reserve)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(_mmap_obj=m, size=size, name=None, backend="memfd", owner=True, fd=fd)

    @classmethod
    def attach(cls, name: str, *, expect_size: int | None = None) -> "Segment":
        """Map an existing named segment (never unlinks it)."""
        validate_name(name)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(errno.ENOENT, f"no segment named {name}") from None
        except posix_ipc.PermissionsError as e:
            raise PermissionError(errno.EACCES, f"not allowed to open segment {name}: {e}") from None
        try:
            size = os.fstat(shm.fd).st_size
            if size == 0:
                raise ValueError(f"segment {name} is empty (0 bytes): not an initialised segment")
            if expect_size is not None and size != expect_size:
                raise ValueError(f"segment {name} has {size} bytes, expected {expect_size}")
            m = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            shm.close_fd()
        return cls(_mmap_obj=m, size=size, name=name, backend="shm", owner=False)

    @classmethod
    def from_fd(cls, fd: int, *, require_sealed: bool = True) -> "Segment":
        """Map a memfd received from another process (takes ownership of fd).

        With require_sealed, refuse a memfd whose size could still change: the
        peer that sent it could otherwise truncate it and make us SIGBUS."""
        try:
            if require_sealed:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != (
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW):
                    raise PermissionError(errno.EPERM, "memfd is not sealed against resizing")
            size = os.fstat(fd).st_size
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(_mmap_obj=m, size=size, name=None, backend="memfd", owner=False, fd=fd)

    # --- use -------------------------------------------------------------------
    @property
    def buf(self) -> mmap.mmap:
        if self._mmap is None:
            raise ValueError("segment is closed")
        return self._mmap

    @property
    def fd(self) -> int:
        """The memfd (memfd backend only; -1 otherwise)."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def close(self) -> None:
        """Unmap this handle.  If views of it are still alive the unmapping is
        left to the last of them, so no view ever dangles."""
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # Views of the segment are still alive somewhere (a message
                # view, a NumPy array): leave the mapping to them; it is
                # unmapped when the last one goes.
                pass
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        """Remove the name (shm backend); the memory lives on until every
        mapping is gone.  Idempotent."""
        if self.backend == "shm" and self.name is not None:
            try:
                posix_ipc.unlink_shared_memory(self.name)
            except posix_ipc.ExistentialError:
                pass

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            if self.owner:
                self.unlink()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.size} bytes"
        return f"<Segment {self.backend} {self.name or f'fd={self._fd}'} {state}{' owner' if self.owner else ''}>"
