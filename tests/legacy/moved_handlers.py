# coding: utf8
"""The original server's handler methods (original_server.py: RPCHandler's
ping, pi and send_result), moved here unchanged and served through rpcd by
rpcd_handler. rpcd serves ping and pi itself, so the config routes the
moved ones as old_ping and old_pi.

    [handlers.legacy]
    exec = ["/usr/bin/python3", "moved_handlers.py"]
    env = { PYTHONPATH = "/usr/share/rpcd" }
    [methods.old_ping]
    handler = "legacy"
    [methods.old_pi]
    handler = "legacy"
"""
import json
import math
import struct

from rpcd_handler import Handler, serve


class RPCHandler(Handler):

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


if __name__ == "__main__":
    h = RPCHandler()
    serve({"old_ping": h.ping, "old_pi": h.pi})
