"""Rendezvous hashing properties."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from synapse_router.routing.hrw import Node, Rendezvous

names = st.lists(
    st.from_regex(r"http://10\.0\.0\.[0-9]{1,3}:80[0-9]{2}", fullmatch=True), min_size=2, max_size=16, unique=True
)
keys = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=200)


@given(names, keys)
def test_deterministic_across_instances(workers: list[str], ks: list[str]) -> None:
    a = Rendezvous([Node(w) for w in workers])
    b = Rendezvous([Node(w) for w in reversed(workers)])  # order of configuration is irrelevant
    for k in ks:
        assert a.pick(k) == b.pick(k)


@given(names, keys, st.data())
def test_removal_moves_only_the_removed_workers_keys(workers: list[str], ks: list[str], data: st.DataObject) -> None:
    removed = data.draw(st.sampled_from(workers))
    before = Rendezvous([Node(w) for w in workers])
    after = Rendezvous([Node(w) for w in workers if w != removed])
    for k in ks:
        old = before.pick(k)
        assert old is not None
        new = after.pick(k)
        if old.name != removed:
            assert new == old
        else:  # the runner-up takes over: what failover by rendezvous order means
            assert new == before.rank(k)[1]


@given(names, keys)
def test_addition_moves_keys_only_to_the_new_worker(workers: list[str], ks: list[str]) -> None:
    before = Rendezvous([Node(w) for w in workers[:-1]])
    after = Rendezvous([Node(w) for w in workers])
    for k in ks:
        new = after.pick(k)
        assert new is not None
        assert new.name == workers[-1] or new == before.pick(k)


@given(names, keys, st.data())
def test_pick_with_eligibility_is_first_eligible_in_rank(
    workers: list[str], ks: list[str], data: st.DataObject
) -> None:
    ring = Rendezvous([Node(w, weight=data.draw(st.floats(0.1, 10))) for w in workers])
    down = set(data.draw(st.lists(st.sampled_from(workers), max_size=len(workers) - 1)))
    for k in ks:
        expected = next(n for n in ring.rank(k) if n.name not in down)
        assert ring.pick(k, down) == expected


def test_nothing_eligible() -> None:
    ring = Rendezvous([Node("a"), Node("b")])
    assert ring.pick("k", {"a", "b"}) is None


@settings(max_examples=10, deadline=None)
@given(st.integers(min_value=2, max_value=16))
def test_balance_uniform(n: int) -> None:
    ring = Rendezvous([Node(f"http://w{i}:8008") for i in range(n)])
    counts = Counter(ring.pick(f"@user{i}:example.org").name for i in range(20_000))  # type: ignore[union-attr]
    mean = 20_000 / n
    assert len(counts) == n
    assert max(counts.values()) < mean * 1.15
    assert min(counts.values()) > mean * 0.85


def test_weights_honoured() -> None:
    ring = Rendezvous([Node("a", 1), Node("b", 2), Node("c", 5)])
    counts = Counter(ring.pick(f"@user{i}:example.org").name for i in range(40_000))  # type: ignore[union-attr]
    total = sum(counts.values())
    for name, weight in (("a", 1), ("b", 2), ("c", 5)):
        assert abs(counts[name] / total - weight / 8) < 0.02


def test_invalid_weight_rejected() -> None:
    for bad in (0, -1, float("inf"), float("nan")):
        try:
            Node("a", bad)
        except ValueError:
            continue
        raise AssertionError(f"weight {bad} accepted")


@settings(max_examples=50, deadline=None)
@given(names, keys, st.data())
def test_a_remembered_order_picks_what_scoring_every_node_picks(
    workers: list[str], ks: list[str], data: st.DataObject
) -> None:
    weights = [(1.0, 2.0, 0.5)[i % 3] for i in range(len(workers))]
    for nodes in ([Node(w) for w in workers], [Node(w, x) for w, x in zip(workers, weights, strict=True)]):
        ring = Rendezvous(nodes)
        excluded = data.draw(st.sets(st.sampled_from(workers)))
        for k in ks + ks:  # the second time from the remembered order
            assert ring.pick(k) == ring._pick(k, ())
            assert ring.pick(k, excluded) == ring._pick(k, excluded)
            assert ring.pick(k) == ring.rank(k)[0]


def test_remembered_orders_are_bounded_oldest_forgotten_first() -> None:
    from synapse_router.routing import hrw

    ring = Rendezvous([Node(f"http://10.0.0.{i}:8008") for i in range(16)])
    for i in range(hrw.RANKINGS_KEPT + 100):
        ring.pick(f"@user{i}:example.org")
    remembered = ring._orders
    assert len(remembered) == hrw.RANKINGS_KEPT
    assert "@user0:example.org" not in remembered and f"@user{hrw.RANKINGS_KEPT + 99}:example.org" in remembered
    assert len(remembered["@user100:example.org"]) == 16  # one byte per node
