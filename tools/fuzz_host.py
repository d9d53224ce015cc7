#!/usr/bin/env python3
"""Coverage-guided fuzzing of the vringipc consumer (host) side, the driver's
used-ring validation and the segment header parser.

The input bytes are the shared segment a hostile peer controls: the fuzzer
writes the descriptor table, avail ring, arena (and, for the driver target, the
used ring), picks a few ring parameters, then drives a bounded sequence of API
calls, rewriting ring bytes between calls as a racing producer would.

Every call is checked against a pure-Python reference model of the ring (the
vringh rules of cython_src/vringh.pxi / vringd.pxi, VRING_NOTES section 4):
the exact result or exception, the iovec segments, the bytes pulled or pushed,
and *every byte of the shared buffers* after the call (a verb may only write
what it is documented to write).  Allowed outcomes are normal results, None,
InvalidRing, InvalidDescriptor, ValueError and LayoutError; anything else -
another exception, a crash or ASAN report, a model mismatch, a hang - is a
finding.

Known, still-open bugs (KNOWN_BUGS) are recognised by what the code does, so a
fixed build stops reporting them.  --known decides what happens when one is
reached: "skip" (fuzzing default: count it and step around it - do not make the
call, or retire the poisoned Iov - so the fuzzer keeps looking for new bugs),
"raise" (replay default: raise KnownBug, used by the regression tests) or
"ignore" (let the bad call happen: under ASAN this shows the memory error).

Usage:
    python tools/fuzz_host.py --seconds 600 --target host [--corpus DIR]
    python tools/fuzz_host.py --replay FILE... [--target host] [--known raise]

Fuzz mode runs atheris in a child process (re-executed with the ASAN runtime
preloaded when the extension was built with VRINGIPC_ASAN=1) and restarts it
after a crash until the time is up.  See tools/README.md.
"""

from __future__ import annotations

import argparse
import errno as E
import gc
import os
import struct
import sys
import time
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ("host", "driver", "header")

# --- the known, still-open bugs ------------------------------------------------
KNOWN_BUGS = {
    "iov-stale-rebind": (
        "VringHost.getdesc binds riov/wiov to this ring (and sets their direction) before the call "
        "but only rewinds them when a chain is walked; on None or InvalidRing they keep the old "
        "segments, so pull/push then copy through this ring's mapping at another ring's offsets "
        "(heap-buffer-overflow) or push into readable buffers"),
    "iov-same-both": (
        "getdesc(iov, iov) is accepted: one vr_iov gets readable and writable segments, is marked "
        "writable, and push() writes into buffers the driver exposed read-only"),
    "abandon-completed-fetch": (
        "vrh_abandon checks each of the last n fetches by head (inflight[head]), not by fetch: if a "
        "head was completed and fetched again, abandon(n) accepts the completed fetch, clears the "
        "head twice and n_inflight drifts from the real in-flight set (later underflows to 2**32-1)"),
    "iov-max-iov-bypass": (
        "vrh_iov_append enforces max_iov on the iovec's allocated capacity (cap >= max_iov), not on "
        "the segment count: an Iov grown by a ring with a larger max_iov accepts longer chains here"),
    "mapped-gc-clear": (
        "Cython generates tp_clear for _ring._Mapped that does Py_CLEAR(view.obj) without "
        "PyBuffer_Release: when the cyclic GC collects a VringHost/VringDriver together with a bound "
        "Iov (e.g. held by an exception traceback), the buffer export is leaked - a bytearray "
        "reports 'deallocated bytearray object has exported buffers', an mmap can never be closed "
        "again (BufferError: cannot close exported pointers exist)"),
    "iov-copy-overlap": (
        "vrh_iov_pull / vrh_iov_push copy with memcpy.  In the zero-copy echo pattern "
        "wiov.push(riov.views()[0]) (or riov.pull_into(wiov.views()[0])) a hostile driver that "
        "makes readable and writable descriptors alias the same bytes (legal, VRING_NOTES row 27) "
        "turns that into an overlapping memcpy: undefined behaviour, ASAN memcpy-param-overlap.  "
        "Only visible under ASAN (glibc's x86-64 memcpy happens to be memmove)"),
    "verbs-after-close": (
        "VringHost.need_notify/notify_enable/notify_disable/pending/notify/set_base and "
        "VringDriver.kick_prepare/kick/disable_cb/enable_cb*/poll/pending/set_base/detach_unused do "
        "not check that the ring is open: after close() they read and write the released buffer "
        "(heap-use-after-free, or SIGSEGV once the mmap is closed)"),
}


class Finding(AssertionError):
    """The code under test did something the model says it must not."""


class KnownBug(Finding):
    """One of KNOWN_BUGS was reached (only raised with known="raise")."""

    def __init__(self, bug: str, detail: str):
        super().__init__(f"known bug {bug}: {detail}")
        self.bug = bug


# --- byte source ---------------------------------------------------------------
class Src:
    """Reads the fuzz input; past its end every read returns zeros."""

    __slots__ = ("d", "p")

    def __init__(self, data: bytes):
        self.d = data
        self.p = 0

    def left(self) -> int:
        return len(self.d) - self.p

    def take(self, n: int) -> bytes:
        b = self.d[self.p:self.p + n]
        self.p += n
        return b + bytes(n - len(b)) if len(b) < n else b

    def u8(self) -> int:
        p = self.p
        self.p = p + 1
        return self.d[p] if p < len(self.d) else 0

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def pick(self, seq):
        return seq[self.u8() % len(seq)]


def _rd16(b, off):
    return b[off] | (b[off + 1] << 8)


def _wr16(b, off, v):
    b[off] = v & 0xFF
    b[off + 1] = (v >> 8) & 0xFF


def _need_event(event, new, old):
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


_DESC = struct.Struct("<QIHH")
_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

NUMS = (1, 2, 4, 8, 16, 64)
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(1 << 17))     # arena / payload filler
ARENAS = (64, 192, 1024, 4096)
MAX_IOVS = (1, 2, 3, 8, 1024)


# The extension is imported lazily (_load): the fuzz-mode parent must not load
# an ASAN build, only its atheris child (which runs with the runtime preloaded).
vringipc = layout = Iov = VringHost = VringDriver = InvalidRing = InvalidDescriptor = None
FEAT_EVENT_IDX = 1 << 29
FEAT_INDIRECT = 1 << 28


def _load():
    global vringipc, layout, Iov, VringHost, VringDriver, InvalidRing, InvalidDescriptor
    if VringHost is not None:
        return
    import vringipc as _v
    from vringipc import layout as _l
    from vringipc._ring import Iov as _I, VringDriver as _D, VringHost as _H
    from vringipc.errors import InvalidDescriptor as _ID, InvalidRing as _IR

    assert _v.FEATURE_EVENT_IDX == FEAT_EVENT_IDX and _v.FEATURE_INDIRECT_DESC == FEAT_INDIRECT
    vringipc, layout, Iov, VringHost, VringDriver, InvalidRing, InvalidDescriptor = _v, _l, _I, _H, _D, _IR, _ID


class State:
    """Per-input harness state shared by the ops."""

    def __init__(self, src: Src, known: str, stats: dict | None, lenient=()):
        self.src = src
        self.known = known
        self.stats = stats
        self.lenient = lenient

    def _mode(self, bug):
        return "skip" if bug in self.lenient else self.known

    def avoid(self, bug: str) -> bool:
        """Called *before* a call that would reach a known bug.  known="skip":
        count it and return True (the caller steps around it, so fuzzing goes
        on looking for new bugs).  Otherwise False: make the call and observe."""
        if self._mode(bug) == "skip":
            self.count(bug)
            return True
        return False

    def observed(self, bug: str, detail: str):
        """The code under test showed a known bug (its behaviour, not a guess:
        a fixed build does not get here).  known="raise": KnownBug; otherwise
        count it and return, and the caller follows the buggy behaviour."""
        self.count(bug)
        if self._mode(bug) == "raise":
            raise KnownBug(bug, detail)

    def count(self, what: str):
        if self.stats is not None:
            self.stats[what] = self.stats.get(what, 0) + 1


def expect(cond, msg, *args):
    if not cond:
        raise Finding(msg % args if args else msg)


def _outcome(fn, *a, **kw):
    """('ok', value) or ('exc', exception) for the allowed exception types only:
    anything else propagates and is a finding of its own."""
    try:
        return ("ok", fn(*a, **kw))
    except (InvalidRing, InvalidDescriptor, ValueError) as e:
        return ("exc", e)


def _expect_valueerror(res, what):
    expect(res[0] == "exc" and type(res[1]) is ValueError, "%s: expected ValueError, got %r", what, res)


