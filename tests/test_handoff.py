"""Handing a Channel / Queue to an unrelated process over a Unix socket
(SCM_RIGHTS): the receiving process is started with subprocess, not fork."""

import os
import subprocess
import sys
import textwrap

import pytest

import vringipc
from vringipc import handoff

CHILD_ENV = dict(os.environ)


def _run(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CHILD_ENV)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["memfd", "shm"])
def test_channel_handoff_to_unrelated_process(tmp_path, backend):
    path = str(tmp_path / "ch.sock")
    with vringipc.Channel(capacity=1 << 16, backend=backend) as ch:
        with handoff.Offer(ch, path) as offer:
            assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
            child = _run(f"""
                import vringipc.handoff as h
                ch = h.connect({path!r})
                for i in range(1000):
                    ch.send(b"msg %d" % i)
                ch.close()
            """)
            try:
                assert offer.serve(count=1, timeout=30) == 1
                got = [ch.recv(timeout=30) for _ in range(1000)]
                assert got == [b"msg %d" % i for i in range(1000)]
                with pytest.raises(vringipc.ChannelClosed):
                    ch.recv(timeout=30)
            finally:
                out, err = child.communicate(timeout=30)
            assert child.returncode == 0, err.decode()
        assert not os.path.exists(path)


@pytest.mark.timeout(60)
def test_queue_handoff_to_unrelated_process(tmp_path):
    path = str(tmp_path / "q.sock")
    q = vringipc.JoinableQueue()
    try:
        with handoff.Offer(q, path) as offer:
            child = _run(f"""
                import vringipc.handoff as h
                q = h.connect({path!r})
                for i in range(100):
                    item = q.get(timeout=30)
                    q.task_done()
                    assert item == {{"n": i}}, item
                print("ok")
            """)
            try:
                assert offer.serve(count=1, timeout=30) == 1
                for i in range(100):
                    q.put({"n": i})
                q.join()
            finally:
                out, err = child.communicate(timeout=30)
            assert child.returncode == 0, err.decode()
            assert out.strip() == b"ok"
    finally:
        q.close()


def test_connect_to_a_non_vringipc_socket_fails(tmp_path):
    import socket
    import threading
    path = str(tmp_path / "other.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        c.sendall(b"HTTP/1.0 200 OK\n{}")
        c.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with pytest.raises(ValueError, match="not a vringipc handoff"):
            handoff.connect(path, timeout=10)
    finally:
        t.join()
        srv.close()


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_another_user_cannot_take_the_offer(tmp_path):
    os.chmod(tmp_path, 0o755)                    # the directory is reachable, the socket is not
    path = str(tmp_path / "ch.sock")
    with vringipc.Channel(capacity=4096) as ch:
        with handoff.Offer(ch, path) as offer:
            pid = os.fork()
            if pid == 0:                         # pragma: no cover - child
                code = 3
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    handoff.connect(path, timeout=5)
                    code = 1                     # got it: wrong
                except PermissionError:
                    code = 0
                except BaseException:
                    code = 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert offer.serve(count=1, timeout=0.2) == 0    # nobody was served
