"""The security model of docs/SECURITY.md, tested end to end.

* Segments are created 0600 (owner only) unless `mode` says otherwise.
* Generated names carry 48 random bits (secrets) and creation is exclusive
  (O_CREAT|O_EXCL): a name squatted in advance, or a symlink planted under it,
  makes create fail or pick another name, never open the squatter's object.
* Another user cannot open a segment (run as uid 65534 in a forked child,
  when the tests run as root).
* Attach validates every header field and the segment size: a truncated,
  oversized or corrupted header is refused with LayoutError naming the field,
  through SharedRing.attach and Channel.attach.
* A consumer facing an untrusted producer uses the sealed memfd backend (an
  unsealed memfd is refused; a named shm segment can be truncated under it,
  which is a SIGBUS) and Channel's bytes API, which never unpickles.  Queue
  unpickles, and unpickling runs code: never use Queue across a trust boundary.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import json
import os
import pickle
import re
import signal
import socket
import struct
import time
import traceback

import pytest

import vringipc
from vringipc.channel import _state_bytes
from vringipc import Channel, Queue
from vringipc import layout as L
from vringipc import segment as segmod
from vringipc.ring import SharedRing, _rebuild_shared_ring, make_eventfd
from vringipc.segment import SHM_DIR, Segment, make_name, name_pid
from vringipc.testing import unique_name

WAIT = 10.0
NOBODY = 65534


def shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, name.lstrip("/"))


def mode_of(name: str) -> int:
    return os.stat(shm_path(name)).st_mode & 0o777


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def run_child(fn, *args, uid: int | None = None, timeout: float = WAIT):
    """Run fn(*args) in a forked child (as `uid` if given); return
    ("ok", result) / ("raised", exception type name, message) / ("signal", n)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # pragma: no cover - child
        os.close(r)
        out = ("raised", "?", "")
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            out = ("ok", fn(*args))
        except BaseException as e:
            out = ("raised", type(e).__name__, str(e))
        finally:
            with contextlib.suppress(Exception):
                os.write(w, pickle.dumps(out))
            os._exit(0)
    os.close(w)
    try:
        end = time.monotonic() + timeout
        while True:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > end:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("child hung")
            time.sleep(0.005)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
    if os.WIFSIGNALED(st):
        return ("signal", os.WTERMSIG(st))
    return pickle.loads(data)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")


# =====================================================================================
# Permissions: 0600 by default, `mode` honoured
# =====================================================================================

def _make(kind: str, **kw):
    if kind == "segment":
        return Segment.create(8192, **kw)
    if kind == "ring":
        return SharedRing.create(num=8, slot_size=64, **kw)
    if kind == "channel":
        return Channel(4096, backend="shm", **kw)
    if kind == "queue":
        return Queue(capacity=1 << 16, backend="shm", **kw)
    raise AssertionError(kind)


def _name(obj) -> str:
    if isinstance(obj, Queue):
        return obj._ring.name
    return obj.name


def _close(obj) -> None:
    if isinstance(obj, Segment):
        obj.close()
        obj.unlink()
    elif isinstance(obj, SharedRing):
        obj.close()
        obj.unlink()
    else:
        obj.close()


KINDS = ["segment", "ring", "channel", "queue"]


@pytest.mark.parametrize("kind", KINDS)
def test_default_mode_is_0600(kind):
    with umask(0):                                 # not thanks to the umask
        obj = _make(kind)
    try:
        assert mode_of(_name(obj)) == 0o600
        assert os.stat(shm_path(_name(obj))).st_uid == os.geteuid()
    finally:
        _close(obj)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", [0o640, 0o400, 0o604])
def test_mode_option(kind, mode):
    with umask(0o022):
        obj = _make(kind, mode=mode)
    try:
        assert mode_of(_name(obj)) == mode
    finally:
        _close(obj)