# =============================================================================
# host target
# =============================================================================
class HostCtx:
    """One VringHost, its buffer and the reference model of its private state."""

    def __init__(self, hid, buf, num, desc_off, avail_off, used_off, lo, size, features, max_iov, max_msg):
        self.hid = hid
        self.buf = buf
        self.num, self.mask = num, num - 1
        self.desc_off, self.avail_off, self.used_off = desc_off, avail_off, used_off
        self.lo, self.hi = lo, lo + size
        self.event_idx = bool(features & FEAT_EVENT_IDX)
        self.indirect = bool(features & FEAT_INDIRECT)
        self.max_iov, self.max_msg = max_iov, max_msg
        self.host = VringHost(buf, num, desc_off, avail_off, used_off, lo, size, features=features,
                              max_msg=max_msg, max_iov=max_iov)
        self.closed = False
        self.freed = False
        self.modelled = True              # False after a known bug the model does not follow
        base = _rd16(buf, used_off + 2)
        self.priv_cap = 0                 # pull_many's private iovec capacity
        self.c_fetched = [0] * num        # mirror of vrh_t.fetched
        self.wcap = [0] * num             # mirror of vrh_t.wcap
        self.reset(base)

    def reset(self, idx):
        self.last_avail = self.shadow = self.last_used = idx
        self.completed = 0
        self.broken = False
        self.inflight = set()
        self.n_inflight = 0               # vrh_t.n_inflight (uint32), == len(inflight) unless a bug
        self.fetch = {}                   # avail index -> head, for fetches still in flight

    # reference of vrh_get_head / vrh_walk -------------------------------------
    def range_ok(self, addr, ln):
        return self.lo <= addr <= self.hi and ln <= self.hi - addr

    def get_head(self, snap):
        if self.broken:
            return ("ring", E.EINVAL)
        if self.last_avail == self.shadow:
            ai = _rd16(snap, self.avail_off + 2)
            if ai == self.last_avail:
                return None
            if ((ai - self.last_avail) & 0xFFFF) > self.num:
                self.broken = True
                return ("ring", E.EINVAL)
            self.shadow = ai
        slot = self.last_avail & self.mask
        hd = _rd16(snap, self.avail_off + 4 + 2 * slot)
        if hd >= self.num or hd in self.inflight:
            self.broken = True
            return ("ring", E.EINVAL)
        self.c_fetched[slot] = hd
        self.fetch[self.last_avail] = hd
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.inflight.add(hd)
        self.n_inflight = (self.n_inflight + 1) & 0xFFFFFFFF
        self.wcap[hd] = 0
        return hd

    def walk(self, snap, head, r, w, cap_bug=False):
        """Reference vrh_walk, without side effects.  r / w: (segs, cap) of the
        caller's iovecs or None.  Returns (rc, r', w', bypass): rc 0 or errno,
        r'/w' the iovecs afterwards ([segs, cap]), bypass True when an iovec's
        capacity above max_iov decided the result (iov-max-iov-bypass); with
        cap_bug the walk does what the buggy vrh_iov_append does there."""
        r = [[], r[1]] if r is not None else None
        w = [[], w[1]] if w is not None else None
        t_off, t_size, i = self.desc_off, self.num, head
        count = icount = 0
        in_ind = resume = bypass = False
        resume_next = 0
        total = 0
        while True:
            if in_ind:
                icount += 1
                if icount > t_size:
                    return E.ELOOP, r, w, bypass
            else:
                count += 1
                if count > self.num:
                    return E.ELOOP, r, w, bypass
            addr, ln, flags, nxt = _DESC.unpack_from(snap, t_off + 16 * i)
            if flags & F_INDIRECT:
                if in_ind or not self.indirect or ln == 0 or ln % 16:
                    return E.EINVAL, r, w, bypass
                if ln // 16 > self.num:
                    return E.E2BIG, r, w, bypass
                if addr % 16 or not self.range_ok(addr, ln):
                    return E.EINVAL, r, w, bypass
                if flags & F_NEXT:
                    if nxt >= self.num:
                        return E.EINVAL, r, w, bypass
                    resume, resume_next = True, nxt
                t_off, t_size, in_ind, icount, i = addr, ln // 16, True, 0, 0
                continue
            if flags & F_WRITE:
                if w is None:
                    return E.EPROTO, r, w, bypass
                tgt = w
            else:
                if w is not None and w[0]:
                    return E.EINVAL, r, w, bypass
                if r is None:
                    return E.EPROTO, r, w, bypass
                tgt = r
            if not self.range_ok(addr, ln):
                return E.EINVAL, r, w, bypass
            total += ln
            if total > self.max_msg:
                return E.EMSGSIZE, r, w, bypass
            used, cap = len(tgt[0]), tgt[1]
            full = used >= self.max_iov                      # what max_iov promises
            c_full = used == cap and cap >= self.max_iov     # what vrh_iov_append checks
            if full != c_full:
                bypass = True
            if c_full if cap_bug else full:
                return E.E2BIG, r, w, bypass
            if used == cap:
                tgt[1] = min(cap * 2 if cap else 8, self.max_iov)
            tgt[0].append((addr, ln))
            if flags & F_NEXT:
                if nxt >= t_size:
                    return E.EINVAL, r, w, bypass
                i = nxt
            elif in_ind and resume:
                in_ind = resume = False
                t_off, t_size, i = self.desc_off, self.num, resume_next
            else:
                break
        return 0, r, w, bypass

    def getdesc(self, snap, r, w):
        """Reference getdesc.  Returns a list of acceptable results, each
        (outcome, r', w', bug): outcome None (empty), ('ok', head),
        ('ring', errno) or ('desc', errno, head); bug None for the correct
        result or the KNOWN_BUGS id whose behaviour that result is.  Call
        take() with the one that happened."""
        h = self.get_head(snap)
        if h is None or isinstance(h, tuple):
            return [(h, None, None, None)]
        out = []
        for cap_bug in (False, True):
            rc, r2, w2, bypass = self.walk(snap, h, r, w, cap_bug)
            out.append((("ok", h) if rc == 0 else ("desc", rc, h), r2, w2,
                        "iov-max-iov-bypass" if cap_bug else None))
            if not bypass:
                break
        return out

    def take(self, cand):
        outcome, _r, w, _bug = cand
        if outcome is not None and outcome[0] == "ok" and w is not None:
            self.wcap[outcome[1]] = min(sum(ln for _, ln in w[0]), 0xFFFFFFFF)

    def complete_fetch(self, hd):
        self.inflight.discard(hd)
        for k, v in list(self.fetch.items()):
            if v == hd:
                del self.fetch[k]

    def put_used(self, exp, idx, hd, ln):
        _ELEM.pack_into(exp, self.used_off + 4 + 8 * (idx & self.mask), hd, ln)

    def publish_used(self, exp, n):
        _wr16(exp, self.used_off + 2, (self.last_used + self.completed + n) & 0xFFFF)
        self.completed = (self.completed + n) & 0xFFFFFFFF

    def need_notify(self, snap):
        if not self.event_idx:
            return not (_rd16(snap, self.avail_off) & 1)
        ue = _rd16(snap, self.avail_off + 4 + 2 * self.num)
        new = (self.last_used + self.completed) & 0xFFFF
        notify = True if self.completed > 0xFFFF else _need_event(ue, new, self.last_used)
        self.last_used = new
        self.completed = 0
        return notify


class IovState:
    """A pooled Iov and what the model knows about it."""

    def __init__(self, obj):
        self.obj = obj
        self.segs = []          # validated segments
        self.cap = 0            # vr_iov.cap
        self.pos = 0            # bytes consumed
        self.hid = None         # host whose ring validated the segments
        self.bound = None       # host whose mapping the Iov now uses
        self.writable = False
        self.modelled = True

    def content(self, ctxs):
        buf = ctxs[self.bound].buf
        return b"".join(bytes(buf[o:o + n]) for o, n in self.segs)

    def total(self):
        return sum(n for _, n in self.segs)


def _fill_desc(src, buf, off, lo, size, num):
    """One descriptor, either raw bytes or a structured, mostly plausible one."""
    mode = src.u8()
    if mode & 0x80:
        buf[off:off + 16] = src.take(16)
        return
    addr = lo - 16 + src.u16() % (size + 48)
    if mode & 0x20:
        addr &= ~15
    ln = src.u16() % (size + 17) if mode & 0x40 else src.u8() % 33
    if mode & F_INDIRECT and mode & 8 and mode & 0x10:
        ln = 16 * (1 + src.u8() % 4)
    nxt = src.u8() % (num + 1)
    flags = mode & 7
    if flags & F_INDIRECT and not mode & 8:
        flags &= ~F_INDIRECT                     # INDIRECT in a quarter of them
    _DESC.pack_into(buf, off, addr, ln, flags, nxt)


