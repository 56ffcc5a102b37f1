"""tunneld — a WireGuard secure-tunnel connector."""

__version__ = "0.1.0"