def test_mode_is_restricted_further_by_umask():
    # shm_open applies the umask, like open(2): documented in SECURITY.md.
    with umask(0o027):
        seg = Segment.create(4096, mode=0o666)
    try:
        assert mode_of(seg.name) == 0o640
    finally:
        _close(seg)


# =====================================================================================
# Names: unguessable, creation exclusive
# =====================================================================================

NAME_RE = re.compile(r"/vr_([0-9a-f]{1,8})_([0-9a-f]{12})")


def test_generated_names_format_and_randomness():
    names = [make_name() for _ in range(2000)]
    rand = []
    for n in names:
        m = NAME_RE.fullmatch(n)
        assert m, n
        assert int(m.group(1), 16) == os.getpid() == name_pid(n)
        assert len(n) <= segmod.MAX_NAME
        rand.append(int(m.group(2), 16))
    assert len(set(rand)) == len(rand)
    # 48 bits: every one of the 48 bit positions varies across the sample.
    varying = 0
    for b in range(48):
        ones = sum((x >> b) & 1 for x in rand)
        if 700 < ones < 1300:
            varying += 1
    assert varying == 48
    assert max(rand) < 1 << 48


def test_generated_names_come_from_secrets(monkeypatch):
    calls = []
    real = segmod.secrets.token_hex

    def spy(n):
        calls.append(n)
        return real(n)
    monkeypatch.setattr(segmod.secrets, "token_hex", spy)
    with Channel(4096, backend="shm") as ch:
        assert NAME_RE.fullmatch(ch.name)
    assert calls == [6]                            # 6 bytes = 48 bits from the CSPRNG


def test_objects_get_generated_names():
    for kind in KINDS:
        obj = _make(kind)
        try:
            assert NAME_RE.fullmatch(_name(obj)), (kind, _name(obj))
        finally:
            _close(obj)


@pytest.mark.parametrize("kind", ["segment", "ring", "channel", "queue"])
def test_create_is_exclusive_existing_file(kind):
    name = unique_name("sq")
    path = shm_path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    try:
        os.write(fd, b"squatter's bytes")
        os.fchmod(fd, 0o666)
        with pytest.raises(FileExistsError):
            if kind == "segment":
                Segment.create(8192, name=name)
            elif kind == "ring":
                SharedRing.create(num=8, slot_size=64, name=name)
            elif kind == "channel":
                Channel(4096, backend="shm", name=name)
            else:
                Queue(capacity=1 << 16, backend="shm", name=name)
        # untouched: not truncated, not re-moded, not unlinked
        st = os.stat(path)
        assert st.st_size == 16 and st.st_mode & 0o777 == 0o666
        with open(path, "rb") as f:
            assert f.read() == b"squatter's bytes"
    finally:
        os.close(fd)
        os.unlink(path)


def test_create_is_exclusive_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch")
    victim.chmod(0o644)
    name = unique_name("ln")
    os.symlink(victim, shm_path(name))
    try:
        with pytest.raises(FileExistsError):
            Channel(4096, backend="shm", name=name)
        # not followed: the target is neither truncated, resized, nor re-moded
        assert victim.read_bytes() == b"do not touch"
        assert victim.stat().st_mode & 0o777 == 0o644
        assert os.path.islink(shm_path(name))
    finally:
        os.unlink(shm_path(name))


def test_generated_name_squatted_in_advance_is_skipped(monkeypatch):
    # An attacker who guessed (or raced) the next generated name and created
    # it first: create notices (O_EXCL) and takes another name.
    taken = make_name()
    fd = os.open(shm_path(taken), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    os.close(fd)
    names = iter([taken, make_name()])
    monkeypatch.setattr(segmod, "make_name", lambda: next(names))
    try:
        with Channel(4096, backend="shm") as ch:
            assert ch.name != taken
            assert mode_of(ch.name) == 0o600
        assert os.stat(shm_path(taken)).st_size == 0     # the squatter's object untouched
    finally:
        os.unlink(shm_path(taken))


# =====================================================================================
# Another user
# =====================================================================================

def _try_segment_attach(name):
    Segment.attach(name).close()
    return "attached"


def _try_ring_attach(name):
    SharedRing.attach(name).close()
    return "attached"


def _try_channel_attach(name):
    Channel.attach(name).close()
    return "attached"


def _try_read_file(path):
    with open(path, "rb") as f:
        f.read(1)
    return "read"


@needs_root
@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", [_try_segment_attach, _try_ring_attach, _try_channel_attach],
                         ids=["Segment.attach", "SharedRing.attach", "Channel.attach"])
