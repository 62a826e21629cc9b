#!/usr/bin/python3
"""Cross-process "the lab is mine" lock, shared with the Rust test support
(tests/support/openstack.rs, Lab::exclusive): whoever has a listening socket
on 127.0.0.1:LAB_LOCK_PORT (5990) owns the lab.  The kernel releases it when
the holder exits, even on a crash: no stale lock files.

  lablock.py CMD ARGS...     run CMD while holding the lock (waits for it)

or from python: `with lablock.held(): ...`
"""
import contextlib
import os
import socket
import subprocess
import sys
import time

PORT = int(os.environ.get("LAB_LOCK_PORT", "5990"))


def acquire(timeout=1800.0, quiet=False):
    deadline = time.time() + timeout
    said = False
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", PORT))
            s.listen(1)
            return s  # non-inheritable (PEP 446): children don't keep it
        except OSError:
            s.close()
            if time.time() > deadline:
                sys.exit("lablock: 127.0.0.1:%d still held after %ds" % (PORT, timeout))
            if not said and not quiet:
                print("lablock: waiting for the lab (another test holds 127.0.0.1:%d)" % PORT,
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(0.2)


@contextlib.contextmanager
def held(timeout=1800.0):
    if os.environ.get("LAB_LOCK_HELD") == "1":  # a parent holds it for us
        yield
        return
    s = acquire(timeout)
    os.environ["LAB_LOCK_HELD"] = "1"
    try:
        yield
    finally:
        os.environ.pop("LAB_LOCK_HELD", None)
        s.close()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    with held():
        sys.exit(subprocess.call(sys.argv[1:]))
