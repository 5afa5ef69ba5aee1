"""A load client for the lb tests: requests through a listener, counting answers by body.

usage: load.py http|tcp HOST:PORT REQUESTS SECONDS CONCURRENCY [PATH]
Stops after REQUESTS requests or SECONDS seconds (whichever first; 0 = no limit on that one),
or when the file named by $LOAD_STOP exists; creates the file named by $LOAD_STARTED after
the first answer. Each request uses a new connection.
Prints one JSON line: {"ok": n, "fail": n, "bodies": {body: n}, "errors": [first few]}.
"""
import http.client
import json
import os
import socket
import sys
import threading
import time

mode, target, total, seconds, conc = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
path = sys.argv[6] if len(sys.argv) > 6 else "/"
host, port = target.rsplit(":", 1)
port = int(port)
stop_file = os.environ.get("LOAD_STOP")
lock = threading.Lock()
state = {"issued": 0, "ok": 0, "fail": 0, "bodies": {}, "errors": []}
deadline = time.time() + seconds if seconds > 0 else None


def one():
    if mode == "http":
        c = http.client.HTTPConnection(host, port, timeout=10)
        try:
            c.request("GET", path, headers={"Connection": "close"})
            r = c.getresponse()
            data = r.read().decode()
            if r.status != 200:
                raise RuntimeError("status %d: %s" % (r.status, data[:80]))
            return data
        finally:
            c.close()
    s = socket.create_connection((host, port), timeout=10)
    try:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
        if not data.endswith(b"\n"):
            raise RuntimeError("connection closed after %r" % data)
        return data.decode().strip()
    finally:
        s.close()


def worker():
    while True:
        with lock:
            if total and state["issued"] >= total:
                return
            if deadline and time.time() > deadline:
                return
            if stop_file and os.path.exists(stop_file):
                return
            state["issued"] += 1
        try:
            body = one()
            with lock:
                state["ok"] += 1
                if state["ok"] == 1 and os.environ.get("LOAD_STARTED"):
                    open(os.environ["LOAD_STARTED"], "w").close()
                state["bodies"][body] = state["bodies"].get(body, 0) + 1
        except Exception as e:  # noqa: BLE001 - every failure counts
            with lock:
                state["fail"] += 1
                if len(state["errors"]) < 5:
                    state["errors"].append("%s: %s" % (type(e).__name__, e))


threads = [threading.Thread(target=worker) for _ in range(conc)]
for t in threads:
    t.start()
for t in threads:
    t.join()
del state["issued"]
print(json.dumps(state), flush=True)
