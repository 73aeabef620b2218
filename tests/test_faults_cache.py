"""Cache integrity: nothing lost, nothing silently wrong.

A cache entry that is truncated, altered, stripped of its manifest or left half-written is
moved aside with one warning naming it and recomputed, and the run ends ok with the same
figures; a finished run survives a failed re-attempt in its folder; a full disk fails the
run clearly without leaving a partial entry; runs sharing one cache agree.

(Kills and interrupted training: tests/test_faults.py.)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spon_exp import runner
from spon_exp.evaluation import offline_data
from spon_exp.models import loading
from spon_exp.runner import run
from spon_exp.tracking import store
from spon_exp.tracking.identity import alpha_key
from tests.test_app import SMALL, compose_cfg, strip_hydra

SMALL_RUN = [*SMALL, "logger=none"]
DATA_FILE = {"sparsifier": "sparse_state.safetensors", "alpha": "alpha.safetensors",
             "dense": "blocks.safetensors", "tokens": "tokens.safetensors"}
REPO = Path(__file__).resolve().parents[1]


def small(tmp_path: Path, *extra: str):
    return strip_hydra(compose_cfg([*SMALL_RUN, *extra], tmp_path))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:  # same size: only the checksum can tell
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 8, len(data)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def warnings_naming(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and str(path) in r.getMessage()]


def moved_aside(entry: Path) -> list[Path]:
    return sorted(entry.parent.glob(f"{entry.name}.corrupt-*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One finished run that wrote every cache entry: ``(root, results)``; tests copy its caches."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPON_EXP_CACHE", str(root / "home"))
        results = run(small(root), root / "run")
    assert results["cache"] == {**results["cache"], "sparsifier": "miss", "dense": "miss", "alpha": "miss"}
    return root, results


@pytest.fixture
def copied_caches(reference, tmp_path, monkeypatch):
    """The reference run's caches (run folder cache + $SPON_EXP_CACHE) copied into tmp_path."""
    root, results = reference
    shutil.copytree(root / "outputs", tmp_path / "outputs")
    shutil.copytree(root / "home", tmp_path / "home")
    monkeypatch.setenv("SPON_EXP_CACHE", str(tmp_path / "home"))
    return results


def entry_of(kind: str, tmp_path: Path, results: dict) -> Path:
    cache = tmp_path / "outputs" / "cache"
    if kind == "tokens":
        return min((tmp_path / "home" / "tokens").iterdir())
    return cache / kind / results["cache"][f"{kind}_key"]


def same_figures(a: dict, b: dict) -> None:
    assert a["status"] == b["status"] == "ok"
    assert a["ppl"] == b["ppl"] and a["gap_closure"] == b["gap_closure"]


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "no_manifest"])
@pytest.mark.parametrize("kind", ["sparsifier", "alpha", "dense", "tokens"])
def test_a_damaged_entry_is_moved_aside_and_recomputed(kind, damage, copied_caches, tmp_path, caplog):
    entry = entry_of(kind, tmp_path, copied_caches)
    data = entry / DATA_FILE[kind]
    if damage == "truncate":
        truncate(data)
    elif damage == "flip_bytes":
        flip_bytes(data)
    else:
        (entry / store.MANIFEST).unlink()
    damaged = data.read_bytes()
    caplog.set_level(logging.WARNING)
    results = run(small(tmp_path), tmp_path / "run")
    same_figures(results, copied_caches)
    if kind != "tokens":
        assert results["cache"][kind] == "miss"
    assert len(warnings_naming(caplog, entry)) == 1, caplog.text
    assert [r for r in caplog.records if "is damaged" in r.getMessage()] == \
        [r for r in caplog.records if str(entry) in r.getMessage()]
    (aside,) = moved_aside(entry)
    assert (aside / DATA_FILE[kind]).read_bytes() == damaged
    assert store.damage(entry) is None  # written again, whole
    again = run(small(tmp_path), tmp_path / "again")
    same_figures(again, copied_caches)
    if kind != "tokens":
        assert again["cache"][kind] == "hit"


@pytest.mark.parametrize("kind", ["sparsifier", "alpha", "dense", "tokens"])
def test_a_stray_temp_folder_of_a_killed_writer_is_never_read(kind, copied_caches, tmp_path, caplog):
    entry = entry_of(kind, tmp_path, copied_caches)
    stray = entry.with_name(f".{entry.name}.99999.0badcafe.tmp")
    entry.rename(stray)  # the writer died before its rename: the entry is absent, the temp folder half full
    truncate(stray / DATA_FILE[kind])
    (stray / store.MANIFEST).unlink()
    caplog.set_level(logging.WARNING)
    results = run(small(tmp_path), tmp_path / "run")
    same_figures(results, copied_caches)
    if kind != "tokens":
        assert results["cache"][kind] == "miss"
    assert not warnings_naming(caplog, entry) and not moved_aside(entry)  # nothing was damaged, only absent
    assert store.damage(entry) is None


