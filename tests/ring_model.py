"""A small pure-Python reference model of one split virtqueue (driver + host).

It is the oracle of tests/test_model.py and deliberately knows nothing about
the Cython code: it keeps only what the protocol says each side must remember.

The state is split three ways, because a corrupted ring invalidates only part
of it:

* driver-private: free descriptors, chains added and not reclaimed, the avail
  index, what the driver last wrote as used_event / callback state.  Shared
  memory cannot change these, so they stay exact even after corruption.
* host-private: fetches in avail order (abandon pops the newest), heads in
  flight, the used index bookkeeping of need_notify.  Also exact under
  corruption (the heads themselves are whatever the host returned).
* the link between the two (chains published but not fetched, completions
  not reclaimed, the bytes) and the notification words in shared memory:
  only meaningful while ``clean`` is True, i.e. nobody scribbled on the ring.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

U16 = 0xFFFF


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event, stated as 'event lies in [old, new) modulo 2**16'."""
    return ((event - old) & U16) < ((new - old) & U16)


@dataclass(eq=False)
class Chain:
    """One chain as the driver exposed it."""

    token: int
    readable: list           # [(offset, length)], in order
    writable: list
    data: bytes              # the readable bytes, concatenated
    ndesc: int               # ring descriptors it occupies
    region: int | None = None  # test allocator bookkeeping (None = slot chain)
    head: int | None = None
    pushed: bytes = b""      # bytes the host pushed before completing it

    @property
    def wcap(self) -> int:
        return sum(n for _, n in self.writable)


@dataclass(eq=False)
class Fetch:
    """One getdesc that consumed an avail entry (successful or InvalidDescriptor)."""

    head: int
    chain: Chain | None      # None when the ring is corrupted (unknown chain)
    wcap: int                # writable bytes the host may report (0 if the walk failed)
    pushed: bytearray = field(default_factory=bytearray)
    in_flight: bool = True


class RingModel:
    def __init__(self, num: int, event_idx: bool, ind_entries: int):
        self.num = num
        self.event_idx = event_idx
        self.ind_entries = ind_entries    # 0 = the driver has no indirect pool
        # Host-written notification words.  A fresh segment is zero and
        # set_base() does not touch them.
        self.avail_event = 0              # used->ring[num]   (EVENT_IDX)
        self.no_notify = False            # used->flags & VRING_USED_F_NO_NOTIFY
        self.reset(0)

    def reset(self, base: int) -> None:
        """Both sides set_base(base): everything forgotten, callbacks off."""
        self.clean = True
        # driver-private
        self.free = self.num
        self.outstanding: dict[int, Chain] = {}     # token -> chain
        self.avail_idx = base
        self.kicked_idx = base
        self.last_used = base
        self.cb_enabled = False
        self.used_event = (base - 1) & U16          # what disable_cb writes
        # link (valid only while clean)
        self.published: deque[Chain] = deque()      # not yet fetched, in order
        self.used: deque[tuple[Chain, int]] = deque()  # completed, not reclaimed
        # host-private
        self.fetches: list[Fetch] = []              # in avail order
        self.in_flight: dict[int, Fetch] = {}       # head -> fetch
        self.last_avail = base
        self.host_last_used = base
        self.completed = 0
        # liveness promises: a peer that said it will sleep must be woken
        self.host_waiting = False           # notify_enable said "empty"...
        self.waiting_at = base              # ...at this avail index
        self.driver_waiting = False         # enable_cb said "nothing used"...
        self.completed_since_wait = 0       # ...and this many completions since

    # --- driver ---------------------------------------------------------------
    def descs_for(self, nsegs: int) -> int:
        """Ring descriptors a chain of nsegs segments takes."""
        if self.ind_entries and 1 < nsegs <= self.ind_entries:
            return 1
        return nsegs

    def add(self, chain: Chain, head: int) -> None:
        chain.head = head
        self.free -= chain.ndesc
        self.outstanding[chain.token] = chain
        self.avail_idx = (self.avail_idx + 1) & U16
        if self.clean:
            self.published.append(chain)

    def kick_prepare(self) -> bool:
        """Expected result; updates the driver's kick bookkeeping."""
        if self.event_idx:
            kick = need_event(self.avail_event, self.avail_idx, self.kicked_idx)
        else:
            kick = not self.no_notify
        self.kicked_idx = self.avail_idx
        return kick

    def reclaim(self, token: int, length: int) -> Chain:
        """get_buf returned (token, length)."""
        chain = self.outstanding.pop(token)
        self.free += chain.ndesc
        self.last_used = (self.last_used + 1) & U16
        if self.event_idx and self.cb_enabled:
            self.used_event = self.last_used
        if self.clean:
            assert self.used.popleft() == (chain, length)
        self.driver_waiting = False
        return chain

    def enable_cb(self) -> bool:
        """Expected result of enable_cb(): True = nothing to reclaim."""
        self.cb_enabled = True
        if self.event_idx:
            self.used_event = self.last_used
        empty = not self.used
        self.driver_waiting = empty
        self.completed_since_wait = 0
        return empty

    def enable_cb_delayed(self) -> bool:
        self.cb_enabled = True
        bufs = (((self.avail_idx - self.last_used) & U16) * 3) // 4
        if self.event_idx:
            self.used_event = (self.last_used + bufs) & U16
        self.driver_waiting = False
        return len(self.used) <= bufs

    def disable_cb(self) -> None:
        self.cb_enabled = False
        if self.event_idx:
            self.used_event = (self.last_used - 1) & U16
        self.driver_waiting = False

    # --- host -----------------------------------------------------------------
    def fetch(self, head: int, chain: Chain | None, wcap: int) -> Fetch:
        f = Fetch(head, chain, wcap)
        self.fetches.append(f)
        self.in_flight[head] = f
        self.last_avail = (self.last_avail + 1) & U16
        if self.clean:
            assert self.published.popleft() is chain
        return f

    def abandonable(self) -> int:
        """Largest n for which abandon(n) is legal: newest fetches still in flight."""
        n = 0
        for f in reversed(self.fetches):
            if not f.in_flight:
                break
            n += 1
        return n

    def abandon(self, n: int) -> list[Fetch]:
        gone = self.fetches[len(self.fetches) - n:]
        del self.fetches[len(self.fetches) - n:]
        for f in reversed(gone):
            del self.in_flight[f.head]
            f.in_flight = False
            if self.clean:
                self.published.appendleft(f.chain)
        self.last_avail = (self.last_avail - n) & U16
        return gone

    def complete(self, head: int, length: int) -> None:
        f = self.in_flight.pop(head)
        f.in_flight = False
        assert length <= f.wcap
        self.completed += 1
        self.completed_since_wait += 1
        if self.clean:
            f.chain.pushed = bytes(f.pushed)
            self.used.append((f.chain, length))

    def need_notify(self) -> bool:
        """Expected result of need_notify() (meaningful only while clean)."""
        if not self.event_idx:
            return self.cb_enabled
        new = (self.host_last_used + self.completed) & U16
        notify = self.completed > U16 or need_event(self.used_event, new, self.host_last_used)
        self.host_last_used = new
        self.completed = 0
        return notify

    def notify_enable(self) -> bool:
        """Expected result of notify_enable(): True = nothing left to fetch."""
        if self.event_idx:
            self.avail_event = self.last_avail
        else:
            self.no_notify = False
        empty = not self.published
        self.host_waiting = empty
        self.waiting_at = self.last_avail     # == avail idx when empty
        return empty

    def notify_disable(self) -> None:
        if not self.event_idx:
            self.no_notify = True
        self.host_waiting = False
