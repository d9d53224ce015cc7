"""vringipc.bridge over loopback: round trips, order, reconnection, restarts,
a SIGKILLed sender, back-pressure, CURVE, the receive-side validator (fuzzed)
and the CLI.  Bridges run in forked children (each with its own ZeroMQ
context); every child is reaped, every address is 127.0.0.1."""

from __future__ import annotations

import logging
import mmap
import os
import platform
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

zmq = pytest.importorskip("zmq")

import vringipc                                          # noqa: E402
from vringipc import bridge as B                         # noqa: E402
from vringipc.queue import Queue                         # noqa: E402

from forking import Forked, reaped                       # noqa: E402

HAS_RAW = hasattr(Queue, "get_message") and hasattr(Queue, "put_message")
needs_raw = pytest.mark.skipif(not HAS_RAW, reason="Queue.get_message/put_message (the raw "
                               "message API, being added on main) are not there yet")

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bridge(role, obj, ep, kw):
    B.run_until_signal((B.Sender if role == "send" else B.Receiver)(obj, ep, **kw))


def start(kids, role, obj, ep, **kw) -> Forked:
    f = Forked(_bridge, role, obj, ep, kw)
    kids.append(f)
    return f


def stop(f: Forked) -> int:
    os.kill(f.pid, signal.SIGTERM)
    return f.join(20)


def feed(ch, msgs):
    """Send msgs from a thread (the reader is the main thread).  A Channel
    whose consumer (a bridge) was killed raises PeerDead until the next one
    claims it: retry."""
    def run():
        end = time.monotonic() + 30
        for m in msgs:
            while True:
                try:
                    ch.send(m, timeout=1)
                    break
                except (vringipc.PeerDead, vringipc.Full):
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.01)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def drain(ch, n, timeout=20.0):
    out = []
    end = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        try:
            out.append(ch.recv(timeout=0.2))
        except vringipc.Empty:
            pass
        except vringipc.PeerDead:          # the producing bridge was stopped: next one
            time.sleep(0.01)
    return out


def numbered(i: int, size: int = 16) -> bytes:
    return struct.pack("<Q", i) + bytes([i & 0xFF]) * max(0, size - 8)


def seqs(msgs):
    return [struct.unpack_from("<Q", m)[0] for m in msgs]


# --- Channel -> bridge -> bridge -> Channel -------------------------------------------------

def test_channel_round_trip_in_order():
    a, b = vringipc.Channel(4 << 20), vringipc.Channel(4 << 20)
    ep = f"tcp://127.0.0.1:{free_port()}"
    sizes = [8, 64, 1000, 70_000, B.INLINE_MAX - 1, B.INLINE_MAX, 1 << 20] * 40
    msgs = [numbered(i, s) for i, s in enumerate(sizes)]
    with reaped() as kids:
        r = start(kids, "recv", b, ep)
        s = start(kids, "send", a, ep)
        t = feed(a, msgs)
        got = drain(b, len(msgs))
        t.join(10)
        assert stop(s) == 0 and stop(r) == 0
    assert got == msgs


def test_endpoint_checks():
    assert B.check_endpoint("tcp://127.0.0.1:5", bind=True)
    assert B.check_endpoint("tcp://0.0.0.0:5", bind=False)           # connecting is fine
    for ep in ("tcp://*:5", "tcp://0.0.0.0:5", "tcp://[::]:5", "tcp://10.1.2.3:5"):
        with pytest.raises(ValueError, match="allow-remote"):
            B.check_endpoint(ep, bind=True)
        assert B.check_endpoint(ep, bind=True, allow_remote=True)
    with pytest.raises(ValueError):
        B.check_endpoint("udp://127.0.0.1:5", bind=True)


# --- reconnection and restarts ---------------------------------------------------------------

