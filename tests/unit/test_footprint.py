"""Memory footprint: what the daemon keeps resident must stay what it needs.

The X25519 public key comes from the libcrypto ``ssl`` already loaded, not from the
``cryptography`` package, whose own OpenSSL costs the daemon ~8 MiB of RSS (tunneld/x25519.py).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import missing_prerequisite
from tunneld import x25519

# RFC 7748 section 6.1: Alice's and Bob's X25519 key pairs.
RFC7748_PAIRS = [
    (
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
    ),
    (
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
    ),
]


@pytest.fixture(scope="module")
def libcrypto() -> x25519.PublicKeyFunction:
    binding = x25519.libcrypto_public_key()
    if binding is None:  # tunneld still works (cryptography), but the footprint is 8 MiB larger
        missing_prerequisite("a Python whose _ssl exposes libcrypto's symbols (Debian's does)")
    return binding


@pytest.mark.parametrize(("private_hex", "public_hex"), RFC7748_PAIRS)
def test_libcrypto_matches_rfc7748(
    libcrypto: x25519.PublicKeyFunction, private_hex: str, public_hex: str
) -> None:
    assert libcrypto(bytes.fromhex(private_hex)) == bytes.fromhex(public_hex)


@pytest.mark.parametrize(("private_hex", "public_hex"), RFC7748_PAIRS)
def test_cryptography_fallback_matches_rfc7748(private_hex: str, public_hex: str) -> None:
    assert x25519.cryptography_public_key(bytes.fromhex(private_hex)) == bytes.fromhex(public_hex)


@given(st.binary(min_size=32, max_size=32))
def test_libcrypto_agrees_with_cryptography(
    libcrypto: x25519.PublicKeyFunction, private_key: bytes
) -> None:
    # Unclamped keys too: both clamp the scalar as RFC 7748 says.
    assert libcrypto(private_key) == x25519.cryptography_public_key(private_key)


@pytest.mark.parametrize("length", [0, 31, 33])
def test_wrong_length_is_refused_before_openssl(length: int) -> None:
    with pytest.raises(ValueError, match=f"32 bytes, got {length}"):
        x25519.public_key(b"\x01" * length)


@pytest.mark.usefixtures("libcrypto")
def test_run_path_loads_neither_cryptography_nor_cli_only_modules() -> None:
    # A fresh interpreter: what `tunneld run` imports, plus the public key it logs at start.
    code = (
        "import sys, tunneld.cli, tunneld.daemon\n"
        "from tunneld import keys\n"
        "keys.public_key(keys.generate_private_key())\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(result.stdout.split())
    assert "tunneld.daemon" in loaded
    assert not {m for m in loaded if m == "cryptography" or m.startswith("cryptography.")}
    assert "tunneld.install" not in loaded


def _raises(private_key: bytes) -> bytes:
    raise ValueError("OpenSSL refused the X25519 private key")


@pytest.mark.parametrize(
    "libcrypto_binding",
    [
        pytest.param(lambda: None, id="unreachable"),
        pytest.param(lambda: _raises, id="refuses"),
        pytest.param(lambda: lambda private_key: bytes(32), id="wrong-answer"),
    ],
)
def test_falls_back_to_cryptography(
    monkeypatch: pytest.MonkeyPatch, libcrypto_binding: Callable[[], object]
) -> None:
    monkeypatch.setattr(x25519, "libcrypto_public_key", libcrypto_binding)
    x25519.implementation.cache_clear()
    try:
        assert x25519.implementation() is x25519.cryptography_public_key
        private_hex, public_hex = RFC7748_PAIRS[1]
        assert x25519.public_key(bytes.fromhex(private_hex)) == bytes.fromhex(public_hex)
    finally:
        x25519.implementation.cache_clear()  # the next caller picks the real one again


@pytest.mark.usefixtures("libcrypto")
def test_libcrypto_is_chosen_when_it_works() -> None:
    assert x25519.implementation() is not x25519.cryptography_public_key
