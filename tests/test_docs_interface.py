"""docs/interface.md and docs/run-folders-and-cache.md say what the code says.

interface.md lists every flag of every command with its ``--help`` text, Hydra's flags as
``spon-exp --hydra-help`` prints them, and every environment variable the package, its Hydra
plugin and install.sh read. run-folders-and-cache.md lists every key the config hash leaves out.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INTERFACE = REPO / "docs" / "interface.md"
ENTRY_POINTS = {  # console script -> module whose main(argv) builds its argparse parser
    "spon-exp-collect": "spon_exp.collect.cli",
    "spon-exp-export": "spon_exp.export.cli",
    "spon-exp-diagnose": "spon_exp.diagnostics.cli",
}


def flat(text: str) -> str:
    """Whitespace folded and Markdown table escapes undone, for comparing prose."""
    return " ".join(text.replace("\\|", "|").split())


def section(program: str) -> str:
    """The interface page's section of one command: from its heading to the next."""
    text = INTERFACE.read_text(encoding="utf-8")
    start = text.index(f"## `{program}`")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


class _Parsed(Exception):
    pass


def parser_of(program: str, monkeypatch) -> argparse.ArgumentParser:
    """The entry point's own parser: main() runs until it parses its arguments, no further."""
    def stop(self, args=None, namespace=None):
        raise _Parsed(self)

    main = importlib.import_module(ENTRY_POINTS[program]).main
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Parsed) as caught:
            main([])
    return caught.value.args[0]


@pytest.mark.parametrize("program", sorted(ENTRY_POINTS))
def test_every_flag_of_a_command_is_on_the_interface_page_with_its_help(program, monkeypatch):
    page = flat(section(program))
    for action in parser_of(program, monkeypatch)._actions:
        names = action.option_strings or [action.dest]
        for name in names:
            assert f"`{name}" in page or f"(`{name}`)" in page, f"{program}: {name} is not on docs/interface.md"
        assert action.help and flat(action.help) in page, f"{program} {names[0]}: its --help text {action.help!r} " \
                                                          f"is not on docs/interface.md"


def test_hydras_flags_are_on_the_interface_page():
    out = subprocess.run([sys.executable, "-m", "spon_exp.cli", "--hydra-help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO).stdout
    flags = out.split("== Flags ==", 1)[1].split("== Configuration groups ==", 1)[0]
    page = flat(section("spon-exp"))
    listed = re.findall(r"^(--[\w-]+(?:,-\w+)?) : (.*)$", flags, re.M)
    assert len(listed) >= 12, flags
    for spelling, help_text in listed:
        for name in spelling.split(","):
            assert f"`{name}`" in page, f"Hydra's {name} is not on docs/interface.md"
        assert flat(help_text).rstrip(":") in page, f"Hydra's help for {spelling} ({help_text!r}) is not on docs/interface.md"


ENV_NAME = r"""["']([A-Z][A-Z0-9_]*_[A-Z0-9_]*|[A-Z]{2,})["']"""


def environment_variables() -> set[str]:
    """Every variable the package, its Hydra plugin and install.sh read: the names on a line
    that touches ``os.environ`` / ``getenv`` (literally, or through a module constant such as
    ``SLURM_VARS``), OmegaConf's ``oc.env:``, and ``${NAME:-...}`` / ``${NAME-...}`` in install.sh."""
    names = set()
    for path in [*REPO.glob("spon_exp/**/*.py"), *REPO.glob("hydra_plugins/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        names |= set(re.findall(r"oc\.env:([A-Z][A-Z0-9_]+)", text))
        for line in text.splitlines():
            if "os.environ" not in line and "getenv(" not in line:
                continue
            names |= set(re.findall(ENV_NAME, line))
            for constant in re.findall(r"\b([A-Z][A-Z0-9_]{2,})\b", line):
                value = re.search(rf"^{constant}\s*=\s*(\(.*?\)|[^\n]+)", text, re.M | re.S)
                if value:
                    names |= set(re.findall(ENV_NAME, value.group(1)))
    names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+):?-", (REPO / "install.sh").read_text(encoding="utf-8")))
    return names


def test_every_environment_variable_the_package_reads_is_on_the_interface_page():
    found = environment_variables()
    # the extraction sees the variables it must (one of each way of reading them)
    assert {"SPON_EXP_CACHE", "SPON_EXP_OUTPUTS", "SPON_EXP_DISABLE_SPARSE_KERNEL", "HF_ENDPOINT",
            "MALLOC_MMAP_THRESHOLD_", "SLURM_ARRAY_TASK_ID", "PYTHON", "HYDRA_FULL_ERROR"} <= found, found
    page = INTERFACE.read_text(encoding="utf-8")
    missing = sorted(name for name in found if f"`{name}`" not in page)
    assert not missing, f"docs/interface.md does not list {missing}"


def _yaml_text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def test_every_key_left_out_of_the_config_hash_is_in_run_folders_and_cache():
    from spon_exp.tracking import identity

    text = (REPO / "docs" / "run-folders-and-cache.md").read_text(encoding="utf-8")
    page = text[text.index("## What names a run"):text.index("## The cache")]
    keys = [*identity.NON_IDENTITY_KEYS, "spon.checkpoint_every",
            *(f"sparsifier.{k}" for k in identity.NOT_SPARSIFIER_SETTINGS)]
    for group, options in identity.NEW_OPTION_DEFAULTS.items():
        prefix = "eval.ppl" if group == "ppl" else group
        keys += [f"{prefix}.{k}={_yaml_text(v)}" for k, v in options.items()]
    missing = [k for k in keys if f"`{k}`" not in page and f"`{k} " not in page]
    assert not missing, f"docs/run-folders-and-cache.md, 'What names a run', does not list {missing}"