def test_a_damaged_packaged_model_copy_is_converted_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPON_EXP_CACHE", str(tmp_path / "home"))
    conversions = []

    def convert(folder: Path) -> None:  # stands in for the GGUF conversion: a tiny model, a real tokenizer
        conversions.append(folder)
        tiny = loading.load_model("tiny-random:llama")
        tiny.model.save_pretrained(folder)
        tiny.tokenizer.save_pretrained(folder)

    monkeypatch.setattr(loading, "_convert_packaged", convert)
    packaged = ["model.path=packaged:smollm2-135m-instruct"]
    first = run(small(tmp_path, *packaged), tmp_path / "a")
    entry = loading.packaged_model_dir()
    assert len(conversions) == 1 and store.damage(entry) is None
    truncate(entry / "model.safetensors")
    caplog.set_level(logging.WARNING)
    second = run(small(tmp_path, *packaged), tmp_path / "b")
    same_figures(second, first)
    assert len(conversions) == 2 and len(warnings_naming(caplog, entry)) == 1, caplog.text
    assert len(moved_aside(entry)) == 1 and store.damage(entry) is None


def test_damaged_offline_lm_eval_data_and_task_folder_are_written_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPON_EXP_CACHE", str(tmp_path / "home"))
    conversions = []
    convert = offline_data.CONVERTERS["piqa"]
    monkeypatch.setitem(offline_data.CONVERTERS, "piqa", lambda: conversions.append(1) or convert())
    zeroshot = ["eval.zeroshot.tasks=[piqa]", "eval.zeroshot.limit=2"]
    first = run(small(tmp_path, *zeroshot), tmp_path / "a")
    assert len(conversions) == 1  # converted once, then read back by each variant's evaluation
    data = offline_data.data_root() / "piqa"
    (tasks,) = (tmp_path / "home" / "lm_eval_data").glob("tasks-*")
    truncate(data / "validation.jsonl")
    (tasks / store.MANIFEST).unlink()
    caplog.set_level(logging.WARNING)
    second = run(small(tmp_path, *zeroshot), tmp_path / "b")
    same_figures(second, first)
    assert second["zeroshot"]["average"] == first["zeroshot"]["average"] and len(conversions) == 2
    for entry in (data, tasks):
        assert len(warnings_naming(caplog, entry)) == 1, caplog.text
        assert len(moved_aside(entry)) == 1 and store.damage(entry) is None


def test_a_damaged_training_checkpoint_restarts_training_from_step_0(tmp_path, monkeypatch, caplog):
    overrides = ["spon.steps=6", "spon.checkpoint_every=2"]
    reference = run(small(tmp_path, *overrides, f"paths.cache={tmp_path / 'other_cache'}"), tmp_path / "reference")
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # steps 0-3 done, checkpoint of step 4 on disk
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(small(tmp_path, *overrides), tmp_path / "run")
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    cfg = small(tmp_path, *overrides)
    # calib.bos=auto resolves to none: the tiny tokenizer puts no BOS
    checkpoint = tmp_path / "outputs" / "cache" / "alpha" / f"{alpha_key(cfg, 'none')}.checkpoint"
    truncate(checkpoint / "train.ckpt")
    caplog.set_level(logging.WARNING)
    results = run(cfg, tmp_path / "run")
    same_figures(results, reference)
    assert results["spon"]["resumed_from"] == 0 and results["spon"]["loss_curve"] == reference["spon"]["loss_curve"]
    assert len(warnings_naming(caplog, checkpoint)) == 1, caplog.text
    assert len(moved_aside(checkpoint)) == 1
    assert not checkpoint.exists()  # removed once the trained α is cached


def test_a_failed_attempt_never_replaces_a_finished_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    first = run(small(tmp_path), run_dir)
    kept = {name: (run_dir / name).read_bytes() for name in ("results.json", "env.json", "config.yaml")}

    def broken(*args, **kwargs):
        raise RuntimeError("the dense baseline broke")

    monkeypatch.setattr(runner, "_dense_baseline", broken)
    with pytest.raises(RuntimeError, match="dense baseline broke"):
        run(small(tmp_path), run_dir)
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
    assert json.loads(kept["results.json"])["status"] == "ok"
    attempt = json.loads((run_dir / "results.attempt-1.json").read_text())
    assert attempt["status"] == "failed" and "dense baseline broke" in attempt["error"]
    assert (run_dir / "error.attempt-1.txt").exists() and not (run_dir / "error.txt").exists()
    monkeypatch.undo()
    again = run(small(tmp_path), run_dir)
    on_disk = json.loads((run_dir / "results.attempt-2.json").read_text())  # a successful attempt stays beside it
    assert on_disk == json.loads(json.dumps(again, default=str)) and on_disk["started_at"] != first["started_at"]
    same_figures(again, first)
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept  # the finished run is never written
    assert (run_dir / "results.attempt-1.json").exists()  # the failed one stays as its record


