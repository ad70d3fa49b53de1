"""Who runs what: a pure function from (num_layers, k, world_size, policy) to layer ranges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Topology", "partition_layers", "make_topology"]

HEAD_PLACEMENTS = ("owner", "last")


def partition_layers(num_layers: int, k: int, world_size: int,
                     policy: str | Sequence[int] = "uniform") -> list[range]:
    """Return one ``range`` of layer indices per rank; rank 0 (the owner) always gets ``range(0, k)``.

    ``policy`` is ``"uniform"`` (the remaining ``num_layers - k`` layers split as evenly as possible,
    earlier workers taking the extra layer) or an explicit list of per-worker layer counts. Every worker
    gets at least one layer, except when ``k == num_layers``: then the workers hold no layers and only
    relay (the last one applies the head with ``split.head=last``).
    With one rank the owner runs every layer whatever ``k`` is.
    Raises ``ValueError`` quoting the numbers when the split cannot be satisfied.
    """
    if num_layers < 1:
        raise ValueError(f"the model must have at least one layer ({num_layers=})")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1 ({world_size=})")
    if not 0 <= k <= num_layers:
        raise ValueError(f"split.k={k} must be between 0 and the model's num_layers={num_layers}")
    workers = world_size - 1
    rest = num_layers - k
    if isinstance(policy, str) and policy != "uniform":
        raise ValueError(f"split.partition={policy!r} is not one of 'uniform' or a list of layer counts")
    if workers == 0:
        return [range(0, num_layers)]
    if isinstance(policy, str):
        if policy == "uniform":
            if rest == 0:
                counts = [0] * workers  # split.k = num_layers: the workers only relay (and may hold the head)
            elif rest < workers:
                raise ValueError(
                    f"cannot give each of the {workers} worker ranks at least one layer: the model has "
                    f"num_layers={num_layers}, split.k={k} leaves {rest} for the workers; use at most "
                    f"{rest + 1} ranks or a smaller split.k")
            else:
                base, extra = divmod(rest, workers)
                counts = [base + (1 if i < extra else 0) for i in range(workers)]
        else:
            raise ValueError(f"split.partition={policy!r} is not one of 'uniform' or a list of layer counts")
    else:
        if any(isinstance(c, bool) or int(c) != c for c in policy):
            raise ValueError(f"split.partition={list(policy)}: layer counts must be integers")
        counts = [int(c) for c in policy]
        if len(counts) != workers:
            raise ValueError(
                f"split.partition lists {len(counts)} layer counts {counts} but there are {workers} worker "
                f"ranks (world size {world_size})")
        if any(c < 0 for c in counts) or (rest and any(c < 1 for c in counts)):
            raise ValueError(f"split.partition={counts}: every worker needs at least one layer")
        if sum(counts) != rest:
            raise ValueError(
                f"split.partition={counts} sums to {sum(counts)} but num_layers={num_layers} - "
                f"split.k={k} = {rest} layers remain for the workers")
    ranges = [range(0, k)]
    start = k
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


@dataclass(frozen=True)
class Topology:
    """Roles of every rank, validated once."""

    num_layers: int
    k: int
    world_size: int
    head: str
    ranges: tuple[range, ...]

    def __post_init__(self) -> None:
        if self.head not in HEAD_PLACEMENTS:
            raise ValueError(f"split.head={self.head!r} must be one of {HEAD_PLACEMENTS}")
        if len(self.ranges) != self.world_size:
            raise ValueError(f"{len(self.ranges)=} does not match {self.world_size=}")

    @property
    def last(self) -> int:
        return self.world_size - 1

    def layers_of(self, rank: int) -> range:
        return self.ranges[rank]

    def head_rank(self) -> int:
        return 0 if self.head == "owner" else self.last

    def layer_counts(self) -> list[int]:
        return [len(r) for r in self.ranges]

    def describe(self) -> list[str]:
        lines = []
        for rank, r in enumerate(self.ranges):
            role = "owner" if rank == 0 else "worker"
            extra = []
            if rank == 0:
                extra.append("embed")
            if rank == self.head_rank():
                extra.append("norm+head")
            span = f"layers [{r.start}, {r.stop})" if len(r) else "no layers"
            lines.append(f"rank {rank} ({role}): {span} ({len(r)}) {'+'.join(extra)}".rstrip())
        return lines


def make_topology(num_layers: int, k: int, world_size: int, head: str = "owner",
                  policy: str | Sequence[int] = "uniform") -> Topology:
    if head not in HEAD_PLACEMENTS:
        raise ValueError(f"split.head={head!r} must be one of {HEAD_PLACEMENTS}")
    if world_size == 1 and head == "last":
        head = "owner"
    ranges = partition_layers(num_layers, k, world_size, policy)
    return Topology(num_layers, k, world_size, head, tuple(ranges))