def test_other_user_cannot_open(how):
    with Channel(4096, backend="shm") as ch:
        out = run_child(how, ch.name, uid=NOBODY)
        assert out[:2] == ("raised", "PermissionError"), out
        assert ch.name in out[2]
        out = run_child(_try_read_file, shm_path(ch.name), uid=NOBODY)
        assert out[:2] == ("raised", "PermissionError"), out


@needs_root
@pytest.mark.timeout(30)
def test_other_user_can_open_when_mode_allows_it():
    # Positive control: the uid switch works, and `mode` is what decides.
    with umask(0):
        ch = Channel(4096, backend="shm", mode=0o666)
    try:
        assert run_child(_try_channel_attach, ch.name, uid=NOBODY) == ("ok", "attached")
    finally:
        ch.close()


@needs_root
@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", [0o640, 0o644])
def test_other_user_cannot_open_group_or_world_readable_for_write(mode):
    # Attaching maps read-write: read permission alone is not enough.
    with umask(0):
        ch = Channel(4096, backend="shm", mode=mode)
    try:
        out = run_child(_try_channel_attach, ch.name, uid=NOBODY)
        assert out[:2] == ("raised", "PermissionError"), out
    finally:
        ch.close()


def _try_open_proc_fd(pid, fd):
    os.close(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR))
    return "opened"


@needs_root
@pytest.mark.timeout(30)
def test_other_user_cannot_reach_a_memfd_segment():
    with Channel(4096) as ch:                      # memfd: no name at all
        assert ch.name is None
        fd = ch._ring.segment.fd
        out = run_child(_try_open_proc_fd, os.getpid(), fd, uid=NOBODY)
        assert out[:2] == ("raised", "PermissionError"), out
        # same user, for comparison: reachable (the trust boundary is the uid)
        assert run_child(_try_open_proc_fd, os.getpid(), fd) == ("ok", "opened")


# =====================================================================================
# Attach validates the header and the size
# =====================================================================================

def _hdr_field(off, fmt):
    return off, struct.Struct(fmt)


R0 = L.RING_TABLE_OFF


def _corruptions(lay: L.SegmentLayout):
    r = lay.rings[0]
    return {
        # field: (offset, format, bad value, words the error must contain)
        "magic": (0x000, "<8s", b"NOTVRING", "magic"),
        "version_major": (0x008, "<H", 2, "version"),
        "hdr_size": (0x00C, "<I", 8192, "hdr_size"),
        "seg_size": (0x010, "<Q", lay.seg_size + 4096, "header says"),
        "features_unknown": (0x018, "<Q", lay.features | 1 << 40, "feature"),
        "features_no_v1": (0x018, "<Q", lay.features & ~L.F_VERSION_1, "feature"),
        "nrings_0": (0x024, "<I", 0, "nrings"),
        "nrings_5": (0x024, "<I", 5, "nrings"),
        "addr_mode": (0x028, "<I", 1, "addr_mode"),
        "arena_off": (0x030, "<Q", lay.arena_off + 64, "arena"),
        "arena_size": (0x038, "<Q", lay.seg_size, "arena"),
        "max_msg_0": (0x040, "<Q", 0, "max_msg"),
        "max_msg_big": (0x040, "<Q", 1 << 33, "max_msg"),
        "ring_num": (R0 + 0, "<H", 3, "ring 0"),
        "ring_align": (R0 + 2, "<H", 64, "align"),
        "ring_max_iov": (R0 + 4, "<I", 0, "max_iov"),
        "ring_desc_off": (R0 + 8, "<Q", r.desc_off + 16, "offsets"),
        "ring_avail_off": (R0 + 16, "<Q", r.avail_off - 2, "offsets"),
        "ring_used_off": (R0 + 24, "<Q", r.used_off + 4096, "offsets"),
        "ring_bytes": (R0 + 32, "<Q", r.ring_bytes + 1, "offsets"),
        "ring_win_off": (R0 + 40, "<Q", lay.arena_off - 4096, "window"),
        "ring_win_size": (R0 + 48, "<Q", lay.arena_size + 64, "window"),
        "ring_win_size_0": (R0 + 48, "<Q", 0, "window"),
    }


