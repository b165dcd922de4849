#!/usr/bin/env python3
"""What another ZooKeeper client (kazoo, unauthenticated unless told) can see
and do to rpcd's registration, for tests/zk_acl.rs. Prints one JSON object.

usage:
  kazoo_acl.py HOSTS inspect NODE...
      {"PATH": {"acls": [[perms, scheme, id], ...], "data": "...",
                "children": [...]} or null if it does not exist, ...}
  kazoo_acl.py HOSTS attack ROOT NODE
      tries, in this order, set_data(NODE), set_acls(NODE, world:anyone all),
      create(ROOT/fake), delete(NODE); each result is "ok" or the exception's
      class name (NoAuthError when the ACLs hold)
  kazoo_acl.py HOSTS mkroot PATH DIGEST_ID
      creates PATH with the ACLs an operator would give it:
      digest:DIGEST_ID:cdrwa world:anyone:r
  kazoo_acl.py HOSTS digest USER:PASSWORD
      kazoo's own digest id for the credentials ("USER:base64(sha1)")

With KAZOO_DIGEST=USER:PASSWORD in the environment the session authenticates
first (ZooKeeper shows an ACL's digest hash only to a session with ADMIN
rights on the node; others see "USER:x").
"""
import json
import os
import sys

from kazoo.client import KazooClient
from kazoo.security import ACL, Id, Permissions, make_digest_acl_credential


def client(hosts):
    cred = os.environ.get("KAZOO_DIGEST")
    auth = [("digest", cred)] if cred else None
    zk = KazooClient(hosts=hosts, timeout=10.0, auth_data=auth)
    zk.start(timeout=15)
    return zk


def inspect(zk, path):
    if zk.exists(path) is None:
        return None
    acls, _ = zk.get_acls(path)
    data, _ = zk.get(path)
    return {
        "acls": sorted([a.perms, a.id.scheme, a.id.id] for a in acls),
        "data": data.decode("utf-8", "replace"),
        "children": sorted(zk.get_children(path)),
    }


def attempt(f):
    try:
        f()
        return "ok"
    except Exception as e:  # noqa: BLE001 - the class name is the answer
        return type(e).__name__


def main():
    hosts, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if cmd == "digest":
        user, password = args[0].split(":", 1)
        print(json.dumps({"id": make_digest_acl_credential(user, password)}))
        return
    zk = client(hosts)
    try:
        if cmd == "inspect":
            out = {p: inspect(zk, p) for p in args}
        elif cmd == "attack":
            root, node = args
            world_all = [ACL(Permissions.ALL, Id("world", "anyone"))]
            out = {
                "set_data": attempt(lambda: zk.set(node, b'{"host": "10.6.6.6", "port": 6666}')),
                "set_acls": attempt(lambda: zk.set_acls(node, world_all)),
                "create": attempt(lambda: zk.create(root + "/rpcfake", b'{"host": "10.6.6.6", "port": 6666}')),
                "delete": attempt(lambda: zk.delete(node)),
            }
        elif cmd == "mkroot":
            path, digest_id = args
            acl = [
                ACL(Permissions.ALL, Id("digest", digest_id)),
                ACL(Permissions.READ, Id("world", "anyone")),
            ]
            zk.create(path, b"", acl=acl, makepath=True)
            out = {"created": path}
        else:
            sys.exit("unknown command " + cmd)
        print(json.dumps(out))
    finally:
        zk.stop()
        zk.close()


if __name__ == "__main__":
    main()
