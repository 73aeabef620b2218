"""Every relative link and every repository file the docs name exists.

The docs are README.md and docs/*.md (CHANGELOG.md is a history: it names files as they were).
A relative link must reach its file and, with ``#anchor``, a heading of it; benchmarks/RESULTS.md's
links are checked too. A repository path the docs name, in a code span or a code block
(``spon_exp/tracking/store.py``, ``conf/sparsifier/*_ref.yaml``, ``sparsifiers/calibration.py``
inside the package, a bare ``hostmem.py``), must exist. Paths of run folders and caches
(``outputs/...``, ``export/sparse_state.{safetensors,json}``), placeholders (``<name>``) and the
reference repositories' files that docs/FIDELITY.md cites (``utils/utils.py:51-52``) are not
repository files and are left alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED_PAGES = [*DOCS, REPO / "benchmarks" / "RESULTS.md"]

# --- links ------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (outside code blocks)."""
    anchors, seen, fence = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", LINKED_PAGES, ids=[str(p.relative_to(REPO)) for p in LINKED_PAGES])
def test_relative_links_point_to_files_and_headings(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


# --- file names -------------------------------------------------------------------------------

#: top-level folders and files: a path starting with one of them is a repository path
TOP = {"spon_exp", "conf", "sweeps", "tests", "benchmarks", "slurm", "docs", "hydra_plugins", ".ci"}
TOP_FILES = {"README.md", "CHANGELOG.md", "install.sh", "pyproject.toml", "requirements.lock"}
#: subpackages the docs name from inside the package (``sparsifiers/teal.py``)
SUBPACKAGES = {p.name for p in (REPO / "spon_exp").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
#: a bare source file name (``hostmem.py``) must exist somewhere in the repository
SOURCE_SUFFIXES = (".py", ".c", ".sh")
#: files of the reference repositories that docs/FIDELITY.md names without a line number
REFERENCE_FILES = {"grab_acts.py", "greedyopt.py", "eval.py", "ppl_test.py", "evaluation.py"}
PATHLIKE = re.compile(r"^\.?[\w.*-]+(/[\w.*-]+)*/?$")
BARE_NAME = re.compile(r"^[\w-]+\.\w+$")
#: files the docs name that a reader or a command creates, with who creates them
CREATED_LATER = {
    "conf/local/default.yaml": "your own cluster settings (git-ignored)",
    "spon_exp/sparsifiers/random_channels.py": "new-sparsifier.md's worked example",
    "conf/sparsifier/random_channels.yaml": "new-sparsifier.md's worked example",
    "benchmarks/results/gpu_acceptance/": "benchmarks/gpu_acceptance.sh",
    "benchmarks/results/sparse_matvec_cuda.json": "benchmarks/perf/sparse_matvec.py --device cuda",
    "benchmarks/results/sparse_decode_cuda.json": "benchmarks/perf/sparse_decode.py --device cuda",
}


def _code_texts(text: str):
    """Code spans outside fenced blocks, and every whitespace-separated word inside them."""
    fenced, outside = False, []
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        elif fenced:
            yield from line.split()
        else:
            outside.append(line)
    yield from re.findall(r"`([^`\n]+)`", "\n".join(outside))


def repository_paths(text: str) -> set[str]:
    """The repository paths a page names (see the module docstring for what is left alone)."""
    found = set()
    for code in _code_texts(text):
        for word in re.split(r"[\s,;()\[\]'\"=]+", code):
            cited = re.match(r"^(.*?):\d", word)  # file:line, a citation
            path = (cited.group(1) if cited else word).rstrip(".:")
            if not path or not PATHLIKE.match(path) or path.startswith("outputs"):
                continue
            first = path.split("/", 1)[0]
            if first in TOP or path in TOP_FILES:
                found.add(path)
            elif cited:
                continue  # a reference repository's file, cited by line
            elif "/" in path and first in SUBPACKAGES and path.endswith((*SOURCE_SUFFIXES, ".md")):
                found.add(f"spon_exp/{path}")
            elif BARE_NAME.match(path) and path.endswith(SOURCE_SUFFIXES) and path not in REFERENCE_FILES:
                found.add(f"**/{path}")
    return found


def exists(path: str) -> bool:
    if path in CREATED_LATER:
        return True
    if "*" in path:
        return any(p for p in REPO.glob(path) if ".git" not in p.parts and "outputs" not in p.parts)
    return (REPO / path).exists()


@pytest.mark.parametrize("page", DOCS, ids=[str(p.relative_to(REPO)) for p in DOCS])
def test_every_repository_file_the_docs_name_exists(page):
    missing = sorted(p for p in repository_paths(page.read_text(encoding="utf-8")) if not exists(p))
    assert not missing, f"{page.relative_to(REPO)} names files that do not exist: {missing}"


def test_the_extraction_finds_repository_paths_and_leaves_the_rest(tmp_path):
    text = ("See `spon_exp/tracking/store.py`, `sparsifiers/teal.py`, `hostmem.py` and "
            "`conf/sparsifier/*_ref.yaml`; TEAL `utils/utils.py:51-52`, `spon_exp/spon/alpha.py:71`, "
            "`outputs/runs/x`, `export/sparse_state.{safetensors,json}`, `conf/<group>/<option>.yaml`, "
            "`results.json`, `grab_acts.py`.\n```bash\npython benchmarks/scale.py --small\n```\n")
    assert repository_paths(text) == {"spon_exp/tracking/store.py", "spon_exp/sparsifiers/teal.py", "**/hostmem.py",
                                      "conf/sparsifier/*_ref.yaml", "spon_exp/spon/alpha.py", "benchmarks/scale.py"}
    assert exists("**/hostmem.py") and exists("conf/sparsifier/*_ref.yaml") and not exists("spon_exp/nothing.py")
