"""PII detection: what counts as an email, phone or card, and what is left alone."""

import pytest

from ratchet.pii import luhn_ok, scan


@pytest.mark.parametrize(
    ("text", "kinds", "redacted"),
    [
        ("write to jane.doe+x@mail.example.co.uk today", ("email",), "write to <EMAIL> today"),
        ("call 555-1234", ("phone",), "call <PHONE>"),
        ("ring (555) 123-4567 now", ("phone",), "ring <PHONE> now"),
        ("my number is +44 20 7946 0958", ("phone",), "my number is <PHONE>"),
        ("dial 5551234567", ("phone",), "dial <PHONE>"),
        ("card 4111 1111 1111 1111 please", ("card",), "card <CARD> please"),
        ("card 4111-1111-1111-1111", ("card",), "card <CARD>"),
        ("a@b.io and 4111111111111111", ("email", "card"), "<EMAIL> and <CARD>"),
        # numbers intent texts are full of, left alone
        ("send $1200 to mom on 2026-11-20 at 5:45 am", (), None),
        ("order 12 pizzas for 8 people", (), None),
        ("pay 100 200 300", (), None),
        ("card 4111 1111 1111 1112 fails the luhn check", (), None),
    ],
)
def test_scan_finds_and_redacts(text, kinds, redacted):
    found = scan(text)
    assert found.kinds == kinds
    assert found.redacted == (redacted if redacted is not None else text)


@pytest.mark.parametrize(("digits", "ok"), [("4111111111111111", True), ("79927398713", True),
                                            ("79927398710", False), ("0", True)])
def test_luhn(digits, ok):
    assert luhn_ok(digits) is ok
