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


def export(argv: list[str] | None = None) -> None:
    """``dynmoe-export CHECKPOINT OUT``: a checkpoint to one single-process state dict (core only);
    ``dynmoe-export CHECKPOINT --hf FOLDER``: a ``model=hf`` run's checkpoint as a folder transformers loads (the
    [train] and [hf] extras: the run's config rebuilds its model, transformers writes it)."""
    import argparse
    import json
    from pathlib import Path

    from safetensors import safe_open

    from .checkpoint import export as exporting
    from .checkpoint.io import resolve
    from .checkpoint.manifest import CheckpointError
    from .errors import DynMoEError

    p = argparse.ArgumentParser(
        prog="dynmoe-export", description=exporting.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, a checkpoints folder, or a run folder")
    p.add_argument("out", type=Path, nargs="?", help="the .safetensors file to write")
    p.add_argument(
        "--hf",
        type=Path,
        metavar="FOLDER",
        help="a model=hf run: write a folder transformers' from_pretrained loads (dynmoe_dist.hf.export) instead",
    )
    a = p.parse_args(argv)
    if (a.out is None) == (a.hf is None):
        p.error("give OUT (a .safetensors file) or --hf FOLDER, one of them")
    if a.hf is not None:
        exit_without_extra("train", "dynmoe-export --hf")
        exit_without_extra("hf", "dynmoe-export --hf")
        from .train.hf_model import export_checkpoint

        try:
            folder = export_checkpoint(a.checkpoint, a.hf)
        except DynMoEError as exc:
            raise SystemExit(f"dynmoe-export: {exc}") from None
        print(f"exported {resolve(a.checkpoint)} -> {folder} (AutoModelForCausalLM.from_pretrained loads it)")
        return
    try:
        out = exporting.export(a.checkpoint, a.out)
    except CheckpointError as exc:
        raise SystemExit(f"dynmoe-export: {exc}") from None
    with safe_open(str(out), "pt") as f:  # the metadata only, no tensor read back
        layers = json.loads(f.metadata()["layers"])
    experts = ", ".join(f"{name}: {len(ids)}" for name, ids in layers.items())
    print(f"exported {resolve(a.checkpoint)} -> {out} ({out.stat().st_size / 1e6:.1f} MB; experts {experts})")
