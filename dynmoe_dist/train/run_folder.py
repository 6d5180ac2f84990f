"""The run folder ``<out_dir>/<name>/``, written by rank 0 only.

    config.yaml      the resolved configuration (every default filled in)
    metrics.jsonl    one JSON object per line: {"kind": "train" | "val", "step": ..., ...} (README lists the fields)
    events.jsonl     one line per adaptation event: what changed, bytes moved, seconds, imbalance before/after
    wandb/           the wandb run (offline by default: `wandb sync runs/<name>/wandb/offline-run-*` uploads it)
    plots/, summary.md   written by `dynmoe-report`

A folder that already holds a run is never overwritten silently: pass another ``name`` or ``overwrite=true``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .metrics import JsonLines, wandb_row

OWNED = ("config.yaml", "metrics.jsonl", "events.jsonl", "summary.md", "plots", "wandb")


def holds_run(path: Path) -> bool:
    return (path / "metrics.jsonl").exists()


def existing_run_error(path: Path) -> ConfigError:
    return ConfigError(
        "name",
        path.name,
        f"a new run name: {path} already holds a run (metrics.jsonl); pass name=<other> (make train RUN=<other>), "
        "or overwrite=true to replace it",
    )


def clear(path: Path) -> None:
    """Remove what an earlier run of this name wrote (and only that)."""
    for entry in OWNED:
        target = path / entry
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


class RunFolder:
    def __init__(self, path: Path, config_yaml: str, config: dict[str, Any], wandb_mode: str, project: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.yaml").write_text(config_yaml)
        self.metrics_file = JsonLines(path / "metrics.jsonl")
        self.events_file = JsonLines(path / "events.jsonl")
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            settings = wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True)
            self.wandb = wandb.init(
                project=project, name=path.name, dir=str(path), mode=wandb_mode, config=config, settings=settings
            )

    def metrics(self, record: dict) -> None:
        self.metrics_file.write(record)
        if self.wandb is not None:
            self.wandb.log(wandb_row(record), step=record["step"])

    def event(self, record: dict) -> None:
        self.events_file.write(record)
        if self.wandb is not None:
            self.wandb.log({f"adapt/{record['layer']}/experts": record["experts"]}, step=record["step"])

    def wandb_dir(self) -> Path | None:
        if self.wandb is None:
            return None
        return Path(self.wandb.dir).parent  # .../wandb/offline-run-<time>-<id>/files -> the run's folder

    def close(self) -> list[str]:
        """Finish and return the lines that tell the user where everything is."""
        wandb_dir = self.wandb_dir()
        if self.wandb is not None:
            self.wandb.finish()
        self.metrics_file.close()
        self.events_file.close()
        lines = [
            f"run folder: {self.path}",
            f"  config:  {self.path / 'config.yaml'}",
            f"  metrics: {self.path / 'metrics.jsonl'}",
            f"  events:  {self.path / 'events.jsonl'}",
        ]
        if wandb_dir is not None:
            lines.append(f"  wandb:   {wandb_dir}")
        lines.append(f"  plots:   dynmoe-report {self.path}")
        return lines
