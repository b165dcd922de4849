"""bench/run's Python handler process: echo through rpcd_handler (share/),
as a user would write it. Replies {"out": "pong", "result": params}, which
is what built-in ping answers, so rpcbench checks it with --reply-as ping.

    [handlers.py]
    exec = ["/usr/bin/python3", "/path/to/bench/py_echo.py"]
    env = { PYTHONPATH = "/path/to/share" }   # or rpcd_handler.py beside this file
"""
import os
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "share"))

from rpcd_handler import serve  # noqa: E402

serve({"echo": lambda p: ("pong", p)})
