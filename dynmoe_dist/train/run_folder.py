"""The run folder ``<out_dir>/<name>/``, written by rank 0 only.

    config.yaml      the resolved configuration (every default filled in)
    metrics.jsonl    one JSON object per line: {"kind": "train" | "val", "step": ..., ...} (README lists the fields)
    events.jsonl     one line per adaptation event: what changed, bytes moved, seconds, imbalance before/after
    wandb/           the wandb run (offline by default: `wandb sync runs/<name>/wandb/offline-run-*` uploads it)
    plots/, summary.md   written by `dynmoe-report`

A folder that already holds a run is never overwritten silently: pass another ``name`` or ``overwrite=true``.
"""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint.files import write_text_atomic
from ..errors import ConfigError
from .metrics import JsonLines, wandb_row

OWNED = ("config.yaml", "metrics.jsonl", "events.jsonl", "summary.md", "plots", "wandb", "wandb_id", "checkpoints")


def holds_run(path: Path) -> bool:
    return (path / "metrics.jsonl").exists()


def existing_run_error(path: Path) -> ConfigError:
    return ConfigError(
        "name",
        path.name,
        f"a new run name: {path} already holds a run (metrics.jsonl); resume=auto continues it from its latest "
        "checkpoint, name=<other> (make train RUN=<other>) starts another, overwrite=true replaces it",
    )


def clear(path: Path) -> None:
    """Remove what an earlier run of this name wrote (and only that)."""
    for entry in OWNED:
        target = path / entry
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def cut_after(path: Path, step: int) -> None:
    """Keep only the records up to ``step`` (a resumed run writes the later ones again); atomic."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class RunFolder:
    def __init__(
        self,
        path: Path,
        config_yaml: str,
        config: dict[str, Any],
        wandb_mode: str,
        project: str,
        resumed_step: int | None = None,
    ) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.yaml").write_text(config_yaml)
        if resumed_step is not None:
            for name in ("metrics.jsonl", "events.jsonl"):
                cut_after(path / name, resumed_step)
        self.metrics_file = JsonLines(path / "metrics.jsonl")
        self.events_file = JsonLines(path / "events.jsonl")
        self.wandb = None
        if wandb_mode != "disabled":
            import wandb

            # one wandb run across resumes: its id is kept in the run folder
            id_file = path / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            settings = wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True)
            self.wandb = wandb.init(
                project=project,
                name=path.name,
                dir=str(path),
                mode=wandb_mode,
                config=config,
                settings=settings,
                id=run_id,
                resume="allow",
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
