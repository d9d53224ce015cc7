"""Channel memory follows the data (issue 9): creation commits a few pages,
the producer commits 1 MiB chunks as messages occupy them (MemoryError when
it cannot) and gives them back when the channel drains; a kept MessageView
pins only its own bytes, and views that use up the room end a blocked send
with an error instead of a hang.

Committed memory is measured on the channel's own memfd (allocated blocks),
not with machine-wide counters that other processes disturb."""

from __future__ import annotations

import collections
import errno
import os
import time

import pytest

from forking import Forked, Gate
from vringipc import Channel
from vringipc.errors import ChannelClosed, Empty, Full, PeerDead

MiB = 1 << 20
WAIT = 20.0


def committed(ch: Channel) -> int:
    """Bytes of the channel's segment backed by memory now."""
    return os.fstat(ch._ring.segment.fd).st_blocks * 512


def test_creating_a_large_channel_commits_a_few_pages():
    for cap in (64 * MiB, 1 << 30, 3 << 30):
        with Channel(capacity=cap) as ch:
            assert ch.capacity == cap
            assert committed(ch) <= 128 * 1024, (cap, committed(ch))


def test_default_capacity_is_large_and_free():
    with Channel() as ch:
        assert ch.capacity >= 1 << 30
        assert committed(ch) <= 128 * 1024


def test_shm_backend_commits_a_few_pages():
    with Channel(capacity=1 << 30, backend="shm") as ch:
        st = os.stat("/dev/shm" + ch.name)
        assert st.st_blocks * 512 <= 128 * 1024


def test_burst_grows_and_draining_gives_it_back():
    with Channel(capacity=256 * MiB) as ch:
        base = committed(ch)
        frame = os.urandom(MiB - 64)
        for _ in range(100):                     # 100 MiB in flight
            ch.send(frame)
        assert committed(ch) >= base + 100 * MiB
        for _ in range(100):
            assert ch.recv() == frame
        # the next send finds the channel drained: the chunks past the first
        # few go back (trim() does it without sending)
        ch.send(b"small")
        assert ch.recv() == b"small"
        assert committed(ch) <= base + 5 * MiB
        assert ch.trim() <= 4 * MiB


def test_trim_gives_back_after_the_consumer_drained():
    with Channel(capacity=64 * MiB) as ch:
        for _ in range(32):
            ch.send(bytes(MiB))
        assert committed(ch) >= 32 * MiB
        assert len(ch.recv_many()) == 32
        assert ch.trim() <= 4 * MiB
        assert committed(ch) <= 5 * MiB


def test_memory_is_reserved_before_it_is_written():
    # the real MADV_POPULATE_WRITE path: a loan's bytes are committed when it
    # is handed out, before anything writes into them
    with Channel(capacity=64 * MiB) as ch:
        before = committed(ch)
        ln = ch.loan(8 * MiB)
        assert committed(ch) >= before + 8 * MiB
        ln.cancel()


def test_steady_stream_stays_in_the_low_chunks():
    with Channel(capacity=1 << 30) as ch:
        frame = bytes(300_000)
        ch.send(frame)
        for _ in range(500):                    # two in flight at a time
            ch.send(frame)
            assert len(ch.recv()) == len(frame)
        assert ch.recv() == frame
        assert committed(ch) <= 5 * MiB


def test_failed_reservation_raises_memory_error():
    with Channel(capacity=64 * MiB) as ch:
        ch.send(b"x")                            # becomes the producer; chunk 0 reserved
        assert ch.recv() == b"x"
        ch._tx.fail_reserve = errno.ENOMEM       # test hook: populating a new chunk fails
        with pytest.raises(MemoryError, match="cannot commit shared memory"):
            ch.send(bytes(3 * MiB))
        with pytest.raises(MemoryError):
            ch.loan(2 * MiB, block=False)
        assert ch._tx.in_flight == 0             # nothing half-allocated
        ch.send(b"fits in chunk 0")              # reserved already: no new chunk needed
        assert ch.recv() == b"fits in chunk 0"
        ch._tx.fail_reserve = 0
        ch.send(bytes(3 * MiB))
        assert len(ch.recv()) == 3 * MiB


def _burst_then_exit(ch, n, gate):
    for i in range(n):
        ch.send(bytes([i]) * MiB)
    gate.set()


