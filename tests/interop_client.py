#!/usr/bin/env python3
"""A client written like the original Python 2 system's: struct.pack("I", n),
the prefix and the body in separate sends, then a blocking read of the
reply. Works on Python 2 and 3."""
import json
import socket
import struct
import sys


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("server closed the connection")
        data += chunk
    return data


def call(sock, method, params):
    body = json.dumps({"in": method, "params": params}).encode("utf-8")
    sock.send(struct.pack("I", len(body)))  # native order: little-endian
    sock.send(body)
    (n,) = struct.unpack("I", recv_exact(sock, 4))
    return json.loads(recv_exact(sock, n).decode("utf-8"))


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.create_connection((host, port), timeout=10)
    for method, params in [("ping", {"hello": "world"}), ("pi", 0), ("pi", 1000)]:
        r = call(sock, method, params)
        print("%s %r" % (r["out"], r["result"]))
    sock.close()


if __name__ == "__main__":
    main()
