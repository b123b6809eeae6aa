"""The broker's subscription decisions without sockets: tokens, roles, limits, release."""

from __future__ import annotations

from mesh.broker.events import EventBus
from mesh.broker.subscribers import MAX_FILTER_BYTES, MAX_FILTERS, MAX_PENDING, Apply, Subscribers
from mesh.protocol import decode_payload
from mesh.protocol.topics import AUTH, CONTROL, REPORT
from mesh.security.gate import Gate, GateSettings, Peer
from mesh.security.policy import parse_policy
from mesh.security.tokens import TokenIssuer, TokenSettings, TokenVerifier

NOW = 1_700_000_000.0
SECRET = b"k" * 32
SETTINGS = TokenSettings("HS256", "mesh", "mesh")
POLICY = parse_policy({"roles": {"watcher": {"subscribe": ["mesh.service"]}, "admin": {"subscribe": ["*"]}}})
WATCH = Peer("watch", "127.0.0.1")
SYNC = b"0123456789abcdef" * 2


def token(subject: str = "watch", role: str = "watcher", ttl: float = 600) -> bytes:
    return TokenIssuer(SETTINGS, SECRET).issue(subject, [role], ttl, NOW).encode()


def secure() -> Subscribers:
    return Subscribers(EventBus(name="b1"), Gate(GateSettings(), TokenVerifier(SETTINGS, SECRET), POLICY))


def sub(flt: bytes) -> bytes:
    return b"\x01" + flt


def refused_in(marker: list[bytes]) -> list[tuple[str, int]]:
    return [(r["filter"], r["code"]) for r in decode_payload(marker[2]).get("refused", [])]


def test_filters_wait_for_the_token_and_only_allowed_ones_apply() -> None:
    """Nothing applies before the token; then each filter by the role's subscribe rule,
    and the marker names what was refused (the invariant: no filter outside the rule)."""
    s = secure()
    assert s.upstream(sub(b"mesh.service."), WATCH, NOW) == ([], [])
    assert s.upstream(sub(b"fz.private."), WATCH, NOW) == ([], [])
    assert s.upstream(sub(b""), WATCH, NOW) == ([], [])
    applied, markers = s.upstream(sub(AUTH + token()), WATCH, NOW)
    assert applied == [Apply(True, b"mesh.service.")] and markers == []
    applied, markers = s.upstream(sub(CONTROL + SYNC), WATCH, NOW)
    assert applied == [Apply(True, CONTROL + SYNC)]
    assert refused_in(markers[0]) == [("fz.private", 2002), ("", 2002)]
    assert s.gate is not None and s.gate.counters["refused_2002"] == 2


def test_a_token_of_another_key_or_a_bad_one_applies_nothing() -> None:
    """A token only counts on its own key's link; refused filters and the sync are told why."""
    s = secure()
    s.upstream(sub(b"mesh.service."), WATCH, NOW)
    s.upstream(sub(CONTROL + SYNC), WATCH, NOW)
    applied, markers = s.upstream(sub(AUTH + token("alice", "admin")), WATCH, NOW)
    assert applied == [Apply(True, CONTROL + SYNC)]  # only the marker's own filter
    assert refused_in(markers[0]) == [("(token)", 2000), ("mesh.service", 2000)]
    applied, _ = secure().upstream(sub(AUTH + b"\xff\xfe"), WATCH, NOW)
    assert applied == []


def test_an_expired_token_makes_filters_wait_again() -> None:
    """Roles are known until the token expires; after that a new filter waits for a new token."""
    s = secure()
    s.upstream(sub(AUTH + token(ttl=10)), WATCH, NOW)
    assert s.upstream(sub(b"mesh.service."), WATCH, NOW + 1)[0] == [Apply(True, b"mesh.service.")]
    assert s.upstream(sub(b"mesh.service.registered."), WATCH, NOW + 20) == ([], [])
    assert s.stats()["pending"] == 1


def test_limits_on_length_pending_and_filters_in_force() -> None:
    """Each bound refuses with its code; none lets a key hold more than it says."""
    s = secure()
    for i in range(MAX_PENDING + 5):
        s.upstream(sub(b"mesh.service.x%d." % i), WATCH, NOW)
    assert s.stats()["pending"] == MAX_PENDING
    s.upstream(sub(b"mesh." + b"x" * MAX_FILTER_BYTES), WATCH, NOW)
    s.upstream(sub(AUTH + token(role="admin")), WATCH, NOW)
    for i in range(MAX_FILTERS):
        s.upstream(sub(b"t%d." % i), WATCH, NOW)
    assert s.in_force == MAX_FILTERS
    assert s.counters["refused_3000"] >= 5 + 256 and s.counters["refused_1002"] == 1


