"""A test backend for the lb tests: an HTTP or TCP server on loopback that names itself.

usage: backend.py http|tcp PORT NAME
HTTP: GET /healthz -> 200 "ok"; GET /slow -> waits 0.5 s, then NAME; any other GET -> NAME.
TCP: on connect, sends NAME and a newline, then closes.
Prints "ready" once listening.
"""
import http.server
import socketserver
import sys
import time

mode, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
body = name.encode()


class Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(0.5)
        data = b"ok" if self.path == "/healthz" else body
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Tcp(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(body + b"\n")


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address):
        pass  # health checks connect and close at once; that is not an error


if mode == "http":
    srv = Server(("127.0.0.1", port), Http)
else:
    srv = Server(("127.0.0.1", port), Tcp)
print("ready", flush=True)
srv.serve_forever()