CORRUPTIONS = list(_corruptions(L.SegmentLayout.build([8], [4096])))


def _attach(how, name):
    if how == "ring":
        return SharedRing.attach(name)
    return Channel.attach(name)


@pytest.mark.parametrize("how", ["ring", "channel"])
@pytest.mark.parametrize("field", CORRUPTIONS)
def test_attach_refuses_corrupted_header_field(how, field):
    with Channel(8192, num=8, backend="shm") as ch:
        lay = ch._ring.layout
        off, fmt, bad, words = _corruptions(lay)[field]
        buf = ch._ring.segment.buf
        struct.pack_into(fmt, buf, off, bad)
        with pytest.raises(L.LayoutError) as ei:
            _attach(how, ch.name)
        assert isinstance(ei.value, ValueError)
        assert words in str(ei.value), str(ei.value)


@pytest.mark.parametrize("how", ["ring", "channel"])
def test_attach_accepts_the_untouched_header(how):
    # control for the test above
    with Channel(8192, num=8, backend="shm") as ch:
        other = _attach(how, ch.name)
        other.close()


@pytest.mark.parametrize("how", ["ring", "channel"])
@pytest.mark.parametrize("change", ["truncated", "oversized", "below_header", "empty"])
def test_attach_refuses_wrong_segment_size(how, change):
    with Channel(8192, num=8, backend="shm") as ch:
        size = ch._ring.segment.size
        new = {"truncated": size - 4096, "oversized": size + 4096,
               "below_header": 100, "empty": 0}[change]
        # Nobody touches the mapping beyond the new size from here on.
        os.truncate(shm_path(ch.name), new)
        with pytest.raises(ValueError) as ei:
            _attach(how, ch.name)
        if change in ("truncated", "oversized"):
            assert isinstance(ei.value, L.LayoutError)
            assert f"header says {size} bytes but the segment has {new}" in str(ei.value)
        elif change == "below_header":
            assert isinstance(ei.value, L.LayoutError) and "smaller than the header" in str(ei.value)
        else:
            assert "0 bytes" in str(ei.value)


