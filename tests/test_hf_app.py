"""model=hf in the training application: a converted Mixtral and an upcycled Qwen3 (tiny random models saved into
a folder, with a BPE tokenizer trained here) train at 2 ranks under both engines with adds, removes and rebalances,
on text tokenised once by the folder's tokenizer; a checkpoint resumes exactly and reshards to one process; a wrong
path, a folder without config.json, an unsupported architecture, a tokenizer larger than the model's vocabulary and
an upcycle layer out of range are refused with the setting to change. One real launch (torchrun, 2 ranks) runs the
application end to end and ``dynmoe-export --hf`` hands its checkpoint back to transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from launch_support import Commands, Launches, Runs

from dynmoe_dist.cli import export as export_command
from dynmoe_dist.errors import ConfigError
from dynmoe_dist.parallel.bootstrap import free_port
from dynmoe_dist.parallel.groups import single_process_groups
from dynmoe_dist.train.checkpointing import load_checkpoint, save_checkpoint
from dynmoe_dist.train.hf_model import inspect_folder
from dynmoe_dist.train.tokens import tokenized_corpus
from dynmoe_dist.train.trainer import Trainer

import dist_pool
import hf_support
from train_support import by_id, config, deepspeed_env

STEPS = 12
SOURCES = ("textwrap.py", "string.py", "bisect.py", "heapq.py")
# Top-Any as the reference trains it, windows of 3 steps + 1 idle, no room for more experts than at the start (a removal
# makes room for one add), a low rebalance bar: with
# the thresholds of ``seed_events`` a dozen steps see adds, removes and rebalances
EVENTS = (
    "moe=top_any_reference",
    "moe.router.balance_weight=0.0",  # a per-rank batch statistic: off, so 1 and 2 ranks can agree exactly
    "adapt.direction=mean",
    "adapt.add_min_share=0",
    "adapt.record_steps=3",
    "adapt.idle_steps=1",
    "adapt.min_experts=2",
    "adapt.max_experts=4",
    "adapt.rebalance_threshold=1.01",
    "adapt.tolerance=0.0",
    "data.seq_len=16",
)


def make_folders(root: Path) -> dict[str, Path]:
    """Two tiny models with the same tokenizer, and a folder of text to train on."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = root / "text"
    data.mkdir()
    for name in SOURCES:
        (data / name).write_text((stdlib / name).read_text())
    lines = (stdlib / "textwrap.py").read_text().splitlines()
    folders = {"text": data}
    for family in ("mixtral", "qwen3"):
        folders[family] = hf_support.save_tiny(family, root / family)
        hf_support.save_tokenizer(folders[family], lines)
    return folders


MODELS = {
    "convert": lambda f: ("model=hf", f"model.path={f['mixtral']}", "model.convert=true"),
    "upcycle": lambda f: ("model=hf", f"model.path={f['qwen3']}", "model.upcycle.num_experts=4"),
}


def overrides(kind: str, folders: dict[str, Path], out: str, *more: str) -> tuple[str, ...]:
    data = ("data.source=text", f"data.path={folders['text']}", f"out_dir={out}")
    return (*MODELS[kind](folders), *EVENTS, *data, f"steps={STEPS}", *more)


def seed_events(model: torch.nn.Module) -> None:
    """Thresholds that leave the last expert idle (removed at the first window), some tokens unrouted (adds) and
    the first expert busy."""
    with torch.no_grad():
        for block in model.blocks():
            block.pending_calibration.clear()
            block.moe.router.threshold.fill_(0.3)
            block.moe.router.threshold[0] = 0.0  # a busy expert: its rank's load above the other's (rebalances)
            block.moe.router.threshold[-1] = 9.0


def trainer(args: tuple[str, ...], world: int) -> Trainer:
    deepspeed_env()
    cfg = config(*args)
    groups = dist_pool.groups(world) if world > 1 else single_process_groups()
    corpus = tokenized_corpus(cfg, groups.rank, groups)
    t = Trainer(cfg, corpus, groups, torch.device("cpu"))
    seed_events(t.model)
    return t


