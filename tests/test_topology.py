"""Unit tests for nesa_hpc.engine.topology: layer partitioning and rank roles (no MPI)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nesa_hpc.engine.topology import HEAD_PLACEMENTS, Topology, make_topology, partition_layers


def _check_cover(ranges: list[range], num_layers: int) -> None:
    """Ranges are contiguous, in rank order, and cover [0, num_layers) exactly once."""
    start = 0
    for r in ranges:
        assert r.step == 1
        assert r.start == start
        assert r.stop >= r.start
        start = r.stop
    assert start == num_layers
    flat = [i for r in ranges for i in r]
    assert flat == list(range(num_layers))


# ---------------------------------------------------------------- uniform policy


@pytest.mark.parametrize(
    ("num_layers", "k", "world_size", "expected"),
    [
        (30, 2, 4, [range(0, 2), range(2, 12), range(12, 21), range(21, 30)]),  # 28 over 3: 10, 9, 9
        (6, 0, 3, [range(0, 0), range(0, 3), range(3, 6)]),
        (6, 1, 3, [range(0, 1), range(1, 4), range(4, 6)]),  # 5 over 2: 3, 2 (earlier worker takes the extra)
        (7, 2, 6, [range(0, 2), range(2, 3), range(3, 4), range(4, 5), range(5, 6), range(6, 7)]),
        (12, 3, 2, [range(0, 3), range(3, 12)]),
    ],
)
def test_uniform_split(num_layers, k, world_size, expected):
    ranges = partition_layers(num_layers, k, world_size)
    assert ranges == expected
    _check_cover(ranges, num_layers)


def test_uniform_is_default_policy():
    assert partition_layers(10, 2, 3) == partition_layers(10, 2, 3, "uniform")


def test_uniform_counts_differ_by_at_most_one_and_extra_goes_first():
    counts = [len(r) for r in partition_layers(30, 5, 8)[1:]]  # 25 layers over 7 workers
    assert counts == [4, 4, 4, 4, 3, 3, 3]
    assert sum(counts) == 25


def test_single_rank_runs_every_layer_whatever_k():
    for k in (0, 3, 8):
        assert partition_layers(8, k, 1) == [range(0, 8)]


def test_single_rank_still_validates_k():
    with pytest.raises(ValueError, match=r"split\.k=9 .*num_layers=8"):
        partition_layers(8, 9, 1)


# ---------------------------------------------------------------- explicit list


def test_explicit_list():
    ranges = partition_layers(30, 2, 4, [10, 9, 9])
    assert ranges == [range(0, 2), range(2, 12), range(12, 21), range(21, 30)]
    _check_cover(ranges, 30)


def test_explicit_list_uneven_and_tuple():
    ranges = partition_layers(10, 1, 3, (1, 8))
    assert ranges == [range(0, 1), range(1, 2), range(2, 10)]


# ---------------------------------------------------------------- k == num_layers: relay workers


def test_k_equals_num_layers_uniform_gives_relay_workers():
    ranges = partition_layers(6, 6, 4)
    assert ranges[0] == range(0, 6)
    assert [len(r) for r in ranges[1:]] == [0, 0, 0]
    _check_cover(ranges, 6)


def test_k_equals_num_layers_explicit_zero_counts():
    ranges = partition_layers(6, 6, 3, [0, 0])
    assert ranges[0] == range(0, 6)
    assert [len(r) for r in ranges[1:]] == [0, 0]


def test_k_equals_num_layers_with_head_last():
    topo = make_topology(6, 6, 3, head="last")
    assert topo.layer_counts() == [6, 0, 0]
    assert topo.head_rank() == 2
    lines = topo.describe()
    assert lines[0] == "rank 0 (owner): layers [0, 6) (6) embed"
    assert lines[1] == "rank 1 (worker): no layers (0)"
    assert lines[2] == "rank 2 (worker): no layers (0) norm+head"


# ---------------------------------------------------------------- errors


def test_k_negative():
    with pytest.raises(ValueError, match=r"split\.k=-1 must be between 0 and the model's num_layers=6"):
        partition_layers(6, -1, 3)


def test_k_above_num_layers():
    with pytest.raises(ValueError, match=r"split\.k=7 must be between 0 and the model's num_layers=6"):
        partition_layers(6, 7, 3)


def test_too_many_ranks():
    # 6 layers, k=2 leaves 4 for 5 workers
    with pytest.raises(ValueError, match=r"5 worker ranks.*num_layers=6, split\.k=2 leaves 4.*at most 5 ranks"):
        partition_layers(6, 2, 6)


def test_zero_layers_and_zero_world_size():
    with pytest.raises(ValueError, match=r"num_layers=0"):
        partition_layers(0, 0, 2)
    with pytest.raises(ValueError, match=r"world_size=0"):
        partition_layers(6, 2, 0)


def test_list_length_mismatch():
    msg = r"lists 2 layer counts \[5, 5\] but there are 3 worker ranks \(world size 4\)"
    with pytest.raises(ValueError, match=msg):
        partition_layers(12, 2, 4, [5, 5])


def test_list_sum_mismatch():
    with pytest.raises(ValueError, match=r"\[5, 4\] sums to 9 but num_layers=12 - split\.k=2 = 10 layers remain"):
        partition_layers(12, 2, 3, [5, 4])


def test_list_negative_count():
    with pytest.raises(ValueError, match=r"split\.partition=\[11, -1\]: every worker needs at least one layer"):
        partition_layers(12, 2, 3, [11, -1])


def test_list_negative_count_even_when_k_is_num_layers():
    with pytest.raises(ValueError, match=r"split\.partition=\[1, -1\]"):
        partition_layers(6, 6, 3, [1, -1])


def test_list_zero_count_when_layers_remain():
    with pytest.raises(ValueError, match=r"split\.partition=\[10, 0\]: every worker needs at least one layer"):
        partition_layers(12, 2, 3, [10, 0])


def test_unknown_policy_string():
    with pytest.raises(ValueError, match=r"split\.partition='even' is not one of"):
        partition_layers(12, 2, 3, "even")


@pytest.mark.parametrize("head", ["middle", "", "Owner"])
def test_bad_head(head):
    with pytest.raises(ValueError, match=rf"split\.head={head!r} must be one of \('owner', 'last'\)"):
        make_topology(12, 2, 3, head=head)


def test_topology_direct_construction_validates():
    with pytest.raises(ValueError, match=r"split\.head='middle'"):
        Topology(6, 2, 2, "middle", (range(0, 2), range(2, 6)))
    with pytest.raises(ValueError, match=r"len\(self\.ranges\)=2 does not match self\.world_size=3"):
        Topology(6, 2, 3, "owner", (range(0, 2), range(2, 6)))


# ---------------------------------------------------------------- Topology


def test_make_topology_roles():
    topo = make_topology(12, 2, 4, head="owner")
    assert isinstance(topo, Topology)
    assert topo.ranges == (range(0, 2), range(2, 6), range(6, 9), range(9, 12))
    assert topo.last == 3
    assert topo.head_rank() == 0
    assert topo.layers_of(2) == range(6, 9)
    assert topo.layer_counts() == [2, 4, 3, 3]
    assert topo.describe() == [
        "rank 0 (owner): layers [0, 2) (2) embed+norm+head",
        "rank 1 (worker): layers [2, 6) (4)",
        "rank 2 (worker): layers [6, 9) (3)",
        "rank 3 (worker): layers [9, 12) (3)",
    ]


def test_make_topology_head_last():
    topo = make_topology(12, 2, 4, head="last", policy=[2, 4, 4])
    assert topo.head_rank() == 3
    assert topo.describe()[-1] == "rank 3 (worker): layers [8, 12) (4) norm+head"
    assert topo.describe()[0] == "rank 0 (owner): layers [0, 2) (2) embed"


def test_make_topology_single_rank_head_last_falls_back_to_owner():
    topo = make_topology(6, 2, 1, head="last")
    assert topo.head == "owner"
    assert topo.head_rank() == 0
    assert topo.ranges == (range(0, 6),)


def test_k_zero_owner_only_embeds():
    topo = make_topology(6, 0, 3)
    assert topo.describe()[0] == "rank 0 (owner): no layers (0) embed+norm+head"
    assert topo.layer_counts() == [0, 3, 3]


def test_topology_is_frozen():
    topo = make_topology(6, 2, 3)
    with pytest.raises(AttributeError):
        topo.k = 3  # type: ignore[misc]


# ---------------------------------------------------------------- properties


@st.composite
def valid_split(draw):
    num_layers = draw(st.integers(1, 64))
    k = draw(st.integers(0, num_layers))
    rest = num_layers - k
    max_world = 40 if rest == 0 else rest + 1
    world_size = draw(st.integers(1, max_world))
    return num_layers, k, world_size


@settings(max_examples=300, deadline=None)
@given(valid_split())
def test_property_uniform_valid(args):
    num_layers, k, world_size = args
    ranges = partition_layers(num_layers, k, world_size)
    assert len(ranges) == world_size
    _check_cover(ranges, num_layers)
    if world_size == 1:
        assert ranges == [range(0, num_layers)]
        return
    assert ranges[0] == range(0, k)
    counts = [len(r) for r in ranges[1:]]
    if k == num_layers:
        assert all(c == 0 for c in counts)
    else:
        assert all(c >= 1 for c in counts)
        assert max(counts) - min(counts) <= 1
        assert counts == sorted(counts, reverse=True)
    for head in HEAD_PLACEMENTS:
        topo = make_topology(num_layers, k, world_size, head=head)
        assert list(topo.ranges) == ranges


@st.composite
def valid_explicit(draw):
    num_layers = draw(st.integers(1, 64))
    k = draw(st.integers(0, num_layers))
    rest = num_layers - k
    if rest == 0:
        workers = draw(st.integers(1, 10))
        return num_layers, k, [0] * workers
    workers = draw(st.integers(1, min(rest, 10)))
    cuts = sorted(draw(st.lists(st.integers(1, rest - 1), min_size=workers - 1, max_size=workers - 1,
                                unique=True))) if workers > 1 else []
    bounds = [0, *cuts, rest]
    return num_layers, k, [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@settings(max_examples=300, deadline=None)
@given(valid_explicit())
def test_property_explicit_valid(args):
    num_layers, k, counts = args
    ranges = partition_layers(num_layers, k, len(counts) + 1, counts)
    _check_cover(ranges, num_layers)
    assert ranges[0] == range(0, k)
    assert [len(r) for r in ranges[1:]] == counts


def _is_valid(num_layers, k, world_size, policy) -> bool:
    if num_layers < 1 or world_size < 1 or not 0 <= k <= num_layers:
        return False
    if world_size == 1:  # one rank runs everything; a list partition is ignored, a bad name is not
        return policy == "uniform" or not isinstance(policy, str)
    workers, rest = world_size - 1, num_layers - k
    if policy == "uniform":
        return rest == 0 or rest >= workers
    if isinstance(policy, str):
        return False
    if len(policy) != workers or any(c < 0 for c in policy) or sum(policy) != rest:
        return False
    return rest == 0 or all(c >= 1 for c in policy)


policies = st.one_of(st.just("uniform"), st.sampled_from(["", "even", "UNIFORM"]),
                     st.lists(st.integers(-3, 20), max_size=8))


@settings(max_examples=500, deadline=None)
@given(num_layers=st.integers(-2, 40), k=st.integers(-3, 45), world_size=st.integers(-1, 10), policy=policies)
def test_property_valid_or_value_error(num_layers, k, world_size, policy):
    valid = _is_valid(num_layers, k, world_size, policy)
    if valid:
        ranges = partition_layers(num_layers, k, world_size, policy)
        _check_cover(ranges, num_layers)
        assert len(ranges) == world_size
    else:
        with pytest.raises(ValueError):
            partition_layers(num_layers, k, world_size, policy)


@settings(max_examples=200, deadline=None)
@given(num_layers=st.integers(1, 20), k=st.integers(0, 20), world_size=st.integers(1, 8),
       head=st.one_of(st.sampled_from(HEAD_PLACEMENTS), st.text(max_size=6)))
def test_property_make_topology_only_value_error(num_layers, k, world_size, head):
    try:
        topo = make_topology(num_layers, k, world_size, head=head)
    except ValueError:
        assert head not in HEAD_PLACEMENTS or not _is_valid(num_layers, k, world_size, "uniform")
    else:
        assert head in HEAD_PLACEMENTS and _is_valid(num_layers, k, world_size, "uniform")
        assert topo.head_rank() in (0, world_size - 1)
        _check_cover(list(topo.ranges), num_layers)


def test_balanced_training_costs_move_layers_to_the_frozen_owner():
    """Training weighs a worker's trained layer as forward + backward (3) and a frozen owner's as forward only:
    the owner takes a longer tail than at inference, and no other tail gives a cheaper most-loaded stage."""
    from nesa_hpc.engine.topology import balanced_plan

    head = 8.0
    _, tail_infer = balanced_plan(30, 2, 2, "owner", head)
    counts, tail = balanced_plan(30, 2, 2, "owner", 2 * head, (1.0, 3.0, 2.0))
    assert tail > tail_infer
    assert counts == [30 - 2 - tail]

    def worst(t: int) -> float:
        return max(2 * 1.0 + t * 2.0 + 2 * head, 3.0 * (28 - t))

    assert worst(tail) == min(worst(t) for t in range(0, 28))
