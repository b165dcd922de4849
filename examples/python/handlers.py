"""An rpcd handler process in Python: a few methods served with rpcd_handler.

rpcd starts this program (see rpcd.toml next to it), sends it the calls of
the methods routed to it, and passes the replies on to the clients. Copy it,
replace the functions with yours, and list them in the serve() call at the
bottom. Standard library only; runs on Python 3.8+ and 2.7.

Each function takes the request's params (decoded JSON) and returns:
  - a value: the reply is {"out": "ok", "result": value};
  - a tuple (out, value) whose out is a string: {"out": out, "result": value};
or raises rpcd_handler.Error(code, message) for an error reply with that
code. Any other exception is an error reply with code "handler_error" (its
traceback goes to rpcd's log). print() goes to rpcd's log too, one log line
per line, tagged with the handler's name and PID.
"""
import re
import sys

from rpcd_handler import Error, serve


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def add(params):
    """add [a, b, ...] -> their sum."""
    if not isinstance(params, list) or not all(_number(x) for x in params):
        raise Error("bad_params", "add takes a list of numbers")
    return sum(params)


def divide(params):
    """divide [a, b] -> a / b, as a float."""
    if not (isinstance(params, list) and len(params) == 2 and all(_number(x) for x in params)):
        raise Error("bad_params", "divide takes [a, b], two numbers")
    a, b = params
    if b == 0:
        raise Error("bad_params", "division by zero")
    return float(a) / b


_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*", re.UNICODE)


def word_count(text):
    """word_count "some text" -> {"words": N, "distinct": M, "top": [[word, n], ...]}
    (words lower-cased; the five most frequent, then alphabetical)."""
    if not isinstance(text, type(u"")) and not isinstance(text, str):
        raise Error("bad_params", "word_count takes a string")
    words = [w.lower() for w in _WORD.findall(text)]
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return "counted", {"words": len(words), "distinct": len(counts), "top": [[w, n] for w, n in top]}


def greet(name):
    """greet "name" -> "hello, name" with out "greeting"; logs the visit."""
    if not isinstance(name, type(u"")) and not isinstance(name, str):
        raise Error("bad_params", "greet takes a name")
    print("greeting %s" % name)  # to rpcd's log, not to the client
    return "greeting", u"hello, %s" % name


if __name__ == "__main__":
    print("example handlers starting on Python %d.%d" % sys.version_info[:2])
    serve({
        "add": add,
        "divide": divide,
        "word_count": word_count,
        "greet": greet,
    })