def steps(t: Trainer, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        r = t.train_step()
        events = [(e.kind, e.added, e.removed, bool(e.moved)) for e in r.events if e.committed]
        out.append((r.loss, r.grad_norm, events))
    return out


def case_engine(args: tuple[str, ...]) -> dict:
    t = trainer(args, dist.get_world_size())
    history = steps(t, STEPS)
    return {"history": history, "experts": [m.num_experts for m in t.model.moe_layers()], "corpus": t.corpus.byte_level}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return make_folders(tmp_path_factory.mktemp("hf_app"))


@pytest.mark.parametrize("kind", ["convert", "upcycle"])
def test_both_engines_train_with_adds_removes_and_rebalances(folders, tmp_path: Path, kind: str) -> None:
    pool = dist_pool.pool(2)
    ref = pool.run(case_engine, overrides(kind, folders, str(tmp_path), "engine=torch"))
    stage = 1 if kind == "convert" else 2
    engine = ("engine=deepspeed", f"engine.zero_stage={stage}")
    ds = pool.run(case_engine, overrides(kind, folders, str(tmp_path), *engine))
    events = [e for _, _, step in ref[0]["history"] for e in step]
    assert any(e[1] for e in events) and any(e[2] for e in events), events
    assert any(e[0] == "rebalance" and e[3] for e in events), events
    assert not ref[0]["corpus"]  # the model's tokens, not bytes
    assert len(list((tmp_path / "tokenized").iterdir())) == 1  # tokenised once, by rank 0, for both runs
    for rank in range(2):
        assert ref[rank]["history"][-1][2:] == ref[0]["history"][-1][2:]
        assert [e for *_, e in ds[rank]["history"]] == [e for *_, e in ref[rank]["history"]]
        for step, ((la, na, _), (lb, nb, _)) in enumerate(zip(ds[rank]["history"], ref[rank]["history"])):
            assert la == pytest.approx(lb, rel=1e-5), f"rank {rank} step {step + 1}"
            assert na == pytest.approx(nb, rel=1e-4), f"rank {rank} step {step + 1}"


def case_resume(args: tuple[str, ...], root: str, save_at: int) -> dict:
    t = trainer(args, dist.get_world_size())
    steps(t, save_at)
    save_checkpoint(t, Path(root), keep=2, config=None)
    saved = by_id(t)
    expected = steps(t, STEPS - save_at)
    resumed = trainer(args, dist.get_world_size())
    load_checkpoint(resumed, Path(root))
    got = steps(resumed, STEPS - save_at)
    a, b = by_id(t), by_id(resumed)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
    return {"expected": expected, "got": got, "same_keys": set(a) == set(b), "diff": diff, "saved": saved}


def test_resume_is_exact_and_reshards_to_one_process(folders, tmp_path: Path) -> None:
    """Torch engine, converted model: resumed == uninterrupted through an event; the 2-rank checkpoint loads on one
    process with every expert by id, the Top-Any thresholds loaded (not calibrated again)."""
    args = overrides("convert", folders, str(tmp_path), "engine=torch")
    results = dist_pool.pool(2).run(case_resume, args, str(tmp_path / "ckpt"), 5)
    for r in results:
        assert any(e for *_, e in r["expected"])  # an adaptation event fell between the save and the end
        assert r["got"] == r["expected"] and r["same_keys"] and r["diff"] == 0.0
    cfg, groups = config(*args), single_process_groups()
    one = Trainer(cfg, tokenized_corpus(cfg, 0, groups), groups, torch.device("cpu"))
    assert all(b.pending_calibration for b in one.model.blocks())  # a fresh convert to Top-Any would calibrate
    load_checkpoint(one, tmp_path / "ckpt")
    one.model.settle_calibration()  # what its first forward does: loaded thresholds are kept
    assert not any(b.pending_calibration for b in one.model.blocks())
    loaded = by_id(one)
    saved = {k: v for r in results for k, v in r["saved"].items() if "/expert/" in k or "/router/" in k}
    assert any(k.endswith("/router/threshold") for k in saved)
    assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert one.train_step().loss == pytest.approx(results[0]["expected"][0][0], rel=0.2)


# ----------------------------------------------------------------------------------------------------------------------
# refusals, before any process group


def refusal(folders: dict[str, Path], *args: str) -> ConfigError:
    cfg = config("model=hf", "data.source=text", f"data.path={folders['text']}", *args)
    with pytest.raises(ConfigError) as err:
        inspect_folder(cfg)
    return err.value


def test_refusals_name_what_to_change(folders, tmp_path: Path) -> None:
    missing = refusal(folders, f"model.path={tmp_path / 'nowhere'}", "model.convert=true")
    assert missing.setting == "model.path" and "does not exist" in str(missing) and "hub" in str(missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    no_config = refusal(folders, f"model.path={tmp_path / 'empty'}", "model.convert=true")
    assert "config.json" in str(no_config) and "model.safetensors" in str(no_config)
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    arch = refusal(folders, f"model.path={other}", "model.convert=true")
    assert "'gpt2'" in str(arch) and all(t in str(arch) for t in ("mixtral", "qwen3_moe", "deepseek_v3", "llama"))
    big = tmp_path / "big_tokenizer"
    shutil.copytree(folders["qwen3"], big)
    hf_support.save_tokenizer(big, (Path(sysconfig.get_paths()["stdlib"]) / "string.py").read_text().split(), 300)
    vocab = refusal(folders, f"model.path={big}", "model.upcycle.num_experts=4", "moe=top_any")
    assert vocab.setting == "data.tokenizer" and "vocab_size=128" in str(vocab) and "data.tokenizer=bytes" in str(vocab)
    upcycle = ("model.upcycle.num_experts=4", "model.upcycle.layers=[0,2]")
    layers = refusal(folders, f"model.path={folders['qwen3']}", *upcycle)
    assert layers.setting == "model.upcycle.layers" and layers.value == 2 and "0..1" in str(layers)
    dense = refusal(folders, f"model.path={folders['qwen3']}", "model.convert=true")
    assert dense.setting == "model.convert" and "model.upcycle.num_experts" in str(dense)
    moe = refusal(folders, f"model.path={folders['mixtral']}")
    assert moe.setting == "model.convert" and "moe=family" in str(moe)


# ----------------------------------------------------------------------------------------------------------------------
# the application, launched


def launch(out: Path, root: Path, *args: str) -> Commands:
    folders = make_folders(root)  # just before the launch starts
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "dynmoe_dist.train", "parallel.device=cpu", "logging.wandb=disabled", "logging.progress=none"]
    cmd += ["data.batch_size=4", "logging.every=4", "logging.val_every=6", "checkpoint.every=6"]
    cmd += [*overrides("upcycle", folders, str(out), *args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [(cmd, env)]


def queue_launches(runs: Runs, wanted: set[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    if "test_application_trains_and_exports_to_transformers" not in wanted:
        return
    root = runs.notes["root"] = tmp_path_factory.mktemp("hf_launch")
    args = ("name=upcycled", "engine.zero_stage=1", "model.upcycle.layers=[1]", "model.upcycle.drop=0.2")
    runs.submit("upcycled", partial(launch, root / "runs", root, *args), 300, split=True)


@pytest.fixture(scope="module")
def launches(background: Launches) -> Runs:
    return background.module(__name__)


def test_application_trains_and_exports_to_transformers(launches: Runs, tmp_path: Path) -> None:
    (done,) = launches.result("upcycled")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    root = launches.notes["root"]
    run = root / "runs" / "upcycled"
    assert "upcycle" in done.stderr and "by the model's tokenizer" in done.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in rows if r["kind"] == "val"]
    assert len(val) == 3 and val[-1] < val[0] and "bpb" not in rows[-1]
    (layer,) = [r for r in rows if r["kind"] == "train"][-1]["moe"]  # layer 1 only was upcycled
    assert layer == "layers.1.mlp"
    out = tmp_path / "exported"
    export_command([str(run), "--hf", str(out)])  # dynmoe-export, in this process (its imports are done here)
    import transformers

    import dynmoe_dist.hf  # noqa: F401 - our dynmoe_<family> type

    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "dynmoe_qwen3" and list(model.config.dynmoe["layers"]) == ["1"]
    assert transformers.AutoTokenizer.from_pretrained(out, local_files_only=True).eos_token == "</s>"
    ids = torch.randint(3, hf_support.VOCAB, (1, 8))
    assert torch.isfinite(model(ids).logits).all()
