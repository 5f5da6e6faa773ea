"""Secrets at rest: the key ring seals and opens, binds values to their context, rotates."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.libs.crypto import KeyRing, KeyRingError, load_key_ring


def _ring(*ids: str) -> KeyRing:
    return KeyRing.parse(",".join(f"{i}:{KeyRing.generate_key()}" for i in ids))


def test_a_sealed_value_opens_only_in_its_context_and_hides_the_plaintext() -> None:
    ring = _ring("k1")
    sealed = ring.seal(b"ghp_secret-token", "sessions/a:agent_options")
    assert b"ghp_secret" not in sealed
    assert ring.seal(b"ghp_secret-token", "sessions/a:agent_options") != sealed  # fresh nonce
    assert ring.open(sealed, "sessions/a:agent_options") == b"ghp_secret-token"
    with pytest.raises(KeyRingError, match="does not open"):
        ring.open(sealed, "sessions/b:agent_options")
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(KeyRingError):
        ring.open(bytes(tampered), "sessions/a:agent_options")
    with pytest.raises(KeyRingError, match="not a sealed value"):
        ring.open(b"plain", "sessions/a:agent_options")


def test_rotation_reads_old_values_and_writes_with_the_new_key() -> None:
    k1, k2 = KeyRing.generate_key(), KeyRing.generate_key()
    old = KeyRing.parse(f"k1:{k1}")
    sealed = old.seal(b"value", "c")
    rotated = KeyRing.parse(f"k2:{k2},k1:{k1}")  # the new key first: it is the primary
    assert rotated.primary == "k2"
    assert rotated.open(sealed, "c") == b"value"
    assert rotated.needs_rotation(sealed)
    fresh = rotated.seal(b"value", "c")
    assert rotated.key_id_of(fresh) == "k2" and not rotated.needs_rotation(fresh)
    with pytest.raises(KeyRingError, match="not in the key ring"):
        old.open(fresh, "c")


def test_production_refuses_to_start_without_keys_and_development_makes_one(
    tmp_path: Path,
) -> None:
    with pytest.raises(KeyRingError, match="CORRAL_ENCRYPTION_KEYS"):
        load_key_ring("", production=True, data_dir=tmp_path)
    first = load_key_ring("", production=False, data_dir=tmp_path)
    again = load_key_ring("", production=False, data_dir=tmp_path)
    assert again.open(first.seal(b"x", "c"), "c") == b"x"  # the same key on the next start
    assert (tmp_path / "encryption-keys").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "configured",
    ["", "nocolon", "k1:not-base64!", "k1:" + "QUFB", "bad id!:" + "A" * 44],
)
def test_a_misconfigured_key_ring_is_refused(configured: str) -> None:
    with pytest.raises(KeyRingError):
        KeyRing.parse(configured)
