"""X25519 public keys, computed by the OpenSSL that Python's ``ssl`` module has loaded already.

Why not simply the ``cryptography`` package: tunneld needs this one function, and importing
``cryptography`` maps its own statically linked copy of OpenSSL (``_rust.abi3.so``) and
initialises it: 8 MiB of the idle daemon's resident memory (bench/run --quick: 52.1 → 44.1 MiB).
trio imports ``ssl`` in every process anyway, so the system's libcrypto is mapped already, and
three of its functions through ctypes do the same job at no memory cost.

``dlsym`` on the ``_ssl`` extension's handle searches the libraries it links, which is how we find
libcrypto — the very one ``ssl`` uses — without guessing a file name. The binding is trusted only
after it reproduces RFC 7748's test vector. Wherever that fails — a Python that links OpenSSL
statically and hides its symbols (python-build-standalone, which uv installs), an OpenSSL whose
policy refuses X25519 — ``cryptography`` does the work as before: the result is the same
everywhere, only the footprint differs.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

_KEY_LEN = 32
#: ``EVP_PKEY_X25519`` (= ``NID_X25519``) in <openssl/evp.h>, the same since OpenSSL 1.1.0.
_EVP_PKEY_X25519 = 1034
#: RFC 7748 section 6.1, Alice's key pair: the known answer the libcrypto binding must give.
_RFC7748_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
_RFC7748_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")

PublicKeyFunction = Callable[[bytes], bytes]


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key of the 32-byte *private_key* (RFC 7748)."""
    if len(private_key) != _KEY_LEN:
        raise ValueError(f"an X25519 private key is {_KEY_LEN} bytes, got {len(private_key)}")
    return implementation()(private_key)


@functools.cache
def implementation() -> PublicKeyFunction:
    """libcrypto's X25519 if it is reachable and gives RFC 7748's answer, else cryptography's."""
    libcrypto = libcrypto_public_key()
    if libcrypto is not None:
        try:
            if libcrypto(_RFC7748_PRIVATE) == _RFC7748_PUBLIC:
                return libcrypto
        except ValueError:
            pass
    return cryptography_public_key


def libcrypto_public_key() -> PublicKeyFunction | None:
    """X25519 through the libcrypto ``_ssl`` links to; None if its symbols cannot be reached."""
    try:
        import _ssl  # loaded already (trio imports ssl): costs nothing

        library = ctypes.CDLL(_ssl.__file__)
        new_private_key = library.EVP_PKEY_new_raw_private_key
        get_public_key = library.EVP_PKEY_get_raw_public_key
        free_key = library.EVP_PKEY_free
        clear_errors = library.ERR_clear_error
    except (ImportError, AttributeError, OSError):  # built in (no __file__), or symbols hidden
        return None
    # EVP_PKEY *EVP_PKEY_new_raw_private_key(int type, ENGINE *e, const unsigned char *key,
    #                                        size_t keylen);
    new_private_key.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t)
    new_private_key.restype = ctypes.c_void_p
    # int EVP_PKEY_get_raw_public_key(const EVP_PKEY *pkey, unsigned char *pub, size_t *len);
    get_public_key.argtypes = (
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_size_t),
    )
    get_public_key.restype = ctypes.c_int
    # void EVP_PKEY_free(EVP_PKEY *pkey);  (it wipes the copy of the private key it holds)
    free_key.argtypes = (ctypes.c_void_p,)
    free_key.restype = None
    # void ERR_clear_error(void);  (a failure must not leave errors for the ssl module to find)
    clear_errors.argtypes = ()
    clear_errors.restype = None

    def libcrypto_x25519(private_key: bytes) -> bytes:
        pkey = new_private_key(_EVP_PKEY_X25519, None, private_key, len(private_key))
        if not pkey:
            clear_errors()
            raise ValueError("OpenSSL refused the X25519 private key")
        try:
            public = ctypes.create_string_buffer(_KEY_LEN)
            size = ctypes.c_size_t(_KEY_LEN)
            if get_public_key(pkey, public, ctypes.byref(size)) != 1 or size.value != _KEY_LEN:
                clear_errors()
                raise ValueError("OpenSSL could not derive the X25519 public key")
            return public.raw
        finally:
            free_key(pkey)

    return libcrypto_x25519


def cryptography_public_key(private_key: bytes) -> bytes:
    """X25519 through the ``cryptography`` package, imported only when first needed."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private = X25519PrivateKey.from_private_bytes(private_key)
    return private.public_key().public_bytes_raw()
