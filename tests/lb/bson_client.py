"""A BSON client for the lbaas example: sends each request of a JSON list, prints the answers.

usage: bson_client.py HOST:PORT REQUESTS.json   (prints one JSON list of responses)
Uses pymongo's `bson` package, a client we did not write.
"""
import json
import socket
import struct
import sys

import bson

host, port = sys.argv[1].rsplit(":", 1)
requests = json.load(open(sys.argv[2]))
s = socket.create_connection((host, int(port)), timeout=30)
out = []


def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise RuntimeError("connection closed")
        data += chunk
    return data


for req in requests:
    s.sendall(bson.encode(req))
    head = read_exact(4)
    (length,) = struct.unpack("<i", head)
    out.append(bson.decode(head + read_exact(length - 4)))
print(json.dumps(out, default=str))
