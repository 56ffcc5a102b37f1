"""A local-only origin for integration tests: ``python origin.py NAME (tcp PORT | unix PATH)``.

Stdlib only, because it runs inside the connector's namespace through ``ip netns exec``. It
prints ``ready`` once listening. Endpoints:

    GET  /hello                      "hello from NAME"
    GET  /headers                    the request headers as JSON
    GET  /connections                how many TCP connections this origin has accepted
    GET  /requests                   how many requests it has handled
    GET  /download?size=N            N bytes of a deterministic pattern (Content-Length)
    POST /upload                     sha256 of the body (Content-Length or chunked), streamed
    GET  /slow-chunks?n=N&delay=S    a chunked response, one chunk every S seconds
    GET  /never                      never answers (for 504 tests)
    GET  /close-mid-response         promises 1000 bytes, sends 10 and hangs up
    GET  /garbage                    answers something that is not HTTP
    GET  /ws                         WebSocket echo (text/binary frames, close)
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse

PATTERN = bytes(range(256)) * 256  # 64 KiB
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B85"


class Stats:
    lock = threading.Lock()
    connections = 0
    requests = 0


def pattern_chunks(size: int):
    while size > 0:
        chunk = PATTERN[: min(size, len(PATTERN))]
        size -= len(chunk)
        yield chunk


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_name_label = "origin"
    # The head and the body go out in separate writes; with Nagle on, the body waits for the
    # peer's delayed ACK (40 ms) — a property of this test origin, not of what it talks to.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with Stats.lock:
            Stats.connections += 1

    def log_message(self, *args: object) -> None:
        pass

    def reply(self, body: bytes, status: int = 200, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with Stats.lock:
            Stats.requests += 1
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/hello":
            self.reply(f"hello from {self.server_name_label}".encode())
        elif url.path == "/headers":
            self.reply(
                json.dumps(dict(self.headers.items())).encode(), content_type="application/json"
            )
        elif url.path == "/connections":
            self.reply(str(Stats.connections).encode())
        elif url.path == "/requests":
            self.reply(str(Stats.requests).encode())
        elif url.path == "/download":
            size = int(query.get("size", "0"))
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for chunk in pattern_chunks(size):
                self.wfile.write(chunk)
        elif url.path == "/slow-chunks":
            count, delay = int(query.get("n", "3")), float(query.get("delay", "0.5"))
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for index in range(count):
                data = f"chunk {index} at {time.monotonic():.3f}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(delay)
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/never":
            time.sleep(3600)
        elif url.path == "/close-mid-response":  # promises 1000 bytes, sends 10, hangs up
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        elif url.path == "/garbage":
            self.wfile.write(b"HTTP/1.1 banana\r\n\x00\x01 nonsense\r\n\r\n")
            self.wfile.flush()
            self.close_connection = True
        elif url.path == "/ws":
            self.websocket_echo()
        else:
            self.reply(b"not found", 404)

    def do_POST(self) -> None:
        with Stats.lock:
            Stats.requests += 1
        digest = hashlib.sha256()
        size = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                length = int(self.rfile.readline().split(b";")[0], 16)
                if length == 0:
                    self.rfile.readline()
                    break
                remaining = length
                while remaining:
                    data = self.rfile.read(min(remaining, 65536))
                    digest.update(data)
                    remaining -= len(data)
                    size += len(data)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining:
                data = self.rfile.read(min(remaining, 65536))
                if not data:
                    break
                digest.update(data)
                remaining -= len(data)
                size += len(data)
        self.reply(f"{size} {digest.hexdigest()}".encode())

    def websocket_echo(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()  # noqa: S324
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self.rfile.read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self.rfile.read(8))
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            self.wfile.write(ws_frame(opcode, payload))
            self.wfile.flush()
            if opcode == 0x8:  # close: echoed, then done
                self.close_connection = True
                return


def ws_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final WebSocket frame; masked when ``mask`` is given (client → server)."""
    head = bytes([0x80 | opcode])
    mask_bit = 0x80 if mask else 0
    if len(payload) < 126:
        head += bytes([mask_bit | len(payload)])
    elif len(payload) < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", len(payload))
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


class TCPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main() -> None:
    name, kind, where = sys.argv[1], sys.argv[2], sys.argv[3]
    Handler.server_name_label = name
    server: socketserver.BaseServer
    if kind == "tcp":
        server = TCPServer(("127.0.0.1", int(where)), Handler)
    else:
        if os.path.exists(where):
            os.unlink(where)
        server = UnixServer(where, Handler)
        # BaseHTTPRequestHandler wants client_address[0] for logs; unix peers have none, and
        # TCP_NODELAY does not exist for them.
        Handler.address_string = lambda self: "unix"  # type: ignore[method-assign]
        Handler.disable_nagle_algorithm = False
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()
