"""The pure parts: authorization policy, throttling windows, periods, key sealing, key formats."""

from __future__ import annotations

import base64
import calendar
import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from corral.libs.auth.caller import Caller
from corral.libs.crypto import KeyRing, KeyRingError
from corral.libs.errors import NotFound, PermissionDenied, ResourceExhausted
from corral.services.identity import tokens
from corral.services.identity.domain import Principal, Role, month_period
from corral.services.identity.throttle import ACCOUNT, SOURCE, LoginThrottle


def _principal(
    roles: set[str], org: str = "acme", subject: str = "organizations/acme/users/a"
) -> Principal:
    return Principal.from_caller(Caller(subject, f"organizations/{org}", frozenset(roles)))


def test_policy() -> None:
    admin, viewer = _principal({"admin"}), _principal({"viewer"})
    root = _principal({"admin", "superuser"}, org="default")
    assert admin.role is Role.ADMIN
    assert root.superuser
    admin.require_admin("acme")
    root.require_admin("acme")
    with pytest.raises(NotFound):
        admin.require_admin("globex")  # not PERMISSION_DENIED: globex does not exist for them
    with pytest.raises(PermissionDenied):
        viewer.require_admin("acme")
    viewer.require_self_or_admin("acme", "organizations/acme/users/a")
    with pytest.raises(PermissionDenied):
        viewer.require_self_or_admin("acme", "organizations/acme/users/b")
    with pytest.raises(PermissionDenied):
        admin.require_superuser()
    with pytest.raises(PermissionDenied):
        admin.require_service()
    _principal({"user", "service"}).require_service()


def test_throttle_budgets() -> None:
    throttle = LoginThrottle(max_per_account=2, max_per_source=3, window_seconds=60)
    throttle.check(ACCOUNT, 1, 1000.0, 1010.0)
    throttle.check(SOURCE, 2, 1000.0, 1010.0)
    with pytest.raises(ResourceExhausted) as caught:
        throttle.check(ACCOUNT, 2, 1000.0, 1010.0)
    assert caught.value.reason == "LOGIN_THROTTLED"
    assert caught.value.retry_after_seconds == 50  # when the oldest failure leaves the window
    assert caught.value.metadata == {"scope": "account"}
    with pytest.raises(ResourceExhausted):
        throttle.check(SOURCE, 3, 1000.0, 1010.0)


def test_month_period_rolls_over_the_year() -> None:
    key, start, end = month_period(calendar.timegm((2025, 12, 31, 23, 59, 59)))
    assert key == "2025-12"
    assert start == calendar.timegm((2025, 12, 1, 0, 0, 0))
    assert end == calendar.timegm((2026, 1, 1, 0, 0, 0))


def _ring(*ids: str) -> KeyRing:
    """A key ring of fresh keys; the first is the primary."""
    return KeyRing.parse(",".join(f"{i}:{KeyRing.generate_key()}" for i in ids))


def test_sealed_keys_need_the_right_key_and_kid() -> None:
    ring = _ring("k1")
    cipher = tokens.KeyCipher(ring)
    sealed = cipher.seal("kid1", b"private pem")
    assert ring.key_id_of(sealed) == "k1"
    assert b"private pem" not in sealed
    assert cipher.open("kid1", sealed) == b"private pem"
    assert not cipher.needs_resealing(sealed)
    with pytest.raises(KeyRingError):
        cipher.open("kid2", sealed)  # a sealed key cannot be swapped under another kid
    with pytest.raises(KeyRingError):
        tokens.KeyCipher(_ring("k1")).open("kid1", sealed)  # another key of the same id
    with pytest.raises(ValueError, match="32 bytes"):
        tokens.KeyCipher(ring, "c2hvcnQ")


def test_rotating_the_key_ring_keeps_old_values_readable() -> None:
    first, second = f"k1:{KeyRing.generate_key()}", f"k2:{KeyRing.generate_key()}"
    sealed = tokens.KeyCipher(KeyRing.parse(first)).seal("kid1", b"private pem")
    rotated = tokens.KeyCipher(KeyRing.parse(f"{second},{first}"))  # k2 primary, k1 kept
    assert rotated.open("kid1", sealed) == b"private pem"
    assert rotated.needs_resealing(sealed)  # sealed with k1, the primary is now k2
    resealed = rotated.seal("kid1", b"private pem")
    assert KeyRing.parse(second).key_id_of(resealed) == "k2"
    assert not rotated.needs_resealing(resealed)
    with pytest.raises(KeyRingError):  # k1 dropped before re-sealing: the value is lost
        tokens.KeyCipher(KeyRing.parse(second)).open("kid1", sealed)


def test_values_sealed_before_the_key_ring_still_open() -> None:
    legacy = base64.urlsafe_b64encode(os.urandom(32)).decode()
    nonce = os.urandom(12)
    raw = base64.urlsafe_b64decode(legacy)
    body = AESGCM(raw).encrypt(nonce, b"private pem", b"kid1")
    old_sealed = b"aesgcm:" + base64.b64encode(nonce + body)
    cipher = tokens.KeyCipher(_ring("k1"), legacy)
    assert cipher.open("kid1", old_sealed) == b"private pem"
    assert cipher.open("kid1", b"plain:private pem") == b"private pem"
    assert cipher.needs_resealing(old_sealed) and cipher.needs_resealing(b"plain:x")
    assert not cipher.needs_resealing(b"")  # wiped keys stay wiped
    with pytest.raises(InvalidTag):
        cipher.open("kid2", old_sealed)
    with pytest.raises(KeyRingError, match="CORRAL_IDENTITY_KEY_ENCRYPTION_KEY"):
        tokens.KeyCipher(_ring("k1")).open("kid1", old_sealed)


def test_key_formats() -> None:
    key = tokens.generate_signing_key()
    assert "d" not in key.public_jwk
    assert tokens.public_only({**key.public_jwk, "d": "secret"}) == key.public_jwk
    plaintext, lookup = tokens.new_api_key()
    assert tokens.api_key_lookup(plaintext) == lookup
    for bad in ("", "crl_short", plaintext.replace("crl_", "xyz_"), plaintext[:-1] + "!"):
        assert tokens.api_key_lookup(bad) is None
