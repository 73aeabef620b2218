"""The C kernels are .c files of the package, each with one stated FMA rule, built by the one
helper (spon_exp/kernels/cbuild.py), shipped as package data, and warning-free under
-Wall -Wextra -Werror with the compiler that helper uses, with and without OpenMP."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from spon_exp.kernels import cbuild

ROOT = Path(__file__).resolve().parents[1]
C_FILES = sorted(cbuild.SOURCE_DIR.glob("*.c"))


def test_every_c_file_is_a_kernel_of_the_build_helper():
    assert C_FILES, "no .c kernels found beside spon_exp/kernels/cbuild.py"
    assert sorted(k.path for k in cbuild.KERNELS) == C_FILES
    assert len({k.library for k in cbuild.KERNELS}) == len(cbuild.KERNELS)


@pytest.mark.parametrize("kernel", cbuild.KERNELS, ids=lambda k: k.source)
def test_each_kernel_states_one_fma_rule(kernel):
    contract = [f for f in kernel.flags if f.startswith("-ffp-contract=")]
    assert len(contract) == 1, f"{kernel.source}: the flags must name the FMA rule once (-ffp-contract=...)"
    assert "-mfma" not in kernel.flag_list(), "FMA instructions come from a target attribute, never the command line"
    head = kernel.text().split("*/", 1)[0]
    rule = re.search(r"FMA rule: (FUSED|NONE)\b", head)
    assert rule, f"{kernel.source}: the top comment must state 'FMA rule: FUSED' or 'FMA rule: NONE'"
    assert contract[0] in head, f"{kernel.source}: the top comment must name its flag {contract[0]}"
    assert f"``{kernel.source}``" in cbuild.__doc__, "the build helper's docstring lists every kernel's rule"
    expected = {"FUSED": "-ffp-contract=fast", "NONE": "-ffp-contract=off"}[rule.group(1)]
    assert contract[0] == expected


def test_c_files_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["spon_exp.kernels"]
    for path in C_FILES:
        assert any(fnmatch.fnmatch(path.name, p) for p in patterns), f"{path.name} is not in package-data"


def _openmp_works(cc: str, tmp_path: Path) -> bool:
    src = tmp_path / "omp_probe.c"
    src.write_text("int probe(void) { return 0; }\n")
    return subprocess.run([cc, "-fopenmp", "-fPIC", "-shared", str(src), "-o", str(tmp_path / "omp_probe.so")],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "no-openmp"])
@pytest.mark.parametrize("kernel", cbuild.KERNELS, ids=lambda k: k.source)
def test_kernel_compiles_without_warnings(kernel, openmp, tmp_path):
    cc = cbuild.compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine (set CC): the kernels fall back to torch")
    if openmp and not _openmp_works(cc, tmp_path):
        pytest.skip(f"{cc} does not support -fopenmp")
    proc = cbuild.check_warnings(kernel, cc, openmp=openmp, dest=tmp_path / f"{kernel.library}.so")
    assert proc.returncode == 0, f"{kernel.source} with {' '.join(cbuild.WARNING_FLAGS)}:\n{proc.stderr}"