def _setup_host(st):
    src = st.src
    num = src.pick(NUMS)
    fbits = src.u8()
    features = (FEAT_EVENT_IDX if fbits & 1 else 0) | (FEAT_INDIRECT if fbits & 2 else 0)
    arena = src.pick(ARENAS)
    max_iov = src.pick(MAX_IOVS)
    m = src.u8() % 6
    max_msg = src.u32() if m == 5 else (0xFFFFFFFF, 0, 1, 100, 4096)[m]
    lay = layout.SegmentLayout.build([num], [arena], features=features, max_iov=max_iov, max_msg=max_msg or 1)
    r = lay.rings[0]
    buf = bytearray(lay.seg_size)
    buf[:layout.HDR_SIZE] = lay.pack_header()
    # ring contents
    for i in range(num):
        _fill_desc(src, buf, r.desc_off + 16 * i, r.win_off, r.win_size, num)
    b = src.u8()
    base = src.u16() if b & 1 else 0
    _wr16(buf, r.used_off + 2, base)
    _wr16(buf, r.avail_off, src.u8() & 1 if not b & 2 else src.u16())
    _wr16(buf, r.avail_off + 2, (base + src.u8() % (num + 2)) & 0xFFFF if b & 0x1C != 0x1C else src.u16())
    if b & 0xE0 == 0xE0:
        for i in range(num):
            _wr16(buf, r.avail_off + 4 + 2 * i, src.u8() % (num + 1) if b & 16 else src.u16())
    else:                                   # a permutation of the heads, as a fresh driver offers
        mult, off = 2 * src.u8() + 1, src.u8()
        for i in range(num):
            _wr16(buf, r.avail_off + 4 + 2 * ((base + i) & (num - 1)), (i * mult + off) & (num - 1))
    _wr16(buf, r.avail_off + 4 + 2 * num, (base + src.u8()) & 0xFFFF)       # used_event
    # arena: a byte pattern, then maybe a few descriptors (indirect tables)
    buf[r.win_off:r.win_off + r.win_size] = PATTERN[:r.win_size]
    nd = src.u8() % 9
    if nd:
        at = r.win_off + 16 * (src.u8() % (r.win_size // 16))
        for k in range(nd):
            if at + 16 * (k + 1) <= r.win_off + r.win_size:
                _fill_desc(src, buf, at + 16 * k, r.win_off, r.win_size, num)
    h0 = HostCtx(0, buf, num, r.desc_off, r.avail_off, r.used_off, r.win_off, r.win_size, features,
                 max_iov, max_msg)
    # A second, tiny ring in a 192-byte buffer of its own, with max_iov=2:
    # desc [0,64), avail [64,78), used [80,118), arena [128,192).  An Iov used
    # on both rings must never carry one ring's offsets to the other.
    buf2 = bytearray(192)
    for i in range(4):
        _fill_desc(src, buf2, 16 * i, 128, 64, 4)
    base2 = src.u8()
    _wr16(buf2, 82, base2)
    _wr16(buf2, 64, src.u8() & 1)
    _wr16(buf2, 66, base2 + src.u8() % 6)
    mult, off = 2 * src.u8() + 1, src.u8()
    for i in range(4):
        _wr16(buf2, 68 + 2 * ((base2 + i) & 3), (i * mult + off) & 3)
    _wr16(buf2, 76, base2 + src.u8() % 4)              # used_event
    buf2[128:192] = PATTERN[:64]
    for k in range(src.u8() % 5):                      # maybe an indirect table
        _fill_desc(src, buf2, 128 + 16 * k, 128, 64, 4)
    h1 = HostCtx(1, buf2, 4, 0, 64, 80, 128, 64, features, 2, 0xFFFFFFFF)
    return [h0, h1]


def _check_host(ctx):
    if not ctx.modelled:
        return
    h = ctx.host
    expect(h.in_flight == ctx.n_inflight, "host%d in_flight %d, model %d", ctx.hid, h.in_flight, ctx.n_inflight)
    expect(h.last_avail_idx == ctx.last_avail, "host%d last_avail_idx %d, model %d", ctx.hid,
           h.last_avail_idx, ctx.last_avail)
    expect(h.broken == ctx.broken, "host%d broken %s, model %s", ctx.hid, h.broken, ctx.broken)
    expect(h.completed == ctx.completed and h.last_used_idx == ctx.last_used,
           "host%d used state (%d,%d), model (%d,%d)", ctx.hid, h.last_used_idx, h.completed,
           ctx.last_used, ctx.completed)


def _same_buf(ctx, exp, what):
    if ctx.buf != exp:
        diff = next(i for i in range(min(len(exp), len(ctx.buf))) if ctx.buf[i] != exp[i])
        raise Finding(f"{what}: host{ctx.hid} buffer byte {diff} is {ctx.buf[diff]}, model {exp[diff]}")


def _pick_head(src, ctx):
    b = src.u8()
    if ctx.inflight and b < 200:
        return sorted(ctx.inflight)[b % len(ctx.inflight)]
    if b < 240:
        return src.u8() % (ctx.num + 1)
    return src.u32()


def _pick_len(src, ctx, hd):
    wcap = ctx.wcap[hd] if hd < ctx.num and hd in ctx.inflight else 0
    c = src.u8() % 5
    return src.u32() if c == 3 else src.u8() if c == 4 else (0, wcap, wcap + 1)[c] & 0xFFFFFFFF


def _same_result(res, outcome):
    if outcome is None:
        return res == ("ok", None)
    if outcome[0] == "ok":
        return res == ("ok", outcome[1])
    if outcome[0] == "ring":
        return (res[0] == "exc" and type(res[1]) is InvalidRing and res[1].errno == outcome[1]
                and res[1].head is None)
    return (res[0] == "exc" and type(res[1]) is InvalidDescriptor and res[1].errno == outcome[1]
            and res[1].head == outcome[2])


def op_getdesc(st, ctxs, pool, ctx):
    src = st.src
    mode = src.u8()
    which = mode % 3
    ri = pool[(mode >> 2) % 3] if which != 1 else None
    wi = pool[(mode >> 4) % 3] if which != 0 else None
    h = ctx.host
    same = ri is not None and ri is wi
    if same and st.avoid("iov-same-both"):
        wi = pool[(pool.index(ri) + 1) % 3]
        same = False
    if not ctx.modelled:
        _outcome(h.getdesc, ri and ri.obj, wi and wi.obj)
        for s in (ri, wi):
            if s is not None:
                s.modelled, s.bound = False, ctx.hid
        return
    if ctx.closed:
        _expect_valueerror(_outcome(h.getdesc, ri and ri.obj, wi and wi.obj), "getdesc after close")
        return
    snap = bytes(ctx.buf)
    if same:
        res = _outcome(h.getdesc, ri.obj, ri.obj)
        _same_buf(ctx, snap, "getdesc wrote to the shared buffer")
        if res[0] == "exc" and type(res[1]) is ValueError:
            return                                   # rejected, as it should be
        st.observed("iov-same-both", f"getdesc(iov, iov) returned {res!r} instead of raising ValueError")
        ri.modelled = ctx.modelled = False           # and go on unmodelled
        ri.bound = ctx.hid
        return
    rm = (ri.segs, ri.cap) if ri is not None else None
    wm = (wi.segs, wi.cap) if wi is not None else None
    cands = ctx.getdesc(snap, rm, wm)
    st.count("getdesc:" + ("empty" if cands[0][0] is None else cands[0][0][0]))
    res = _outcome(h.getdesc, ri and ri.obj, wi and wi.obj)
    _same_buf(ctx, snap, "getdesc wrote to the shared buffer")
    got = (ri and ri.obj.segments, wi and wi.obj.segments)
    for cand in cands:
        outcome, r2, w2, bug = cand
        if not _same_result(res, outcome):
            continue
        if outcome is not None and outcome[0] != "ring" and (
                (r2 is not None and got[0] != r2[0]) or (w2 is not None and got[1] != w2[0])):
            continue
        break
    else:
        outcome, r2, w2, _ = cands[0]
        raise Finding(f"host{ctx.hid} getdesc: got {res!r} segments {got!r}; model {outcome!r} "
                      f"segments {r2 and r2[0]!r} / {w2 and w2[0]!r}")
    if bug:
        st.observed(bug, f"host{ctx.hid} getdesc returned {res!r}: the iov's capacity overrode "
                         f"max_iov={ctx.max_iov}")
    ctx.take(cand)
    filled = outcome is not None and outcome[0] != "ring"
    for s, m, wr in ((ri, r2, False), (wi, w2, True)):
        if s is None:
            continue
        if not s.modelled:
            s.bound, s.hid, s.writable = ctx.hid, ctx.hid, wr
            continue
        if filled:
            s.segs, s.cap = m
            s.hid, s.pos = ctx.hid, 0
            for off, ln in s.segs:
                expect(ctx.lo <= off and off + ln <= ctx.hi, "segment (%d,%d) outside the arena", off, ln)
        else:
            # Nothing fetched.  The iov may be rewound, or (vringh) keep its old
            # chain - but only one validated by this ring, in this direction.
            now = s.obj.segments
            if not now:
                s.segs, s.pos = [], 0
            elif now != s.segs:
                raise Finding(f"getdesc {res!r} changed an iov to {now!r} (was {s.segs!r})")
            elif s.hid != ctx.hid or s.writable != wr:
                st.observed("iov-stale-rebind",
                            f"getdesc returned {res!r}: an Iov still holds {len(now)} segment(s) validated by "
                            f"ring {s.hid} ({'writable' if s.writable else 'readable'}) but is now bound to "
                            f"ring {ctx.hid} as {'wiov' if wr else 'riov'}")
                if st.known == "skip":
                    # step around it: retire the poisoned Iov, use a fresh one
                    pool[pool.index(s)] = IovState(Iov())
                    continue
                s.modelled = False                    # known="ignore": keep using it
        s.bound, s.writable = ctx.hid, wr


def _copy_plan(segs, pos, n):
    """The chunks an Iov copy of n bytes from cursor `pos` touches, in order:
    (segment offset of the chunk, offset in the caller's buffer, length)."""
    out = []
    done = 0
    for off, ln in segs:
        if done >= n:
            break
        if pos >= ln:
            pos -= ln
            continue
        part = min(ln - pos, n - done)
        out.append((off + pos, done, part))
        done += part
        pos = 0
    return out


def _alias_view(src, pool, s, bctx, writable):
    """A view of another pooled Iov's segment on the same ring (the zero-copy
    echo pattern), or None: (iov state, segment offset, memoryview)."""
    b = src.u8()
    t = pool[b % 3]
    if t is s or not t.modelled or t.bound != s.bound or bctx is None or bctx.closed or not t.segs \
            or t.writable != writable or t.hid != s.bound:
        return None
    off, ln = t.segs[(b >> 2) % len(t.segs)]
    mv = memoryview(bctx.buf)[off:off + ln]
    return t, off, mv if writable else mv.toreadonly()


def _overlaps(plan, other_off, src_is_segment):
    """Does any chunk copy between overlapping ranges?"""
    for seg_off, done, part in plan:
        if part and seg_off < other_off + done + part and other_off + done < seg_off + part:
            return True
    return False


def op_pull(st, ctxs, pool, ctx):
    src = st.src
    b = src.u8()
    s = pool[b % 3]
    kind = (b >> 2) % 3
    bctx = ctxs[s.bound] if s.bound is not None else None
    dead = s.bound is None or bctx.closed
    if not s.modelled or (bctx is not None and not bctx.modelled):
        n = -1 if b & 0x80 else src.u16()
        try:
            if kind == 0:
                s.obj.pull(n)
            elif kind == 1:
                s.obj.pull_into(bytearray(max(n, 0) or s.obj.remaining))
            else:
                s.obj.views()
        except ValueError:
            pass
        return
    total = s.total()
    expect(s.obj.remaining == total - s.pos, "iov remaining %d, model %d", s.obj.remaining, total - s.pos)
    if kind == 0:
        n = -1 if b & 0x80 else src.u16() % (total + 2)
        res = _outcome(s.obj.pull, n)
    elif kind == 1:
        alias = _alias_view(src, pool, s, bctx, True) if b & 0x40 and not dead and not s.writable else None
        if alias is not None:
            # riov.pull_into(wiov.views()[k]): copy within the shared buffer
            _t, doff, dst = alias
            st.count("pull_into:view")
            plan = _copy_plan(s.segs, s.pos, len(dst))
            if _overlaps(plan, doff, True) and st.avoid("iov-copy-overlap"):
                dst.release()
                return
            exp = bytearray(bctx.buf)
            for seg_off, done, part in plan:                 # memmove semantics, chunk by chunk
                exp[doff + done:doff + done + part] = bytes(exp[seg_off:seg_off + part])
            res = _outcome(s.obj.pull_into, dst)
            dst.release()
            moved = sum(p for _, _, p in plan)
            expect(res == ("ok", moved), "pull_into(view): %r, model %d", res, moved)
            _same_buf(bctx, exp, "pull_into a view of the segment")
            s.pos += moved
            return
        n = src.u16() % (total + 2)
        dst = bytearray(n)
        res = _outcome(s.obj.pull_into, dst)
    else:
        res = _outcome(s.obj.views)
    if dead or (s.writable and kind != 2):
        _expect_valueerror(res, "pull/views on an unbound, closed or writable iov")
        return
    expect(res[0] == "ok", "pull/views: %r", res)
    data = s.content(ctxs)
    if kind == 2:
        vs = res[1]
        expect(len(vs) == len(s.segs), "views: %d views for %d segments", len(vs), len(s.segs))
        for v, (o, n) in zip(vs, s.segs):
            expect(bytes(v) == bytes(bctx.buf[o:o + n]) and v.readonly == (not s.writable),
                   "views: wrong view of segment (%d,%d)", o, n)
            v.release()
        return
    want = data[s.pos:] if n < 0 else data[s.pos:s.pos + n]
    if kind == 0:
        expect(res[1] == want, "pull(%d): %d bytes differ from the segments", n, len(res[1]))
    else:
        expect(res[1] == len(want) and bytes(dst[:len(want)]) == want, "pull_into: wrong bytes")
    s.pos += len(want)


def op_push(st, ctxs, pool, ctx):
    src = st.src
    b = src.u8()
    s = pool[b % 3]
    bctx = ctxs[s.bound] if s.bound is not None else None
    total = s.total()
    n = src.u16() % (total + 2)
    data = PATTERN[b * 3:b * 3 + n]
    if not s.modelled or (bctx is not None and not bctx.modelled):
        try:
            s.obj.push(data)
        except ValueError:
            pass
        return
    ok = s.bound is not None and not bctx.closed and s.writable
    alias = _alias_view(src, pool, s, bctx, False) if b & 0x40 and ok else None
    if alias is not None:
        # wiov.push(riov.views()[k]): echo a request back, within the shared buffer
        _t, soff, data = alias
        st.count("push:view")
        n = len(data)
        plan = _copy_plan(s.segs, s.pos, n)
        if _overlaps(plan, soff, False) and st.avoid("iov-copy-overlap"):
            data.release()
            return
    exp = bytearray(bctx.buf) if bctx is not None else None
    res = _outcome(s.obj.push, data)
    if alias is not None:
        data.release()
    if not ok:
        _expect_valueerror(res, "push on an unbound, closed or readable iov")
        return
    plan = _copy_plan(s.segs, s.pos, n)
    for off, done, part in plan:                         # memmove semantics, chunk by chunk
        exp[off:off + part] = bytes(exp[soff + done:soff + done + part]) if alias else data[done:done + part]
    done = sum(p for _, _, p in plan)
    expect(res == ("ok", done), "push(%d): returned %r, model %d", n, res, done)
    _same_buf(bctx, exp, "push")
    s.pos += done


def op_cursor(st, ctxs, pool, ctx):
    b = st.src.u8()
    s = pool[b % 3]
    if b & 4:
        s.obj.reset()
        s.pos = 0
    else:
        n = st.src.u16()
        got = s.obj.advance(n)
        want = min(n, s.total() - s.pos)
        if s.modelled:
            expect(got == want, "advance(%d) = %d, model %d", n, got, want)
        s.pos += got


def op_complete(st, ctxs, pool, ctx):
    src = st.src
    hd = _pick_head(src, ctx)
    ln = _pick_len(src, ctx, hd)
    if not ctx.modelled:
        _outcome(ctx.host.complete, hd, ln)
        return
    exp = bytearray(ctx.buf)
    res = _outcome(ctx.host.complete, hd, ln)
    if ctx.closed or hd not in ctx.inflight or ln > ctx.wcap[hd]:
        _expect_valueerror(res, f"complete({hd}, {ln})")
    else:
        expect(res == ("ok", None), "complete(%d, %d): %r", hd, ln, res)
        ctx.put_used(exp, ctx.last_used + ctx.completed, hd, ln)
        ctx.publish_used(exp, 1)
        ctx.complete_fetch(hd)
        ctx.n_inflight = (ctx.n_inflight - 1) & 0xFFFFFFFF
    _same_buf(ctx, exp, "complete")


def op_complete_multi(st, ctxs, pool, ctx):
    src = st.src
    k = src.u8() % 6
    items = []
    for _ in range(k):
        hd = _pick_head(src, ctx)
        items.append((hd, _pick_len(src, ctx, hd)))
    if not ctx.modelled:
        _outcome(ctx.host.complete_multi, items)
        return
    exp = bytearray(ctx.buf)
    res = _outcome(ctx.host.complete_multi, items)
    heads = [h for h, _ in items]
    ok = (not ctx.closed and k <= ctx.num and k <= ctx.n_inflight and len(set(heads)) == k
          and all(h in ctx.inflight and ln <= ctx.wcap[h] for h, ln in items))
    if not ok:
        _expect_valueerror(res, f"complete_multi({items})")
    else:
        expect(res == ("ok", None), "complete_multi(%r): %r", items, res)
        for j, (h, ln) in enumerate(items):
            ctx.put_used(exp, ctx.last_used + ctx.completed + j, h, ln)
            ctx.complete_fetch(h)
        ctx.publish_used(exp, k)
        ctx.n_inflight = (ctx.n_inflight - k) & 0xFFFFFFFF
    _same_buf(ctx, exp, "complete_multi")


def op_abandon(st, ctxs, pool, ctx):
    b = st.src.u8()
    n = b % 4 if b < 250 else st.src.u32()
    if ctx.modelled and ctx.num < n <= ctx.n_inflight:   # only after an abandon-completed-fetch drift
        ctx.modelled = False
    idxs = [(ctx.last_avail - k) & 0xFFFF for k in range(1, n + 1)] if n <= min(ctx.n_inflight, ctx.num) else []
    c_ok = n <= ctx.n_inflight and all(ctx.c_fetched[i & ctx.mask] in ctx.inflight for i in idxs)
    ok = n <= ctx.n_inflight and all(i in ctx.fetch for i in idxs)
    if c_ok and not ok and st.avoid("abandon-completed-fetch"):
        return
    if not ctx.modelled:
        _outcome(ctx.host.abandon, n)
        return
    snap = bytes(ctx.buf)
    res = _outcome(ctx.host.abandon, n)
    if ok:
        expect(res == ("ok", None), "abandon(%d): %r", n, res)
    elif res[0] == "exc" or not c_ok:
        _expect_valueerror(res, f"abandon({n})")
    else:
        st.observed("abandon-completed-fetch", f"abandon({n}) accepted: the last fetches were heads "
                    f"{[ctx.c_fetched[i & ctx.mask] for i in idxs]}, one of them completed and fetched again")
    if res == ("ok", None):                          # what vrh_abandon does (== correct when ok)
        for i in idxs:
            ctx.inflight.discard(ctx.c_fetched[i & ctx.mask])
            ctx.fetch.pop(i, None)
        ctx.n_inflight = (ctx.n_inflight - n) & 0xFFFFFFFF
        ctx.last_avail = (ctx.last_avail - n) & 0xFFFF
    _same_buf(ctx, snap, "abandon wrote to the shared buffer")


def _after_close(st, ctx, verb, *args) -> bool:
    """If the ring is closed, the call must raise ValueError.  True = handled."""
    if not ctx.closed:
        return False
    if st.avoid("verbs-after-close"):
        return True
    res = _outcome(getattr(ctx.host, verb), *args)
    if not (res[0] == "exc" and type(res[1]) is ValueError):
        st.observed("verbs-after-close", f"VringHost.{verb}() after close() returned {res!r}")
    return True


def op_notify(st, ctxs, pool, ctx):
    kind = st.src.u8() % 5
    h = ctx.host
    verb = ("need_notify", "notify_enable", "notify_disable", "pending", "notify")[kind]
    if _after_close(st, ctx, verb):
        return
    if not ctx.modelled:
        _outcome(getattr(h, verb))
        return
    exp = bytearray(ctx.buf)
    snap = bytes(exp)
    if kind in (0, 4):
        want = ctx.need_notify(snap)
    elif kind == 1:
        if ctx.event_idx:
            _wr16(exp, ctx.used_off + 4 + 8 * ctx.num, ctx.last_avail)
        else:
            _wr16(exp, ctx.used_off, 0)
        want = _rd16(snap, ctx.avail_off + 2) == ctx.last_avail
    elif kind == 2:
        if not ctx.event_idx:
            _wr16(exp, ctx.used_off, 1)
        want = None
    else:
        want = ctx.last_avail != ctx.shadow or _rd16(snap, ctx.avail_off + 2) != ctx.last_avail
    res = _outcome(getattr(h, verb))
    expect(res == ("ok", want), "%s(): %r, model %r", verb, res, want)
    _same_buf(ctx, exp, verb)


def op_pull_many(st, ctxs, pool, ctx):
    src = st.src
    b = src.u8()
    dst = bytearray(src.u16() % (2 * (ctx.hi - ctx.lo) + 1))
    cnt = src.u8() % (ctx.num + 2)
    lengths = array("I", [0xAAAAAAAA]) * cnt
    max_count = src.u8() if b & 1 else 0xFFFFFFFF
    notify = bool(b & 2)
    if not ctx.modelled:
        _outcome(ctx.host.pull_many, dst, lengths, max_count, notify)
        return
    exp = bytearray(ctx.buf)
    snap = bytes(exp)
    res = _outcome(ctx.host.pull_many, dst, lengths, max_count, notify)
    if ctx.closed:
        _expect_valueerror(res, "pull_many after close")
        return
    n = pos = 0
    got = []
    err = None
    nmax = min(max_count, cnt, ctx.num)
    priv = ([], ctx.priv_cap)
    while n < nmax:
        cand = ctx.getdesc(snap, priv, None)[0]     # pull_many's own iov never exceeds max_iov
        ctx.take(cand)
        ref, priv = cand[0], cand[1] or priv
        if ref is None:
            break
        if ref[0] != "ok":
            err = ref
            break
        data = b"".join(snap[o:o + ln] for o, ln in priv[0])
        if len(data) > len(dst) - pos:
            ctx.last_avail = (ctx.last_avail - 1) & 0xFFFF       # vrh_abandon(1)
            ctx.inflight.discard(ref[1])
            ctx.fetch.pop(ctx.last_avail, None)
            ctx.n_inflight = (ctx.n_inflight - 1) & 0xFFFFFFFF
            break
        got.append((ref[1], data))
        pos += len(data)
        n += 1
    ctx.priv_cap = priv[1]
    if n:
        for j, (hd, _) in enumerate(got):
            ctx.put_used(exp, ctx.last_used + ctx.completed + j, hd, 0)
            ctx.complete_fetch(hd)
        ctx.publish_used(exp, n)
        ctx.n_inflight = (ctx.n_inflight - n) & 0xFFFFFFFF
        if notify:
            ctx.need_notify(snap)
    if err is None:
        expect(res == ("ok", n), "pull_many: %r, model %d chains", res, n)
    elif err[0] == "ring":
        expect(res[0] == "exc" and type(res[1]) is InvalidRing, "pull_many: %r, model InvalidRing", res)
    else:
        expect(res[0] == "exc" and type(res[1]) is InvalidDescriptor and res[1].head == err[2]
               and res[1].errno == err[1], "pull_many: %r, model InvalidDescriptor(%d, %d)", res, err[1], err[2])
    wantb = b"".join(d for _, d in got)
    expect(bytes(dst[:len(wantb)]) == wantb, "pull_many: wrong bytes in dst")
    expect(list(lengths[:n]) == [len(d) for _, d in got], "pull_many: lengths %r", list(lengths[:n]))
    _same_buf(ctx, exp, "pull_many")


def op_set_base(st, ctxs, pool, ctx):
    src = st.src
    b = src.u8() % 3
    idx = src.u16() if b == 2 else ctx.last_avail if b == 0 or ctx.freed else _rd16(ctx.buf, ctx.used_off + 2)
    if _after_close(st, ctx, "set_base", idx):
        return
    if not ctx.modelled:
        _outcome(ctx.host.set_base, idx)
        return
    exp = bytearray(ctx.buf)
    res = _outcome(ctx.host.set_base, idx)
    expect(res == ("ok", None), "set_base: %r", res)
    ctx.reset(idx)
    _wr16(exp, ctx.used_off + 2, idx)
    _same_buf(ctx, exp, "set_base")


def op_close(st, ctxs, pool, ctx):
    if ctx.closed:
        return
    ctx.host.close()
    ctx.closed = True
    if st.known == "ignore":
        # Let the buffer go, as a caller unmapping the segment after close()
        # would: any later access through the host or an Iov is a use-after-free.
        ctx.freed = True
        ctx.modelled = False
        ctx.buf = None
        for s in pool:
            if s.bound == ctx.hid:
                s.modelled = False


def op_mutate(st, ctxs, pool, ctx):
    """A racing hostile producer rewrites part of the ring or arena."""
    if ctx.freed:
        return
    src = st.src
    b = src.u8()
    buf = ctx.buf
    kind = (0, 0, 1, 2, 3, 3, 3, 4)[b % 8]
    b >>= 3
    if kind == 0:                                    # raw bytes anywhere in the rings / arena
        regions = ((ctx.desc_off, 16 * ctx.num), (ctx.avail_off, 6 + 2 * ctx.num),
                   (ctx.used_off, 6 + 8 * ctx.num), (ctx.lo, ctx.hi - ctx.lo))
        start, ln = regions[b % 4]
        off = start + src.u16() % ln
        n = 1 + src.u8() % 8
        data = src.take(n)[:start + ln - off]
        buf[off:off + len(data)] = data
    elif kind == 1:                                  # one structured descriptor
        _fill_desc(src, buf, ctx.desc_off + 16 * (src.u8() % ctx.num), ctx.lo, ctx.hi - ctx.lo, ctx.num)
    elif kind == 2:                                  # an indirect table entry in the arena
        at = ctx.lo + 16 * (src.u8() % ((ctx.hi - ctx.lo) // 16))
        _fill_desc(src, buf, at, ctx.lo, ctx.hi - ctx.lo, ctx.num)
    elif kind == 3:                                  # publish 1..4 heads, as a producer would
        ai = _rd16(buf, ctx.avail_off + 2)
        pending = {_rd16(buf, ctx.avail_off + 4 + 2 * (k & ctx.mask))
                   for k in range(ctx.last_avail, ctx.last_avail + ((ai - ctx.last_avail) & 0xFFFF) % (ctx.num + 1))}
        free = [h for h in range(ctx.num) if h not in ctx.inflight and h not in pending]
        for _ in range(1 + b % 4):
            c = src.u8()
            hd = free.pop(c % len(free)) if free and c < 240 else c % (ctx.num + 1)
            _wr16(buf, ctx.avail_off + 4 + 2 * (ai & ctx.mask), hd)
            ai = (ai + 1) & 0xFFFF
        _wr16(buf, ctx.avail_off + 2, ai)
    else:                       # avail idx anywhere, avail flags, used_event, used flags, avail_event
        offs = (ctx.avail_off + 2, ctx.avail_off, ctx.avail_off + 4 + 2 * ctx.num, ctx.used_off,
                ctx.used_off + 4 + 8 * ctx.num)
        _wr16(buf, offs[b % 5], src.u16())


HOST_OPS = (op_getdesc, op_getdesc, op_getdesc, op_pull, op_pull, op_push, op_cursor, op_complete,
            op_complete, op_complete_multi, op_abandon, op_notify, op_notify, op_pull_many,
            op_set_base, op_mutate, op_mutate, op_mutate, op_mutate, op_close)
MAX_OPS = 64


def run_host(st: State):
    ctxs = _setup_host(st)
    pool = [IovState(Iov()) for _ in range(3)]
    src = st.src
    for _ in range(MAX_OPS):
        if src.left() <= 0:
            break
        b = src.u8()
        op = HOST_OPS[b % len(HOST_OPS)]
        if op is op_close and not b & 0x80:
            continue                                  # close is rare
        ctx = ctxs[1] if b >= 0xE0 else ctxs[0]
        st.count(op.__name__)
        op(st, ctxs, pool, ctx)
        _check_host(ctx)


# =============================================================================
# driver target: VringDriver's used-ring validation against a hostile device
# =============================================================================
class DriverCtx:
    def __init__(self, st):
        src = st.src
        self.num = num = src.pick(NUMS)
        self.mask = num - 1
        fb = src.u8()
        self.event_idx = bool(fb & 1)
        want_ind = bool(fb & 2)
        features = (FEAT_EVENT_IDX if self.event_idx else 0) | (FEAT_INDIRECT if want_ind else 0)
        arena = src.pick(ARENAS[1:]) + (64 * num if fb & 4 else 0)
        lay = layout.SegmentLayout.build([num], [arena + 16 * 4 * num], features=features)
        r = lay.rings[0]
        self.desc_off, self.avail_off, self.used_off = r.desc_off, r.avail_off, r.used_off
        self.buf = bytearray(lay.seg_size)
        self.lo, self.hi = r.win_off, r.win_off + r.win_size
        self.slot_size = 64 if fb & 4 else 0
        self.ind_entries = 0
        pool = None
        if want_ind and num >= 2:
            self.ind_entries = min(4, num)
            self.ind_off = self.hi - 16 * self.ind_entries * num
            pool = (self.ind_off, self.ind_entries)
        base = src.u16() if fb & 8 else 0
        _wr16(self.buf, self.avail_off + 2, base)
        _wr16(self.buf, self.used_off + 2, src.u16() if fb & 16 else base)
        self.drv = VringDriver(self.buf, *r.ring_args(), features=features, indirect_pool=pool,
                               slot_size=self.slot_size)
        self.closed = False
        self.reset(base)
        _wr16(self.buf, self.avail_off + 2, base)
        self.disable_cb()

    def reset(self, idx):
        self.link = [(k + 1) & 0xFFFF for k in range(self.num)]
        self.ndesc = [0] * self.num
        self.wcap = [0] * self.num
        self.token = [None] * self.num
        self.free_head = 0
        self.num_free = self.num
        self.avail_idx = self.kicked = self.last_used = self.shadow_used = idx
        self.num_added = 0
        self.broken = False

    def disable_cb(self, exp=None):
        exp = self.buf if exp is None else exp
        self.cb = False
        if self.event_idx:
            _wr16(exp, self.avail_off + 4 + 2 * self.num, (self.last_used - 1) & 0xFFFF)
        else:
            _wr16(exp, self.avail_off, 1)

    def get_buf(self, snap, exp):
        """Reference vrd_get_buf: None | ('ring',) | (head, len, token)."""
        if self.broken:
            return ("ring",)
        if self.last_used == self.shadow_used:
            u = _rd16(snap, self.used_off + 2)
            if u == self.last_used:
                return None
            if ((u - self.last_used) & 0xFFFF) > ((self.avail_idx - self.last_used) & 0xFFFF):
                self.broken = True
                return ("ring",)
            self.shadow_used = u
        hid, ln = _ELEM.unpack_from(snap, self.used_off + 4 + 8 * (self.last_used & self.mask))
        if hid >= self.num or self.ndesc[hid] == 0 or ln > self.wcap[hid]:
            self.broken = True
            return ("ring",)
        n, last = self.ndesc[hid], hid
        for _ in range(1, n):
            last = self.link[last]
        self.link[last] = self.free_head
        self.free_head = hid
        self.num_free += n
        self.ndesc[hid] = 0
        tok, self.token[hid] = self.token[hid], None
        self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx and self.cb:
            _wr16(exp, self.avail_off + 4 + 2 * self.num, self.last_used)
        return (hid, ln, tok)

    def add(self, exp, segs, n_out, tok, slot=None):
        """Reference vrd_add / vrd_add_slot (slot = (data or None, length)):
        the head, 'full', 'inval' or 'broken'."""
        total = len(segs)
        if self.broken:
            return "broken"
        if slot is not None:
            slot_data, ln = slot
            if not self.slot_size or ln > self.slot_size:
                return "inval"
            if self.num_free < 1:
                return "full"
            hd = self.free_head
            self.free_head = self.link[hd]
            self.num_free -= 1
            off = self.lo + hd * self.slot_size
            if slot_data is not None:
                exp[off:off + ln] = slot_data
            _DESC.pack_into(exp, self.desc_off + 16 * hd, off, ln, F_WRITE if slot_data is None else 0, 0)
            self.ndesc[hd] = 1
            wbytes = ln if slot_data is None else 0
        else:
            if total == 0 or not all(self.lo <= o <= self.hi and n <= self.hi - o for o, n in segs):
                return "inval"
            wbytes = sum(n for _, n in segs[n_out:])
            if self.ind_entries and 1 < total <= self.ind_entries:
                if self.num_free < 1:
                    return "full"
                hd = self.free_head
                self.free_head = self.link[hd]
                self.num_free -= 1
                t = self.ind_off + hd * self.ind_entries * 16
                for k, (o, n) in enumerate(segs):
                    fl = (F_WRITE if k >= n_out else 0) | (F_NEXT if k + 1 < total else 0)
                    _DESC.pack_into(exp, t + 16 * k, o, n, fl, k + 1 if k + 1 < total else 0)
                _DESC.pack_into(exp, self.desc_off + 16 * hd, t, total * 16, F_INDIRECT, 0)
                self.ndesc[hd] = 1
            else:
                if self.num_free < total:
                    return "full"
                hd = i = self.free_head
                for k, (o, n) in enumerate(segs):
                    fl = F_WRITE if k >= n_out else 0
                    if k + 1 < total:
                        _DESC.pack_into(exp, self.desc_off + 16 * i, o, n, fl | F_NEXT, self.link[i])
                    else:
                        _DESC.pack_into(exp, self.desc_off + 16 * i, o, n, fl, 0)
                    i = self.link[i]
                self.free_head = i
                self.num_free -= total
                self.ndesc[hd] = total
        self.wcap[hd] = wbytes
        self.token[hd] = tok
        _wr16(exp, self.avail_off + 4 + 2 * (self.avail_idx & self.mask), hd)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.num_added += 1
        _wr16(exp, self.avail_off + 2, self.avail_idx)
        return hd


def _check_driver(dc):
    d = dc.drv
    expect(d.num_free == dc.num_free, "driver num_free %d, model %d", d.num_free, dc.num_free)
    expect(d.broken == dc.broken, "driver broken %s, model %s", d.broken, dc.broken)
    expect(d.avail_idx == dc.avail_idx and d.last_used_idx == dc.last_used,
           "driver indices (%d,%d), model (%d,%d)", d.avail_idx, d.last_used_idx, dc.avail_idx, dc.last_used)
    expect(dc.num_free + sum(dc.ndesc) == dc.num, "model free-list accounting")


def _drv_same(dc, exp, what):
    if dc.buf != exp:
        diff = next(i for i in range(len(exp)) if dc.buf[i] != exp[i])
        raise Finding(f"{what}: driver buffer byte {diff} is {dc.buf[diff]}, model {exp[diff]}")


def _seg(src, dc):
    b = src.u8()
    size = dc.hi - dc.lo
    if b & 0x80 and b & 0x40:
        return (src.u64(), src.u32())                 # garbage: outside the arena
    off = dc.lo + src.u16() % (size + 1)
    return (off, src.u16() % (dc.hi - off + 1))


def drv_add(st, dc):
    src = st.src
    b = src.u8()
    exp = bytearray(dc.buf)
    tok = object()
    d = dc.drv
    kind = b % 4
    if kind == 3 and dc.slot_size and b & 8:
        drv_add_many(st, dc, b, exp)
        return
    if kind == 3 and dc.slot_size:
        ln = src.u8() % (dc.slot_size + 2)
        if b & 4:
            data = PATTERN[b:b + ln]
            ref = dc.add(exp, (), 0, tok, slot=(data, ln))
            res = _outcome(d.add_slot, data, tok)
        else:
            ref = dc.add(exp, (), 0, tok, slot=(None, ln))
            res = _outcome(d.add_slot_writable, ln, tok)
    else:
        n_out = (b >> 2) % 4
        n_in = (b >> 4) % 4 if kind != 2 else 0
        segs = [_seg(src, dc) for _ in range(n_out + n_in)]
        if kind == 2 and n_out == 1:
            ref = dc.add(exp, segs, 1, tok)
            res = _outcome(d.add_buf, segs[0][0], segs[0][1], False, tok)
        else:
            ref = dc.add(exp, segs, n_out, tok)
            res = _outcome(d.add, segs[:n_out], segs[n_out:], tok)
    if dc.closed:
        _expect_valueerror(res, "add after close")
        return
    if ref == "full":
        expect(res == ("ok", None), "add: ring full in the model, got %r", res)
    elif ref == "inval":
        _expect_valueerror(res, "add of an invalid chain")
    elif ref == "broken":
        expect(res[0] == "exc" and type(res[1]) in (InvalidRing, ValueError), "add on a broken ring: %r", res)
    else:
        expect(res == ("ok", ref), "add: head %r, model %r", res, ref)
    _drv_same(dc, exp, "add")


def drv_add_many(st, dc, b, exp):
    """VringDriver.add_many_slots (batch, no GIL) against the model."""
    src = st.src
    st.count("drv_add_many")
    cnt = src.u8() % (dc.num + 3)
    lengths = array("I", [src.u8() % (dc.slot_size + 2) for _ in range(cnt)])
    srcbuf = PATTERN[b:b + src.u16() % (dc.slot_size * (cnt + 1) + 1)]
    count = src.u8() if b & 0x10 else cnt
    kick = bool(b & 0x20)
    res = _outcome(dc.drv.add_many_slots, srcbuf, lengths, count, kick)
    if dc.closed:
        _expect_valueerror(res, "add_many_slots after close")
        return
    count = min(count, cnt)
    n = pos = 0
    while n < count:
        ln = lengths[n]
        if ln > dc.slot_size or pos + ln > len(srcbuf):
            break
        if not isinstance(dc.add(exp, (), 0, None, slot=(srcbuf[pos:pos + ln], ln)), int):
            break
        pos += ln
        n += 1
    if kick and n:
        dc.kicked, dc.num_added = dc.avail_idx, 0
    if n < count and dc.broken:
        expect(res[0] == "exc" and type(res[1]) is InvalidRing, "add_many_slots: %r, model InvalidRing", res)
    else:
        expect(res == ("ok", n), "add_many_slots: %r, model %d", res, n)
        st.count("drv_add_many:%s" % ("0" if n == 0 else "n"))
    _drv_same(dc, exp, "add_many_slots")


def drv_get(st, dc):
    src = st.src
    b = src.u8()
    d = dc.drv
    exp = bytearray(dc.buf)
    snap = bytes(exp)
    kind = b % 3
    if kind == 2:
        mx = src.u8() % (dc.num + 2)
        res = _outcome(d.reclaim, mx)
        if dc.closed:
            _expect_valueerror(res, "reclaim after close")
            return
        n, err = 0, False
        while n < mx and n < dc.num:
            r = dc.get_buf(snap, exp)
            if r is None:
                break
            if r[0] == "ring":
                err = True
                break
            n += 1
        if err:
            expect(res[0] == "exc" and type(res[1]) is InvalidRing, "reclaim: %r, model InvalidRing", res)
        else:
            expect(res == ("ok", n), "reclaim: %r, model %d", res, n)
    else:
        res = _outcome(d.get_buf if kind == 0 else d.get_buf_head)
        if dc.closed:
            _expect_valueerror(res, "get_buf after close")
            return
        r = dc.get_buf(snap, exp)
        if r is None:
            expect(res == ("ok", None), "get_buf: %r, model None", res)
        elif r[0] == "ring":
            expect(res[0] == "exc" and type(res[1]) is InvalidRing, "get_buf: %r, model InvalidRing", res)
        else:
            hd, ln, tok = r
            if kind == 0:
                expect(res[0] == "ok" and res[1] is not None and res[1][0] is tok and res[1][1] == ln,
                       "get_buf: %r, model (token of head %d, %d)", res, hd, ln)
            else:
                expect(res == ("ok", (hd, ln)), "get_buf_head: %r, model (%d, %d)", res, hd, ln)
    _drv_same(dc, exp, "get_buf/reclaim")


def drv_device(st, dc):
    """The hostile device writes the used ring (or anything else)."""
    src = st.src
    b = src.u8()
    buf = dc.buf
    kind = b % 5
    if kind == 0:                      # one used element, usually plausible
        live = [h for h in range(dc.num) if dc.ndesc[h]]
        i = src.u8()
        hid = live[i % len(live)] if live and i < 200 else src.u32() if i > 250 else i % (dc.num + 1)
        c = src.u8() % 4
        wc = dc.wcap[hid] if hid < dc.num else 0
        ln = src.u32() if c == 3 else (0, wc, wc + 1)[c] & 0xFFFFFFFF
        slot = (_rd16(buf, dc.used_off + 2) + (b >> 3) % 3) & dc.mask
        _ELEM.pack_into(buf, dc.used_off + 4 + 8 * slot, hid, ln)
    elif kind == 1:                    # used idx forward a bit
        _wr16(buf, dc.used_off + 2, _rd16(buf, dc.used_off + 2) + 1 + (b >> 3) % 3)
    elif kind == 2:                    # used idx anywhere
        _wr16(buf, dc.used_off + 2, src.u16())
    elif kind == 3:                    # used flags / avail_event
        _wr16(buf, dc.used_off if b & 8 else dc.used_off + 4 + 8 * dc.num, src.u16())
    else:                              # raw bytes anywhere in the segment's rings or arena
        regions = ((dc.desc_off, 16 * dc.num), (dc.avail_off, 6 + 2 * dc.num),
                   (dc.used_off, 6 + 8 * dc.num), (dc.lo, dc.hi - dc.lo))
        start, ln = regions[(b >> 3) % 4]
        off = start + src.u16() % ln
        data = src.take(1 + src.u8() % 8)[:start + ln - off]
        buf[off:off + len(data)] = data


def drv_notify(st, dc):
    src = st.src
    kind = src.u8() % 8
    d = dc.drv
    names = ("kick_prepare", "enable_cb", "enable_cb_delayed", "disable_cb", "poll", "pending",
             "detach_unused", "set_base")
    if dc.closed:
        if st.avoid("verbs-after-close"):
            return
        args = (src.u16(),) if kind in (4, 7) else ()
        res = _outcome(getattr(d, names[kind]), *args)
        if not (res[0] == "exc" and type(res[1]) is ValueError):
            st.observed("verbs-after-close", f"VringDriver.{names[kind]}() after close() returned {res!r}")
        return
    exp = bytearray(dc.buf)
    snap = bytes(exp)
    ue_off = dc.avail_off + 4 + 2 * dc.num
    if kind == 0:
        if dc.event_idx:
            want = dc.num_added >= 0xFFFF or _need_event(_rd16(snap, dc.used_off + 4 + 8 * dc.num),
                                                          dc.avail_idx, dc.kicked)
        else:
            want = not (_rd16(snap, dc.used_off) & 1)
        dc.kicked, dc.num_added = dc.avail_idx, 0
        res = _outcome(d.kick_prepare)
    elif kind in (1, 2):
        dc.cb = True
        if kind == 1:
            bufs = 0
            ev = dc.last_used
        else:
            bufs = ((((dc.avail_idx - dc.last_used) & 0xFFFF) * 3) // 4) & 0xFFFF
            ev = (dc.last_used + bufs) & 0xFFFF
        if dc.event_idx:
            _wr16(exp, ue_off, ev)
        else:
            _wr16(exp, dc.avail_off, 0)
        want = not (((_rd16(snap, dc.used_off + 2) - dc.last_used) & 0xFFFF) > bufs)
        res = _outcome(d.enable_cb if kind == 1 else d.enable_cb_delayed)
    elif kind == 3:
        dc.disable_cb(exp)
        want = None
        res = _outcome(d.disable_cb)
    elif kind == 4:
        last = src.u16() if src.u8() & 1 else dc.last_used
        want = _rd16(snap, dc.used_off + 2) != last
        res = _outcome(d.poll, last)
    elif kind == 5:
        want = dc.last_used != dc.shadow_used or _rd16(snap, dc.used_off + 2) != dc.last_used
        res = _outcome(d.pending)
    else:
        if kind == 6:
            want = [dc.token[h] for h in range(dc.num) if dc.ndesc[h]]
            idx = dc.avail_idx
            res = _outcome(d.detach_unused)
        else:
            idx = src.u16()
            want = None
            res = _outcome(d.set_base, idx)
        dc.reset(idx)
        _wr16(exp, dc.avail_off + 2, idx)
        dc.disable_cb(exp)
        if kind == 6:
            expect(res[0] == "ok" and len(res[1]) == len(want) and all(a is b for a, b in zip(res[1], want)),
                   "detach_unused: %r", res)
            _drv_same(dc, exp, "detach_unused")
            return
    expect(res == ("ok", want), "%s: %r, model %r", names[kind], res, want)
    _drv_same(dc, exp, names[kind])


def drv_close(st, dc):
    if not dc.closed:
        dc.drv.close()
        dc.closed = True
        if st.known == "ignore":
            dc.buf = None            # released, as a caller unmapping after close() would


def drv_poke(st, dc):
    """known="ignore" after close + release: call a verb, model nothing (under
    ASAN, one that touches the buffer is a use-after-free)."""
    d = dc.drv
    calls = (d.kick_prepare, d.kick, d.enable_cb, d.enable_cb_delayed, d.disable_cb, d.pending,
             d.detach_unused, d.get_buf, d.reclaim, lambda: d.poll(0), lambda: d.set_base(0),
             lambda: d.add_buf(dc.lo, 1))
    _outcome(calls[st.src.u8() % len(calls)])


DRIVER_OPS = (drv_add, drv_add, drv_add, drv_get, drv_get, drv_device, drv_device, drv_device,
              drv_notify, drv_close)


def run_driver(st: State):
    dc = DriverCtx(st)
    src = st.src
    for _ in range(MAX_OPS):
        if src.left() <= 0:
            break
        b = src.u8()
        op = DRIVER_OPS[b % len(DRIVER_OPS)]
        if op is drv_close and b < 0xC0:
            continue
        st.count(op.__name__)
        if dc.buf is None:
            drv_poke(st, dc)
            continue
        op(st, dc)
        if not dc.closed:
            _check_driver(dc)


# =============================================================================
# header target: parse_header, and rings built from whatever it accepts
# =============================================================================
def run_header(st: State):
    src = st.src
    b = src.u8()
    if b & 1:
        # raw header page from the input, at one of a few segment sizes
        size = (4096, 8192, 16384, 20480, 65536)[(b >> 1) % 5]
        buf = bytearray(size)
        page = src.take(min(src.left(), 4096))
        buf[:len(page)] = page
    else:
        nr = 1 + (b >> 1) % 2
        nums = [src.pick(NUMS) for _ in range(nr)]
        arenas = [src.pick(ARENAS) for _ in range(nr)]
        lay = layout.SegmentLayout.build(nums, arenas, features=(src.u8() & 3) << 28,
                                         max_iov=src.pick(MAX_IOVS))
        buf = bytearray(lay.seg_size + (0, 0, 0, 4096, -4096)[(b >> 3) % 5])
        buf[:4096] = lay.pack_header()
        for _ in range(src.u8() % 6):                 # patch header fields
            off = src.u16() % 0x300
            n = 1 + (src.u8() & 7)
            buf[off:off + n] = src.take(n)
    try:
        lay = layout.parse_header(buf)
    except layout.LayoutError as e:
        st.count("header:rejected:" + str(e).split(" ")[0])
        return
    st.count(f"header:accepted:{len(lay.rings)}")
    # Whatever parse_header accepts must be a consistent, usable layout.
    expect(lay.seg_size == len(buf), "seg_size %d != buffer %d", lay.seg_size, len(buf))
    end = layout.HDR_SIZE
    for r in lay.rings:
        expect(r.desc_off >= end and r.win_off >= lay.arena_off and r.win_off + r.win_size <= lay.arena_off
               + lay.arena_size <= lay.seg_size, "ring/arena placement %r", r)
        expect(r.used_off + 6 + 8 * r.num <= r.desc_off + r.ring_bytes <= lay.arena_off, "ring overruns %r", r)
        end = r.desc_off + r.ring_bytes
    again = layout.parse_header(bytearray(lay.pack_header()) + bytes(lay.seg_size - layout.HDR_SIZE))
    expect(again == lay, "pack_header/parse_header round trip differs")
    for r in lay.rings:
        h = VringHost(buf, *r.ring_args(), features=lay.features, max_msg=lay.max_msg, max_iov=r.max_iov)
        d = VringDriver(buf, *r.ring_args(), features=lay.features)
        riov = Iov()
        for _ in range(4):
            try:
                hd = h.getdesc(riov, Iov())
            except (InvalidRing, InvalidDescriptor):
                break
            if hd is None:
                break
            h.complete(hd, 0)
        h.need_notify()
        try:
            d.get_buf()
        except InvalidRing:
            pass
        h.close()
        d.close()


# =============================================================================
_PRINTED_ERRORS: list = []


def _excepthook(tp, value, tb):
    # Errors CPython can only print (PyErr_Print from a dealloc, for instance)
    # land here; one_input turns them into findings.
    _PRINTED_ERRORS.append(f"{tp.__name__}: {value}")
    if "has exported buffers" not in str(value):      # mapped-gc-clear: counted, not printed
        sys.__excepthook__(tp, value, tb)


def _unraisablehook(u):
    _PRINTED_ERRORS.append(f"unraisable {u.exc_type.__name__}: {u.exc_value} in {u.object!r}")
    sys.__unraisablehook__(u)


def one_input(data: bytes, target: str = "host", known: str = "raise", stats: dict | None = None,
              lenient=()):
    """Run one input through the harness.  Returns normally, or raises Finding /
    KnownBug (a bug), or any other exception (also a bug).

    known: what to do on reaching a KNOWN_BUGS entry (see the module doc);
    lenient: bug ids treated as known="skip" whatever `known` says."""
    _load()
    sys.excepthook, sys.unraisablehook = _excepthook, _unraisablehook
    st = State(Src(data), known, stats, lenient)
    {"host": run_host, "driver": run_driver, "header": run_header}[target](st)
    # Collect this input's garbage now (exception tracebacks make cycles that
    # hold rings and Iovs), so errors printed by deallocators are attributed here.
    gc.collect(1)
    if _PRINTED_ERRORS:
        errs = _PRINTED_ERRORS[:]
        del _PRINTED_ERRORS[:]
        if all("has exported buffers" in e for e in errs):
            st.observed("mapped-gc-clear", errs[0])
        else:
            raise Finding("errors printed during the input: " + "; ".join(errs))


def _target_of(path, default):
    for t in TARGETS:
        if os.sep + t + os.sep in path or os.path.basename(path).startswith(t + "-"):
            return t
    return default


# --- fuzz mode -------------------------------------------------------------------
def _find_ext(build):
    import glob
    hits = glob.glob(os.path.join(build, "vringipc", "_ring*.so"))
    return hits[0] if hits else None


def _asan_env(build):
    """Environment for a child that imports the extension from `build`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = build + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    so = _find_ext(build)
    blob = open(so, "rb").read() if so else b""
    kind = "plain"
    if b"__asan_init" in blob:
        if b"__sanitizer_cov_8bit_counters_init" in blob:
            import atheris  # noqa: F401  (clang + -fsanitize=fuzzer-no-link: atheris's runtime)
            pre = os.path.join(os.path.dirname(os.path.dirname(atheris.__file__)), "asan_with_fuzzer.so")
            kind = "asan+cov"
        else:
            import subprocess
            pre = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                                 text=True).stdout.strip()
            kind = "asan"
        if pre not in env.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = pre + (" " + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
        env.setdefault("ASAN_OPTIONS", "detect_leaks=0:allocator_may_return_null=1")
        # every Python allocation through malloc, so ASAN sees small buffers too
        # (pymalloc pools would hide an overflow of a 192-byte bytearray)
        env.setdefault("PYTHONMALLOC", "malloc")
    return env, kind


def _worker(args, extra):
    """The atheris process (fuzz mode child)."""
    import atheris

    sys.path.insert(0, args.build)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    with atheris.instrument_imports(include=["vringipc"] + (["fuzz_host"] if args.instrument == "all" else [])):
        import fuzz_host as fh          # this file again, instrumented
        fh._load()
    import json

    target, known = args.target, args.known
    stats: dict = {}
    n = [0]

    def test_one(data):
        fh.one_input(data, target, known, stats)
        n[0] += 1
        if args.stats and n[0] % 5000 == 0:
            with open(args.stats + ".tmp", "w") as f:
                json.dump({"inputs": n[0], **stats}, f, sort_keys=True)
            os.replace(args.stats + ".tmp", args.stats)

    atheris.Setup([sys.argv[0]] + extra, test_one)
    atheris.Fuzz()


def _fuzz(args, extra=()):
    import re
    import subprocess
    import tempfile

    env, kind = _asan_env(args.build)
    corpus = args.corpus or tempfile.mkdtemp(prefix=f"vringipc-fuzz-{args.target}-")
    os.makedirs(corpus, exist_ok=True)
    art = args.artifacts or os.path.join(corpus, "..", f"crashes-{args.target}")
    os.makedirs(art, exist_ok=True)
    if not os.listdir(corpus) and args.random_seeds:
        # Deterministic random seeds of a useful size: the harness needs a few
        # hundred bytes before the first operation runs.
        import random
        rng = random.Random(args.target)
        for i in range(args.random_seeds):
            with open(os.path.join(corpus, f"seed-{i:03d}"), "wb") as f:
                f.write(rng.randbytes(rng.randrange(64, args.max_len)))
    seeds = [d for d in args.seed if os.path.isdir(d)]
    reg = os.path.join(ROOT, "tests", "fuzz_corpus", args.target)
    if os.path.isdir(reg):
        seeds.append(reg)
    print(f"fuzz target={args.target} build={args.build} ({kind}) corpus={corpus} artifacts={art}", flush=True)
    if kind == "asan":
        print("  WARNING: gcc's libasan, preloaded first, also defines the __sanitizer_cov_* callbacks and "
              "shadows libFuzzer's: atheris gets no coverage at all (cov stays unset), so this run is blind "
              "random testing under ASAN.  Fuzz with the clang build (tools/README.md); use this build to "
              "--replay a corpus under gcc's ASAN.", flush=True)
    deadline = time.monotonic() + args.seconds
    execs = 0
    cov = ft = None
    crashes = []
    runs = 0
    log = open(args.log, "a") if args.log else None
    before = set(os.listdir(art))
    stats_file = os.path.join(os.path.abspath(art), "..", f"stats-{args.target}.json")
    while True:
        left = int(deadline - time.monotonic())
        if left < 1 or runs > 20:
            break
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--target", args.target,
               "--known", args.known, "--build", args.build, "--stats", stats_file,
               "--instrument", args.instrument, "--",
               f"-max_total_time={left}", f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_mb}",
               f"-malloc_limit_mb={args.malloc_mb}", f"-max_len={args.max_len}",
               f"-artifact_prefix={os.path.abspath(art)}/", "-print_final_stats=1", "-len_control=0",
               *extra, corpus] + seeds
        runs += 1
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace")
        run_execs = 0
        shown = time.monotonic()
        for line in p.stdout:
            if log:
                log.write(line)
                log.flush()
            m = re.match(r"#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+)", line)
            if m:
                run_execs = int(m.group(1))
                cov, ft = int(m.group(3)), int(m.group(4))
                if m.group(2) in ("pulse", "DONE", "INITED") or args.verbose or time.monotonic() - shown > 60:
                    print(f"  [{time.strftime('%H:%M:%S')}] {line.strip()}", flush=True)
                    shown = time.monotonic()
            elif "stat::number_of_executed_units" in line:
                run_execs = int(line.split(":")[-1])
            elif ("ERROR:" in line or "Traceback" in line or "==ERROR" in line or "Finding" in line
                  or "SUMMARY" in line):
                print("  " + line.rstrip(), flush=True)
        rc = p.wait()
        execs += run_execs
        new = sorted(set(os.listdir(art)) - before)
        before |= set(new)
        for f in new:
            if f.startswith(("crash-", "timeout-", "oom-", "leak-")):
                crashes.append(os.path.join(art, f))
                print(f"  FOUND {f} (worker rc={rc})", flush=True)
        if rc == 0 and not new:
            break
        if not new:                       # died without an artifact: report and stop
            crashes.append(f"worker exited rc={rc} without an artifact")
            print(f"  worker exited rc={rc}", flush=True)
            break
    print(f"RESULT target={args.target} build={kind} seconds={args.seconds} execs={execs} "
          f"cov={cov} ft={ft} crashes={len(crashes)} corpus_files={len(os.listdir(corpus))} restarts={runs - 1}",
          flush=True)
    for c in crashes:
        print(f"  crash: {c}")
    if os.path.exists(stats_file):
        with open(stats_file) as f:
            print(f"  harness counters (last worker, every 5000 inputs): {f.read()}")
    return 1 if crashes else 0


def _replay(args):
    bad = 0
    stats: dict = {}
    files = []
    for f in args.replay:
        if os.path.isdir(f):
            files += sorted(os.path.join(f, x) for x in os.listdir(f))
        else:
            files.append(f)
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        t = args.target or _target_of(f, "host")
        try:
            one_input(data, t, args.known, stats, tuple(args.lenient))
            print(f"ok      {t:6} {f}")
        except KnownBug as e:
            bad += 1
            print(f"KNOWN   {t:6} {f}: {e}")
        except Exception as e:  # noqa: BLE001  (every other exception is a finding)
            bad += 1
            print(f"FINDING {t:6} {f}: {type(e).__name__}: {e}")
            if args.verbose:
                import traceback
                traceback.print_exc()
    if stats:
        print("harness counters (known bugs and operations):", stats)
    print(f"{len(files)} inputs, {bad} failing")
    return 1 if bad else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=TARGETS, default=None)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--corpus", help="corpus directory (kept; default: a new temp dir)")
    ap.add_argument("--seed", action="append", default=[], help="extra read-only seed corpus dir(s)")
    ap.add_argument("--artifacts", help="where crash-* files go (default: <corpus>/../crashes-<target>)")
    ap.add_argument("--replay", nargs="+", metavar="FILE", help="run inputs through the harness, no atheris")
    ap.add_argument("--known", choices=("skip", "raise", "ignore"), default=None,
                    help="on a known bug: skip (fuzz default), raise (replay default), ignore (do it anyway)")
    ap.add_argument("--lenient", action="append", default=[], metavar="BUG",
                    help="treat this known bug as skip (replay), e.g. mapped-gc-clear")
    ap.add_argument("--instrument", choices=("all", "lib"), default="all",
                    help="atheris Python instrumentation: harness + vringipc (all) or vringipc only (lib, ~4x faster)")
    ap.add_argument("--build", default=ROOT, help="directory holding the vringipc package to test")
    ap.add_argument("--timeout", type=int, default=10, help="per-input hang limit, seconds")
    ap.add_argument("--rss-mb", type=int, default=3072)
    ap.add_argument("--malloc-mb", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--log", help="append the full libFuzzer output here")
    ap.add_argument("--random-seeds", type=int, default=64, help="random seed inputs for an empty corpus")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ap.add_argument("-v", "--verbose", action="store_true")
    args, extra = ap.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    args.build = os.path.abspath(args.build)
    if args.worker:
        return _worker(args, extra)
    if args.replay:
        env, kind = _asan_env(args.build)
        if kind != "plain" and env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
            # an ASAN build: re-exec with its runtime preloaded
            os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv or sys.argv[1:]), env)
        sys.path.insert(0, args.build)
        args.known = args.known or "raise"
        return _replay(args)
    args.target = args.target or "host"
    args.known = args.known or "skip"
    return _fuzz(args, extra)


if __name__ == "__main__":
    sys.exit(main())
