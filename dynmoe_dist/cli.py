"""Console scripts. Each checks its extra first, so a core-only install says what to add instead of failing on an
import deep inside the application."""

from __future__ import annotations

from .extras import exit_without_extra


def train() -> None:
    """``dynmoe-train``: the hydra training application (dynmoe_dist.train.app)."""
    exit_without_extra("train", "dynmoe-train")
    from .train.app import main

    main()


def report() -> None:
    """``dynmoe-report RUN_FOLDER``: plots and summary of a run (dynmoe_dist.train.report)."""
    exit_without_extra("train", "dynmoe-report")
    from .train.report import main

    main()


def export() -> None:
    """``dynmoe-export``: a checkpoint to one single-process state dict (core only)."""
    from .checkpoint.export import main

    main()
