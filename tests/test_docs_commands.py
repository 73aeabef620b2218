"""Every command the documentation shows keeps working.

Each ``spon-exp ...`` line in a shell code block of README.md or docs/*.md composes, as
``spon-exp ... --cfg job`` would (Hydra's compose API, in-process: no model, no data, no run).
A sweep (``--multirun``) composes its first combination. Lines that end with
``# needs: network`` or ``# needs: gpu`` are skipped with that reason. The other entry points
(``spon-exp-collect``, ``-export``, ``-diagnose``) parse their documented arguments with their
own argparse parsers, stopped before they do anything. Python snippets parse and import only
names that exist, and README.md stays short. (Links and file names: tests/test_docs_links.py.)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from omegaconf import OmegaConf, open_dict

from spon_exp.cli import CONFIG_DIR
from spon_exp.config import register_configs, resolve_aliases

REPO = Path(CONFIG_DIR).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 260
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
NEEDS = re.compile(r"#\s*needs:\s*([\w, -]+?)\s*$")
ENTRY_POINTS = {  # console script -> module whose main(argv) builds its argparse parser
    "spon-exp-collect": "spon_exp.collect.cli",
    "spon-exp-export": "spon_exp.export.cli",
    "spon-exp-diagnose": "spon_exp.diagnostics.cli",
}


@dataclass
class Command:
    where: str  # file:line, the command's first line
    program: str
    args: list[str]
    needs: str | None  # "network", "gpu", ... from a trailing "# needs: ..." comment


def _shell_lines(path: Path):
    """(line number, logical line) of every line in a shell code block, continuations joined."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fence = None  # the open fence's language, None outside a block
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            i += 1
            continue
        if fence is not None and fence in SHELL_FENCES and stripped:
            start, text = i + 1, stripped
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            yield start, text
        i += 1


def _split_comment(text: str) -> tuple[str, str]:
    """The command and its trailing ``# ...`` comment (a ``#`` outside quotes after a blank)."""
    quote = None
    for j, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (j == 0 or text[j - 1].isspace()):
            return text[:j].rstrip(), text[j:]
    return text, ""


def _segments(command: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``;``, ``|``), each
    without leading ``VAR=value`` assignments and ``$ `` prompts."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""
    parts, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    out = []
    for words in parts:
        if words[:1] == ["$"]:
            words = words[1:]
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words = words[1:]
        if words:
            out.append(words)
    return out


def documented_commands() -> list[Command]:
    found = []
    for path in DOCS:
        for line, text in _shell_lines(path):
            if text.startswith("$ "):
                text = text[2:]
            command, comment = _split_comment(text)
            needs = NEEDS.search(comment)
            for words in _segments(command):
                if words[0] == "spon-exp" or words[0] in ENTRY_POINTS:
                    found.append(Command(f"{path.relative_to(REPO)}:{line}", words[0], words[1:],
                                         needs.group(1).strip() if needs else None))
    return found


COMMANDS = documented_commands()
SPON_EXP = [c for c in COMMANDS if c.program == "spon-exp"]
OTHERS = [c for c in COMMANDS if c.program != "spon-exp"]


def _skip_if_needed(command: Command) -> None:
    if command.needs:
        pytest.skip(f"{command.where}: needs {command.needs}")


# --- spon-exp: compose like `spon-exp ... --cfg job` --------------------------------------

HYDRA_FLAGS_WITH_VALUE = {"-cd": "config_dir", "--config-dir": "config_dir", "-cn": "config_name",
                          "--config-name": "config_name", "-cp": "config_path", "--config-path": "config_path",
                          "-c": "cfg", "--cfg": "cfg", "-p": "package", "--package": "package"}
HYDRA_SWITCHES = {"-m": "multirun", "--multirun": "multirun", "--verbose": "verbose", "--resolve": "resolve"}


def parse_spon_exp(args: list[str]) -> tuple[dict, list[str]]:
    """Hydra's command line (plus spon-exp's own ``--verbose``): its flags and the overrides."""
    flags: dict = {"multirun": False, "config_dir": None, "config_name": "config"}
    overrides = []
    words = iter(args)
    for word in words:
        flag, _, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        if flag in HYDRA_FLAGS_WITH_VALUE:
            value = inline or next(words, None)
            assert value is not None, f"{flag} needs a value"
            flags[HYDRA_FLAGS_WITH_VALUE[flag]] = value
        elif word in HYDRA_SWITCHES:
            flags[HYDRA_SWITCHES[word]] = True
        else:
            assert not word.startswith("-"), f"spon-exp has no option {word}"
            overrides.append(word)
    assert "config_path" not in flags, "use -cd (a folder), as the docs do; -cp is relative to the package"
    return flags, overrides


def _first_value(override) -> str:
    value = override.value()
    if isinstance(value, IntervalSweep):
        return str(value.start)
    return next(iter(override.sweep_string_iterator()))


def first_combination(overrides: list[str], multirun: bool) -> list[str]:
    """The overrides of a sweep's first job (``a=1,2`` -> ``a=1``; choice / range / interval)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            assert multirun, f"{text} is a sweep: the command needs --multirun"
            out.append(f"{override.get_key_element()}={_first_value(override)}")
        else:
            out.append(text)
    return out


def compose_job(flags: dict, overrides: list[str]):
    register_configs()
    GlobalHydra.instance().clear()
    if flags["config_dir"]:
        config_dir = (REPO / flags["config_dir"]).resolve()
        assert config_dir.is_dir(), f"-cd {flags['config_dir']}: no such folder (relative to the repository)"
        overrides = [f"hydra.searchpath=[file://{CONFIG_DIR}]", *overrides]
    else:
        config_dir = Path(CONFIG_DIR)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(flags["config_name"], overrides=overrides, return_hydra_config=True)


def _sweeper_defaults(cfg, overrides: list[str]) -> list[str]:
    """A grid sweep's own parameters (``hydra.sweeper.params``) the command leaves alone, at
    their first value; a search sweeper's (Optuna) space is left to the sweeper."""
    params = cfg.hydra.sweeper.get("params") or {}
    if not params or "optuna" in str(cfg.hydra.sweeper.get("_target_", "")).lower():
        return []
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return first_combination([f"{k}={v}" for k, v in params.items() if k not in given], multirun=True)


