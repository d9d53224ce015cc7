"""VringHost / VringDriver lifecycle (issue 8): close() while a thread sleeps in
wait() / wait_used(), and a sleeper whose suppression word a peer overwrote
with "never notify" (it must wake anyway: each 100 ms sleep slice re-arms).

Crash-prone cases run in a forked child; no assertion depends on timing."""

from __future__ import annotations

import struct

import pytest

from vringipc.ring import SharedRing

from forking import wait_for, words
from test_lifecycle_channel import WAIT, Blocked, _in_child

NUM = 8
NO_NOTIFY = 1          # VRING_USED_F_NO_NOTIFY / VRING_AVAIL_F_NO_INTERRUPT


def _ring(event_idx: bool) -> SharedRing:
    return SharedRing.create(num=NUM, slot_size=64, indirect=False, event_idx=event_idx,
                             backend="memfd")


# --- close while blocked ------------------------------------------------------------------

def _close_while_waiting(side: str, closer: str) -> None:
    ring = _ring(True)
    host = ring.host()
    drv = ring.driver(slot_size=64)
    if side == "host":
        b = Blocked(lambda: host.wait(timeout=None, spin=0))
        target = host
    else:
        drv.add_slot(b"in flight")
        b = Blocked(lambda: drv.wait_used(timeout=None, spin=0))
        target = drv
    if closer == "side":
        target.close()
    else:
        ring.close()                          # the eventfds and the mapping too
    kind, exc = b.outcome()
    if kind != "raised" or not isinstance(exc, ValueError) or "closed" not in str(exc):
        raise AssertionError(f"expected ValueError('... closed'), got {kind} {exc!r}")
    with pytest.raises(ValueError):
        target.wait(0) if side == "host" else target.wait_used(0)
    ring.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("closer", ["side", "ring"])
@pytest.mark.parametrize("side", ["host", "driver"])
def test_close_wakes_waiter(side, closer):
    _in_child(_close_while_waiting, side, closer)


# --- a peer overwrites the suppression word while we sleep ------------------------------------

class Word:
    """A u16 of the ring in shared memory."""

    def __init__(self, ring: SharedRing, off: int):
        self.buf = ring.segment.buf
        self.off = off

    def get(self) -> int:
        return struct.unpack_from("<H", self.buf, self.off)[0]

    def set(self, v: int) -> None:
        # one 16-bit store (struct.pack_into zeroes the field first, which
        # the peer reading it concurrently could see)
        words(self.buf, "H")[self.off // 2] = v & 0xFFFF


def _host_word(ring, event_idx):
    r = ring.layout.rings[0]
    # EVENT_IDX: avail_event after the used ring; else used->flags
    return Word(ring, r.used_off + 4 + 8 * r.num if event_idx else r.used_off)


def _driver_word(ring, event_idx):
    r = ring.layout.rings[0]
    # EVENT_IDX: used_event after the avail ring; else avail->flags
    return Word(ring, r.avail_off + 4 + 2 * r.num if event_idx else r.avail_off)


def _sleep_armed(word: Word, event_idx: bool, call):
    """Start call() in a thread once word holds a sentinel; return (blocked,
    armed value) once the sleeper has armed (rewritten the word) and sleeps."""
    sentinel = 0xBEEF if event_idx else NO_NOTIFY
    word.set(sentinel)
    b = Blocked(call)
    wait_for(lambda: word.get() != sentinel, "the waiter to arm its notification word")
    return b, word.get()


def _never(armed: int, event_idx: bool) -> int:
    # EVENT_IDX: an event index half the ring space away is never crossed by
    # the next index update; otherwise the NO_NOTIFY / NO_INTERRUPT flag
    return (armed + 0x8000) & 0xFFFF if event_idx else NO_NOTIFY


@pytest.mark.timeout(60)
@pytest.mark.parametrize("event_idx", [True, False])
def test_host_wait_forever_survives_overwritten_suppression_word(event_idx):
    with _ring(event_idx) as ring:
        host = ring.host()
        drv = ring.driver(slot_size=64)
        word = _host_word(ring, event_idx)
        for attempt in range(5):
            b, armed = _sleep_armed(word, event_idx, lambda: host.wait(timeout=None, spin=0))
            word.set(_never(armed, event_idx))          # the peer: "never kick me"
            drv.add_slot(b"m%d" % attempt)              # publish ...
            kicked = drv.kick()                         # ... suppressed
            word.set(armed)                             # and restore, without kicking
            assert b.outcome(WAIT) == ("returned", True)
            assert host.getdesc(*_iovs()) is not None
            if not kicked:
                break                                   # woken by the slice re-arm alone
            # (the waiter re-armed between our write and the kick: try again)
        else:
            pytest.fail("could never suppress the kick")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("event_idx", [True, False])
def test_driver_wait_used_forever_survives_overwritten_suppression_word(event_idx):
    with _ring(event_idx) as ring:
        host = ring.host()
        drv = ring.driver(slot_size=64)
        word = _driver_word(ring, event_idx)
        for attempt in range(5):
            drv.add_slot(b"m%d" % attempt)
            drv.kick()
            riov, wiov = _iovs()
            head = host.getdesc(riov, wiov)
            assert head is not None
            b, armed = _sleep_armed(word, event_idx,
                                    lambda: drv.wait_used(timeout=None, spin=0))
            word.set(_never(armed, event_idx))          # the peer: "never call me"
            host.complete(head, 0)                      # publish ...
            notified = host.notify()                    # ... suppressed
            word.set(armed)                             # and restore, without calling
            assert b.outcome(WAIT) == ("returned", True)
            assert drv.get_buf() is not None
            if not notified:
                break
        else:
            pytest.fail("could never suppress the call")


def _iovs():
    from vringipc._ring import Iov
    return Iov(), Iov()


# --- fork: a child's close() is not the parent's ----------------------------------------------

def _close_in_child(ring, host):
    host.close()
    ring.close()


@pytest.mark.timeout(60)
def test_child_closing_an_inherited_side_does_not_wake_the_parent():
    # The close() wake-up eventfd is per process: a forked child that closes
    # its copy of the ring must not leave the parent's waits waking at once
    # (they would spin: that fd is never drained).
    with _ring(True) as ring:
        host = ring.host()
        assert host.wait(timeout=0.01, spin=0) is False     # creates the wake-up fd
        from forking import Forked
        with Forked(_close_in_child, ring, host) as p:
            assert p.join() == 0
        checks = []
        assert host.wait(timeout=0.3, spin=0, check=lambda: checks.append(1),
                         check_interval=0.1) is False
        # a sleep brings ~1 check per check_interval; a spurious wake-up one each
        assert len(checks) < 20, f"{len(checks)} wake-ups in 0.3 s: the wait spins"
