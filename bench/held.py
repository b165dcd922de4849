#!/usr/bin/env python3
"""bench/held.py: open N connections, one request on each, then hold them.

    held.py --port P --count N [--proto rpcd|redis] [--host 127.0.0.1]
            [--src ADDR] [--window 64] [--timeout 10] [--stall 5]
            [--deadline 60] [--max-hold 300]

Opens N TCP connections to HOST:PORT (at most WINDOW being opened or waiting
for their reply at once), sends one request on each (rpcd: the ping frame of
SPEC §2, a 4-byte little-endian length and {"in":"ping","params":null};
redis: inline PING) and checks the reply byte for byte (rpcd:
{"out":"pong","result":null}; redis: +PONG). Then it prints one JSON line
on stdout:

    {"event": "held", "count": N, "answered": A, "tried": T, "timeout": ...,
     "refused": ..., "reset": ..., "closed": ..., "wrong": ..., "other": ...,
     "not_tried": ..., "stalled": bool, "secs": S}

and holds the answered connections open, idle, until stdin reaches EOF (or
is closed), SIGTERM/SIGINT/SIGHUP arrives, or MAX_HOLD seconds pass; then
it prints {"event": "exit", "dropped": D, "held_secs": H, "held_at_exit": K}
(D: held connections that the server closed or reset meanwhile, K: those
still open at the end), closes them and exits.

Bounded: a connection that is not answered TIMEOUT seconds after its
connect began counts as "timeout"; when no connection has been answered for
STALL seconds (a server that stopped accepting), or DEADLINE seconds have
passed since the start, the connections not yet answered are given up
(counted as "timeout" if begun, "not_tried" if never begun). --src binds
each socket to that source address first (IP_BIND_ADDRESS_NO_PORT, so the
port is still chosen at connect time), to spread many connections over
several loopback addresses when one address's ephemeral ports would not
suffice. Standard library only; all errors are counted, never raised.
"""
import argparse, errno, json, os, resource, selectors, signal, socket, struct, sys, time

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

RPCD_BODY = b'{"in":"ping","params":null}'
RPCD_REPLY = b'{"out":"pong","result":null}'
PROTOS = {
    "rpcd": (struct.pack("<I", len(RPCD_BODY)) + RPCD_BODY, struct.pack("<I", len(RPCD_REPLY)) + RPCD_REPLY),
    "redis": (b"PING\r\n", b"+PONG\r\n"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--proto", choices=sorted(PROTOS), default="rpcd")
    ap.add_argument("--src", default=None)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--stall", type=float, default=5.0)
    ap.add_argument("--deadline", type=float, default=60.0)
    ap.add_argument("--max-hold", type=float, default=300.0)
    a = ap.parse_args()
    request, reply = PROTOS[a.proto]

    # Room for N sockets (the soft limit up to the hard one).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.count + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass

    stop = {"now": False}

    def on_signal(_s, _f):
        stop["now"] = True

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    sel = selectors.DefaultSelector()
    stdin_open = True
    had_stdin = True
    try:
        os.set_blocking(0, False)
        sel.register(0, selectors.EVENT_READ, "stdin")
    except PermissionError:
        # Not pollable (a file, /dev/null): at its end it counts as closed.
        try:
            at_end = os.read(0, 1) == b""
        except OSError:
            at_end = True
        stdin_open, had_stdin = False, at_end
    except (OSError, ValueError):
        # No stdin at all: only a signal or MAX_HOLD ends the hold.
        stdin_open = had_stdin = False

    def read_stdin():
        nonlocal stdin_open
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            stdin_open = False
            try:
                sel.unregister(0)
            except (KeyError, ValueError):
                pass

    counts = dict(answered=0, tried=0, timeout=0, refused=0, reset=0, closed=0, wrong=0, other=0)
    pending = {}  # fd -> [sock, state, started, received]
    held = {}  # fd -> sock
    t0 = time.monotonic()
    last_answer = t0
    stalled = False

    def fail(fd, kind):
        sock = pending.pop(fd)[0]
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        counts[kind] += 1

    def classify(e):
        if isinstance(e, ConnectionRefusedError):
            return "refused"
        if isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return "reset"
        return "other"

    def begin():
        counts["tried"] += 1
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            counts["other"] += 1
            return
        sock.setblocking(False)
        try:
            if a.src:
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((a.src, 0))
            rc = sock.connect_ex((a.host, a.port))
        except OSError as e:
            sock.close()
            counts[classify(e)] += 1
            return
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            counts["refused" if rc == errno.ECONNREFUSED else "other"] += 1
            return
        pending[sock.fileno()] = [sock, "connect", time.monotonic(), b""]
        sel.register(sock, selectors.EVENT_WRITE, "conn")

    def on_conn(sock, ev):
        nonlocal last_answer
        fd = sock.fileno()
        st = pending.get(fd)
        if st is None:
            return
        if st[1] == "connect":
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                fail(fd, "refused" if err == errno.ECONNREFUSED else ("reset" if err == errno.ECONNRESET else "other"))
                return
            try:
                n = sock.send(request)
            except OSError as e:
                fail(fd, classify(e))
                return
            if n != len(request):  # a 33-byte send into an empty buffer is whole
                fail(fd, "other")
                return
            st[1] = "reply"
            sel.modify(sock, selectors.EVENT_READ, "conn")
            return
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as e:
            fail(fd, classify(e))
            return
        if not data:
            fail(fd, "closed")
            return
        st[3] += data
        got = st[3]
        if not reply.startswith(got[: len(reply)]) or len(got) > len(reply):
            fail(fd, "wrong")
            return
        if len(got) == len(reply):
            pending.pop(fd)
            held[fd] = sock  # stays registered: a close by the server is seen
            sel.modify(sock, selectors.EVENT_READ, "held")
            counts["answered"] += 1
            last_answer = time.monotonic()

    dropped = 0

    def on_held(sock):
        nonlocal dropped
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        # EOF or reset: the server dropped it; unexpected data counts too.
        held.pop(sock.fileno(), None)
        sel.unregister(sock)
        sock.close()
        dropped += 1

    def dispatch(timeout):
        for key, ev in sel.select(timeout):
            if key.data == "stdin":
                read_stdin()
            elif key.data == "conn":
                on_conn(key.fileobj, ev)
            else:
                on_held(key.fileobj)

    # Phase 1: connect and ask.
    next_i = 0
    while not stop["now"]:
        now = time.monotonic()
        if now - t0 > a.deadline or (pending and now - last_answer > a.stall):
            stalled = True
            break
        while next_i < a.count and len(pending) < a.window:
            begin()
            next_i += 1
        if not pending and next_i >= a.count:
            break
        dispatch(0.05)
        now = time.monotonic()
        for fd in [fd for fd, st in pending.items() if now - st[2] > a.timeout]:
            fail(fd, "timeout")
        if not pending and next_i < a.count and now - last_answer > a.stall:
            stalled = True
            break
    for fd in list(pending):
        fail(fd, "timeout")
    counts["not_tried"] = a.count - next_i
    line = dict(event="held", count=a.count, stalled=stalled, secs=round(time.monotonic() - t0, 3), **counts)
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()

    # Phase 2: hold.
    h0 = time.monotonic()
    while not stop["now"] and (stdin_open or not had_stdin) and time.monotonic() - h0 < a.max_hold:
        dispatch(0.5)
    held_secs = round(time.monotonic() - h0, 3)
    for sock in held.values():
        sock.close()
    sys.stdout.write(json.dumps(dict(event="exit", dropped=dropped, held_secs=held_secs, held_at_exit=len(held))) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
