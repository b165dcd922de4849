# coding: utf8
"""The original system's server, as its users run it: an asyncore RPC
server that preforks its processes and registers itself in ZooKeeper
(the teaching system's chapter-16 "distributed RPC server").

This is a reconstruction for rpcd's tests and benchmarks, faithful to the
original's structure: RPCHandler (asyncore.dispatcher_with_send) with the
handler methods ping and pi answering through send_result, RPCServer
preforking children that share the listening socket, and a kazoo
registration of {"host", "port"} as an ephemeral sequential node. Options
the original does not have, for testing and benchmarking only:

    original_server.py HOST PORT [--processes N] [--zk HOSTS|--no-zk]
                                 [--root PATH] [--nodelay] [--quiet]

--nodelay sets TCP_NODELAY on accepted sockets, so that a benchmark is not
held back by Nagle's algorithm (the original's two send() calls per reply
would otherwise wait for the client's delayed ACK). Runs on Python 2.7 and
on Python 3 up to 3.11 (asyncore was removed in 3.12).
"""
import asyncore
import errno
import json
import math
import os
import signal
import socket
import struct
import sys
from io import BytesIO

try:
    from select import error as select_error  # Python 2
except ImportError:
    select_error = OSError

OPTS = {"processes": 10, "zk": "127.0.0.1:2181", "root": "/demo", "nodelay": False, "quiet": False}


def log(*args):
    if not OPTS["quiet"]:
        print(" ".join(str(a) for a in args))
        sys.stdout.flush()


class RPCHandler(asyncore.dispatcher_with_send):

    def __init__(self, sock, addr):
        asyncore.dispatcher_with_send.__init__(self, sock=sock)
        self.addr = addr
        self.handlers = {
            "ping": self.ping,
            "pi": self.pi,
        }
        self.rbuf = BytesIO()

    def handle_connect(self):
        log(self.addr, 'comes')

    def handle_close(self):
        log(self.addr, 'bye')
        self.close()

    def handle_read(self):
        while True:
            content = self.recv(1024)
            if content:
                self.rbuf.write(content)
            if len(content) < 1024:
                break
        self.handle_rpc()

    def handle_rpc(self):
        while True:
            self.rbuf.seek(0)
            length_prefix = self.rbuf.read(4)
            if len(length_prefix) < 4:
                break
            length, = struct.unpack("I", length_prefix)
            body = self.rbuf.read(length)
            if len(body) < length:
                break
            request = json.loads(body.decode("utf-8"))
            in_ = request['in']
            params = request['params']
            log(os.getpid(), in_, params)
            handler = self.handlers[in_]
            handler(params)
            left = self.rbuf.getvalue()[length + 4:]
            self.rbuf = BytesIO()
            self.rbuf.write(left)
        self.rbuf.seek(0, 2)

    def ping(self, params):
        self.send_result("pong", params)

    def pi(self, n):
        s = 0.0
        for i in range(n + 1):
            s += 1.0/(2*i+1)/(2*i+1)
        result = math.sqrt(8*s)
        self.send_result("pi_r", result)

    def send_result(self, out, result):
        response = {"out": out, "result": result}
        body = json.dumps(response).encode("utf-8")
        length_prefix = struct.pack("I", len(body))
        self.send(length_prefix)
        self.send(body)


class RPCServer(asyncore.dispatcher):

    def __init__(self, host, port):
        asyncore.dispatcher.__init__(self)
        self.host = host
        self.port = port
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.set_reuse_addr()
        self.bind((host, port))
        self.listen(128)
        self.child_pids = []
        if self.prefork(OPTS["processes"]):  # the parent
            self.register_zk()
            self.register_parent_signal()
        else:  # a child
            self.register_child_signal()

    def prefork(self, n):
        for i in range(n):
            pid = os.fork()
            if pid < 0:
                raise RuntimeError("fork failed")
            if pid > 0:
                self.child_pids.append(pid)
                continue
            if pid == 0:
                return False
        return True

    def register_zk(self):
        self.zk = None
        if not OPTS["zk"]:
            return
        from kazoo.client import KazooClient
        self.zk = KazooClient(hosts=OPTS["zk"])
        self.zk.start()
        self.zk.ensure_path(OPTS["root"])
        value = json.dumps({"host": self.host, "port": self.port}).encode("utf-8")
        self.zk.create(OPTS["root"] + "/rpc", value, ephemeral=True, sequence=True)

    def exit_parent(self, sig, frame):
        if self.zk is not None:
            self.zk.stop()
        self.close()
        asyncore.close_all()
        pids = []
        for pid in self.child_pids:
            try:
                os.kill(pid, signal.SIGINT)
                pids.append(pid)
            except OSError as ex:
                if ex.args[0] == errno.ECHILD:
                    continue
                raise ex
            log("kill", pid)
        for pid in pids:
            while True:
                try:
                    os.waitpid(pid, 0)
                    break
                except OSError as ex:
                    if ex.args[0] == errno.ECHILD:
                        break
                    if ex.args[0] != errno.EINTR:
                        raise ex
            log("wait over", pid)

    def reap_child(self, sig, frame):
        log("before reap")
        while True:
            try:
                info = os.waitpid(-1, os.WNOHANG)
                break
            except OSError as ex:
                if ex.args[0] == errno.ECHILD:
                    return
                if ex.args[0] != errno.EINTR:
                    raise ex
        pid = info[0]
        try:
            self.child_pids.remove(pid)
        except ValueError:
            pass
        log("after reap", pid)

    def register_parent_signal(self):
        signal.signal(signal.SIGINT, self.exit_parent)
        signal.signal(signal.SIGTERM, self.exit_parent)
        signal.signal(signal.SIGCHLD, self.reap_child)

    def exit_child(self, sig, frame):
        self.close()
        asyncore.close_all()
        log("all closed")

    def register_child_signal(self):
        signal.signal(signal.SIGINT, self.exit_child)
        signal.signal(signal.SIGTERM, self.exit_child)

    def handle_accept(self):
        pair = self.accept()  # get a client connection
        if pair is not None:
            sock, addr = pair
            if OPTS["nodelay"]:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            RPCHandler(sock, addr)


def main():
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    host, port = args[0], int(args[1])
    rest = args[2:]
    while rest:
        a = rest.pop(0)
        if a == "--processes":
            OPTS["processes"] = int(rest.pop(0))
        elif a == "--zk":
            OPTS["zk"] = rest.pop(0)
        elif a == "--no-zk":
            OPTS["zk"] = None
        elif a == "--root":
            OPTS["root"] = rest.pop(0)
        elif a == "--nodelay":
            OPTS["nodelay"] = True
        elif a == "--quiet":
            OPTS["quiet"] = True
        else:
            sys.exit("unknown option %s" % a)
    RPCServer(host, port)
    try:
        asyncore.loop()
    except (OSError, select_error) as ex:  # closed under select() by a signal handler
        if ex.args[0] != errno.EBADF:
            raise


if __name__ == '__main__':
    main()