def test_attach_refuses_a_foreign_object():
    name = unique_name("fo")
    fd = os.open(shm_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.write(fd, os.urandom(8192))
        with pytest.raises(L.LayoutError, match="magic"):
            Channel.attach(name)
        with pytest.raises(L.LayoutError, match="magic"):
            SharedRing.attach(name)
    finally:
        os.close(fd)
        os.unlink(shm_path(name))


def test_channel_attach_refuses_another_kind_of_segment():
    with SharedRing.create(num=8, slot_size=64) as ring:      # a raw ring, app_kind 0
        with pytest.raises(ValueError, match="not a vringipc Channel"):
            Channel.attach(ring.name)
    q = Queue(capacity=1 << 16, backend="shm")
    try:
        with pytest.raises(ValueError, match="not a vringipc Channel"):
            Channel.attach(q._ring.name)
    finally:
        q.close()


def test_attach_refuses_unknown_app_kind():
    with SharedRing.create(num=8, slot_size=64) as ring:
        struct.pack_into("<I", ring.segment.buf, 0x02C, 99)
        with pytest.raises(L.LayoutError):
            SharedRing.attach(ring.name).close()


def test_header_is_read_once_into_a_private_copy():
    # A peer rewriting the header after attach changes nothing for us.
    with Channel(8192, num=8, backend="shm") as ch:
        other = Channel.attach(ch.name)
        try:
            before = other._ring.layout
            ch._ring.segment.buf[:L.HDR_SIZE] = b"\xa5" * L.HDR_SIZE
            assert other._ring.layout == before and other.capacity == before.rings[0].win_size - _state_bytes(before.rings[0].num)
        finally:
            other.close()


# =====================================================================================
# Untrusted producer: sealed memfd, bytes API
# =====================================================================================

class _Fd:
    """Stands in for multiprocessing's DupFd when rebuilding a SharedRing."""

    def __init__(self, fd):
        self.fd = fd

    def detach(self):
        return self.fd


def test_rebuild_refuses_unsealed_memfd():
    # The path a Channel/Queue takes into a spawn/forkserver child: a memfd
    # that could still be resized under us is refused.
    with SharedRing.create(num=8, slot_size=64, backend="memfd") as ring:
        size = ring.segment.size
        fd = os.memfd_create("fake", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        os.pwrite(fd, bytes(ring.segment.buf[:L.HDR_SIZE]), 0)
        k, c = make_eventfd(), make_eventfd()
        try:
            with pytest.raises(PermissionError, match="sealed"):
                _rebuild_shared_ring(("memfd", _Fd(fd)), [_Fd(k)], [_Fd(c)])
        finally:
            os.close(k)
            os.close(c)


def test_memfd_segment_cannot_be_resized_by_the_producer():
    with Channel(4096) as ch:
        fd = ch._ring.segment.fd
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        for size in (0, 4096, ch._ring.segment.size * 2):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        with pytest.raises(PermissionError):      # and the seals cannot be taken off/added to
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)


def _consumer_of_shm(name, gate_r, ready_w):
    ch = Channel.attach(name)
    os.write(ready_w, b"r")
    os.read(gate_r, 1)                           # the producer truncates meanwhile
    try:
        ch.recv_nowait()
    except vringipc.Empty:
        pass
    return "survived"


@pytest.mark.timeout(30)
def test_shm_segment_truncated_under_a_consumer_is_a_sigbus():
    # Why an untrusted producer must hand over a sealed memfd: anyone with
    # write access to a named segment can shrink it, and the consumer's next
    # access to the vanished pages is SIGBUS (a crash, not an exception).
    ch = Channel(8192, num=8, backend="shm")
    r, w = os.pipe()
    rr, rw = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:                               # pragma: no cover - child
            code = 0
            # The SIGBUS is the expected outcome: no "Fatal Python error" and
            # stack dump from faulthandler (PYTHONFAULTHANDLER=1 in conftest).
            faulthandler.disable()
            try:
                _consumer_of_shm(ch.name, r, rw)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        assert os.read(rr, 1) == b"r"              # attached and validated
        os.truncate(shm_path(ch.name), 0)          # the hostile producer
        os.write(w, b"x")
        _, st = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGBUS
    finally:
        for fd in (r, w, rr, rw):
            os.close(fd)
        ch.close()                                 # touches no page: safe after the truncate


def _untrusted_producer(sock, sealed: bool, payloads):
    """A producer in another process hands its segment over as an fd
    (SCM_RIGHTS), then sends.  With sealed=False it forges an unsealed copy."""
    ch = Channel(8192, num=8)
    fd = ch._ring.segment.fd
    if not sealed:
        fake = os.memfd_create("forged", os.MFD_CLOEXEC)
        os.ftruncate(fake, ch._ring.segment.size)
        os.pwrite(fake, bytes(ch._ring.segment.buf[:]), 0)
        fd = fake
    socket.send_fds(sock, [b"ring"], [fd, ch._ring.kick_fds[0], ch._ring.call_fds[0]])
    if sock.recv(1) != b"g":
        return "refused"
    for p in payloads:
        ch.send(p, timeout=WAIT)
    sock.recv(1)
    return "sent"


def _consumer_from_fds(sock):
    """The recipe of SECURITY.md for a consumer that does not trust its producer."""
    _, fds, _, _ = socket.recv_fds(sock, 16, 3)
    seg_fd, kick, call = fds
    try:
        seg = Segment.from_fd(seg_fd)              # refuses an unsealed memfd
    except PermissionError:
        os.close(kick)
        os.close(call)
        raise
    lay = L.parse_header(seg.buf)                  # validates every field and the size
    ring = SharedRing(seg, lay, [kick], [call])
    return Channel(_ring=ring)                     # refuses a non-Channel segment


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sealed", [True, False])
def test_untrusted_producer_over_a_unix_socket(sealed):
    evil = pickle.dumps(_Evil("/nonexistent"), 5)
    payloads = [b"plain bytes", evil, b"\x00" * 5000]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:                                   # pragma: no cover - child
        code = 0
        try:
            b.close()
            _untrusted_producer(a, sealed, payloads)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    a.close()
    try:
        if not sealed:
            with pytest.raises(PermissionError, match="sealed"):
                _consumer_from_fds(b)
            b.send(b"n")
        else:
            ch = _consumer_from_fds(b)
            b.send(b"g")
            got = [ch.recv(timeout=WAIT) for _ in payloads]
            assert got == payloads and all(type(g) is bytes for g in got)
            b.send(b"d")
            ch.close()
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
    finally:
        b.close()
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# =====================================================================================
# The pickle trust boundary
# =====================================================================================

class _Evil:
    """Unpickling this runs code: it creates the file at `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def test_queue_get_runs_the_producers_code(tmp_path):
    # The trust boundary, shown: whoever can put into a Queue runs code in
    # every process that gets from it.  Never use a Queue across a trust boundary.
    marker = tmp_path / "pwned"
    q = Queue(capacity=1 << 16)
    try:
        q.put(_Evil(str(marker)))
        assert not marker.exists()                 # put does not run it...
        q.get(timeout=WAIT)
        assert marker.read_text() == "pwned"       # ...get does
    finally:
        q.close()


def test_queue_get_runs_code_written_by_a_hostile_peer(tmp_path):
    # Same with bytes written straight into the segment (no put() involved).
    marker = tmp_path / "pwned"
    q = Queue(capacity=1 << 16)
    try:
        q._core.put_msg(0, pickle.dumps(_Evil(str(marker)), 5))
        q.get(timeout=WAIT)
        assert marker.exists()
    finally:
        q.close()


@pytest.mark.parametrize("api", ["recv", "recv_into", "recv_view", "recv_many"])
def test_channel_returns_the_same_malicious_bytes_without_running_them(tmp_path, api):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(str(marker)), 5)
    with Channel(8192) as ch:
        ch.send(evil)
        if api == "recv":
            got = ch.recv(timeout=WAIT)
        elif api == "recv_into":
            buf = bytearray(len(evil) + 10)
            got = bytes(buf[:ch.recv_into(buf, timeout=WAIT)])
        elif api == "recv_view":
            with ch.recv_view(timeout=WAIT) as v:
                got = bytes(v)
        else:
            (got,) = ch.recv_many(timeout=WAIT)
    assert got == evil
    assert not marker.exists()


def test_queue_custom_loads_is_never_bypassed(tmp_path):
    marker = tmp_path / "pwned"
    q = Queue(capacity=1 << 16, dumps=lambda o: json.dumps(o).encode(),
              loads=lambda b: json.loads(bytes(b)))
    try:
        q.put({"k": [1, 2]})
        assert q.get(timeout=WAIT) == {"k": [1, 2]}
        q._core.put_msg(0, pickle.dumps(_Evil(str(marker)), 5))  # hostile peer
        with contextlib.suppress(Exception):
            q.get(timeout=WAIT)
        assert not marker.exists(), "a custom-loads queue unpickled a message"
    finally:
        q.close()
