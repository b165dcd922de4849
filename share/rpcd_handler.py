"""rpcd_handler: serve Python functions as an rpcd handler process.

rpcd (see rpcd.toml(5), [handlers.NAME] and [methods.NAME]) starts this
program, sends it requests on the socket named by RPCD_FD (fd 3), and passes
the replies on to its clients. One file, standard library only; runs on
Python 3.8+ and 2.7.

    from rpcd_handler import serve

    def add(params):
        a, b = params
        return a + b                  # reply {"out": "ok", "result": a + b}

    def pi(n):
        s = 0.0
        for i in range(n + 1):
            s += 1.0 / (2 * i + 1) / (2 * i + 1)
        return "pi_r", (8 * s) ** 0.5  # a tuple (out, result) sets "out"

    serve({"add": add, "pi": pi})

A function takes the request's params (decoded JSON) and returns the result,
or a tuple (out, result). Raise rpcd_handler.Error(code, message) for an
error reply with your own code; any other exception becomes an error reply
with code "handler_error" (and its traceback goes to stderr, which rpcd
logs). print() is harmless: stdout and stderr go to rpcd's log, line by
line; only fd 3 carries frames.

Handlers written for the original server, which answer through
send_result(out, result) on a handler object or write the framed reply to a
connection, are served unchanged too: subclass rpcd_handler.Handler (it has
send_result, send and sendall), or wrap f(conn, params) functions with
rpcd_handler.conn_style(f).

The helper answers "ping" itself when your methods have none (for
`warmup = { in = "ping" }`); clients never reach it, since rpcd serves
ping itself. It reads requests in batches and writes the replies of a batch
in one send, so max_inflight > 1 gives pipelining (calls still run one at a
time in this process). It returns when rpcd closes the channel.
"""

import json
import os
import socket
import struct
import sys
import traceback

__all__ = ["serve", "Error", "Handler", "conn_style"]

_LEN = struct.Struct("<I")
_PY2 = sys.version_info[0] == 2


class Error(Exception):
    """An error reply: {"out": "error", "result": {"code": code, "message": message}}."""

    def __init__(self, code, message):
        Exception.__init__(self, "%s: %s" % (code, message))
        self.code = code
        self.message = message


class _Capture(object):
    """Collects what a handler writes as if to a client connection: frames
    of a 4-byte length and a JSON body {"out": ..., "result": ...}."""

    def __init__(self):
        self.data = b""
        self.reply = None

    def send(self, data):
        if not isinstance(data, bytes):
            data = data.encode("utf-8")
        self.data += data
        return len(data)

    sendall = send
    write = send

    def send_result(self, out, result):
        self.reply = (out, result)

    def take(self):
        """The first reply written, as (out, result), or None."""
        if self.reply is not None:
            return self.reply
        if len(self.data) >= 4:
            (n,) = _LEN.unpack_from(self.data, 0)
            if len(self.data) >= 4 + n:
                v = json.loads(self.data[4:4 + n].decode("utf-8"))
                return v.get("out", "ok"), v.get("result")
        return None


class Handler(object):
    """A base class for handlers that answer with self.send_result(out,
    result), or write a framed reply with self.send / self.sendall, as the
    original server's did. serve(instance) serves its public methods."""

    _capture = None

    def send_result(self, out, result):
        self._capture.send_result(out, result)

    def send(self, data):
        return self._capture.send(data)

    def sendall(self, data):
        self._capture.send(data)


def conn_style(f):
    """Wraps a function f(conn, params) that writes its reply to conn (a
    length-prefixed JSON frame, as the original server's send_result did)."""

    def call(params):
        conn = _Capture()
        f(conn, params)
        reply = conn.take()
        if reply is None:
            raise Error("handler_error", "the function wrote no reply")
        return tuple(reply)

    call.__name__ = getattr(f, "__name__", "conn_style")
    return call


def _methods_of(obj):
    if isinstance(obj, dict):
        return dict(obj)
    skip = set(dir(Handler))
    out = {}
    for name in dir(obj):
        if name.startswith("_") or name in skip:
            continue
        f = getattr(obj, name)
        if callable(f):
            out[name] = f
    return out


def _ping(params):
    return "pong", params


def _reply(rid, out, result):
    return json.dumps({"id": rid, "out": out, "result": result}, separators=(",", ":"))


def _error(rid, code, message):
    return _reply(rid, "error", {"code": code, "message": message})


def _call(methods, handler, req):
    rid = req.get("id")
    name = req.get("in")
    f = methods.get(name)
    if f is None:
        if name == "ping":
            f = _ping
        else:
            return _error(rid, "unknown_method", "this handler has no method %r" % (name,))
    capture = None
    if handler is not None:
        capture = handler._capture = _Capture()
    try:
        r = f(req.get("params"))
        if r is None and capture is not None:
            r = capture.take()
            r = tuple(r) if r is not None else None
    except Error as e:
        return _error(rid, e.code, e.message)
    except Exception as e:  # the client gets the error; the log gets the traceback
        traceback.print_exc()
        sys.stderr.flush()
        return _error(rid, "handler_error", "%s: %s" % (type(e).__name__, e))
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], (str, type(u""))):
        out, result = r
    else:
        out, result = "ok", r
    try:
        return _reply(rid, out, result)
    except (TypeError, ValueError) as e:
        return _error(rid, "handler_error", "the result is not JSON: %s" % (e,))


def _line_buffered():
    """print() output reaches rpcd's log line by line, not at exit."""
    try:
        if _PY2:
            sys.stdout = os.fdopen(1, "w", 1)
        else:
            sys.stdout.reconfigure(line_buffering=True)
            sys.stderr.reconfigure(line_buffering=True)
    except Exception:
        pass


def serve(methods, fd=None):
    """Serves `methods` (a dict of name -> function, or a Handler instance)
    on the rpcd channel until rpcd closes it."""
    handler = methods if isinstance(methods, Handler) else None
    table = _methods_of(methods)
    if fd is None:
        fd = int(os.environ.get("RPCD_FD", "3"))
    sock = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
    os.close(fd)  # fromfd made a copy
    _line_buffered()
    buf = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.error as e:
            if getattr(e, "errno", None) == 4:  # EINTR (Python 2)
                continue
            raise
        if not chunk:
            break
        buf += chunk
        replies = []
        at = 0
        while len(buf) - at >= 4:
            (n,) = _LEN.unpack_from(buf, at)
            if len(buf) - at < 4 + n:
                break
            body = buf[at + 4:at + 4 + n]
            at += 4 + n
            req = json.loads(body.decode("utf-8"))
            text = _call(table, handler, req).encode("utf-8")
            replies.append(_LEN.pack(len(text)) + text)
        buf = buf[at:]
        if replies:
            sock.sendall(b"".join(replies))
    sock.close()
