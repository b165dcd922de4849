# coding: utf-8
"""Tests of share/rpcd_handler.py that run without rpcd: each test starts a
handler process the way rpcd does (fork, the channel as fd 3 with RPCD_FD,
a cleared environment, stdout and stderr to files, stdin /dev/null) and
talks the channel protocol to it over a socketpair.

Standard library only; runs on Python 3.8+ and 2.7:

    python3 tests/python/test_rpcd_handler.py [-v]

This file is also the handler program: `test_rpcd_handler.py --serve SET`
serves one of the method sets defined below.
"""
from __future__ import print_function

import json
import math
import os
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHARE = os.environ.get("RPCD_HANDLER_DIR") or os.path.join(REPO, "share")
LEGACY = os.path.join(REPO, "tests", "legacy", "moved_handlers.py")
SELF = os.path.join(HERE, "test_rpcd_handler.py")
TIMEOUT = 10.0
_LEN = struct.Struct("<I")

sys.dont_write_bytecode = True  # share/ is part of the source tree
if SHARE not in sys.path:
    sys.path.insert(0, SHARE)

import rpcd_handler  # noqa: E402
from rpcd_handler import Error, Handler, conn_style  # noqa: E402


# ---------------------------------------------------------------------------
# The handler side: method sets served by `--serve SET`.

def add(params):
    a, b = params
    return a + b


def pi(n):
    s = 0.0
    for i in range(n + 1):
        s += 1.0 / (2 * i + 1) / (2 * i + 1)
    return "pi_r", math.sqrt(8 * s)


def as_list(params):
    return ["pi_r", params]


def three_tuple(params):
    return ("a", "b", params)


def int_pair(params):
    return (1, params)


def nothing(params):
    return None


def echo(params):
    return params


def bad_input(params):
    if not isinstance(params, int):
        raise Error("bad_input", "params must be an integer")
    return params


def explode(params):
    return 1 // params


def explode_text(params):
    raise ValueError(u"caf\u00e9 is closed")


def talk(params):
    print("talk says", params)
    sys.stdout.write("a second line\n")
    sys.stderr.write("talk on stderr\n")
    return "talked"


def talk_unicode(params):
    print(u"caf\u00e9 \U0001F600")
    sys.stderr.write(u"na\u00efve\n")
    print(u"\u00e9t\u00e9", file=sys.stderr)
    return params


def a_set(params):
    return set([1])


def nan(params):
    return float("nan")


def sleepy(params):
    time.sleep(params)
    return params


def exit_now(params):
    sys.exit(3)


class Tally(Handler):
    """A Handler that answers with send_result, as the original server's."""

    def __init__(self):
        self.n = 0

    def bump(self, params):
        self.n += params
        self.send_result("tally", self.n)

    def plain(self, params):
        return "returned", params

    def both(self, params):
        self.send_result("sent", params)
        return "returned", params

    def bad_out(self, params):
        self.send_result(5, params)

    def _private(self, params):
        return "private"


class Legacy(Handler):
    """Overrides send_result and writes the frame through self.send, as
    tests/legacy/moved_handlers.py does."""

    def ping(self, params):
        self.send_result("pong", params)

    def pi(self, n):
        s = 0.0
        for i in range(n + 1):
            s += 1.0 / (2 * i + 1) / (2 * i + 1)
        self.send_result("pi_r", math.sqrt(8 * s))

    def partial(self, params):
        self.send(struct.pack("I", 100))
        self.send(b"{}")

    def send_result(self, out, result):
        body = json.dumps({"out": out, "result": result}).encode("utf-8")
        self.send(struct.pack("I", len(body)))
        self.sendall(body)


@conn_style
def conn_echo(conn, params):
    body = json.dumps({"out": "echoed", "result": params}).encode("utf-8")
    conn.send(struct.pack("I", len(body)))
    conn.send(body[:3])
    conn.sendall(body[3:])


@conn_style
def conn_write(conn, params):
    conn.write(struct.pack("I", 2) + b"{}")


@conn_style
def conn_result(conn, params):
    conn.send_result("conn_r", params)


@conn_style
def conn_silent(conn, params):
    pass


