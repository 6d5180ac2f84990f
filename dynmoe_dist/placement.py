"""PlacementTable: which rank owns each expert, and in which local slot.

The one contract between the data plane (dispatch reads it every forward) and the control plane (adapt/ replaces it
at a commit). Versioned and immutable: a new placement is a new table with version + 1. Any number of experts per
rank, so the expert count need not be divisible by the expert-parallel size (7 experts on 3 ranks is fine).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import torch

from .errors import ConfigError, check


@dataclass(frozen=True)
class PlacementTable:
    """Positions are the router's row order; ``expert_ids[p]`` lives on rank ``owners[p]`` in slot ``slots[p]``."""

    expert_ids: tuple[int, ...]
    owners: tuple[int, ...]
    slots: tuple[int, ...]
    ep_size: int
    version: int = 0

    def __post_init__(self) -> None:
        n = len(self.expert_ids)
        check(self.ep_size >= 1, "ep_size", self.ep_size, "an integer >= 1")
        if not (len(self.owners) == len(self.slots) == n):
            raise ConfigError("placement", (n, len(self.owners), len(self.slots)), "one owner and slot per expert")
        if len(set(self.expert_ids)) != n:
            raise ConfigError("placement.expert_ids", self.expert_ids, "unique expert ids")
        for rank in range(self.ep_size):
            slots = sorted(s for o, s in zip(self.owners, self.slots) if o == rank)
            if slots != list(range(len(slots))):
                raise ConfigError(f"placement slots of rank {rank}", slots, "0..n-1, each used once")
        bad = [o for o in self.owners if not 0 <= o < self.ep_size]
        if bad:
            raise ConfigError("placement owner", bad[0], f"a rank in 0..{self.ep_size - 1}")

    @classmethod
    def contiguous(cls, expert_ids: list[int] | tuple[int, ...], ep_size: int, version: int = 0) -> PlacementTable:
        """Blocks of consecutive experts per rank, sizes differing by at most one (7 on 3 ranks: 3, 2, 2)."""
        n = len(expert_ids)
        sizes = [n // ep_size + (1 if r < n % ep_size else 0) for r in range(ep_size)]
        owners, slots = [], []
        for rank, size in enumerate(sizes):
            owners += [rank] * size
            slots += list(range(size))
        return cls(tuple(int(i) for i in expert_ids), tuple(owners), tuple(slots), ep_size, version)

    @classmethod
    def from_owners(
        cls, expert_ids: list[int] | tuple[int, ...], owners: list[int], ep_size: int, version: int = 0
    ) -> PlacementTable:
        """Slots assigned in position order on each owner."""
        seen = [0] * ep_size
        slots = []
        for o in owners:
            check(0 <= o < ep_size, "placement owner", o, f"a rank in 0..{ep_size - 1}")
            slots.append(seen[o])
            seen[o] += 1
        return cls(tuple(int(i) for i in expert_ids), tuple(int(o) for o in owners), tuple(slots), ep_size, version)

    @property
    def num_experts(self) -> int:
        return len(self.expert_ids)

    def experts_on(self, rank: int) -> list[int]:
        """Expert ids on ``rank`` in slot order."""
        pairs = sorted((s, i) for i, o, s in zip(self.expert_ids, self.owners, self.slots) if o == rank)
        return [i for _, i in pairs]

    def positions_on(self, rank: int) -> list[int]:
        """Router positions of the experts on ``rank`` in slot order."""
        pairs = sorted((s, p) for p, (o, s) in enumerate(zip(self.owners, self.slots)) if o == rank)
        return [p for _, p in pairs]

    def counts_per_rank(self) -> list[int]:
        return list(self.rank_sizes)

    @cached_property
    def rank_sizes(self) -> tuple[int, ...]:
        """Experts per rank (read on every forward, so computed once per table)."""
        sizes = [0] * self.ep_size
        for o in self.owners:
            sizes[o] += 1
        return tuple(sizes)

    @cached_property
    def rank_offsets(self) -> tuple[int, ...]:
        """Where each rank's block starts in (rank, slot) order; one more entry for the end."""
        offsets = [0]
        for c in self.rank_sizes:
            offsets.append(offsets[-1] + c)
        return tuple(offsets)

    def owner_of(self, expert_id: int) -> int:
        return self.owners[self.expert_ids.index(expert_id)]

    @cached_property
    def dispatch_index(self) -> torch.Tensor:
        """[E] int64: position -> index in (owner rank, slot) order, the order rows travel in."""
        offsets = self.rank_offsets
        return torch.tensor([offsets[o] + s for o, s in zip(self.owners, self.slots)], dtype=torch.int64)

    def digest(self) -> str:
        """A short hash of the whole table, for proving that every rank holds the same one."""
        text = repr((self.version, self.ep_size, self.expert_ids, self.owners, self.slots))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
