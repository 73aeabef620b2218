"""keep_freed_memory: allocations up to 32 MB come from the heap and stay there when freed; the
spon-exp CLI applies it to CPU runs only, and not with malloc_tuning=false."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import ctypes, json, sys

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 << 20

    def allocate_and_free():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)  # touch it: its pages are faulted in
        mapped = libc.mallinfo2().hblkhd >= size
        libc.free(p)
        return {"mapped": mapped, "kept_after_free": libc.mallinfo2().keepcost >= size}

    before = allocate_and_free()  # glibc's defaults: a fresh mapping, unmapped on free
    sys.path.insert(0, sys.argv[1])
    from spon_exp.hostmem import keep_freed_memory
    print(json.dumps({"before": before, "set": keep_freed_memory(), "after": allocate_and_free(),
                      "again": allocate_and_free()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_serves_large_temporaries_from_the_heap_and_keeps_them(tmp_path):
    import ctypes
    import json
    from pathlib import Path

    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* settings of the user's
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", SCRIPT, root], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["before"] == {"mapped": True, "kept_after_free": False}  # the control: glibc's defaults
    assert report["set"] is True
    assert report["after"] == {"mapped": False, "kept_after_free": True}
    assert report["again"] == {"mapped": False, "kept_after_free": True}


def test_keep_freed_memory_leaves_a_users_own_settings(monkeypatch):
    from spon_exp.hostmem import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False


# ------------------------------------------------------------------ which runs tune malloc


@pytest.mark.parametrize("overrides,tuned", [
    ([], True),  # the default: model.device=cpu
    (["model.device=cuda"], False),
    (["model.device=cuda:1"], False),
    (["model.device_map=auto"], False),  # accelerate places the model: GPUs
    (["malloc_tuning=false"], False),
])
def test_malloc_tuning_applies_to_cpu_runs_only(overrides, tuned):
    from spon_exp.hostmem import applies_to_run
    from tests.test_app import compose_cfg

    cfg = compose_cfg(overrides)
    assert applies_to_run(cfg.model.device, cfg.model.device_map, cfg.malloc_tuning) is tuned


def test_malloc_tuning_is_no_part_of_a_runs_identity():
    """Neither the option's value nor its absence (the config.yaml of a run written before it
    existed) changes a run's hash, cache keys, W&B id or sweep folder name."""
    from omegaconf import open_dict

    from spon_exp.tracking.identity import RunIdentity
    from tests.test_app import compose_cfg

    base = compose_cfg([])
    identity = RunIdentity.of(base)
    assert RunIdentity.of(compose_cfg(["malloc_tuning=false"])) == identity
    with open_dict(base):
        del base["malloc_tuning"]
    assert RunIdentity.of(base) == identity
    assert "malloc_tuning" in base.hydra.job.config.override_dirname.exclude_keys


CLI_PATCH = textwrap.dedent("""
    import json, sys
    import spon_exp.hostmem, spon_exp.runner, spon_exp.tracking.summary
    log = open(sys.argv[1], "a")

    def keep_freed_memory():
        log.write(json.dumps({"tuned": True}) + "\\n"); log.flush()
        return True

    def run(cfg, run_dir, hydra_files=None):
        log.write(json.dumps({"device": cfg.model.device, "malloc_tuning": cfg.malloc_tuning}) + "\\n"); log.flush()
        return {"status": "ok"}

    spon_exp.hostmem.keep_freed_memory = keep_freed_memory
    spon_exp.runner.run = run
    spon_exp.tracking.summary.summary_table = lambda results: ""
    sys.argv = ["spon-exp", *sys.argv[2:]]
    from spon_exp.cli import main
    main()
""")


def test_the_cli_tunes_malloc_for_a_cpu_run_only(tmp_path):
    """The spon-exp CLI (a sweep of four jobs in one process, the run itself stubbed): only the
    CPU job with malloc_tuning on calls keep_freed_memory, before its run."""
    calls = tmp_path / "calls.jsonl"
    proc = subprocess.run([sys.executable, "-c", CLI_PATCH, str(calls), "--multirun", "model=tiny_random",
                           "logger=none", "model.device=cuda,cpu", "malloc_tuning=true,false",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.outputs={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in calls.read_text().splitlines()]
    tuned_before = {}
    for i, event in enumerate(events):
        if "device" in event:
            tuned_before[(event["device"], event["malloc_tuning"])] = i > 0 and events[i - 1] == {"tuned": True}
    assert tuned_before == {("cuda", True): False, ("cuda", False): False, ("cpu", True): True,
                            ("cpu", False): False}
    assert sum(e == {"tuned": True} for e in events) == 1