def compose_command(args: list[str]):
    flags, overrides = parse_spon_exp(args)
    problem = getattr(importlib.import_module("spon_exp.cli"), "_override_problem", None)
    for override in overrides:  # what spon-exp checks before Hydra sees the command line
        assert problem is None or problem(override) is None, problem(override)
    job = first_combination(overrides, flags["multirun"])
    cfg = compose_job(flags, job)
    if flags["multirun"]:
        extra = _sweeper_defaults(cfg, job)
        if extra:
            cfg = compose_job(flags, [*job, *extra])
    with open_dict(cfg):  # what Hydra's app fills in at launch
        cfg.hydra.runtime.cwd = str(REPO)
        cfg.hydra.runtime.output_dir = str(REPO / "outputs" / "docs-test-never-written")
    HydraConfig.instance().set_config(cfg)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(job_cfg, resolve=True)  # every interpolation resolves
    resolve_aliases(job_cfg, explicit_sparsity=any(o.split("=", 1)[0].lstrip("+~") == "sparsity" for o in job))
    return job_cfg


@pytest.mark.parametrize("command", SPON_EXP, ids=[c.where for c in SPON_EXP])
def test_spon_exp_command_composes(command):
    _skip_if_needed(command)
    compose_command(command.args)


# --- the other entry points: their documented arguments parse --------------------------------

class _Parsed(Exception):
    pass


def _parser_of(program: str, monkeypatch) -> argparse.ArgumentParser:
    """The entry point's own parser: main() runs until it parses its arguments, no further."""
    def stop(self, args=None, namespace=None):
        raise _Parsed(self)

    main = importlib.import_module(ENTRY_POINTS[program]).main
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Parsed) as caught:
            main([])
    return caught.value.args[0]


@pytest.mark.parametrize("command", OTHERS, ids=[c.where for c in OTHERS])
def test_entry_point_arguments_parse(command, monkeypatch):
    _skip_if_needed(command)
    parser = _parser_of(command.program, monkeypatch)
    parser.allow_abbrev = False  # the docs spell every option out
    try:
        parser.parse_args(command.args)
    except SystemExit as e:
        pytest.fail(f"{command.where}: {command.program} {' '.join(command.args)}: argparse exit {e.code}")


# --- the extraction itself, and the README's length ------------------------------------------

def test_the_docs_show_commands():
    assert len(SPON_EXP) >= 20 and {c.program for c in OTHERS} == set(ENTRY_POINTS)
    assert any(c.args == [] for c in SPON_EXP), "the default run, plain spon-exp, is shown"


def test_extraction_joins_continuations_and_splits_chains(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\n$ spon-exp --multirun a=1,2 \\\n    b=3   # needs: gpu\n"
                   "./install.sh && spon-exp c=4 # a comment\n```\n```python\nspon-exp nope\n```\n")
    monkeypatch.setattr(f"{__name__}.DOCS", [doc])
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    got = [(c.where, c.program, c.args, c.needs) for c in documented_commands()]
    assert got == [("x.md:3", "spon-exp", ["--multirun", "a=1,2", "b=3"], "gpu"),
                   ("x.md:5", "spon-exp", ["c=4"], None)]


@pytest.mark.parametrize("args", [
    ["sparsifier=teel"],                        # no such config
    ["spon.lrr=1e-3"],                          # no such key
    ["sparsity=0.4,0.6"],                       # a sweep without --multirun
    ["--multirun", "-cd", "sweeps", "-cn", "no_such_sweep"],
    ["sparsity=0.4", "sparsifier.sparsity=0.6"],  # the alias disagrees
    ["--frobnicate"],
])
def test_a_broken_command_fails(args):
    with pytest.raises(Exception):
        compose_command(args)


def test_a_sweep_composes_its_first_combination():
    cfg = compose_command(["--multirun", "-cd", "sweeps", "-cn", "sparsity_curve_cpu", "spon.count=0,1"])
    assert (cfg.sparsity, cfg.seed, cfg.spon.count) == (0.25, 0, 0)
    assert compose_command(["sparsifier.sparsity=0.4"]).sparsity == 0.4


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/ (at most {README_MAX_LINES})"


# --- Python snippets: valid syntax, and every name they import exists ---------------------------

def _python_blocks():
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        fence, start, body = None, 0, []
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                if fence is None:
                    fence, start, body = stripped[3:].strip().lower(), number, []
                else:
                    if fence == "python":
                        yield f"{path.relative_to(REPO)}:{start}", textwrap.dedent("\n".join(body))
                    fence = None
            elif fence is not None:
                body.append(line)


PYTHON_BLOCKS = list(_python_blocks())


@pytest.mark.parametrize("where,code", PYTHON_BLOCKS, ids=[w for w, _ in PYTHON_BLOCKS])
def test_python_snippet_imports_exist(where, code):
    import ast

    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "spon_exp":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                    f"{where}: from {node.module} import {alias.name}: no such name"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "spon_exp":
                    importlib.import_module(alias.name)
