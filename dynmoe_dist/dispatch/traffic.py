"""What one dispatch moved and computed, per rank: the numbers behind "dropless, no padding"."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Traffic:
    assignments: int  # (token, expert) pairs this rank routed
    rows_sent: int  # rows this rank dispatched, to its own experts included
    rows_sent_off_rank: int  # of those, rows that crossed the network
    rows_computed: int  # rows this rank's experts computed
    row_bytes: int  # bytes of one row
    rows_shadowed: int = 0  # of rows_computed, rows computed here with a copy of another rank's expert (shadow.py)
    experts_shadowed: int = 0  # experts copied for this step, world-wide (the same on every rank)

    @property
    def exchange_bytes(self) -> int:
        """Bytes this rank sends in one forward: dispatch plus combine (the backward sends as much again)."""
        return 2 * self.rows_sent * self.row_bytes

    @property
    def padding_ratio(self) -> float:
        """Rows sent per assignment: exactly 1.0 for a dropless, unpadded dispatch."""
        return self.rows_sent / self.assignments if self.assignments else 1.0
