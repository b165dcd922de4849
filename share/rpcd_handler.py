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
or a tuple (out, result) whose out is a string (a list, or a tuple of any
other shape, is a result). Raise rpcd_handler.Error(code, message) for an
error reply with your own code; any other exception becomes an error reply
with code "handler_error" (and its traceback goes to stderr, which rpcd
logs). A result that JSON cannot carry (a set, an object, NaN or infinity)
is a "handler_error" reply too. print() is harmless: stdout and stderr go to
rpcd's log, line by line; only fd 3 carries frames.

Handlers written for the original server, which answer through
send_result(out, result) on a handler object or write the framed reply to a
connection, are served unchanged too: subclass rpcd_handler.Handler (it has
send_result, send and sendall; serve() takes an instance, or a dict of its
bound methods), or wrap f(conn, params) functions with
rpcd_handler.conn_style(f). A reply sent that way is the reply, whatever the
method returns; without one, the return value is.

rpcd_handler.time_left() gives the seconds left before the current call's
deadline (its timeout_ms, counted from when rpcd received it): past it, the
client has had its `timeout` answer and rpcd kills this process.

The helper answers "ping" itself when your methods have none (for
`warmup = { in = "ping" }`); clients never reach it, since rpcd serves
ping itself. It reads requests in batches and writes the replies of a batch
in one send (once a batch has taken over a millisecond, each reply goes as
soon as it is ready),
so max_inflight > 1 gives pipelining (calls still run one at a time in this
process). A reply larger than rpcd takes (RPCD_MAX_FRAME_BYTES) becomes a
"handler_error" reply. It returns when rpcd closes the channel.
"""

import errno
import json
import os
import socket
import struct
import sys
import time
import traceback

__all__ = ["serve", "Error", "Handler", "conn_style", "time_left"]

# The largest frame rpcd accepts (0: not known).
try:
    _MAX_FRAME = int(os.environ.get("RPCD_MAX_FRAME_BYTES", "0"))
except ValueError:
    _MAX_FRAME = 0
# A batch of requests slower than this sends each reply as soon as it is ready.
_SLOW = 0.001

_LEN = struct.Struct("<I")
_PY2 = sys.version_info[0] == 2
if _PY2:
    _UNICODE = unicode  # noqa: F821 (Python 2)
    _TEXT = (str, unicode)  # noqa: F821
else:
    _UNICODE = str
    _TEXT = (str,)


class Error(Exception):
    """An error reply: {"out": "error", "result": {"code": code, "message": message}}."""

    def __init__(self, code, message):
        Exception.__init__(self, "%s: %s" % (code, message))
        self.code = code
        self.message = message


class _Reply(tuple):
    """(out, result) of a reply that was sent rather than returned: used as
    it is, never taken for a result."""


class _Capture(object):
    """Collects what a handler writes as if to a client connection: frames
    of a 4-byte length and a JSON body {"out": ..., "result": ...}, or
    send_result(out, result) calls. The first reply counts."""

    def __init__(self):
        self.chunks = []
        self.size = 0
        self.reply = None

    def send(self, data):
        if isinstance(data, _UNICODE):
            data = data.encode("utf-8")
        elif not isinstance(data, bytes):
            data = bytes(data)  # bytearray, memoryview
        self.chunks.append(data)
        self.size += len(data)
        return len(data)

    def sendall(self, data):
        self.send(data)

    write = send

    def send_result(self, out, result):
        if self.reply is None and not self.size:
            self.reply = _Reply((out, result))

    def take(self):
        """The first reply sent, as a _Reply (out, result), or None. Raises
        Error for bytes that are not a whole reply frame."""
        if self.reply is not None:
            return self.reply
        if not self.size:
            return None
        data = b"".join(self.chunks)
        if len(data) < 4 or len(data) < 4 + _LEN.unpack_from(data, 0)[0]:
            raise Error("handler_error", "the method wrote an incomplete frame (%d bytes)" % len(data))
        (n,) = _LEN.unpack_from(data, 0)
        try:
            v = json.loads(data[4:4 + n].decode("utf-8"))
        except ValueError as e:
            raise Error("handler_error", "the method wrote a frame that is not JSON: %s" % _text(e))
        if not isinstance(v, dict):
            raise Error("handler_error", "the method wrote a frame that is not a JSON object")
        return _Reply((v.get("out", "ok"), v.get("result")))


class _State(object):
    capture = None  # the _Capture of the call in progress, once it sends
    in_call = False
    received = None  # time.time() when the call in progress was read
    deadline_ms = None  # ... and its time left then


_state = _State()


def _current(what):
    if not _state.in_call:
        raise RuntimeError("Handler.%s outside a request: only methods that rpcd_handler.serve() "
                           "calls can send a reply" % what)
    if _state.capture is None:
        _state.capture = _Capture()
    return _state.capture


class Handler(object):
    """A base class for handlers that answer with self.send_result(out,
    result), or write a framed reply with self.send / self.sendall, as the
    original server's did. serve(instance) serves its public methods;
    serve({"name": instance.method, ...}) serves the ones named."""

    def send_result(self, out, result):
        _current("send_result").send_result(out, result)

    def send(self, data):
        return _current("send").send(data)

    def sendall(self, data):
        _current("sendall").sendall(data)


def time_left():
    """Seconds left before the current call's deadline (0.0 once it has
    passed), or None outside a call."""
    if _state.deadline_ms is None:
        return None
    return max(0.0, _state.received + _state.deadline_ms / 1000.0 - time.time())


def conn_style(f):
    """Wraps a function f(conn, params) that writes its reply to conn (a
    length-prefixed JSON frame, as the original server's send_result did,
    through conn.send, conn.sendall or conn.write; or conn.send_result(out,
    result))."""

    def call(params):
        conn = _Capture()
        f(conn, params)
        reply = conn.take()
        if reply is None:
            raise Error("handler_error", "the function wrote no reply")
        return reply

    call.__name__ = getattr(f, "__name__", "conn_style")
    call.__doc__ = getattr(f, "__doc__", None)
    return call


def _key(name):
    if _PY2 and isinstance(name, str):
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            return name
    return name


def _methods_of(obj):
    if isinstance(obj, dict):
        return dict((_key(k), v) for k, v in obj.items())
    skip = set(dir(Handler))
    out = {}
    for name in dir(obj):
        if name.startswith("_") or name in skip:
            continue
        f = getattr(obj, name)
        if callable(f):
            out[_key(name)] = f
    return out


def _ping(params):
    return "pong", params


def _text(e):
    """str(e) that never fails (Python 2 and non-ASCII messages)."""
    try:
        return _UNICODE(e)
    except Exception:
        try:
            return repr(e)
        except Exception:
            return type(e).__name__


# One encoder for every reply: json.dumps() with options builds a new one each call.
_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _reply(rid, out, result):
    """The reply's JSON; an error reply if it cannot be encoded."""
    try:
        text = _dumps({"id": rid, "out": out, "result": result})
        if _MAX_FRAME and len(text) > _MAX_FRAME:  # ASCII: characters are bytes
            return _dumps({"id": rid, "out": "error", "result": {"code": "handler_error",
                           "message": "the reply is %d bytes, over rpcd's max_frame_bytes (%d)" % (len(text), _MAX_FRAME)}})
        return text
    except (TypeError, ValueError, OverflowError) as e:
        if out == "error" and isinstance(result, dict) and "code" in result:
            what = "the error reply is not JSON"
        else:
            what = "the result is not JSON"
        return _dumps({"id": rid, "out": "error",
                       "result": {"code": "handler_error", "message": "%s: %s" % (what, _text(e))}})


