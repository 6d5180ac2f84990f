"""The README and the docs against the repository: presets, config keys, links and paths they name must exist.

What counts as a name (the convention the docs are written to):

- **Presets.** The README's configuration table (the one whose header starts ``| group | presets |``) lists, per
  config group, every preset as a backticked name in its second column. That set must equal
  ``configs/<group>/*.yaml``, in both directions.
- **Config keys.** In inline code and in ``bash`` code blocks of README.md, docs/TRAINING.md, docs/LAUNCH.md and
  docker/README.md, every whitespace-separated word of the form ``group.key[.key...]`` or ``group.key=value``, whose
  first part is a config group (a folder of ``configs/``), must be a key of the composed configuration
  (``moe.router.k``, ``data.batch_size``, ``engine.zero_stage=2``); a word ``group=value`` must name a preset of that
  group (``moe=top_k``); and a lowercase ``word=value`` whose word is no group must be a top-level key (``steps=100``)
  unless the code looks like Python (it holds a parenthesis) or the word is an option's value (``--ulimit
  memlock=-1``).
- **Example commands.** Every training command in those ``bash`` blocks (``dynmoe-train``, ``-m dynmoe_dist.train``,
  ``make train``, ``launch/`` scripts) composes and passes the application's own checks.
- **Links and paths.** Every relative Markdown link in README.md, docs/*.md and docker/README.md points at a file of
  the repository (and at a heading of it, when it has an anchor); every ``X.md`` file name the text mentions exists;
  every backticked path into the repository (``tests/test_layer.py``, ``dispatch/permute.py``) exists.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from dynmoe_dist.train.config import CONFIG_DIR, check_config, load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
ALL_DOCS = [README, *DOCS, ROOT / "docker" / "README.md"]
CONFIG_DOCS = [README, ROOT / "docs" / "TRAINING.md", ROOT / "docs" / "LAUNCH.md", ROOT / "docker" / "README.md"]

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
WORD = re.compile(r"^(?P<key>[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)(?:=(?P<value>\S*))?$")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
FENCE = re.compile(r"^```(\w*)\s*$")


def presets(group: str) -> set[str]:
    return {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}


# ------------------------------------------------------------------------------------------------------------------
# reading Markdown


def split_code(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(the prose with fenced blocks blanked out, [(language, block text)])."""
    prose, blocks, lang, block = [], [], None, []
    for line in text.splitlines():
        fence = FENCE.match(line)
        if lang is None and fence:
            lang, block = fence.group(1), []
            prose.append("")
        elif lang is not None and line.startswith("```"):
            blocks.append((lang, "\n".join(block)))
            lang = None
            prose.append("")
        elif lang is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def code_spans(text: str) -> list[str]:
    """Inline code (one span may wrap a line) and the lines of ``bash`` blocks, each as one string."""
    prose, blocks = split_code(text)
    spans = [s.replace("\n", " ") for s in INLINE.findall(prose)]
    for lang, block in blocks:
        if lang == "bash":
            joined = re.sub(r"\\\n\s*", " ", block)  # continued lines as one
            spans += [line.split(" #", 1)[0] for line in joined.splitlines()]
    return spans


def config_words(text: str) -> list[tuple[str, str | None, bool]]:
    """(key, value, python-like) for every word of the code spans that has the shape of a config override."""
    found = []
    for span in code_spans(text):
        pythonish = "(" in span
        words = span.split()
        for before, word in zip(["", *words], words):
            if re.fullmatch(r"--?[\w-]+", before):
                continue  # an option's value (`--ulimit memlock=-1`), not an override
            m = WORD.match(word.strip("'\"[],;"))
            if m:
                found.append((m.group("key"), m.group("value"), pythonish))
    return found


# ------------------------------------------------------------------------------------------------------------------
# the checks, as functions of the text, so the test of the convention can feed them a misspelt document


@pytest.fixture(scope="module")
def config():
    return load_config([])


def is_key(cfg: object, dotted: str) -> bool:
    obj = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def bad_config_names(text: str, cfg: object) -> list[str]:
    top = {f.name for f in dataclasses.fields(cfg)}
    bad = []
    for key, value, pythonish in config_words(text):
        first = key.split(".")[0]
        if "." in key:
            if first in GROUPS and not is_key(cfg, key):
                bad.append(f"{key}: no such config key")
        elif value is not None:
            if key in GROUPS:
                if re.fullmatch(r"[a-z_][a-z0-9_]*", value) and value not in presets(key):
                    bad.append(f"{key}={value}: no preset configs/{key}/{value}.yaml")
            elif not pythonish and key not in top:
                bad.append(f"{key}={value}: no top-level config key {key!r}")
    return bad


def training_commands(text: str) -> list[list[str]]:
    """The hydra overrides of every training command in the ``bash`` blocks (``dynmoe-train ...``,
    ``... -m dynmoe_dist.train ...``, ``make train ...``, ``launch/*`` scripts)."""
    commands = []
    for span in code_spans(text):
        words = span.split()
        starts = [i for i, w in enumerate(words) if w in ("dynmoe-train", "dynmoe_dist.train", "train")]
        starts += [i for i, w in enumerate(words) if w.startswith("launch/")]
        if not starts or (words[starts[0]] == "train" and "make" not in words[: starts[0]]):
            continue
        overrides = [w for w in words[min(starts) + 1 :] if WORD.match(w) and "=" in w]
        commands.append(overrides)
    return commands


