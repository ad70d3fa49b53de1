"""Who runs what: a pure function from (num_layers, k, world_size, policy) to layer ranges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["Topology", "partition_layers", "make_topology", "balanced_plan", "PARTITIONS"]

PARTITIONS = ("uniform", "balanced")

HEAD_PLACEMENTS = ("owner", "last")


def partition_layers(num_layers: int, k: int, world_size: int,
                     policy: str | Sequence[int] = "uniform", tail: int = 0) -> list[range]:
    """Return one ``range`` of layer indices per rank; rank 0 (the owner) always gets ``range(0, k)``.

    ``policy`` is ``"uniform"`` (the remaining ``num_layers - k`` layers split as evenly as possible,
    earlier workers taking the extra layer) or an explicit list of per-worker layer counts. Every worker
    gets at least one layer, except when ``k == num_layers``: then the workers hold no layers and only
    relay (the last one applies the head with ``split.head=last``).
    With one rank the owner runs every layer whatever ``k`` is.
    Raises ``ValueError`` quoting the numbers when the split cannot be satisfied.
    """
    if num_layers < 1:
        raise ConfigError(f"the model must have at least one layer ({num_layers=})")
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1 ({world_size=})")
    if not 0 <= k <= num_layers:
        raise ConfigError(f"split.k={k} must be between 0 and the model's num_layers={num_layers}")
    workers = world_size - 1
    if not 0 <= tail <= num_layers - k:
        raise ConfigError(f"split.owner_tail={tail} must be between 0 and num_layers - split.k = {num_layers - k}")
    rest = num_layers - k - tail
    if isinstance(policy, str) and policy != "uniform":
        raise ConfigError(f"split.partition={policy!r} is not one of 'uniform' or a list of layer counts")
    if workers == 0:
        return [range(0, num_layers)]
    if isinstance(policy, str):
        if policy == "uniform":
            if rest == 0:
                counts = [0] * workers  # split.k = num_layers: the workers only relay (and may hold the head)
            elif rest < workers:
                raise ConfigError(
                    f"cannot give each of the {workers} worker ranks at least one layer: the model has "
                    f"num_layers={num_layers}, split.k={k} leaves {rest} for the workers; use at most "
                    f"{rest + 1} ranks or a smaller split.k")
            else:
                base, extra = divmod(rest, workers)
                counts = [base + (1 if i < extra else 0) for i in range(workers)]
        else:
            raise ConfigError(f"split.partition={policy!r} is not one of 'uniform' or a list of layer counts")
    else:
        if any(isinstance(c, bool) or int(c) != c for c in policy):
            raise ConfigError(f"split.partition={list(policy)}: layer counts must be integers")
        counts = [int(c) for c in policy]
        if len(counts) != workers:
            raise ConfigError(
                f"split.partition lists {len(counts)} layer counts {counts} but there are {workers} worker "
                f"ranks (world size {world_size})")
        if any(c < 0 for c in counts) or (rest and any(c < 1 for c in counts)):
            raise ConfigError(f"split.partition={counts}: every worker needs at least one layer")
        if sum(counts) != rest:
            left = f"num_layers={num_layers} - split.k={k}" + (f" - split.owner_tail={tail}" if tail else "")
            raise ConfigError(f"split.partition={counts} sums to {sum(counts)} but {left} = {rest} layers remain "
                             "for the workers")
    ranges = [range(0, k)]
    start = k
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def balanced_plan(num_layers: int, k: int, world_size: int, head: str, head_cost: float,
                  costs: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> tuple[list[int], int]:
    """Per-worker layer counts and an owner tail that make every stage cost about the same.

    Costs are in units of one layer's forward (the layers of a supported model are identical); ``costs``
    weighs a layer of the owner's front, of a worker and of the owner's tail (training: a trained layer's
    backward costs about twice its forward, a frozen owner layer only runs forward). The owner pays
    ``k`` front layers plus, with ``head="owner"``, the final norm + head (``head_cost``) and any tail layers
    it keeps; with ``head="last"`` the last worker pays the head. Returns ``(counts, tail)`` minimising
    the most expensive stage (ties: the smallest tail, so the workers carry the layers).
    """
    front, per, back = costs
    workers = world_size - 1
    if workers == 0:
        return [], 0
    best: tuple[float, int, list[int]] | None = None
    max_tail = num_layers - k - workers if head == "owner" else 0
    for tail in range(0, max(0, max_tail) + 1):
        rest = num_layers - k - tail
        if rest == 0 and tail == 0:
            counts = [0] * workers
        elif rest < workers:
            continue
        elif head == "last" and workers > 1:
            # the last worker carries the head: try every size for its block, spread the rest evenly
            options = []
            for n_last in range(1, rest - (workers - 1) + 1):
                others = _even(rest - n_last, workers - 1)
                options.append((max([*(per * c for c in others), per * n_last + head_cost]), [*others, n_last]))
            counts = min(options, key=lambda o: o[0])[1]
        else:
            counts = _even(rest, workers)
        owner = k * front + tail * back + (head_cost if head == "owner" else 0.0)
        last_extra = head_cost if head == "last" else 0.0
        cost = max(owner, *(per * c for c in counts[:-1]), per * counts[-1] + last_extra) if counts else owner
        if best is None or cost < best[0] - 1e-9:
            best = (cost, tail, counts)
    if best is None:
        raise ConfigError(f"cannot give each of the {workers} worker ranks at least one layer: the model has "
                         f"num_layers={num_layers} and split.k={k}")
    return best[2], best[1]


def _even(n: int, parts: int) -> list[int]:
    if parts == 0:
        return []
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class Topology:
    """Roles of every rank, validated once.

    ``ranges[r]`` is the contiguous block rank ``r`` runs on the way out: ``range(0, k)`` for the owner.
    ``tail`` holds the last layers when the owner also runs them on the way back, before the head
    (U-shaped split, ``split.head=owner`` only): the workers' blocks then end at ``tail.start``.
    """

    num_layers: int
    k: int
    world_size: int
    head: str
    ranges: tuple[range, ...]
    tail: range = range(0)

    def __post_init__(self) -> None:
        if self.head not in HEAD_PLACEMENTS:
            raise ConfigError(f"split.head={self.head!r} must be one of {HEAD_PLACEMENTS}")
        if len(self.ranges) != self.world_size:
            raise ValueError(f"{len(self.ranges)=} does not match {self.world_size=}")
        if len(self.tail) and (self.head != "owner" or self.tail.stop != self.num_layers):
            raise ConfigError(f"an owner tail ({self.tail}) needs split.head=owner and must end at the last layer")

    @property
    def last(self) -> int:
        return self.world_size - 1

    def layers_of(self, rank: int) -> range:
        return self.ranges[rank]

    def head_rank(self) -> int:
        return 0 if self.head == "owner" else self.last

    def layer_counts(self) -> list[int]:
        return [len(r) + (len(self.tail) if rank == 0 else 0) for rank, r in enumerate(self.ranges)]

    def describe(self, costs: list[float] | None = None) -> list[str]:
        """One line per rank: layers, extra duties and (given per-rank costs) the expected share of work."""
        lines = []
        total = sum(costs) if costs else 0.0
        for rank, r in enumerate(self.ranges):
            role = "owner" if rank == 0 else "worker"
            extra = []
            if rank == 0:
                extra.append("embed")
            if rank == self.head_rank():
                extra.append("norm+head")
            span = f"layers [{r.start}, {r.stop})" if len(r) else "no layers"
            if rank == 0 and len(self.tail):
                span += f" + [{self.tail.start}, {self.tail.stop})"
            line = f"rank {rank} ({role}): {span} ({self.layer_counts()[rank]}) {'+'.join(extra)}".rstrip()
            if costs and total:
                line += f", expected share of work {100 * costs[rank] / total:.0f}%"
            lines.append(line)
        return lines

    def stage_costs(self, head_cost: float) -> list[float]:
        """Expected work per rank in layer units (the cost model behind ``split.partition=balanced``)."""
        costs = [float(n) for n in self.layer_counts()]
        costs[self.head_rank()] += head_cost
        return costs


def make_topology(num_layers: int, k: int, world_size: int, head: str = "owner",
                  policy: str | Sequence[int] = "uniform", head_cost: float = 0.0,
                  owner_tail: int | None = None, costs: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Topology:
    """Validate the split options and build the :class:`Topology` (``head_cost`` in layer units is used
    by ``policy="balanced"``; ``owner_tail`` overrides the balanced tail, or adds one to other policies)."""
    if head not in HEAD_PLACEMENTS:
        raise ConfigError(f"split.head={head!r} must be one of {HEAD_PLACEMENTS}")
    if world_size == 1 and head == "last":
        head = "owner"
    if owner_tail and head != "owner":
        raise ConfigError(f"split.owner_tail={owner_tail} needs split.head=owner (the owner runs the tail before "
                         "its head)")
    if not 0 <= k <= num_layers:
        raise ConfigError(f"split.k={k} must be between 0 and the model's num_layers={num_layers}")
    tail = owner_tail or 0
    if policy == "balanced":
        counts, auto_tail = balanced_plan(num_layers, k, world_size, head, head_cost, costs)
        if owner_tail is None:
            tail = auto_tail
        else:
            counts = _even(num_layers - k - tail, world_size - 1)
        policy = counts if world_size > 1 else "uniform"
    if world_size == 1:
        tail = 0
    ranges = partition_layers(num_layers, k, world_size, policy, tail)
    return Topology(num_layers, k, world_size, head, tuple(ranges), range(num_layers - tail, num_layers))
