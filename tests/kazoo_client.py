#!/usr/bin/env python3
"""A discovery client written like the original system's kazoo client:
watch the root's children with ChildrenWatch, read {"host", "port"} JSON from
each child, call a random server with struct.pack("I") framing.

usage: kazoo_client.py HOSTS ROOT WANT CALLS

Waits (up to 30 s) until WANT servers are seen, prints "discovered N", then
makes CALLS ping calls, one line each: "host:port OUT RESULT". Exit 1 on any
failure."""
import json
import random
import socket
import sys
import threading
import time

from kazoo.client import KazooClient

# The framing of the original clients, shared with the interoperability test.
from interop_client import call  # noqa: E402


def main():
    hosts, root, want, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    zk = KazooClient(hosts=hosts, timeout=10.0)
    zk.start(timeout=15)
    servers = {}
    lock = threading.Lock()

    @zk.ChildrenWatch(root)
    def on_children(children):
        found = {}
        for child in children:
            data, _ = zk.get(root + "/" + child)
            info = json.loads(data.decode("utf-8"))
            found[child] = (info["host"], int(info["port"]))
        with lock:
            servers.clear()
            servers.update(found)

    deadline = time.time() + 30
    while True:
        with lock:
            n = len(servers)
        if n >= want:
            break
        if time.time() > deadline:
            print("only %d server(s) discovered" % n)
            sys.exit(1)
        time.sleep(0.05)
    print("discovered %d" % n)
    sys.stdout.flush()

    conns = {}
    for i in range(calls):
        with lock:
            host, port = random.choice(list(servers.values()))
        sock = conns.get((host, port))
        if sock is None:
            sock = socket.create_connection((host, port), timeout=10)
            conns[(host, port)] = sock
        r = call(sock, "ping", {"i": i})
        if r.get("out") != "pong" or r.get("result") != {"i": i}:
            print("BAD %s:%d %r" % (host, port, r))
            sys.exit(1)
        print("%s:%d %s %s" % (host, port, r["out"], json.dumps(r["result"])))
    for sock in conns.values():
        sock.close()
    zk.stop()
    zk.close()


if __name__ == "__main__":
    main()
