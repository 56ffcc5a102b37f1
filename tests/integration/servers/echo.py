"""A line-echo TCP server for integration tests: ``python echo.py PORT`` on 127.0.0.1.

Echoes each line back; after the client half-closes, it sends "bye\\n" and closes, so tests can
see that half-close crosses the relay in both directions.
"""

from __future__ import annotations

import socketserver
import sys


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)
        self.wfile.write(b"bye\n")


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    server = Server(("127.0.0.1", int(sys.argv[1])), Echo)
    print("ready", flush=True)
    server.serve_forever()