def _proxy(listen_port, target_port, ready):
    """A TCP relay 127.0.0.1:listen -> 127.0.0.1:target (killed to cut the link)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen_port))
    srv.listen(4)
    os.write(ready, b"x")
    pairs = {}
    while True:
        rl = [srv] + list(pairs)
        for s in select.select(rl, [], [], 1.0)[0]:
            if s is srv:
                c, _ = srv.accept()
                u = socket.create_connection(("127.0.0.1", target_port))
                pairs[c], pairs[u] = u, c
                continue
            data = b""
            try:
                data = s.recv(1 << 16)
            except OSError:
                pass
            if not data:
                o = pairs.pop(s)
                pairs.pop(o, None)
                s.close()
                o.close()
            else:
                pairs[s].sendall(data)


def _start_proxy(kids, lp, tp):
    r, w = os.pipe()
    f = Forked(_proxy, lp, tp, w)
    kids.append(f)
    assert select.select([r], [], [], 10)[0]
    os.close(r)
    os.close(w)
    return f


def test_tcp_disconnect_and_reconnect_lose_and_duplicate_nothing():
    a, b = vringipc.Channel(1 << 20), vringipc.Channel(1 << 20)
    rp, pp = free_port(), free_port()
    msgs = [numbered(i, 200) for i in range(6000)]
    with reaped() as kids:
        r = start(kids, "recv", b, f"tcp://127.0.0.1:{rp}")
        proxy = _start_proxy(kids, pp, rp)
        s = start(kids, "send", a, f"tcp://127.0.0.1:{pp}", window=256, retransmit=0.5)
        t = feed(a, msgs)
        got = drain(b, 1500)
        proxy.kill()                          # every TCP connection drops mid-stream
        got += drain(b, 300, timeout=0.5)     # what was already delivered
        proxy = _start_proxy(kids, pp, rp)
        got += drain(b, len(msgs) - len(got))
        t.join(10)
        assert stop(s) == 0 and stop(r) == 0
    assert seqs(got) == list(range(len(msgs)))


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_receiver_restart_with_state_file(tmp_path, how):
    a, b = vringipc.Channel(1 << 20), vringipc.Channel(1 << 20)
    ep = f"tcp://127.0.0.1:{free_port()}"
    state = str(tmp_path / "recv.state")
    msgs = [numbered(i, 100) for i in range(5000)]
    with reaped() as kids:
        r = start(kids, "recv", b, ep, state_file=state)
        s = start(kids, "send", a, ep, window=512, retransmit=0.5)
        t = feed(a, msgs)
        got = drain(b, 1500)
        if how == "SIGKILL":
            r.kill()
        else:
            assert stop(r) == 0
        got += drain(b, len(msgs), timeout=0.3)      # what it put before going
        r = start(kids, "recv", b, ep, state_file=state)
        got += drain(b, len(msgs) - len(got))
        got += drain(b, 1, timeout=0.5)              # a duplicate would show up here
        t.join(10)
        assert stop(s) == 0 and stop(r) == 0
    ids = seqs(got)
    if how == "SIGKILL":
        # at most the one message whose put committed right before the kill
        dups = len(ids) - len(set(ids))
        assert dups <= 1, dups
        ids = sorted(set(ids))
    assert ids == list(range(len(msgs)))


def test_sigkilled_sender_loses_at_most_its_window():
    a, b = vringipc.Channel(1 << 20), vringipc.Channel(1 << 20)
    ep = f"tcp://127.0.0.1:{free_port()}"
    window = 16
    msgs = [numbered(i, 64) for i in range(4000)]
    with reaped() as kids:
        r = start(kids, "recv", b, ep)
        s = start(kids, "send", a, ep, window=window)
        t = feed(a, msgs)
        got = drain(b, 1000)
        s.kill()
        s = start(kids, "send", a, ep, window=window)     # a new session takes over
        got += drain(b, len(msgs) - len(got), timeout=10)
        got += drain(b, window + 1, timeout=0.5)
        t.join(10)
        assert stop(s) == 0 and stop(r) == 0
    ids = seqs(got)
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "order kept, no duplicate"
    assert len(msgs) - len(ids) <= window, f"lost {len(msgs) - len(ids)} > window {window}"


def fill_until_full(put, make):
    """Put make(0), make(1)... until a put with a 1 s timeout raises Full;
    returns how many went in."""
    sent = 0
    with pytest.raises(vringipc.Full):
        for i in range(10_000):
            put(make(i), timeout=1.0)
            sent += 1
    return sent


def test_back_pressure_reaches_the_local_producer():
    # nobody reads b: the remote Channel fills, acks stop, the sender's window
    # fills, the local Channel fills, and a.send() blocks (Full on timeout)
    a = vringipc.Channel(64 << 10, num=32)
    b = vringipc.Channel(64 << 10, num=32)
    ep = f"tcp://127.0.0.1:{free_port()}"
    window = 64
    with reaped() as kids:
        r = start(kids, "recv", b, ep)
        s = start(kids, "send", a, ep, window=window)
        sent = fill_until_full(a.send, lambda i: numbered(i, 100))
        # b (32) + the receiver's put in progress + the sender's window + a (32)
        assert sent <= 32 + 1 + window + 32, sent
        got = drain(b, sent)
        assert seqs(got) == list(range(sent))
        assert stop(s) == 0 and stop(r) == 0


# --- security ----------------------------------------------------------------------------

def _cli_run(tmp, label, args):
    with open(tmp / f"{label}.err", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "vringipc", "bridge", *args],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=os.getcwd())


def test_wrong_curve_key_is_refused(tmp_path):
    keys = tmp_path / "keys"
    B.keygen(str(keys), "server")
    B.keygen(str(keys), "good")
    B.keygen(str(keys), "bad")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.link(keys / "good.key", allowed / "good.key")
    a, b = vringipc.Channel(1 << 20), vringipc.Channel(1 << 20)
    ep = f"tcp://127.0.0.1:{free_port()}"
    server = B.CurveServer(str(keys / "server.key_secret"), str(allowed))
    with reaped() as kids:
        r = start(kids, "recv", b, ep, curve=server)
        bad = start(kids, "send", a, ep, curve=B.CurveClient(str(keys / "bad.key_secret"),
                                                            str(keys / "server.key")))
        a.send(b"secret")
        assert drain(b, 1, timeout=1.5) == [], "a client with the wrong key got through"
        bad.kill()
        good = start(kids, "send", a, ep, curve=B.CurveClient(str(keys / "good.key_secret"),
                                                             str(keys / "server.key")))
        # the refused sender was never welcomed, so it took nothing from a
        a.send(b"hello")
        assert drain(b, 2, timeout=10) == [b"secret", b"hello"]
        assert stop(good) == 0 and stop(r) == 0


# --- the receive-side validator, fuzzed ------------------------------------------------------

class FakeSink:
    accepts = (B.SRC_QUEUE, B.SRC_CHANNEL)
    max_message = 40_000

    def __init__(self):
        self.got = []

    def check(self, kind, nbufs):
        pass

    def put(self, kind, main, bufs, timeout):
        assert kind in B.KINDS
        self.got.append((kind, bytes(main), [bytes(x) for x in bufs]))


SESSION = b"S" * 16


def _hello(nonce=1, first_unacked=1, protocol=B.PROTOCOL):
    return [B.T_HELLO, B.HELLO.pack(SESSION, B.SRC_QUEUE, protocol, nonce, first_unacked)]


def _data(seq, items, count=None, own_from=None):
    frames = B.build_data(seq, items, own_from)
    if count is not None:                   # a header that lies about the count
        frames[1] = frames[1][:8] + struct.pack("<I", count) + frames[1][12:]
    return frames


def test_receiver_core_sequence_rules(caplog):
    sink = FakeSink()
    core = B.ReceiverCore(sink)
    hello = _hello(7)
    assert core.handle(SESSION, hello) == [[B.T_WELCOME, B.WELCOME.pack(7, 0)]]
    assert core.handle(SESSION, _data(1, [(0, b"m1", [b"b"]), (2, b"m2", [])])) == \
        [[B.T_ACK, B.ACK.pack(2)]]
    # a retransmission overlapping what was delivered: only the new one is put
    assert core.handle(SESSION, _data(2, [(2, b"m2", []), (1, b"m3", [])])) == \
        [[B.T_ACK, B.ACK.pack(3)]]
    # a gap: nothing put, a resync asked
    assert core.handle(SESSION, _data(9, [(2, b"m9", [])])) == [[B.T_RESYNC]]
    assert [m for _k, m, _b in sink.got] == [b"m1", b"m2", b"m3"]
    with caplog.at_level(logging.ERROR, logger="vringipc.bridge"):
        assert core.handle(SESSION, _data(4, [(3, b"x", [])])) == []          # kind 3
        big = _data(4, [(0, b"x", [b"1" * 9000])], own_from=8192)
        assert core.handle(SESSION, big[:-1]) == []                           # frame missing
        assert core.handle(SESSION, big[:2] + [b"y" + big[2]] + big[3:]) == []  # blob size
        assert core.handle(SESSION, _data(4, [(0, b"x" * 50_000, [])])) == []   # too large
        assert core.handle(SESSION, [b"Z"]) == []
    assert core.refused == 5 and "refused" in caplog.text
    assert len(sink.got) == 3
    # a receiver that restarts without memory learns where to resume from HELLO
    core2 = B.ReceiverCore(FakeSink())
    assert core2.handle(SESSION, _data(4, [(0, b"m4", [])])) == [[B.T_RESYNC]]


def test_a_part_the_wire_cannot_state_is_a_clear_error():
    # lengths are u32 with bit 31 marking a frame of its own: 2 GiB - 1 at most
    lens, small, big = [], [], []
    assert B._place(b"p", B.MAX_PART, lens, small, big) and lens == [B.MAX_PART | B.OWN_FRAME]
    with pytest.raises(ValueError, match="parts up to"):
        B._place(b"p", B.MAX_PART + 1, lens, small, big)
    assert len(lens) == 1 and big == [b"p"] and small == []


def _receive_speaking(protocol, obj, ep):
    B.PROTOCOL = protocol                       # this child's receiver only
    B.run_until_signal(B.Receiver(obj, ep))


def test_a_sender_of_another_protocol_version_is_refused():
    # the receiver says why (T_ERR), the sender stops with BridgeRefused
    # before taking anything from its local object
    a, b = vringipc.Channel(1 << 20), vringipc.Channel(1 << 20)
    ep = f"tcp://127.0.0.1:{free_port()}"
    a.send(b"stays here")
    with reaped() as kids:
        r = Forked(_receive_speaking, B.PROTOCOL + 1, b, ep)
        kids.append(r)
        s = B.Sender(a, ep)
        try:
            with pytest.raises(B.BridgeRefused, match="protocol"):
                s.run(threading.Event())
        finally:
            s.close()
        assert stop(r) == 0
    assert a.recv(timeout=1) == b"stays here"
    # the receive side on its own: no session is opened (a pre-version
    # sender's HELLO had a zero where the version now is)
    core = B.ReceiverCore(FakeSink())
    for v in (0, B.PROTOCOL + 1):
        rep = core.handle(SESSION, _hello(protocol=v))
        assert rep[0][0] == B.T_ERR and b"protocol" in rep[0][1]
    assert not core.sessions


def _keep_freed(report_fd):
    os.write(report_fd, b"1" if B.keep_freed_buffers() else b"0")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or "LD_PRELOAD" in os.environ,
                    reason="mallopt is glibc's (an allocator preloaded, e.g. ASAN's, ignores it)")
def test_keep_freed_buffers_takes_effect_on_glibc():
    # in a child: the setting is process-wide
    r, w = os.pipe()
    try:
        with Forked(_keep_freed, w) as c:
            assert c.join() == 0
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.close(w)


def test_state_file_survives_restart_and_is_exclusive(tmp_path):
    p = str(tmp_path / "st")
    st = B.StateFile(p)
    with pytest.raises(RuntimeError, match="in use"):
        B.StateFile(p)
    core = B.ReceiverCore(FakeSink(), st)
    core.handle(SESSION, _hello())
    core.handle(SESSION, _data(1, [(2, b"a", []), (2, b"b", [])]))
    st.close()
    st = B.StateFile(p)
    sink = FakeSink()
    core = B.ReceiverCore(sink, st)
    assert core.handle(SESSION, _hello()) == \
        [[B.T_WELCOME, B.WELCOME.pack(1, 2)]]
    core.handle(SESSION, _data(1, [(2, b"a", []), (2, b"b", []), (2, b"c", [])]))
    assert [m for _k, m, _b in sink.got] == [b"c"]
    st.close()


def _receive_numbered(path, n, sink_kind):
    # a receiving bridge's core putting n one-message DATA messages, each
    # recorded in the state file as it is put
    st = B.StateFile(path)
    sink = FakeSink() if sink_kind == "python" else Queue(capacity=16 << 20)
    if sink_kind == "python":
        sink.put = lambda kind, main, bufs, timeout: None      # no need to keep them
    core = B.ReceiverCore(sink, st)
    core.handle(SESSION, _hello())
    for seq in range(1, n + 1):
        core.handle(SESSION, _data(seq, [(2, b"m", [])]))
        if sink_kind == "queue" and seq % 1000 == 0:
            while sink.qsize():
                sink.get()
    st.close()


@pytest.mark.parametrize("sink_kind", ["python", "queue"])
def test_state_file_count_is_never_seen_torn(tmp_path, sink_kind):
    # Another process (or a SIGKILL, which freezes whatever is there) must
    # only ever see whole counts: a count that went back, even for an
    # instant, is what a restarted receiver would resume from.
    path = str(tmp_path / "st")
    n = 20_000
    B.StateFile(path).close()                      # create it: the reader maps it first
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    off = len(B.StateFile.MAGIC) + 16               # slot 0's delivered word
    seen, last, went_back = 0, 0, []
    with Forked(_receive_numbered, path, n, sink_kind) as w:
        while w.status is None:
            v = struct.unpack_from("<Q", mm, off)[0]
            if v < last:
                went_back.append((last, v))
            last = v
            seen += 1
            if seen % 4096 == 0:
                pid, st = os.waitpid(w.pid, os.WNOHANG)
                if pid:
                    w.status = st
    mm.close()
    assert os.waitstatus_to_exitcode(w.status) == 0
    assert last == n
    assert not went_back, f"the count went back {len(went_back)} times, e.g. {went_back[:3]}"


def test_fuzz_receive_side():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    frame = st.binary(max_size=64)
    part = st.one_of(st.binary(max_size=40), st.sampled_from([b"L" * 8192, b"L" * 9000]))
    item = st.tuples(st.integers(0, 4), part, st.lists(part, max_size=3))

    def structured_data(seq, items, count, own_from, flip, drop, extra):
        frames = _data(seq, items, count, own_from)
        if flip is not None and items:
            # a part said to be in the blob / in a frame of its own when it is not
            hdr = bytearray(frames[1])
            _s, c, nparts = B.DATA_HDR.unpack_from(hdr)
            if nparts and len(hdr) >= B.DATA_HDR.size + 4 * c + 4 * nparts:
                off = B.DATA_HDR.size + 4 * c + 4 * (flip % nparts)
                struct.pack_into("<I", hdr, off,
                                 struct.unpack_from("<I", hdr, off)[0] ^ B.OWN_FRAME)
                frames[1] = bytes(hdr)
        return frames[:len(frames) - drop] + extra

    structured = st.builds(
        structured_data, st.integers(0, 12), st.lists(item, min_size=0, max_size=5),
        st.one_of(st.none(), st.integers(0, 70000)), st.sampled_from([30, 8192, B.INLINE_MAX]),
        st.one_of(st.none(), st.integers(0, 20)), st.integers(0, 2),
        st.lists(frame, max_size=2))
    raw = st.lists(frame, max_size=6)
    hello = st.builds(_hello, st.integers(0, 3), st.integers(1, 6))
    message = st.one_of(structured, raw, hello,
                        st.builds(lambda f: [B.T_HELLO, f], frame))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from([SESSION, b"other"]), message), max_size=12))
    def run(stream):
        logging.getLogger("vringipc.bridge").setLevel(logging.CRITICAL)
        sink = FakeSink()
        core = B.ReceiverCore(sink)
        delivered = {}
        for rid, frames in stream:
            before = len(sink.got)
            replies = core.handle(rid, frames)          # never raises
            for rep in replies:
                assert rep[0] in (B.T_WELCOME, B.T_ACK, B.T_RESYNC, B.T_ERR)
            new = sink.got[before:]
            if new:
                # only a fully valid DATA message from a known session is put,
                # in sequence: the ack counts exactly the messages put
                s = core.sessions[rid]
                assert replies[-1] == [B.T_ACK, B.ACK.pack(s.delivered)]
                assert s.delivered - delivered.get(rid, s.delivered - len(new)) == len(new)
            for r, s in core.sessions.items():
                delivered[r] = s.delivered
        for kind, main, bufs in sink.got:
            assert kind in B.KINDS and len(main) + sum(map(len, bufs)) <= sink.max_message
        logging.getLogger("vringipc.bridge").setLevel(logging.NOTSET)

    run()


# --- the CLI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["queue", "channel"])
def test_cli_status_line_and_sigterm(tmp_path, kind):
    if kind == "queue":
        a = Queue(backend="shm", name=f"/vrbr_a_{os.getpid()}")
        b = Queue(backend="shm", name=f"/vrbr_b_{os.getpid()}")
        names = (a._ring.name, b._ring.name)
    else:
        a = vringipc.Channel(1 << 20, backend="shm")
        b = vringipc.Channel(1 << 20, backend="shm")
        names = (a.name, b.name)
    ep = f"tcp://127.0.0.1:{free_port()}"
    procs = []
    try:
        procs.append(_cli_run(tmp_path, "recv", ["--from", ep, "--to", f"{kind}:{names[1]}",
                                                 "--status-every", "0.2",
                                                 "--state", str(tmp_path / "st")]))
        procs.append(_cli_run(tmp_path, "send", ["--from", f"{kind}:{names[0]}", "--to", ep,
                                                 "--status-every", "0.2"]))
        msgs = [numbered(i, 50) for i in range(500)]
        if kind == "queue":
            for m in msgs:
                a.put(m)
            assert [b.get(timeout=20) for _ in msgs] == msgs
        else:
            t = feed(a, msgs)
            assert drain(b, len(msgs)) == msgs
            t.join(10)
        time.sleep(0.5)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(20) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        a.close()
        b.close()
    send_err = (tmp_path / "send.err").read_text()
    recv_err = (tmp_path / "recv.err").read_text()
    assert "500 msgs" in send_err and f"window 0/{B.DEFAULT_WINDOW}" in send_err and "reconnects" in send_err
    assert "500 msgs" in recv_err and "delivered" in recv_err
    assert "stopped" in send_err and "stopped" in recv_err


def test_cli_refuses_public_bind_without_flag():
    res = subprocess.run([sys.executable, "-m", "vringipc", "bridge", "--from", "tcp://*:5999",
                          "--to", "queue:/nonexistent"], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2 and "allow-remote" in res.stderr


# --- Queue -> bridge -> bridge -> Queue (needs the raw message API) ---------------------------

def _assert_same(objs, got):
    """got is objs after a round trip: dicts {"i", "arr"} compared field by field."""
    assert len(got) == len(objs)
    for o, g in zip(objs, got):
        if isinstance(o, dict):
            assert g["i"] == o["i"] and (g["arr"] == o["arr"]).all()
        else:
            assert g == o


@needs_raw
def test_queue_round_trip_never_unpickles():
    np = pytest.importorskip("numpy")
    qa, qb = Queue(), Queue()
    ep = f"tcp://127.0.0.1:{free_port()}"
    # arrays in the blob and in frames of their own (from INLINE_MAX on)
    objs = [{"i": i, "arr": np.full(1000 * (i % 5), i, dtype=np.int32)} for i in range(300)]
    objs += [{"i": i, "arr": np.full(n // 4, i, dtype=np.int32)}
             for i, n in enumerate([65536, B.INLINE_MAX - 4, B.INLINE_MAX, 300_000] * 5)]
    objs += [b"raw bytes", "text", None]
    with reaped() as kids:
        r = start(kids, "recv", qb, ep)
        s = start(kids, "send", qa, ep)
        # the bridges must not unpickle: a pickle that would run code crashes
        # only the consumer that get()s it
        for o in objs:
            qa.put(o)
        got = [qb.get(timeout=20) for _ in objs]
        assert stop(s) == 0 and stop(r) == 0
    _assert_same(objs, got)
    qa.close()
    qb.close()


def _send_with_inline_max(inline_max, obj, ep):
    B.INLINE_MAX = inline_max                   # this child's sender only
    B.run_until_signal(B.Sender(obj, ep))


@needs_raw
@pytest.mark.parametrize("inline_max", [1, 1 << 20])     # every part a frame; none
def test_where_parts_travel_is_the_senders_choice(inline_max):
    # the receiver follows the OWN_FRAME marks, whatever threshold the sender used
    np = pytest.importorskip("numpy")
    qa, qb = Queue(capacity=16 << 20), Queue(capacity=16 << 20)
    ep = f"tcp://127.0.0.1:{free_port()}"
    objs = []
    for i, n in enumerate([8, 5000, 70_000, 300_000] * 10):
        objs += [numbered(i, n), {"i": i, "arr": np.full(n // 4, i, dtype=np.int32)}]
    with reaped() as kids:
        start(kids, "recv", qb, ep)
        s = Forked(_send_with_inline_max, inline_max, qa, ep)
        kids.append(s)
        for o in objs:
            qa.put(o)
        got = [qb.get(timeout=20) for _ in objs]
        assert stop(s) == 0 and stop(kids[0]) == 0
    _assert_same(objs, got)
    qa.close()
    qb.close()


@needs_raw
def test_queue_back_pressure_and_sigkilled_sender():
    # the remote queue (maxsize 20) is not read: local put()s end with Full
    qa, qb = Queue(maxsize=20), Queue(maxsize=20)
    ep = f"tcp://127.0.0.1:{free_port()}"
    window = 32
    with reaped() as kids:
        r = start(kids, "recv", qb, ep)
        s = start(kids, "send", qa, ep, window=window)
        sent = fill_until_full(qa.put, lambda i: i)
        assert sent <= 20 + 1 + window + 20, sent
        s.kill()                              # its window (<= 32) is lost, nothing else
        s = start(kids, "send", qa, ep, window=window)
        got = []
        while True:
            try:
                got.append(qb.get(timeout=1.5))
            except vringipc.Empty:
                break
        assert stop(s) == 0 and stop(r) == 0
    assert got == sorted(set(got)) and sent - len(got) <= window
    assert got[-1] == sent - 1                # the messages after the window all arrived
    qa.close()
    qb.close()


@needs_raw
@pytest.mark.parametrize("size", [16, 100_000, 200_000])  # packed in C; large, held
def test_stopped_sender_puts_its_unacknowledged_window_back(size):
    # The remote queue is full and nobody reads it: acks stop, the sender's
    # window holds what it took.  Stopped, it waits drain_timeout for acks,
    # then puts the window back into its local queue: nothing lost, nothing
    # twice (once the receiver is stopped too).
    qa, qb = Queue(), Queue(maxsize=10)
    ep = f"tcp://127.0.0.1:{free_port()}"
    r = B.Receiver(qb, ep)
    s = B.Sender(qa, ep, window=40)
    rstop, sstop = threading.Event(), threading.Event()
    rt = threading.Thread(target=r.run, args=(rstop,))
    st = threading.Thread(target=s.run, args=(sstop,), kwargs={"drain_timeout": 0.3})
    rt.start()
    st.start()
    try:
        for i in range(100):
            qa.put(numbered(i, size))
        end = time.monotonic() + 20
        while (qb.qsize() < 10 or s.inflight == 0) and time.monotonic() < end:
            time.sleep(0.01)
        assert qb.qsize() == 10 and s.inflight > 0
    finally:
        rstop.set()
        rt.join(20)
        sstop.set()
        st.join(20)
        r.close()
        s.close()
    assert s.lost == 0 and s.returned > 0
    got = []
    for q in (qb, qa):
        while True:
            try:
                got.append(q.get(timeout=0.2))
            except vringipc.Empty:
                break
    assert sorted(seqs(got)) == list(range(100))      # each once
    qa.close()
    qb.close()


@needs_raw
def test_malformed_frames_leave_a_real_queue_intact():
    q = Queue(capacity=1 << 20)
    core = B.ReceiverCore(q)
    core.handle(SESSION, _hello())
    core.handle(SESSION, _data(1, [(9, b"x", [])]))
    core.handle(SESSION, _data(1, [(0, b"x", [b"1" * 9000])], own_from=8192)[:-1])
    core.handle(SESSION, _data(1, [(2, b"ok", [])]))
    assert q.get(timeout=5) == b"ok"
    assert q.empty()
    q.close()