def test_unsubscriptions_release_counts_also_for_closed_links() -> None:
    """An unsubscription from the key, or libzmq's own for a closed link (no User-Id),
    releases one count; memory is released when the peer leaves."""
    s = secure()
    s.upstream(sub(AUTH + token(role="admin")), WATCH, NOW)
    s.upstream(sub(b"a."), WATCH, NOW)
    s.upstream(sub(b"b."), WATCH, NOW)
    assert s.upstream(b"\x00a.", WATCH, NOW) == ([Apply(False, b"a.")], [])
    assert s.upstream(b"\x00b.", Peer(None, None), NOW) == ([Apply(False, b"b.")], [])
    assert s.upstream(b"\x00b.", Peer(None, None), NOW) == ([Apply(False, b"b.")], [])  # counts nothing
    assert s.in_force == 0 and s.holders == {} and s.keys["watch"].count == 0


def test_without_security_bounded_filters_apply_and_the_auth_filter_is_ignored() -> None:
    """Security off: no token, every sane filter applies; the length bound still holds."""
    s = Subscribers(EventBus())
    assert s.upstream(sub(b"x."), Peer(), NOW)[0] == [Apply(True, b"x.")]
    assert s.upstream(sub(AUTH + b"whatever"), Peer(), NOW) == ([], [])
    assert s.upstream(sub(b"y" * (MAX_FILTER_BYTES + 1)), Peer(), NOW) == ([], [])
    assert s.upstream(sub(CONTROL), Peer(), NOW) == ([], [])  # would match every sync marker
    applied, markers = s.upstream(sub(CONTROL + SYNC), Peer(), NOW)
    assert applied == [Apply(True, CONTROL + SYNC)] and refused_in(markers[0]) == [("y" * 197 + "...", 1002), ("(sync)", 1002)]


def test_nothing_applies_while_libzmq_cannot_tell_the_link() -> None:
    """After an upstream message that is not an (un)subscription, libzmq would apply a
    decision to the next message's link: the invariant is that no filter is applied
    then; the subscriber is told UNAVAILABLE (retryable), and reports travel as
    never-applied REPORT subscriptions."""
    s = secure()
    s.upstream(sub(AUTH + token(role="admin")), WATCH, NOW)
    assert s.upstream(b"\x02a report", WATCH, NOW) == ([], [])
    assert s.upstream(sub(b"a."), WATCH, NOW, aligned=False) == ([], [])
    assert s.upstream(b"\x00a.", WATCH, NOW, aligned=False) == ([], [])
    applied, markers = s.upstream(sub(CONTROL + SYNC), WATCH, NOW)
    assert refused_in(markers[0]) == [("a", 3006)]  # UNAVAILABLE
    report = b'\x84\xa3sub\xa1s\xa6prefix\xa0\xa8received\x01\xa6missed\x00'
    assert s.upstream(sub(REPORT + report), WATCH, NOW) == ([], [])
    assert s.bus.stats()["subscribers"]["s"]["received"] == 1


def test_a_revoked_token_authorises_no_new_filter() -> None:
    """The key's token is checked again before each new filter (a cached check)."""
    revoked: set[str] = set()

    class Revoking(TokenVerifier):
        def verify(self, token, now):  # type: ignore[override]
            identity = super().verify(token, now)
            if identity.jti in revoked:
                from mesh.protocol import TokenRevokedError
                raise TokenRevokedError("revoked", details={"reason": "revoked"})
            return identity

    verifier = Revoking(SETTINGS, SECRET)
    s = Subscribers(EventBus(), Gate(GateSettings(), verifier, POLICY))
    tok = token(role="admin")
    s.upstream(sub(AUTH + tok), WATCH, NOW)
    assert s.upstream(sub(b"a."), WATCH, NOW)[0] == [Apply(True, b"a.")]
    revoked.add(verifier.verify(tok.decode(), NOW).jti)
    assert s.upstream(sub(b"b."), WATCH, NOW) == ([], [])  # waits for a valid token