@pytest.mark.timeout(60)
def test_takeover_gives_back_what_the_dead_producer_committed():
    with Channel(capacity=64 * MiB) as ch:
        gate = Gate()
        with Forked(_burst_then_exit, ch, 24, gate) as p:
            gate.wait()
            assert p.join() == 0
        assert committed(ch) >= 24 * MiB
        for i in range(24):
            assert ch.recv(timeout=WAIT) == bytes([i]) * MiB
        with pytest.raises(PeerDead):
            ch.recv(timeout=WAIT)
        # this process takes over as producer: it does not know what the
        # dead one committed, and gives back everything past the first chunks
        ch.send(b"mine")
        ch.trim()
        assert committed(ch) <= 5 * MiB


# --- no head-of-line stall ----------------------------------------------------------------

FRAME = 900_000


def _stream(ch, count):
    frame = bytearray(FRAME)
    for i in range(count):
        frame[:8] = frame[-8:] = i.to_bytes(8, "little")
        ch.send(frame, timeout=WAIT)


@pytest.mark.timeout(120)
def test_kept_views_do_not_stall_the_stream():
    """10,000 frames of 900 KB through a 64 MiB channel; the consumer keeps
    one view in every 100 for the next 500 frames (up to 5 held at once).
    Before, the first kept view stopped the producer ~72 frames later."""
    count = 10_000
    with Channel(capacity=64 * MiB) as ch:
        kept = collections.deque()
        with Forked(_stream, ch, count) as p:
            t0 = time.monotonic()
            for i in range(count):
                v = ch.recv_view(timeout=WAIT)
                mv = memoryview(v)
                assert int.from_bytes(mv[:8], "little") == i
                mv.release()
                if i % 100 == 0:
                    kept.append((i, v))
                    if len(kept) > 5:
                        j, old = kept.popleft()
                        m = memoryview(old)    # never overwritten while held
                        assert (int.from_bytes(m[:8], "little"), int.from_bytes(m[-8:], "little")) == (j, j)
                        m.release()
                        old.release()
                else:
                    v.release()
            elapsed = time.monotonic() - t0
            assert p.join() == 0
        for j, v in kept:
            assert int.from_bytes(memoryview(v)[-8:], "little") == j
            v.release()
        assert ch.views_outstanding == 0
    print(f"10,000 x 900 KB frames, kept views: {elapsed:.1f} s")


def _fill_until_error(ch, gate):
    frame = bytes(MiB)
    try:
        for _ in range(100):
            ch.send(frame)                       # no timeout: must not hang
    except MemoryError as e:
        msg = str(e)
        assert "held by the consumer" in msg and "MessageView" in msg, msg
        gate.set(b"M")
        return
    gate.set(b"?")


@pytest.mark.timeout(60)
def test_views_exhausting_the_space_end_the_blocked_send():
    with Channel(capacity=8 * MiB) as ch:
        gate = Gate()
        views = []
        with Forked(_fill_until_error, ch, gate) as p:
            while True:
                try:
                    views.append(ch.recv_view(timeout=WAIT))   # keeps every one
                except (PeerDead, ChannelClosed, Empty):
                    break
            assert gate.wait() == b"M"
            assert p.join() == 0
        assert 6 <= len(views) <= 8
        for v in views:
            v.release()


def test_blocked_send_timeout_names_the_held_views():
    with Channel(capacity=4 * MiB) as ch:
        ch.send(bytes(3 * MiB))
        v = ch.recv_view()
        with pytest.raises(Full, match=r"1 message\(s\) of \d+ bytes .*held by the consumer"):
            ch.send(bytes(2 * MiB), timeout=0.2)
        v.release()
        ch.send(bytes(2 * MiB), timeout=WAIT)
        assert len(ch.recv()) == 2 * MiB


def test_pending_loan_is_skipped_and_cancel_frees_it():
    with Channel(capacity=MiB) as ch:
        ln = ch.loan(200_000)                    # taken, not committed
        for i in range(40):                      # 8 MB around it
            ch.send(bytes([i]) * 200_000)
            assert ch.recv() == bytes([i]) * 200_000
        assert ch._tx.pinned[0] == 1
        ln.cancel()
        assert ch._tx.pinned == (0, 0) and ch._tx.reclaim() == 0
        ch.send(bytes(ch.capacity))              # all of it back
        assert len(ch.recv()) == ch.capacity


def test_skipped_loan_committed_late_is_delivered():
    with Channel(capacity=MiB) as ch:
        ln = ch.loan(100_000)
        for i in range(30):
            ch.send(bytes([i]) * 300_000)
            assert ch.recv() == bytes([i]) * 300_000
        memoryview(ln)[:] = b"L" * 100_000     # (the view is released at once)
        ln.commit()
        assert ch.recv() == b"L" * 100_000
        assert ch._tx.reclaim() == 0 and ch._tx.pinned == (0, 0)
