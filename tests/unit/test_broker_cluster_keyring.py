"""The payload key ring's metadata in a broker cluster (sans-IO): proposed by the broker
whose state directory holds a rotation, committed once, the same on every broker."""

from __future__ import annotations

import pytest

from mesh.security.payload import KeyRing
from mesh.testing.sharedlog import Cluster


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def test_a_key_ring_with_a_new_key_is_proposed_until_committed_and_then_not_again(cluster: Cluster) -> None:
    """What `mesh keys rotate` made on one machine reaches every broker's shared state, keys left out."""
    b1, b2 = cluster.brokers
    ring = KeyRing.generate()
    assert b1.offer_keyring(ring.metadata(), 1.0) and b2.offer_keyring(ring.metadata(), 1.0)
    cluster.commit(1.0)
    assert cluster.states[0].keyring == cluster.states[1].keyring == ring.metadata()
    assert b1.take_proposals(5.0) == [] and not b1.offer_keyring(ring.metadata(), 5.0)  # confirmed, nothing new
    new = ring.rotate(10.0, grace=60.0, delay=5.0)
    assert b2.offer_keyring(ring.metadata(), 10.0)
    cluster.commit(10.0)
    assert b1.stats()["keyring"]["keys"][new] == {"active_from": 15.0, "retire_at": None}


def test_an_older_copy_is_not_proposed_and_a_ring_the_cluster_cannot_hold_is_refused(cluster: Cluster) -> None:
    b1, b2 = cluster.brokers
    ring = KeyRing.generate()
    old = ring.metadata()
    ring.rotate(1.0, grace=60.0)
    assert b1.offer_keyring(ring.metadata(), 1.0)
    cluster.commit(1.0)
    assert not b2.offer_keyring(old, 2.0) and b2.take_proposals(2.0) == []
    with pytest.raises(ValueError):
        b2.offer_keyring({**ring.metadata(), "generation": 5, "keys": {}}, 2.0)
