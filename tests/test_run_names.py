"""A run names the model that actually ran: model.path without model.name takes its name
from the path (results, folder, W&B, collect), a model config keeps its own name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_app import compose_cfg


@pytest.mark.parametrize("overrides,name", [
    ([], "smollm2-135m"),
    (["model=llama3_8b"], "llama3-8b"),
    (["model.path=/models/gemma-3-270m-q4_k_m.gguf"], "gemma-3-270m-q4_k_m"),
    (["model=llama3_8b", "model.path=google/gemma-3-270m"], "gemma-3-270m"),
    (["model.path=tiny-random:qwen3"], "tiny-random-qwen3"),
    (["model.path=/models/my model/"], "my_model"),
    (["model.path=/models/x.gguf", "model.name=mine"], "mine"),
])
def test_model_name_follows_the_path(overrides, name):
    assert compose_cfg(overrides).model.name == name


def test_a_run_on_another_family_is_named_for_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spon_exp.cli", "experiment=smoke", "model.path=tiny-random:qwen3",
                           f"paths.outputs={tmp_path}"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "runs").glob("*/*/results.json")
    results = json.loads(results_file.read_text())
    assert results["model"] == {**results["model"], "name": "tiny-random-qwen3", "path": "tiny-random:qwen3"}
    assert "tiny-random-qwen3" in results_file.parent.name and "model tiny-random-qwen3" in proc.stdout
