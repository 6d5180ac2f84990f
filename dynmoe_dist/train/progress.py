"""Progress on rank 0: a tqdm bar on a terminal, plain lines (one per log interval) when output is a file or pipe."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, initial: int, mode: str, enabled: bool) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step") if self.mode == "bar" else None

    def update(self, n: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def line(self, text: str) -> None:
        """A line for the log, printed above the bar when there is one."""
        if self.bar is not None:
            self.bar.write(text)
        elif self.mode == "lines":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