def _error(rid, code, message):
    return _reply(rid, "error", {"code": code, "message": message})


def _call(methods, req, received=None):
    """Runs one request; returns the reply's JSON text."""
    if not isinstance(req, dict):
        raise ValueError("rpcd sent a request that is not a JSON object")
    rid = req.get("id")
    name = req.get("in")
    f = methods.get(name) if isinstance(name, _TEXT) else None
    if f is None:
        if name == "ping":
            f = _ping
        else:
            return _error(rid, "unknown_method", "this handler has no method %s" % _dumps(name))
    ms = req.get("deadline_ms")
    _state.deadline_ms = ms if isinstance(ms, (int, float)) else None
    _state.received = received if received is not None else time.time()
    _state.capture = None
    _state.in_call = True
    try:
        try:
            r = f(req.get("params"))
        finally:
            capture, _state.capture, _state.in_call, _state.deadline_ms = _state.capture, None, False, None
        sent = capture.take() if capture is not None else None
        if sent is not None:
            r = sent
    except Error as e:
        return _error(rid, e.code, e.message)
    except Exception as e:  # the client gets the error; the log gets the traceback
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except Exception:
            pass
        return _error(rid, "handler_error", "%s: %s" % (type(e).__name__, _text(e)))
    if isinstance(r, _Reply):
        out, result = r
        if not isinstance(out, _TEXT):
            return _error(rid, "handler_error", "the reply's out is not a string: %r" % (out,))
    elif type(r) is tuple and len(r) == 2 and isinstance(r[0], _TEXT):
        out, result = r
    else:
        out, result = "ok", r
    return _reply(rid, out, result)


