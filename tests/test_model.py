"""Model-based tests: the real ring core against a pure-Python reference model.

RingMachine (hypothesis stateful) drives a VringDriver and a VringHost over one
anonymous mapping in this process, and checks every step against
tests/ring_model.py: heads in FIFO order, segments, bytes in both directions,
descriptor accounting (indirect vs direct), abandon, complete_multi, and the
notification words with and without EVENT_IDX, from random bases near the u16
wrap.  Some machines also scribble random bytes over the shared memory; from
then on only safety is asserted (every call returns normally or raises
InvalidRing / InvalidDescriptor / ValueError), plus the parts of the model that
live in each side's private memory and so cannot be corrupted.  After an
InvalidRing both sides set_base() and exact checking resumes.

Plus: need_event against its formula for all u16 triples drawn, a deterministic
run of 70,000 messages across the u16 index wrap, and the abandon
misuse check fooled by a reused head.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import random

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import vringipc
from vringipc import (
    FEATURE_EVENT_IDX,
    FEATURE_INDIRECT_DESC,
    InvalidDescriptor,
    InvalidRing,
    Iov,
    VringDriver,
    VringHost,
)
from vringipc.layout import SegmentLayout

from ring_model import U16, Chain, RingModel
from ring_model import need_event as model_need_event

SLOT = 64          # slot-mode bytes per head
SEG_MAX = 40       # largest segment of an add() chain
REGION = 512       # private arena bytes of one add() chain: 7 segments + gaps fit
BASES = st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, U16))
DESC_ERRNOS = {errno.EINVAL, errno.ELOOP, errno.EPROTO, errno.EMSGSIZE, errno.E2BIG}
MAX_MSG = 1024      # host limit: every clean chain is below it, corrupted ones may not be


class Ring:
    """A driver and a host over one anonymous mapping.  Arena: slots | indirect
    pool | one private REGION per possible chain."""

    def __init__(self, num, event_idx, indirect, ind_entries, max_msg=0xFFFFFFFF):
        self.num = num
        self.ind = min(ind_entries, num) if indirect and num >= 2 else 0
        feats = (FEATURE_EVENT_IDX if event_idx else 0) | (FEATURE_INDIRECT_DESC if indirect else 0)
        slots, pool = num * SLOT, num * self.ind * 16
        lay = SegmentLayout.build([num], [slots + pool + num * REGION], features=feats)
        self.r = r = lay.rings[0]
        self.lo, self.hi = r.win_off, r.win_off + r.win_size
        self.pool_off = r.win_off + slots
        self.region_off = self.pool_off + pool
        self.mm = mmap.mmap(-1, lay.seg_size)
        self.host = VringHost(self.mm, *r.ring_args(), features=feats, max_msg=max_msg)
        self.drv = VringDriver(self.mm, *r.ring_args(), features=feats, slot_size=SLOT,
                               indirect_pool=(self.pool_off, self.ind) if self.ind else None)
        assert self.drv.indirect == bool(self.ind)

    def region(self, k):
        return self.region_off + k * REGION

    def read(self, segs):
        return b"".join(self.mm[o:o + n] for o, n in segs)

    def close(self):
        self.host.close()
        self.drv.close()
        self.mm.close()


class RingMachine(RuleBasedStateMachine):
    ring = None

    # --- setup / teardown -------------------------------------------------------
    @initialize(num=st.sampled_from([1, 2, 8, 256]), event_idx=st.booleans(),
                indirect=st.booleans(), ind_entries=st.integers(2, 8), base=BASES,
                corruptible=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def setup(self, num, event_idx, indirect, ind_entries, base, corruptible, seed):
        self.ring = Ring(num, event_idx, indirect, ind_entries, max_msg=MAX_MSG)
        self.host, self.drv = self.ring.host, self.ring.drv
        self.model = RingModel(num, event_idx, self.ring.ind)
        self.corruptible = corruptible
        self.rng = random.Random(seed)
        self.tokens = itertools.count(1)
        self.iov_pool = []
        self.reset_both(base)

    def teardown(self):
        if self.ring is not None:
            self.iovs = {}
            self.iov_pool = []
            self.ring.close()

    def reset_both(self, base):
        """set_base(base) on both sides; the model forgets everything.

        Exact checking may resume after corruption because everything either
        side reads from shared memory is rewritten before it is read again:
        avail.idx / used.idx by set_base, used_event (EVENT_IDX) or
        avail.flags by the driver's set_base (disable_cb), descriptors,
        indirect tables, ring entries and payload by each add / complete, and
        avail_event or used.flags by the notify_enable() below."""
        was_clean = self.model.clean
        self.host.set_base(base)
        self.drv.set_base(base)
        self.model.reset(base)
        self.free_regions = list(range(self.ring.num))
        self.iovs = {}                      # in-flight head -> (riov, wiov)
        if not was_clean:
            event("reset after corruption")
            # Corruption may have hit the host-written notification words
            # (avail_event / used->flags), which set_base leaves alone: write
            # them again so the model knows them.
            assert self.host.notify_enable() == self.model.notify_enable()

    # --- helpers ----------------------------------------------------------------
    def take_iov(self):
        return self.iov_pool.pop() if self.iov_pool else Iov()

    def release(self, head):
        for iov in self.iovs.pop(head, (None, None)):
            if iov is not None:
                self.iov_pool.append(iov)   # reused by a later getdesc (vringh_iov reuse)

    def added(self, chain, head):
        m = self.model
        assert head is not None and 0 <= head < m.num
        assert all(c.head != head for c in m.outstanding.values()), f"head {head} handed out twice"
        m.add(chain, head)

    def check_new_head(self, head):
        assert 0 <= head < self.model.num
        assert head not in self.model.in_flight, f"head {head} fetched while in flight"

    def pull(self, riov, how):
        """Pull every readable byte, in one of several ways; returns them."""
        total = riov.total
        if how == "all":
            got = riov.pull()
        elif how == "chunks":          # small random pieces across segment boundaries
            parts = []
            while riov.remaining:
                before = riov.remaining
                k = self.rng.randrange(0, 8)
                piece = riov.pull(k)
                assert len(piece) == min(k, before) and riov.remaining == before - len(piece)
                parts.append(piece)
            got = b"".join(parts)
        elif how == "into":
            buf = bytearray(total + self.rng.randrange(0, 4))
            assert riov.pull_into(buf) == total
            got = bytes(buf[:total])
        else:                          # zero-copy views; the cursor stays put
            got = b"".join(bytes(v) for v in riov.views())
            assert riov.remaining == total
            riov.advance(self.rng.randrange(0, total + 2))
            riov.reset()
            assert riov.pull() == got
        assert riov.remaining == 0 and riov.pull() == b""
        return got

    # --- the one rule ----------------------------------------------------------------
    # One dispatching rule rather than a rule per verb: hypothesis' swarm testing
    # switches each rule off in about half the runs, and a chain needs add,
    # fetch, complete and get_buf all enabled to make a round trip.  The list
    # sets the weights.
    ACTIONS = (["add"] * 4 + ["kick_prepare"] * 2 + ["getdesc"] * 2 + ["serve"] * 3 + ["host_iov"] * 3
               + ["get_buf"] * 3 + ["callbacks"] * 2 + ["notify"] * 2
               + ["abandon", "misuse", "reset", "corrupt"])

    @rule(data=st.data(), action=st.sampled_from(ACTIONS))
    def step(self, data, action):
        getattr(self, "do_" + action)(data)

    # --- driver ---------------------------------------------------------------------
    def do_add(self, data):
        """add() of 1..4 readable + 0..3 writable segments in a private region,
        or a slot (readable with data, or writable)."""
        kind = data.draw(st.sampled_from(["chain", "chain", "slot", "slot_writable"]), label="kind")
        if kind == "chain":
            self.add_chain(data)
        else:
            self.add_slot(data, kind == "slot_writable")

    def add_chain(self, data):
        m, ring = self.model, self.ring
        nr = data.draw(st.integers(1, 4), label="readable")
        nw = data.draw(st.integers(0, 3), label="writable")
        sizes = data.draw(st.lists(st.integers(0, SEG_MAX), min_size=nr + nw, max_size=nr + nw),
                          label="sizes")
        ndesc = m.descs_for(nr + nw)
        fits = m.free >= ndesc
        region = self.free_regions[-1] if fits else 0
        pos, segs = ring.region(region), []
        for n in sizes:
            pos += self.rng.randrange(0, 9)
            segs.append((pos, n))
            pos += n
        readable, writable = segs[:nr], segs[nr:]
        payload = b""
        if fits:                       # the region is ours: fill it
            for off, n in readable:
                chunk = self.rng.randbytes(n)
                ring.mm[off:off + n] = chunk
                payload += chunk
            for off, n in writable:
                ring.mm[off:off + n] = b"\xee" * n
        chain = Chain(next(self.tokens), readable, writable, payload, ndesc, region)
        head = self.drv.add(readable, writable, token=chain.token)
        if not fits:
            assert head is None, "add succeeded without enough free descriptors"
            event("add: ring full")
            return
        self.free_regions.pop()
        self.added(chain, head)

    def add_slot(self, data, writable):
        m, ring = self.model, self.ring
        n = data.draw(st.integers(0, SLOT), label="length")
        token = next(self.tokens)
        if writable:
            payload = b""
            head = self.drv.add_slot_writable(n, token=token)
        else:
            payload = self.rng.randbytes(n)
            head = self.drv.add_slot(payload, token=token)
        if m.free < 1:
            assert head is None, "add_slot succeeded on a full ring"
            return
        assert head is not None, "add_slot failed with a free descriptor"
        seg = [(ring.lo + head * SLOT, n)]
        chain = Chain(token, [] if writable else seg, seg if writable else [], payload, 1)
        self.added(chain, head)
        assert self.drv.slot_offset(head) == seg[0][0]
        if writable:
            ring.mm[seg[0][0]:seg[0][0] + n] = b"\xee" * n

    def do_kick_prepare(self, data):
        m = self.model
        promised = m.host_waiting and m.avail_idx != m.waiting_at
        expect = m.kick_prepare()
        got = self.drv.kick_prepare()
        if m.clean:
            assert got == expect
            if promised:
                event("kick promised")
                assert got, "lost kick: host enabled notifications on an empty ring, driver added"
        if got:
            m.host_waiting = False

    def do_get_buf(self, data):
        """Reclaim up to 1..3 chains (stops at None or an error)."""
        for _ in range(data.draw(st.integers(1, 3), label="count")):
            if not self.get_buf_one(data):
                return

    def get_buf_one(self, data):
        m, ring = self.model, self.ring
        expect = m.used[0] if m.clean and m.used else None
        try:
            got = self.drv.get_buf()
        except InvalidRing as e:
            assert not m.clean, f"InvalidRing from a clean used ring: {e}"
            event("driver: InvalidRing " + "".join(ch for ch in e.strerror if not ch.isdigit()))
            assert self.drv.broken and e.head is None
            assert self.drv.num_free == m.free and self.drv.in_flight == len(m.outstanding)
            with pytest.raises(InvalidRing):   # stays broken until set_base
                self.drv.get_buf()
            with pytest.raises(InvalidRing):
                self.drv.add([(ring.region(0), 1)])
            with pytest.raises(InvalidRing):
                self.drv.add_slot(b"x")
            self.reset_both(data.draw(BASES, label="base after InvalidRing"))
            return False
        if got is None:
            assert expect is None, "driver missed a completion"
            return False
        token, length = got
        assert token in m.outstanding, f"get_buf returned unknown token {token}"
        chain = m.outstanding[token]
        assert length <= chain.wcap
        if m.clean:
            assert expect is not None
            assert (token, length) == (expect[0].token, expect[1])
            assert ring.read(chain.writable).startswith(chain.pushed), "pushed bytes not visible"
            assert ring.read(chain.readable) == chain.data, "readable buffer modified"
        event("reclaimed" if m.clean else "reclaimed (corrupted)")
        if m.clean and length:
            event("reclaimed with pushed bytes")
        m.reclaim(token, length)
        if chain.region is not None:
            self.free_regions.append(chain.region)
        return True

    def do_callbacks(self, data):
        kind = data.draw(st.sampled_from(["enable_cb", "enable_cb_delayed", "disable_cb"]), label="kind")
        m = self.model
        if kind == "disable_cb":
            m.disable_cb()
            self.drv.disable_cb()
            return
        expect = m.enable_cb() if kind == "enable_cb" else m.enable_cb_delayed()
        got = getattr(self.drv, kind)()
        if m.clean:
            assert got == expect
        else:
            m.driver_waiting = False

    # --- host -----------------------------------------------------------------------
    def do_getdesc(self, data):
        """Fetch up to 1..3 chains (stops when empty or after an error)."""
        for _ in range(data.draw(st.integers(1, 3), label="count")):
            dirs = data.draw(st.sampled_from(["rw"] * 6 + ["r", "w"]), label="dirs")
            how = data.draw(st.sampled_from(["all", "chunks", "into", "views"]), label="how")
            if not self.getdesc_one(data, dirs, how):
                return

    def getdesc_one(self, data, dirs, how):
        """One getdesc checked against the model; False = stop fetching."""
        m, ring = self.model, self.ring
        riov = self.take_iov() if "r" in dirs else None
        wiov = self.take_iov() if "w" in dirs else None
        expect = m.published[0] if m.clean and m.published else None
        before = self.host.last_avail_idx
        try:
            head = self.host.getdesc(riov, wiov)
        except InvalidDescriptor as e:
            event(f"host: InvalidDescriptor {errno.errorcode[e.errno]} " + "".join(
                ch for ch in e.strerror if not ch.isdigit()))
            assert e.errno in DESC_ERRNOS
            self.check_new_head(e.head)
            if m.clean:
                assert expect is not None and e.head == expect.head
                assert e.errno == errno.EPROTO
                assert (expect.readable and riov is None) or (expect.writable and wiov is None)
            m.fetch(e.head, expect, 0)
            self.iovs[e.head] = (None, None)
            return True
        except InvalidRing as e:
            assert not m.clean, f"InvalidRing from a clean ring: {e}"
            event("host: InvalidRing " + "".join(ch for ch in e.strerror if not ch.isdigit()))
            assert e.head is None and self.host.broken
            assert self.host.last_avail_idx == before and self.host.in_flight == len(m.in_flight)
            with pytest.raises(InvalidRing):   # stays broken until set_base
                self.host.getdesc(Iov(), Iov())
            self.reset_both(data.draw(BASES, label="base after InvalidRing"))
            return False
        if head is None:
            assert expect is None, "host missed a published chain"
            if riov is not None:
                self.iov_pool.append(riov)
            if wiov is not None:
                self.iov_pool.append(wiov)
            return False
        self.check_new_head(head)
        if m.clean:
            assert expect is not None and head == expect.head
            assert not (expect.readable and riov is None) and not (expect.writable and wiov is None)
            if riov is not None:
                assert riov.segments == expect.readable
            if wiov is not None:
                assert wiov.segments == expect.writable
        for iov in (riov, wiov):
            if iov is not None:
                assert iov.nsegs == len(iov.segments)
                assert iov.total == iov.remaining == sum(n for _, n in iov.segments)
                assert all(ring.lo <= o and o + n <= ring.hi for o, n in iov.segments)
        event("fetched" if m.clean else "fetched (corrupted)")
        got = self.pull(riov, how) if riov is not None else b""
        if m.clean:
            assert got == expect.data
        m.fetch(head, expect, wiov.total if wiov is not None else 0)
        self.iovs[head] = (riov, wiov)
        return True

    def push_into(self, data, head):
        m = self.model
        f, wiov = m.in_flight[head], self.iovs[head][1]
        room = f.wcap - len(f.pushed)
        assert wiov.remaining == room
        blob = self.rng.randbytes(data.draw(st.integers(0, min(room, 200) + 4), label="push"))
        assert wiov.push(blob) == min(len(blob), room)
        f.pushed += blob[:room]

    def do_host_iov(self, data):
        """push() random bytes into an in-flight chain (in several steps,
        sometimes beyond its room), or complete(head, length) /
        complete_multi([...]) in-flight heads with lengths <= what was pushed."""
        kind = data.draw(st.sampled_from(["push", "complete", "complete_multi"]), label="kind")
        m = self.model
        busy = sorted(m.in_flight)
        multi = kind == "complete_multi"
        if kind == "push":
            pushable = [h for h in busy if self.iovs[h][1] is not None]
            if pushable:
                self.push_into(data, data.draw(st.sampled_from(pushable), label="head"))
            return
        if multi:
            heads = (data.draw(st.lists(st.sampled_from(busy), min_size=1, unique=True), label="heads")
                     if busy else [])
        elif busy:
            heads = [data.draw(st.sampled_from(busy), label="head")]
        else:
            return
        items = [(h, data.draw(st.integers(0, len(m.in_flight[h].pushed)), label="length"))
                 for h in heads]
        if multi:
            event(f"complete_multi of {min(len(items), 2)}+")
            self.host.complete_multi(items)
        else:
            self.host.complete(*items[0])
        for h, n in items:
            m.complete(h, n)
            self.release(h)

    def do_abandon(self, data):
        ok = self.model.abandonable()
        n = data.draw(st.integers(min(ok, 1), ok), label="n")
        self.host.abandon(n)
        if n:
            event("abandon")
        for f in self.model.abandon(n):
            self.release(f.head)

    def do_serve(self, data):
        """The device loop of vdpa_sim, 1..3 times: fetch, pull, push a reply, complete."""
        for _ in range(data.draw(st.integers(1, 3), label="count")):
            how = data.draw(st.sampled_from(["all", "chunks", "into", "views"]), label="how")
            if not self.getdesc_one(data, "rw", how):
                return
            head = self.model.fetches[-1].head
            if self.iovs[head][1] is not None:
                self.push_into(data, head)
            n = data.draw(st.integers(0, len(self.model.in_flight[head].pushed)), label="length")
            self.host.complete(head, n)
            self.model.complete(head, n)
            self.release(head)

    def do_notify(self, data):
        kind = data.draw(st.sampled_from(["need_notify", "need_notify", "notify_enable", "notify_disable"]),
                         label="kind")
        m = self.model
        if kind == "notify_disable":
            m.notify_disable()
            self.host.notify_disable()
        elif kind == "notify_enable":
            expect = m.notify_enable()
            got = self.host.notify_enable()
            if m.clean:
                assert got == expect
            else:
                m.host_waiting = False
        else:
            promised = m.driver_waiting and m.completed_since_wait > 0
            expect = m.need_notify()
            got = self.host.need_notify()
            if m.clean:
                assert got == expect
                if promised:
                    event("call promised")
                    assert got, "lost call: driver enabled callbacks on an empty used ring, host completed"
            if got:
                m.driver_waiting = False

    # --- misuse: always ValueError, nothing changes (invariants check that) --------
    def do_misuse(self, data):
        kind = data.draw(st.sampled_from([
            "complete_unknown", "complete_too_long", "multi_dup", "multi_unknown", "multi_too_long",
            "abandon_too_many",
            "getdesc_none", "slot_too_big", "add_outside", "add_empty", "pull_wiov", "push_riov"]),
            label="kind")
        m, ring = self.model, self.ring
        idle = sorted(set(range(m.num)) - set(m.in_flight))
        busy = sorted(m.in_flight)
        if kind == "complete_unknown" and idle:
            h = data.draw(st.sampled_from(idle))
            call = lambda: self.host.complete(h, 0)  # noqa: E731
        elif kind == "complete_too_long" and busy:
            h = data.draw(st.sampled_from(busy))
            call = lambda: self.host.complete(h, m.in_flight[h].wcap + 1)  # noqa: E731
        elif kind == "multi_dup" and busy:
            # Same count as in flight, so only the duplicate check can catch it.
            items = [(h, 0) for h in busy]
            items[-1] = items[0]
            if len(items) == 1:
                items.append(items[0])
            call = lambda: self.host.complete_multi(items)  # noqa: E731
        elif kind == "multi_unknown" and idle and busy:
            # Valid entries first, then one that is not in flight: all-or-nothing.
            items = [(h, 0) for h in busy[:-1]] + [(data.draw(st.sampled_from(idle)), 0)]
            call = lambda: self.host.complete_multi(items)  # noqa: E731
        elif kind == "multi_too_long" and busy:
            items = [(h, 0) for h in busy]
            items[-1] = (busy[-1], m.in_flight[busy[-1]].wcap + 1)
            call = lambda: self.host.complete_multi(items)  # noqa: E731
        elif kind == "abandon_too_many":
            n = m.abandonable() + 1
            call = lambda: self.host.abandon(n)  # noqa: E731
        elif kind == "getdesc_none":
            call = lambda: self.host.getdesc(None, None)  # noqa: E731
        elif kind == "slot_too_big":
            call = lambda: self.drv.add_slot(bytes(SLOT + 1))  # noqa: E731
        elif kind == "add_outside":
            call = lambda: self.drv.add([(ring.hi - 4, 8)])  # noqa: E731
        elif kind == "add_empty":
            call = lambda: self.drv.add([], [])  # noqa: E731
        elif kind == "pull_wiov" and any(w is not None for _, w in self.iovs.values()):
            w = next(w for _, w in self.iovs.values() if w is not None)
            call = lambda: w.pull(1)  # noqa: E731
        elif kind == "push_riov" and any(r is not None for r, _ in self.iovs.values()):
            r = next(r for r, _ in self.iovs.values() if r is not None)
            call = lambda: r.push(b"x")  # noqa: E731
        else:
            return
        with pytest.raises(ValueError):
            call()
        if kind.startswith("multi") and data.draw(st.booleans(), label="retry valid part"):
            # All-or-nothing: the valid entries of the rejected batch still complete.
            good = sorted({h for h, _ in items if h in m.in_flight})
            self.host.complete_multi([(h, 0) for h in good])
            for h in good:
                m.complete(h, 0)
                self.release(h)

    # --- both sides ---------------------------------------------------------------
    def do_reset(self, data):
        """Restart both sides (one time in four: it throws the state away):
        set_base(random) or detach_unused()."""
        how = data.draw(st.sampled_from(["no", "no", "no", "set_base", "detach_unused"]), label="how")
        if how == "no":
            return
        if how == "set_base":
            self.reset_both(data.draw(BASES, label="base"))
        else:
            tokens = self.drv.detach_unused()
            assert sorted(tokens) == sorted(self.model.outstanding)
            assert self.drv.avail_idx == self.model.avail_idx
            self.reset_both(self.model.avail_idx)

    def do_corrupt(self, data):
        """Random bytes over a slice of the shared ring memory; from now on
        only safety (and the private halves of the model) are checked."""
        if not self.corruptible:
            return
        m, r, ring = self.model, self.ring.r, self.ring
        num = m.num
        how = data.draw(st.sampled_from(["bytes", "field", "loop"]), label="how")
        live = list(m.published)[:4]
        if how == "loop" and live:
            # NEXT back to the head itself, or backwards inside an indirect table.
            c = data.draw(st.sampled_from(live), label="chain")
            if c.ndesc == 1 and len(c.readable) + len(c.writable) > 1:
                k = self.rng.randrange(ring.ind)
                d, nxt = ring.pool_off + (c.head * ring.ind + k) * 16, self.rng.randrange(k + 1)
            else:
                d, nxt = r.desc_off + 16 * c.head, c.head
            flags = int.from_bytes(ring.mm[d + 12:d + 14], "little") | 1
            ring.mm[d + 12:d + 16] = flags.to_bytes(2, "little") + nxt.to_bytes(2, "little")
            m.clean = False
            event("corrupted (loop)")
            return
        if how == "field":
            # A small value in one field: loops, heads out of range or busy,
            # index jumps, flags... (random bytes rarely make those).
            fields = [(r.avail_off + 2, 2), (r.avail_off + 4 + 2 * (m.last_avail & (num - 1)), 2),
                      (r.used_off + 2, 2), (r.used_off + 4 + 8 * (m.last_used & (num - 1)), 4),
                      (r.used_off + 8 + 8 * (m.last_used & (num - 1)), 4)]
            for c in list(m.published)[:4] + [f.chain for f in m.fetches[-2:] if f.chain]:
                d = r.desc_off + 16 * c.head
                fields += [(d + 8, 4), (d + 12, 2), (d + 14, 2)]
                if c.ndesc == 1 and len(c.readable) + len(c.writable) > 1:
                    t = ring.pool_off + (c.head * ring.ind + self.rng.randrange(ring.ind)) * 16
                    fields += [(t + 8, 4), (t + 12, 2), (t + 14, 2)]
            start, n = data.draw(st.sampled_from(fields), label="field")
            cur = int.from_bytes(ring.mm[start:start + n], "little")
            value = self.rng.choice([self.rng.randrange(8), self.rng.randrange(num + 2),
                                     cur + self.rng.randrange(-2, num + 3)]) % (1 << 8 * n)
            ring.mm[start:start + n] = value.to_bytes(n, "little")
            m.clean = False
            event("corrupted (field)")
            return
        spots = [
            (r.desc_off, 16 * num), (r.avail_off, 6 + 2 * num), (r.used_off, 6 + 8 * num),
            (ring.lo, ring.hi - ring.lo),                          # anywhere in each part
            (r.avail_off + 2, 2), (r.avail_off + 4 + 2 * (m.last_avail & (num - 1)), 2),
            (r.used_off + 2, 2), (r.used_off + 4 + 8 * (m.last_used & (num - 1)), 8),
        ]
        for c in list(m.published)[:4]:                            # live chains
            spots.append((r.desc_off + 16 * c.head, 16))
            if c.ndesc == 1 and len(c.readable) + len(c.writable) > 1:
                spots.append((ring.pool_off + c.head * ring.ind * 16, ring.ind * 16))
            spots += [(o, n) for o, n in c.readable + c.writable if n]
        off, span = data.draw(st.sampled_from(spots), label="spot")
        start = off + data.draw(st.integers(0, span - 1), label="at")
        n = data.draw(st.integers(1, min(8, off + span - start)), label="bytes")
        ring.mm[start:start + n] = self.rng.randbytes(n)
        m.clean = False
        event("corrupted")

    # --- invariants -----------------------------------------------------------------
    @invariant()
    def private_state(self):
        """What each side keeps in private memory: exact even after corruption."""
        if self.ring is None:
            return
        h, d, m = self.host, self.drv, self.model
        assert h.in_flight == len(m.in_flight)
        assert h.last_avail_idx == m.last_avail
        assert (h.last_used_idx, h.completed) == (m.host_last_used, m.completed)
        assert d.num_free == m.free
        assert d.in_flight == len(m.outstanding)
        assert (d.avail_idx, d.last_used_idx) == (m.avail_idx, m.last_used)
        assert not h.broken and not d.broken

    @invariant()
    def shared_state(self):
        if self.ring is None:
            return
        hp, dp = self.host.pending(), self.drv.pending()    # must not raise, corrupted or not
        if self.model.clean:
            assert hp == bool(self.model.published)
            assert dp == bool(self.model.used)


@pytest.mark.timeout(300)
def test_ring_against_model():
    run_state_machine_as_test(RingMachine, settings=settings(
        max_examples=200, stateful_step_count=50, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))


# --- plain properties ------------------------------------------------------------
@settings(max_examples=1000, deadline=None)
@given(st.integers(0, U16), st.integers(0, U16), st.integers(0, U16))
@example(0, 0, 0)
@example(0xFFFF, 0, 0xFFFF)       # event just before the wrap, window crosses it
@example(0, 1, 0xFFFF)
@example(5, 5, 5)
@example(0x8000, 0, 0x8001)       # window of 0xFFFF entries
def test_need_event_formula(ev, new, old):
    want = ((new - ev - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
    assert vringipc.need_event(ev, new, old) == want
    assert model_need_event(ev, new, old) == want   # "ev in [old, new) mod 2**16"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
def test_u16_wrap_long_sequence(event_idx):
    """70,000 messages through a ring of 8 from base 0xFFF0: every index crosses
    0xFFFF -> 0 twice.  Mixed slot / indirect / direct chains, replies pushed
    into writable segments, complete and complete_multi, and each round checks
    that a sleeping peer is notified and a polling one is not."""
    num, base, total = 8, 0xFFF0, 70_000
    ring = Ring(num, event_idx, indirect=True, ind_entries=2)   # 3-segment chains go direct
    host, drv, mm = ring.host, ring.drv, ring.mm
    try:
        host.set_base(base)
        drv.set_base(base)
        riov, wiov = Iov(), Iov()

        def msg(i):
            return i.to_bytes(4, "little") * (1 + i % 5)

        sent = 0
        for rnd in itertools.count():
            if sent == total:
                break
            want = min(1 + (rnd * 5) % num, total - sent)
            host_sleeps, drv_sleeps = rnd % 2 == 0, rnd % 3 == 0
            if host_sleeps:
                assert host.notify_enable()          # empty: safe to sleep
            else:
                host.notify_disable()
            if drv_sleeps:
                assert drv.enable_cb()
            else:
                drv.disable_cb()
            batch = 0
            while batch < want:                      # stop early when descriptors run out
                i = sent + batch
                data, off = msg(i), ring.region(batch)
                if i % 3 == 0:
                    head = drv.add_slot(data, token=i)
                else:
                    mm[off:off + len(data)] = data
                    if i % 3 == 1:                   # 2 segments: one indirect descriptor
                        segs = [(off, len(data))]
                    else:                            # 3 segments: 3 direct descriptors
                        k = len(data) // 2
                        segs = [(off, k), (off + k, len(data) - k)]
                    head = drv.add(segs, [(off + 128, 4)], token=i)
                if head is None:
                    assert batch and drv.num_free < 3
                    break
                batch += 1
            # A polling host gets no kick (EVENT_IDX: stale avail_event; else NO_NOTIFY).
            assert drv.kick_prepare() == host_sleeps
            done = []
            for j in range(batch):
                i = sent + j
                head = host.getdesc(riov, wiov)
                assert head is not None
                assert riov.pull() == msg(i), f"message {i} corrupted"
                n = wiov.push((i ^ 0x5A5A5A5A).to_bytes(4, "little")) if wiov.total else 0
                done.append((head, n))
            assert host.getdesc(riov, wiov) is None
            if rnd % 2:
                host.complete_multi(done)
            else:
                for head, n in done:
                    host.complete(head, n)
            assert host.need_notify() == drv_sleeps
            for j in range(batch):
                i = sent + j
                token, n = drv.get_buf()
                assert token == i
                if i % 3:
                    off = ring.region(j) + 128
                    assert n == 4 and mm[off:off + 4] == (i ^ 0x5A5A5A5A).to_bytes(4, "little")
                else:
                    assert n == 0
            assert drv.get_buf() is None
            sent += batch
        end = (base + total) & U16
        assert host.last_avail_idx == drv.avail_idx == drv.last_used_idx == end
        assert drv.num_free == num and host.in_flight == 0
    finally:
        ring.close()


# --- bugs found ------------------------------------------------------------------
def test_abandon_rejects_completed_fetch_with_reused_head():
    ring = Ring(8, event_idx=False, indirect=False, ind_entries=2)
    host, drv = ring.host, ring.drv
    try:
        drv.add_slot(b"A", token="A")
        drv.add_slot(b"B", token="B")
        a = host.getdesc(Iov(), Iov())
        b = host.getdesc(Iov(), Iov())
        host.complete(b, 0)                   # fetch #2 is done...
        assert drv.get_buf() == ("B", 0)
        assert drv.add_slot(b"C", token="C") == b   # ...and its head is reused (LIFO free list)
        assert host.getdesc(Iov(), Iov()) == b      # fetch #3, same head
        # Only fetch #3 is a recent in-flight fetch; fetch #2 was completed.
        with pytest.raises(ValueError):
            host.abandon(2)
        assert host.in_flight == 2                  # a and the refetched b
        host.complete(a, 0)
        host.complete(b, 0)
    finally:
        ring.close()