def preset_table(text: str) -> dict[str, set[str]]:
    """The README's table of groups and presets: {group: presets named in its second column}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\|\s*group\s*\|\s*presets\s*\|", line))
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        (group,) = re.findall(r"`([^`]+)`", cells[0])
        table[group] = set(re.findall(r"`([^`]+)`", cells[1]))
    return table


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose.splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def dead_links(path: Path, text: str) -> list[str]:
    prose, _ = split_code(text)
    prose = INLINE.sub("", prose)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+:", target):
            continue  # an absolute URL
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return bad


TOP_DIRS = ("benchmarks", "configs", "docker", "docs", "dynmoe_dist", "launch", "tests")
PATH_WORD = re.compile(r"^(?:[\w.-]+/)*[\w.-]+\.(?:py|md|sh|sbatch|yaml|toml|txt|example)$|^docker/Dockerfile$")


def dead_paths(path: Path, text: str) -> list[str]:
    """Backticked repository paths, and every ``X.md`` the text names, that do not exist."""
    subpackages = {p.name for p in (ROOT / "dynmoe_dist").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    bad = []
    for span in code_spans(text):
        for word in span.split():
            word = word.strip("'\"(),;:")
            if not PATH_WORD.match(word) or "<" in word or "*" in word:
                continue
            first = word.split("/")[0]
            if "/" not in word:
                candidates = [ROOT / word] if word.endswith((".toml", ".txt")) else []
            elif first in TOP_DIRS:
                candidates = [ROOT / word]
            elif first in subpackages:
                candidates = [ROOT / "dynmoe_dist" / word]
            else:
                candidates = []
            if candidates and not any(c.exists() for c in candidates):
                bad.append(f"`{word}`: not in the repository")
    for name in re.findall(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Z][A-Z_]*\.md)\b", text):
        if not ((path.parent / name).exists() or (ROOT / name).exists()):
            bad.append(f"{name}: not in the repository")
    return bad


# ------------------------------------------------------------------------------------------------------------------
# the tests


def test_the_readme_stays_short() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_every_preset_is_listed_and_every_listed_preset_exists() -> None:
    table = preset_table(README.read_text(encoding="utf-8"))
    assert sorted(table) == GROUPS, "one row per folder of configs/"
    for group in GROUPS:
        missing, unknown = presets(group) - table[group], table[group] - presets(group)
        assert not missing, f"configs/{group}/ has presets the README does not list: {sorted(missing)}"
        assert not unknown, f"the README lists presets configs/{group}/ does not have: {sorted(unknown)}"


@pytest.mark.parametrize("doc", CONFIG_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_key_and_preset_named_exists(doc: Path, config) -> None:
    text = doc.read_text(encoding="utf-8")
    assert not bad_config_names(text, config)


@pytest.mark.parametrize("doc", CONFIG_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_training_command_shown_is_a_valid_configuration(doc: Path) -> None:
    """Each example command composes and passes the application's checks, at the world size it names
    (``parallel.world_size``) or else at 16 ranks; a dataset path need not exist."""
    for overrides in training_commands(doc.read_text(encoding="utf-8")):
        named = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("parallel.world_size=")]
        check_config(load_config(overrides), world_size=named[0] if named else 16)


def test_the_readme_names_config_keys_at_all(config) -> None:
    """The convention above finds the README's keys (so the test above is not vacuous)."""
    keys = {k for k, _, _ in config_words(README.read_text(encoding="utf-8")) if "." in k and k.split(".")[0] in GROUPS}
    assert {"moe.router.k", "data.batch_size", "engine.zero_stage", "parallel.world_size"} <= keys


def test_a_misspelt_name_is_caught(config) -> None:
    text = (
        "Set `moe.router.kk` and `data.batchsize=8`.\n\n"
        "```bash\nmake train moe=top_q step=100 engine.zero_stage=2\ndocker run --ulimit memlock=-1 img steps=5\n```\n"
        'A table row: | `moe` | `top_k` |; Python is not checked for keywords: `f(gemm="loop")`.\n'
    )
    assert bad_config_names(text, config) == [
        "moe.router.kk: no such config key",
        "data.batchsize: no such config key",
        "moe=top_q: no preset configs/moe/top_q.yaml",
        "step=100: no top-level config key 'step'",
    ]


@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dead_links_or_paths(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    assert not dead_links(doc, text) + dead_paths(doc, text)


def test_a_dead_link_or_path_is_caught() -> None:
    doc = ROOT / "docs" / "ARCHITECTURE.md"
    text = (
        "See [the guide](NOWHERE.md), [a heading](BENCHMARKS.md#no-such-heading), [ok](BENCHMARKS.md#train),\n"
        "`tests/test_nothing_here.py`, `dispatch/nowhere.py` and docs/GONE.md.\n"
    )
    assert dead_links(doc, text) == [
        "NOWHERE.md: no file docs/NOWHERE.md",
        "BENCHMARKS.md#no-such-heading: no heading #no-such-heading in docs/BENCHMARKS.md",
    ]
    assert dead_paths(doc, text) == [
        "`tests/test_nothing_here.py`: not in the repository",
        "`dispatch/nowhere.py`: not in the repository",
        "NOWHERE.md: not in the repository",
        "docs/GONE.md: not in the repository",
    ]


def test_the_benchmark_report_markers_are_in_the_readme() -> None:
    """`python -m benchmarks report --write README.md` writes its table between these two lines."""
    lines = README.read_text(encoding="utf-8").splitlines()
    begin, end = "<!-- benchmarks report: begin -->", "<!-- benchmarks report: end -->"
    assert lines.count(begin) == 1 and lines.count(end) == 1
    assert lines.index(begin) < lines.index(end)