def test_a_full_disk_fails_the_run_clearly_and_leaves_no_partial_entry(copied_caches, tmp_path, monkeypatch):
    alpha_entry = entry_of("alpha", tmp_path, copied_caches)
    shutil.rmtree(alpha_entry)
    sealed = store._seal

    def disk_full(folder: Path) -> None:
        if folder.parent.name == "alpha":
            (folder / "half_written").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        sealed(folder)

    monkeypatch.setattr(store, "_seal", disk_full)
    with pytest.raises(OSError, match="No space left on device") as failure:
        run(small(tmp_path), tmp_path / "full")
    assert str(alpha_entry) in str(failure.value) and "free some disk space" in str(failure.value)
    failed = json.loads((tmp_path / "full" / "results.json").read_text())
    assert failed["status"] == "failed" and "No space left on device" in failed["error"]
    assert list(alpha_entry.parent.iterdir()) == []  # neither an entry nor a temp folder
    monkeypatch.setattr(store, "_seal", sealed)
    again = run(small(tmp_path), tmp_path / "again")
    same_figures(again, copied_caches)
    assert again["cache"]["alpha"] == "miss" and store.damage(alpha_entry) is None


def test_two_runs_sharing_one_cache_both_finish_ok_with_identical_alpha(tmp_path):
    env = {**os.environ, "SPON_EXP_CACHE": str(tmp_path / "home")}
    command = [sys.executable, "-m", "spon_exp.cli", *SMALL_RUN, f"paths.outputs={tmp_path / 'outputs'}"]
    procs = [subprocess.Popen([*command, f"hydra.run.dir={tmp_path / name}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("a", "b"))
    same_figures(a, b)
    alpha_a, alpha_b = (load_file(str(tmp_path / name / "alpha.safetensors")) for name in ("a", "b"))
    assert alpha_a.keys() == alpha_b.keys() and all(torch.equal(alpha_a[k], alpha_b[k]) for k in alpha_a)
    entries = [e for root in (tmp_path / "outputs" / "cache", tmp_path / "home") for e in root.glob("*/*")]
    assert entries and all(store.damage(e) is None for e in entries), entries  # no temp folder, nothing aside


def test_the_first_whole_entry_wins_unless_replacing(tmp_path, caplog):
    entry = tmp_path / "entry"
    store.write_entry(entry, lambda d: (d / "x.txt").write_text("first"))
    store.write_entry(entry, lambda d: (d / "x.txt").write_text("second"))  # another writer, same key
    assert store.read_entry(entry, lambda d: (d / "x.txt").read_text(), "test entry") == "first"
    store.write_entry(entry, lambda d: (d / "x.txt").write_text("third"), replace=True)
    assert store.read_entry(entry, lambda d: (d / "x.txt").read_text(), "test entry") == "third"
    assert not [p for p in tmp_path.iterdir() if p != entry]  # no temp or old folder left behind
    caplog.set_level(logging.WARNING)
    assert store.read_entry(entry, lambda d: int((d / "x.txt").read_text()), "test entry") is None  # cannot parse
    assert len(warnings_naming(caplog, entry)) == 1 and not entry.exists() and len(moved_aside(entry)) == 1


def _stress_writer(folder: str, rounds: int, seed: int) -> None:
    import random

    from spon_exp.tracking.store import write_entry

    rng = random.Random(seed)
    for _ in range(rounds):
        token = f"{seed}-{rng.random()}" * rng.randint(1, 2000)  # files of varying size

        def fill(tmp: Path) -> None:
            (tmp / "a.txt").write_text(token)
            (tmp / "b.txt").write_text(token)

        write_entry(folder, fill, replace=True)


def _stress_reader(folder: str, rounds: int, results) -> None:
    from spon_exp.tracking.store import read_entry

    def read(entry: Path) -> str:
        a, b = (entry / "a.txt").read_text(), (entry / "b.txt").read_text()
        if a != b:
            raise AssertionError("a mixed entry")
        return a

    seen = mixed = 0
    for _ in range(rounds):
        try:
            seen += read_entry(folder, read, "stress entry") is not None
        except AssertionError:
            mixed += 1
    results.put((seen, mixed))


def test_concurrent_readers_and_replacing_writers_never_damage_or_mix_an_entry(tmp_path, caplog):
    """Several processes write the same entry (replace=True, as training checkpoints do) while
    others read it: no entry is ever moved aside as damaged and no reader sees files of two
    different writes."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    folder = str(tmp_path / "entry")
    results = ctx.Queue()
    procs = [ctx.Process(target=_stress_writer, args=(folder, 150, seed)) for seed in range(3)]
    procs += [ctx.Process(target=_stress_reader, args=(folder, 400, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    counts = [results.get(timeout=10) for _ in range(3)]
    assert all(mixed == 0 for _, mixed in counts)
    assert sum(seen for seen, _ in counts) > 100  # the readers really read entries, not only misses
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "entry"]
    assert not [n for n in leftovers if ".corrupt-" in n], leftovers  # nothing moved aside as damaged
    from spon_exp.tracking.store import damage

    assert damage(folder) is None
