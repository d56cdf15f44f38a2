"""Signed URLs: valid, tampered path, tampered expiry, expired, unknown kid, rotation."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mercato.kit.clock import ManualClock
from mercato.kit.signing import InvalidSignature, UrlSigner

OLD = b"old-key-0123456789abcdef0123456789abcdef"
NEW = b"new-key-fedcba9876543210fedcba9876543210"
PATH = "/media/products/0190a1b2-0000-7000-8000-000000000001.svg"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))


def test_a_signed_url_verifies_until_it_expires(clock: ManualClock) -> None:
    signer = UrlSigner(keys={"k1": OLD}, current_kid="k1", clock=clock)
    signed = signer.sign(PATH, ttl_s=600)
    assert signed.expires == int(clock.now().timestamp()) + 600
    assert signer.verify(PATH, expires=signed.expires, kid="k1", sig=signed.sig) == 600
    assert signed.url.startswith(PATH + "?expires=")
    clock.advance(599)
    assert signer.verify(PATH, expires=signed.expires, kid="k1", sig=signed.sig) == 1
    clock.advance(1)
    with pytest.raises(InvalidSignature) as err:
        signer.verify(PATH, expires=signed.expires, kid="k1", sig=signed.sig)
    assert err.value.reason == "expired"


def test_tampering_with_the_path_or_the_expiry_is_detected(clock: ManualClock) -> None:
    signer = UrlSigner(keys={"k1": OLD}, current_kid="k1", clock=clock)
    signed = signer.sign(PATH, ttl_s=600)
    other = PATH.replace("0001.svg", "0002.svg")
    for path, expires in ((other, signed.expires), (PATH, signed.expires + 3600)):
        with pytest.raises(InvalidSignature) as err:
            signer.verify(path, expires=expires, kid="k1", sig=signed.sig)
        assert err.value.reason == "bad_signature"
    with pytest.raises(InvalidSignature):
        signer.verify(PATH, expires=signed.expires, kid="k1", sig=signed.sig[:-1] + "A")
    with pytest.raises(InvalidSignature):
        signer.verify(PATH, expires=signed.expires, kid="k1", sig="é" * 10)


def test_an_unknown_key_id_is_refused(clock: ManualClock) -> None:
    signer = UrlSigner(keys={"k1": OLD}, current_kid="k1", clock=clock)
    signed = signer.sign(PATH, ttl_s=600)
    with pytest.raises(InvalidSignature) as err:
        signer.verify(PATH, expires=signed.expires, kid="k9", sig=signed.sig)
    assert err.value.reason == "unknown_kid"


def test_rotation_old_urls_verify_until_the_old_key_is_removed(clock: ManualClock) -> None:
    before = UrlSigner(keys={"k1": OLD}, current_kid="k1", clock=clock)
    old_url = before.sign(PATH, ttl_s=3600)
    # Step 1: deploy k2 as current, keep k1 for verification.
    during = UrlSigner(keys={"k2": NEW, "k1": OLD}, current_kid="k2", clock=clock)
    new_url = during.sign(PATH, ttl_s=3600)
    assert new_url.kid == "k2"
    assert new_url.sig != old_url.sig
    during.verify(PATH, expires=old_url.expires, kid="k1", sig=old_url.sig)
    during.verify(PATH, expires=new_url.expires, kid="k2", sig=new_url.sig)
    # Step 2: once every k1 URL has expired, k1 is removed; its URLs no longer verify.
    after = UrlSigner(keys={"k2": NEW}, current_kid="k2", clock=clock)
    after.verify(PATH, expires=new_url.expires, kid="k2", sig=new_url.sig)
    with pytest.raises(InvalidSignature):
        after.verify(PATH, expires=old_url.expires, kid="k1", sig=old_url.sig)


def test_a_signature_from_one_key_does_not_verify_under_another_kid(clock: ManualClock) -> None:
    signer = UrlSigner(keys={"k2": NEW, "k1": OLD}, current_kid="k2", clock=clock)
    signed = signer.sign(PATH, ttl_s=600)
    with pytest.raises(InvalidSignature):
        signer.verify(PATH, expires=signed.expires, kid="k1", sig=signed.sig)


def test_expiry_is_rounded_up_so_one_window_shares_one_url(clock: ManualClock) -> None:
    signer = UrlSigner(keys={"k1": OLD}, current_kid="k1", clock=clock)
    clock.advance(30)  # mid-window
    first = signer.sign(PATH, ttl_s=3600, granularity_s=300)
    clock.advance(120)
    second = signer.sign(PATH, ttl_s=3600, granularity_s=300)
    assert first == second
    assert first.expires % 300 == 0
    assert first.expires - clock.now().timestamp() >= 3600 - 300


def test_keys_are_validated() -> None:
    with pytest.raises(ValueError, match="current key"):
        UrlSigner(keys={"k1": OLD}, current_kid="k2")
    with pytest.raises(ValueError, match="shorter"):
        UrlSigner(keys={"k1": b"short"}, current_kid="k1")
    with pytest.raises(ValueError, match="key id"):
        UrlSigner(keys={"bad kid": OLD}, current_kid="bad kid")