class _Utf8Out(object):
    """A Python 2 stream that writes unicode as UTF-8: rpcd's environment
    has no locale, so a plain one would fail on print(u"caf\u00e9")."""

    def __init__(self, f):
        self._f = f

    def write(self, s):
        if isinstance(s, _UNICODE):
            s = s.encode("utf-8", "replace")
        self._f.write(s)

    def writelines(self, lines):
        for s in lines:
            self.write(s)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _line_buffered():
    """print() output reaches rpcd's log line by line, not at exit."""
    if _PY2:
        try:
            sys.stdout.flush()
            fd = os.dup(1)  # not fd 1 itself, which the old file object closes when freed
            _cloexec(fd)
            sys.stdout = _Utf8Out(os.fdopen(fd, "w", 1))
        except Exception:
            pass
        if sys.stderr is not None and not isinstance(sys.stderr, _Utf8Out):
            sys.stderr = _Utf8Out(sys.stderr)  # unbuffered already
        return
    for f in (sys.stdout, sys.stderr):
        try:
            f.reconfigure(line_buffering=True)
        except Exception:
            pass


def _cloexec(fd):
    """Programs a method starts do not inherit the channel (Python 3 does
    this itself; Python 2's subprocess keeps descriptors by default)."""
    try:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    except Exception:
        pass


_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)


def _send(sock, replies):
    """Sends replies in one go; False once rpcd has gone."""
    try:
        sock.sendall(b"".join(replies))
        return True
    except socket.error as e:
        if e.errno in _GONE:
            return False
        raise


def serve(methods, fd=None):
    """Serves `methods` (a dict of name -> function, or a Handler instance)
    on the rpcd channel until rpcd closes it."""
    table = _methods_of(methods)
    if fd is None:
        fd = int(os.environ.get("RPCD_FD", "3"))
    try:
        sock = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
    except (OSError, socket.error) as e:
        raise SystemExit("rpcd_handler: no rpcd channel on fd %d (RPCD_FD): %s; "
                         "this program is meant to be started by rpcd" % (fd, e))
    os.close(fd)  # fromfd made a copy
    sock.setblocking(True)
    _cloexec(sock.fileno())
    _line_buffered()
    buf = bytearray()
    try:
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.error as e:
                if e.errno == errno.EINTR:  # Python 2
                    continue
                if e.errno in _GONE:
                    break
                raise
            if not chunk:
                break  # EOF: rpcd is done with this process
            buf += chunk
            replies = []
            at = 0
            t_read = time.time()
            while len(buf) - at >= 4:
                (n,) = _LEN.unpack_from(buf, at)
                if len(buf) - at - 4 < n:
                    break
                body = bytes(buf[at + 4:at + 4 + n])
                at += 4 + n
                req = json.loads(body.decode("utf-8"))
                if replies and time.time() - t_read > _SLOW:
                    # A slow batch: what is ready goes now, not after the rest.
                    if not _send(sock, replies):
                        return
                    replies = []
                text = _call(table, req, t_read).encode("utf-8")
                replies.append(_LEN.pack(len(text)) + text)
            if at:
                del buf[:at]
            if replies and not _send(sock, replies):
                break
    finally:
        sock.close()
