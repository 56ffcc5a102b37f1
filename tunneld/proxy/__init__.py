"""Forwarding what arrives through the tunnel to local-only services (HTTP/1.1, WebSocket, TCP)."""