SETS = {
    "funcs": lambda: {
        "add": add, "pi": pi, "as_list": as_list, "three_tuple": three_tuple,
        "int_pair": int_pair, "nothing": nothing, "echo": echo, "bad_input": bad_input,
        "explode": explode, "explode_text": explode_text, "talk": talk, "talk_unicode": talk_unicode, "a_set": a_set,
        "nan": nan, "sleepy": sleepy, "exit_now": exit_now,
        "conn_echo": conn_echo, "conn_write": conn_write, "conn_result": conn_result,
        "conn_silent": conn_silent,
    },
    "own_ping": lambda: {"ping": lambda p: ("own_pong", p)},
    "tally": lambda: Tally(),
    "legacy_instance": lambda: Legacy(),
    "legacy_bound": lambda: (lambda h: {"old_ping": h.ping, "old_pi": h.pi, "partial": h.partial})(Legacy()),
}


def serve_main(name):
    print("starting", name)  # before serve(): must not reach the channel either
    rpcd_handler.serve(SETS[name]())
    print("serve returned")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--serve":
    serve_main(sys.argv[2])
    sys.exit(0)

# The rest is the test side only (a handler process does not need it).
import errno  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import unittest  # noqa: E402


# ---------------------------------------------------------------------------
# The rpcd side.

def _no_constant(name):
    raise ValueError("%s is not JSON (rpcd would drop the process)" % name)


def strict_json(body):
    """A reply as rpcd parses it: JSON proper (no NaN or Infinity)."""
    return json.loads(body.decode("utf-8"), parse_constant=_no_constant)


def frame(obj):
    body = json.dumps(obj).encode("utf-8")
    return _LEN.pack(len(body)) + body


def child_argv(name):
    return [sys.executable, SELF, "--serve", name]


