"""WireGuard devices: the only home of pyroute2 and of backend processes.

``device.open_device`` is the entry point; the rest of tunneld sees a :class:`Device` and the
plain data in :mod:`tunneld.wireguard.model`, never a backend.
"""
