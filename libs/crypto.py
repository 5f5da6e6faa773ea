"""Secrets at rest: AES-256-GCM under a key ring, the key id stored with every value.

- A key ring holds one or more 256-bit keys by id; the *primary* one encrypts, every one
  decrypts. Rotation without downtime: add the new key as primary everywhere (the old one stays
  for reading), let :meth:`KeyRing.needs_rotation` values be rewritten, then drop the old key.
- A sealed value is ``b"\\x01" + len(key id) + key id + 12-byte nonce + ciphertext and tag``.
  The caller's *context* (e.g. ``sessions/abc:agent_options``) is authenticated data: a value
  copied into another row does not decrypt there.
- Keys come from ``CORRAL_ENCRYPTION_KEYS``: ``id:base64key[,id:base64key...]``, the first is the
  primary. Production refuses to start without one; development makes one under the data
  directory and says so.

AES-GCM is the ``cryptography`` package's (OpenSSL); nothing here implements a cipher.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger("corral.crypto")

VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class KeyRingError(Exception):
    """The key ring is misconfigured, or a value cannot be opened with it."""


class KeyRing:
    def __init__(self, keys: Mapping[str, bytes], primary: str) -> None:
        if primary not in keys:
            raise KeyRingError(f"the primary key {primary!r} is not in the key ring")
        for key_id, key in keys.items():
            if not _KEY_ID.match(key_id):
                raise KeyRingError(f"key id {key_id!r}: 1-32 letters, digits, '_' or '-'")
            if len(key) != KEY_BYTES:
                raise KeyRingError(f"key {key_id!r} is {len(key)} bytes, not {KEY_BYTES}")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._keys = dict(keys)
        self.primary = primary

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """``id:base64key[,id:base64key...]``; the first key is the primary."""
        keys: dict[str, bytes] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key_id, sep, encoded = item.partition(":")
            if not sep:
                raise KeyRingError("each key is id:base64key")
            try:
                keys[key_id] = base64.b64decode(encoded, validate=True)
            except ValueError as exc:
                raise KeyRingError(f"key {key_id!r} is not base64") from exc
        if not keys:
            raise KeyRingError("the key ring is empty")
        return cls(keys, next(iter(keys)))

    @staticmethod
    def generate_key() -> str:
        """A new key in the form ``CORRAL_ENCRYPTION_KEYS`` takes (without its id)."""
        return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.primary].encrypt(nonce, plaintext, context.encode())
        key_id = self.primary.encode()
        return bytes([VERSION, len(key_id)]) + key_id + nonce + sealed

    def open(self, value: bytes, context: str) -> bytes:
        key_id, nonce, sealed = self._split(value)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise KeyRingError(f"the value was sealed with key {key_id!r}, not in the key ring")
        try:
            return cipher.decrypt(nonce, sealed, context.encode())
        except InvalidTag as exc:
            raise KeyRingError("the value does not open: wrong key, context or data") from exc

    def derive(self, label: str) -> bytes:
        """A 256-bit key for another purpose (``label``), derived from the primary key with
        HKDF-SHA256: the same on every replica with the same ring."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label.encode())
        return hkdf.derive(self._keys[self.primary])

    def key_id_of(self, value: bytes) -> str:
        return self._split(value)[0]

    def needs_rotation(self, value: bytes) -> bool:
        """True when ``value`` was sealed with another key than the primary one."""
        return self.key_id_of(value) != self.primary

    @staticmethod
    def _split(value: bytes) -> tuple[str, bytes, bytes]:
        if len(value) < 2 or value[0] != VERSION:
            raise KeyRingError("not a sealed value")
        length = value[1]
        start = 2 + length
        if len(value) < start + NONCE_BYTES + 16:
            raise KeyRingError("the sealed value is truncated")
        key_id = value[2:start].decode("ascii", errors="replace")
        return key_id, value[start : start + NONCE_BYTES], value[start + NONCE_BYTES :]


def load_key_ring(configured: str, *, production: bool, data_dir: Path) -> KeyRing:
    """The deployment's key ring: ``configured`` (``CORRAL_ENCRYPTION_KEYS``) if set; otherwise
    refuse in production, and in development use (or make) ``<data_dir>/encryption-keys``."""
    if configured:
        return KeyRing.parse(configured)
    if production:
        raise KeyRingError(
            "CORRAL_ENCRYPTION_KEYS is not set: production does not start without a key to"
            " encrypt secrets at rest (make one with `corral admin new-encryption-key`)"
        )
    path = data_dir / "encryption-keys"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".encryption-keys.{os.getpid()}")
        temporary.write_text(f"dev1:{KeyRing.generate_key()}\n")
        temporary.chmod(0o600)
        try:
            os.link(temporary, path)  # exactly one process's key wins; the others read it
            log.warning("development: made an encryption key in %s", path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    return KeyRing.parse(path.read_text().strip())