class Child(object):
    """A handler process on a socketpair, started as rpcd starts one."""

    def __init__(self, argv, fd=3, env_fd=None, extra_env=None):
        self.dir = tempfile.mkdtemp(prefix="rpcd_handler_test.")
        self.out_path = os.path.join(self.dir, "stdout")
        self.err_path = os.path.join(self.dir, "stderr")
        env = {
            "RPCD_FD": str(fd if env_fd is None else env_fd),
            "RPCD_HANDLER": "test",
            "PYTHONPATH": SHARE,
            "PYTHONDONTWRITEBYTECODE": "1",
            "RPCD_HANDLER_DIR": SHARE,  # this file, as a handler, imports the same helper
        }
        env.update(extra_env or {})
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out = os.open(self.out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(self.err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # only dup2 and exec here
            try:
                t = theirs.fileno()
                if t == fd:
                    t = os.dup(t)
                for src, dst in ((null, 0), (out, 1), (err, 2), (t, fd)):
                    os.dup2(src, dst)  # inheritable
                # Nothing else of ours (Python 2 would pass on every
                # descriptor, the parent's end of the channel included).
                os.closerange(3, fd)
                os.closerange(fd + 1, 1024)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid = pid
        self.status = None
        theirs.close()
        for f in (out, err, null):
            os.close(f)
        self.sock = ours
        self.sock.settimeout(TIMEOUT)
        self.rbuf = b""

    # -- channel --

    def send(self, data):
        self.sock.sendall(data)

    def request(self, rid, method, params=None):
        self.send(frame({"id": rid, "in": method, "params": params, "deadline_ms": 5000}))

    def read_frame(self):
        while True:
            if len(self.rbuf) >= 4:
                (n,) = _LEN.unpack_from(self.rbuf, 0)
                if len(self.rbuf) >= 4 + n:
                    body, self.rbuf = self.rbuf[4:4 + n], self.rbuf[4 + n:]
                    return strict_json(body)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise AssertionError("the handler closed the channel; stderr:\n" + self.stderr())
            self.rbuf += chunk

    def call(self, method, params=None, rid=1):
        self.request(rid, method, params)
        reply = self.read_frame()
        if reply.get("id") != rid:
            raise AssertionError("reply %r is not for id %r" % (reply, rid))
        return reply

    def readable(self, secs):
        return bool(self.rbuf) or bool(select.select([self.sock], [], [], secs)[0])

    # -- process --

    def close(self):
        try:
            self.sock.close()
        except Exception:
            pass

    def wait(self, timeout=TIMEOUT):
        """The exit status (os.waitpid's), or None after `timeout`."""
        end = time.time() + timeout
        while self.status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if pid == self.pid:
                self.status = status
                break
            if time.time() > end:
                return None
            time.sleep(0.005)
        return self.status

    def stop(self):
        """Closes the channel (EOF) and returns the exit status; kills the
        process if it does not exit."""
        self.close()
        status = self.wait()
        if status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
            self.wait()
        return status

    def stdout(self):
        with open(self.out_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def cleanup(self):
        if self.status is None:
            self.stop()
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ChannelTest(unittest.TestCase):
    """self.c is a handler process serving SET: one for the whole class if
    SHARED (for tests that leave it as they found it), else one per test."""
    SET = "funcs"
    SHARED = True
    shared = None

    @classmethod
    def setUpClass(cls):
        if cls.SHARED:
            cls.shared = Child(child_argv(cls.SET))

    @classmethod
    def tearDownClass(cls):
        if cls.shared is not None:
            cls.shared.cleanup()
            cls.shared = None

    def start(self, argv=None, **kw):
        c = Child(argv or child_argv(self.SET), **kw)
        self.addCleanup(c.cleanup)
        return c

    def setUp(self):
        cls = type(self)
        if cls.shared is not None and (cls.shared.wait(0) is not None or cls.shared.readable(0)):
            # A failed test left it dead or with replies unread: a new one,
            # so that the failure does not spread to the tests after it.
            cls.shared.cleanup()
            cls.shared = Child(child_argv(cls.SET))
        self.c = cls.shared or self.start()

    def assertExitsZero(self, c):
        status = c.stop()
        self.assertIsNotNone(status, "the handler did not exit after EOF")
        self.assertTrue(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0,
                        "exit status %r; stderr:\n%s" % (status, c.stderr()))

    def assertError(self, reply, code, *fragments):
        self.assertEqual(reply["out"], "error", reply)
        self.assertEqual(sorted(reply["result"]), ["code", "message"], reply)
        self.assertEqual(reply["result"]["code"], code, reply)
        for f in fragments:
            self.assertIn(f, reply["result"]["message"])


class TestReplies(ChannelTest):

    def test_result_is_ok(self):
        self.assertEqual(self.c.call("add", [2, 3], rid=7), {"id": 7, "out": "ok", "result": 5})

    def test_reply_keys_and_id(self):
        r = self.c.call("echo", {"k": [1, None, True]}, rid=123456789012)
        self.assertEqual(r, {"id": 123456789012, "out": "ok", "result": {"k": [1, None, True]}})

    def test_tuple_sets_out(self):
        r = self.c.call("pi", 10)
        s = 0.0
        for i in range(11):
            s += 1.0 / (2 * i + 1) / (2 * i + 1)
        self.assertEqual(r, {"id": 1, "out": "pi_r", "result": math.sqrt(8 * s)})

    def test_list_is_a_result(self):
        self.assertEqual(self.c.call("as_list", 4), {"id": 1, "out": "ok", "result": ["pi_r", 4]})

    def test_other_tuples_are_results(self):
        self.assertEqual(self.c.call("three_tuple", 1), {"id": 1, "out": "ok", "result": ["a", "b", 1]})
        self.assertEqual(self.c.call("int_pair", "x"), {"id": 1, "out": "ok", "result": [1, "x"]})

    def test_none_is_null(self):
        self.assertEqual(self.c.call("nothing", 1), {"id": 1, "out": "ok", "result": None})

    def test_unicode_round_trip(self):
        p = {u"cl\u00e9": u"\u65e5\u672c \U0001F600 caf\u00e9"}
        self.assertEqual(self.c.call("echo", p)["result"], p)

    def test_large_frames(self):
        p = u"x\u00e9" * 300000  # frames of about 2 MB each way
        self.assertEqual(self.c.call("echo", p)["result"], p)


class TestErrors(ChannelTest):

    def test_error_code(self):
        self.assertError(self.c.call("bad_input", "x"), "bad_input", "params must be an integer")
        self.assertEqual(self.c.call("bad_input", 3, rid=2), {"id": 2, "out": "ok", "result": 3})

    def test_exception_is_handler_error(self):
        self.assertError(self.c.call("explode", 0), "handler_error", "ZeroDivisionError")
        self.assertEqual(self.c.call("explode", 1, rid=2)["result"], 1)  # still serving
        err = self.c.stderr()
        self.assertIn("Traceback", err)
        self.assertIn("ZeroDivisionError", err)
        self.assertIn("in explode", err)

    def test_exception_with_non_ascii_message(self):
        self.assertError(self.c.call("explode_text"), "handler_error", u"caf\u00e9 is closed", "ValueError")

    def test_unknown_method(self):
        self.assertError(self.c.call("nope", 1), "unknown_method", "nope")
        self.assertEqual(self.c.call("add", [1, 1], rid=2)["result"], 2)

    def test_not_json_result(self):
        self.assertError(self.c.call("a_set"), "handler_error", "not JSON")
        self.assertEqual(self.c.call("add", [1, 1], rid=2)["result"], 2)

    def test_nan_is_not_json(self):
        # NaN is not JSON: sending it would make rpcd drop the process.
        self.c.request(1, "nan")
        self.c.request(2, "echo", 5)
        first, second = self.c.read_frame(), self.c.read_frame()
        self.assertError(first, "handler_error", "not JSON")
        self.assertEqual(second, {"id": 2, "out": "ok", "result": 5})

    def test_sys_exit_ends_the_process(self):
        c = self.start()
        c.request(1, "exit_now")
        self.assertEqual(c.sock.recv(10), b"")
        status = c.wait()
        self.assertTrue(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, status)


class TestPing(ChannelTest):

    def test_helper_ping(self):
        self.assertEqual(self.c.call("ping", {"a": [1, 2]}), {"id": 1, "out": "pong", "result": {"a": [1, 2]}})
        self.assertEqual(self.c.call("ping", None, rid=2), {"id": 2, "out": "pong", "result": None})

    def test_warmup_style_request(self):
        # rpcd's warmup frame: params may be absent.
        self.c.send(frame({"id": 9, "in": "ping", "deadline_ms": 30000}))
        self.assertEqual(self.c.read_frame(), {"id": 9, "out": "pong", "result": None})

    def test_own_ping_wins(self):
        c = self.start(child_argv("own_ping"))
        self.assertEqual(c.call("ping", 4), {"id": 1, "out": "own_pong", "result": 4})


class TestHandlerClasses(ChannelTest):
    SET = "tally"

    def test_send_result(self):
        n = self.c.call("bump", 0)["result"]  # the process is shared
        self.assertEqual(self.c.call("bump", 2, rid=2), {"id": 2, "out": "tally", "result": n + 2})
        self.assertEqual(self.c.call("bump", 3, rid=3), {"id": 3, "out": "tally", "result": n + 5})

    def test_return_value(self):
        self.assertEqual(self.c.call("plain", 1), {"id": 1, "out": "returned", "result": 1})

    def test_sent_reply_wins(self):
        self.assertEqual(self.c.call("both", 1), {"id": 1, "out": "sent", "result": 1})

    def test_out_must_be_a_string(self):
        self.assertError(self.c.call("bad_out", 1), "handler_error", "out")

    def test_only_public_methods(self):
        for name in ("send_result", "send", "sendall", "_private", "__init__", "n"):
            self.assertError(self.c.call(name, 1), "unknown_method")
        self.assertEqual(self.c.call("ping", 1)["out"], "pong")  # Tally has none

    def test_legacy_instance(self):
        c = self.start(child_argv("legacy_instance"))
        self.assertEqual(c.call("ping", [1, "a"]), {"id": 1, "out": "pong", "result": [1, "a"]})
        self.assertEqual(c.call("pi", 10, rid=2), {"id": 2, "out": "pi_r", "result": math.sqrt(8 * sum_terms(10))})

    def test_legacy_bound_methods(self):
        c = self.start(child_argv("legacy_bound"))
        self.assertEqual(c.call("old_ping", {"x": 1}), {"id": 1, "out": "pong", "result": {"x": 1}})
        self.assertEqual(c.call("old_pi", 3, rid=2)["result"], math.sqrt(8 * sum_terms(3)))
        self.assertError(c.call("partial", None, rid=3), "handler_error", "incomplete frame")
        self.assertEqual(c.call("ping", 0, rid=4)["out"], "pong")

    @unittest.skipUnless(os.path.exists(LEGACY), "no tests/legacy/moved_handlers.py")
    def test_moved_handlers_file(self):
        c = self.start([sys.executable, LEGACY])
        self.assertEqual(c.call("old_ping", [1, 2]), {"id": 1, "out": "pong", "result": [1, 2]})
        self.assertEqual(c.call("old_pi", 100, rid=2), {"id": 2, "out": "pi_r", "result": math.sqrt(8 * sum_terms(100))})
        self.assertExitsZero(c)

    def test_send_outside_a_request(self):
        self.assertRaises(RuntimeError, Tally().send_result, "ok", 1)
        self.assertRaises(RuntimeError, Legacy().send, b"x")


def sum_terms(n):
    s = 0.0
    for i in range(n + 1):
        s += 1.0 / (2 * i + 1) / (2 * i + 1)
    return s


class TestConnStyle(ChannelTest):

    def test_frame_in_pieces(self):
        self.assertEqual(self.c.call("conn_echo", [1, {"a": 2}]), {"id": 1, "out": "echoed", "result": [1, {"a": 2}]})

    def test_write_without_out(self):
        self.assertEqual(self.c.call("conn_write"), {"id": 1, "out": "ok", "result": None})

    def test_send_result(self):
        self.assertEqual(self.c.call("conn_result", "z"), {"id": 1, "out": "conn_r", "result": "z"})

    def test_no_reply(self):
        self.assertError(self.c.call("conn_silent"), "handler_error", "no reply")

    def test_name_kept(self):
        self.assertEqual(conn_echo.__name__, "conn_echo")


class TestOutput(ChannelTest):
    SHARED = False

    def wait_for(self, what, read):
        end = time.time() + TIMEOUT
        while what not in read():
            if time.time() > end:
                self.fail("%r never appeared in %r" % (what, read()))
            time.sleep(0.01)

    def test_print_goes_to_stdout(self):
        self.assertEqual(self.c.call("talk", [1]), {"id": 1, "out": "ok", "result": "talked"})
        # Line by line, while the process runs (not at exit).
        self.wait_for("talk says [1]\na second line\n", self.c.stdout)
        self.wait_for("talk on stderr\n", self.c.stderr)
        self.assertEqual(self.c.call("add", [1, 2], rid=2), {"id": 2, "out": "ok", "result": 3})
        self.assertFalse(self.c.readable(0.05), "stray bytes on the channel")
        self.assertExitsZero(self.c)
        self.assertEqual(self.c.stdout(), "starting funcs\ntalk says [1]\na second line\nserve returned\n")

    def test_print_non_ascii(self):
        # The environment has no locale (rpcd clears it): still UTF-8 out.
        self.assertEqual(self.c.call("talk_unicode", u"\u00e9"), {"id": 1, "out": "ok", "result": u"\u00e9"})
        self.assertExitsZero(self.c)
        self.assertIn(u"caf\u00e9 \U0001F600\n", self.c.stdout())
        self.assertIn(u"na\u00efve\n\u00e9t\u00e9\n", self.c.stderr())


def frames_in(data):
    """The frames in `data`, which must hold whole frames only."""
    out = []
    while data:
        if len(data) < 4:
            raise AssertionError("a partial length prefix: %r" % (data,))
        (n,) = _LEN.unpack_from(data, 0)
        if len(data) < 4 + n:
            raise AssertionError("a partial frame: %r" % (data,))
        out.append(strict_json(data[4:4 + n]))
        data = data[4 + n:]
    return out


class TestFraming(ChannelTest):
    SHARED = False

    def test_pipelined_batch(self):
        self.c.send(b"".join(frame({"id": i, "in": m, "params": p, "deadline_ms": 5000})
                             for i, m, p in ((11, "add", [0, 0]), (12, "add", [1, 2]), (13, "nope", 0), (14, "ping", "x"))))
        # The replies of one quick batch come in one write, so in one read.
        self.assertTrue(self.c.readable(TIMEOUT))
        replies = dict((r["id"], r) for r in frames_in(self.c.sock.recv(1 << 20)))
        self.assertEqual(sorted(replies), [11, 12, 13, 14])
        self.assertEqual(replies[11], {"id": 11, "out": "ok", "result": 0})
        self.assertEqual(replies[12], {"id": 12, "out": "ok", "result": 3})
        self.assertError(replies[13], "unknown_method")
        self.assertEqual(replies[14], {"id": 14, "out": "pong", "result": "x"})


    def test_a_slow_call_does_not_hold_back_ready_replies(self):
        self.c.send(b"".join(frame({"id": i, "in": m, "params": p, "deadline_ms": 5000})
                             for i, m, p in ((21, "sleepy", 0.05), (22, "add", [1, 1]), (23, "sleepy", 0.5))))
        # 21 goes before 22 runs, 22 before 23 runs: neither waits for 23.
        self.assertTrue(self.c.readable(TIMEOUT))
        got = []
        end = time.time() + 0.4
        while time.time() < end and len(got) < 2:
            if self.c.readable(0.05):
                got.extend(r["id"] for r in frames_in(self.c.sock.recv(1 << 20)))
        self.assertEqual(got, [21, 22], "replies 21 and 22 came before call 23 ended")
        self.assertTrue(self.c.readable(TIMEOUT))
        self.assertEqual([r["id"] for r in frames_in(self.c.sock.recv(1 << 20))], [23])
    def test_frame_split_across_writes(self):
        data = frame({"id": 5, "in": "add", "params": [20, 22], "deadline_ms": 5000})
        for piece in (data[:1], data[1:3], data[3:4], data[4:9], data[9:-1]):
            self.c.send(piece)
            time.sleep(0.02)
            self.assertFalse(self.c.readable(0), "a reply before the frame was whole")
        self.c.send(data[-1:])
        self.assertEqual(self.c.read_frame(), {"id": 5, "out": "ok", "result": 42})

    def test_complete_frame_answered_before_the_next_is_whole(self):
        a = frame({"id": 1, "in": "add", "params": [1, 2], "deadline_ms": 5000})
        b = frame({"id": 2, "in": "add", "params": [3, 4], "deadline_ms": 5000})
        self.c.send(a + b[:6])
        self.assertEqual(self.c.read_frame(), {"id": 1, "out": "ok", "result": 3})
        self.c.send(b[6:])
        self.assertEqual(self.c.read_frame(), {"id": 2, "out": "ok", "result": 7})

    def test_byte_by_byte(self):
        data = frame({"id": 3, "in": "echo", "params": u"\u00e9t\u00e9", "deadline_ms": 5000})
        for i in range(len(data)):
            self.c.send(data[i:i + 1])
        self.assertEqual(self.c.read_frame(), {"id": 3, "out": "ok", "result": u"\u00e9t\u00e9"})


class TestLifecycle(ChannelTest):
    SHARED = False

    def test_eof_exits_zero(self):
        self.assertEqual(self.c.call("add", [1, 2])["result"], 3)
        self.assertExitsZero(self.c)
        self.assertIn("serve returned\n", self.c.stdout())

    def test_eof_at_once(self):
        self.assertExitsZero(self.c)

    def test_eof_with_a_partial_frame(self):
        self.c.send(frame({"id": 1, "in": "add", "params": [1, 2]})[:7])
        self.assertExitsZero(self.c)

    def test_rpcd_fd_names_the_channel(self):
        c = self.start(fd=7)
        self.assertEqual(c.call("add", [2, 2])["result"], 4)
        self.assertExitsZero(c)

    def test_channel_not_inherited_by_programs(self):
        # A program the method starts must not hold the channel: fd 3 is
        # closed (serve() works on a copy), and the copy and anything else
        # the helper opened are close-on-exec.
        c = self.start([sys.executable, "-c",
                        "import os, rpcd_handler\n"
                        "def fds(p):\n"
                        "    import fcntl\n"
                        "    out = []\n"
                        "    for fd in range(3, 64):\n"
                        "        try:\n"
                        "            out.append((fd, bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)))\n"
                        "        except (IOError, OSError):\n"
                        "            pass\n"
                        "    return out\n"
                        "rpcd_handler.serve({'fds': fds})\n"])
        fds = c.call("fds")["result"]
        self.assertTrue(fds, "the channel's copy is missing")
        for fd, cloexec in fds:
            self.assertTrue(cloexec, "fd %d is inherited by programs the handler starts (%r)" % (fd, fds))


if __name__ == "__main__":
    unittest.main()
