"""Bad inputs stop before the model loads with one line naming what is wrong (exit code 2, no
traceback unless --verbose); Ctrl-C ends with a line saying how to resume (exit code 130),
and the re-run resumes.

(Killed runs and resumed training: tests/test_faults.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from spon_exp import hub
from spon_exp.assets import packaged_path
from spon_exp.config import ConfigError, validate
from spon_exp.data.corpora import check_corpus_size
from spon_exp.models import loading
from spon_exp.models.loading import SMOLLM2, SMOLLM2_GGUF, model_context_length
from spon_exp.runner import RunInterrupted, run
from tests.test_app import SMALL, compose_cfg, strip_hydra

SMOKE = ["experiment=smoke", "logger=none"]


@pytest.fixture()
def bad(tmp_path):
    """Files a user could point a run at by mistake."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 8)  # 0x80 is no UTF-8 start byte
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blank.txt").write_text("\n\n  \n\n")
    (folder / "no_text.jsonl").write_text('{"text": "a passage"}\n{"content": "no text field"}\n')
    (folder / "not_json.jsonl").write_text('{"text": "ok"}\n\n{text: unquoted}\n')
    (folder / "tiny.txt").write_text("x" * 200)  # one passage: it goes to the evaluation split
    (folder / "garbage.gguf").write_bytes(b"<html>404 Not Found</html>")
    (folder / "damaged.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 13)
    (folder / "not_a_model").mkdir()
    (folder / "not_a_model" / "README.md").write_text("notes")
    (folder / "bad_config").mkdir()
    (folder / "bad_config" / "config.json").write_text("{not json")
    many = "\n\n".join(f"Passage {i} about topic {i % 7}, long enough to fill some tokens." for i in range(100))
    (folder / "enough.txt").write_text(many)
    return folder


# ---------------------------------------------------------------- checks in validate()

def rejects(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as raised:
        validate(strip_hydra(compose_cfg(SMALL + overrides, tmp_path)))
    text = str(raised.value)
    assert message in text, text
    assert "\n" not in text  # one line
    return text


@pytest.mark.parametrize("overrides,message", [
    (["eval.ppl.seq_len=100000"], "eval.ppl.seq_len=100000 is longer than the model's context: "
                                  "tiny-random:llama has 512 positions (max_position_embeddings); "
                                  "use eval.ppl.seq_len=512 or less"),
    (["calib.seq_len=513"], "calib.seq_len=513 is longer than the model's context"),
    (["eval=teal_sliding"], "eval.ppl.context + eval.ppl.window = 2047 + 512 is longer than the model's context"),
    (["eval=teal_sliding", "eval.ppl.context=300", "eval.ppl.window=212"], "use eval.ppl.context=299 or less"),
    (["model.path=tiny-random:gpt9"], "No tiny config for family 'gpt9'"),
    (["model.device=gpu"], "Unknown device 'gpu'"),
    (["model.device=cuda:64"], "cuda:64"),
    (["model.dtype=float8"], "Unknown dtype 'float8'"),
    (["spon.projections=attn"], "spon.projections: Unknown projection set 'attn'"),
    (["spon.projections=[q_proj,w9]"], "spon.projections: Unknown projection names ['w9']"),
    (["spon.projections=[]"], "spon.projections: An empty projection list selects nothing"),
])
def test_lengths_devices_and_dtypes_are_checked_against_the_model(overrides, message, tmp_path):
    rejects(overrides, message, tmp_path)


def test_lengths_within_the_context_pass(tmp_path):
    validate(strip_hydra(compose_cfg(SMALL + ["calib.seq_len=512", "eval=teal_sliding", "eval.ppl.context=255",
                                              "eval.ppl.window=256"], tmp_path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_fails_in_one_line(tmp_path):
    rejects(["model.device=cuda"], "Device 'cuda' is not available on this machine", tmp_path)


def test_context_is_read_from_packaged_and_gguf_models_without_loading_weights(tmp_path):
    gguf = packaged_path(SMOLLM2, SMOLLM2_GGUF)
    assert model_context_length(loading.PACKAGED) == 8192
    assert model_context_length(str(gguf)) == 8192  # the GGUF metadata
    assert model_context_length(str(loading.packaged_model_dir())) == 8192  # a local folder's config.json
    rejects([f"model.path={gguf}", "eval.ppl.seq_len=9000"], "has 8192 positions", tmp_path)


def test_a_hub_id_is_not_checked_while_offline(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0, refresh=False: False)
    assert model_context_length("no-such-org-xyz/no-such-model") is None


@pytest.mark.parametrize("name,overrides,message", [
    ("binary.txt", ["calib.corpus={}"], "binary.txt is not UTF-8 text (byte 128: invalid start byte)"),
    ("empty.txt", ["calib.corpus={}"], "empty.txt is empty"),
    ("blank.txt", ["eval.ppl.corpora=[{}]"], "blank.txt holds no text"),
    ("no_text.jsonl", ["eval.ppl.corpora=[{}]"], "no_text.jsonl line 2 has no 'text' field"),
    ("not_json.jsonl", ["calib.corpus={}"], "not_json.jsonl line 3 is not JSON"),
    ("tiny.txt", ["calib.corpus={}"], "is too small for calibration: of its 1 passage, 0 go to calibration, 0 to "
                                      "validation and 1 to evaluation (split by hash: half to evaluation, a fifth of "
                                      "the rest to validation), the calibration split has 0 tokens, "
                                      "and calib.seq_len=64 needs 64; add passages"),
    ("tiny.txt", ["eval.ppl.corpora=[{}]", "eval.ppl.seq_len=256"],
     "is too small for evaluation: of its 1 passage, 0 go to calibration, 0 to validation and 1 to evaluation (split "
     "by hash: half to evaluation, a fifth of the rest to validation), the evaluation split has 200 tokens, and "
     "eval.ppl.seq_len=256 needs 256; use eval.ppl.seq_len=200 or less"),
    ("not_a_model", ["model.path={}"], "not_a_model is not a model folder: it has no config.json"),
    ("bad_config", ["model.path={}"], "bad_config/config.json is not a model config transformers can read"),
    ("garbage.gguf", ["model.path={}"], "garbage.gguf is not a GGUF file: it does not start with the bytes 'GGUF'"),
    ("damaged.gguf", ["model.path={}"], "damaged.gguf is not a readable GGUF file"),
])
def test_corpora_and_model_files_are_checked(bad, name, overrides, message, tmp_path):
    text = rejects([o.format(bad / name) for o in overrides], message, tmp_path)
    assert str(bad / name) in text  # the file is named


def test_a_large_enough_local_corpus_passes_and_its_tokens_are_cached(bad, tmp_path, monkeypatch):
    monkeypatch.setenv("SPON_EXP_CACHE", str(tmp_path / "cache"))
    corpus = str(bad / "enough.txt")
    validate(strip_hydra(compose_cfg(SMALL + [f"calib.corpus={corpus}", f"eval.ppl.corpora=[{corpus}]"], tmp_path)))
    entries = [e for e in (tmp_path / "cache" / "tokens").iterdir() if not e.name.startswith(".")]
    assert len(entries) == 2  # both splits tokenised once, the run re-uses them


def test_without_a_tokenizer_the_split_is_bounded_by_its_bytes(bad):
    with pytest.raises(ValueError, match=r"the calibration split has 0 bytes, so at most that many tokens"):
        check_corpus_size(str(bad / "tiny.txt"), {"calibration": (64, "calib.seq_len=64")}, tokenizer=None)
    check_corpus_size(str(bad / "tiny.txt"), {"evaluation": (200, "eval.ppl.seq_len=200")}, tokenizer=None)


# ---------------------------------------------------------------- the CLI: one line, exit code 2

def cli(args, tmp_path, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spon_exp.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=tmp_path)


BAD_INPUTS = [  # (override, what the one line must say); {} is the folder of bad files
    ("eval.ppl.seq_len=100000", "eval.ppl.seq_len=100000 is longer than the model's context"),
    ("eval=teal_sliding", "eval.ppl.context + eval.ppl.window = 2047 + 512"),
    ("calib.corpus={}/binary.txt", "{}/binary.txt is not UTF-8 text"),
    ("calib.corpus={}/empty.txt", "{}/empty.txt is empty"),
    ("eval.ppl.corpora=[{}/no_text.jsonl]", "{}/no_text.jsonl line 2 has no 'text' field"),
    ("calib.corpus={}/tiny.txt", "0 go to calibration, 0 to validation and 1 to evaluation"),
    ("model.path={}/not_a_model", "{}/not_a_model is not a model folder: it has no config.json"),
    ("model.path={}/garbage.gguf", "{}/garbage.gguf is not a GGUF file"),
    ("model.dtype=float8", "Unknown dtype 'float8'"),
    ("model.device=gpu", "Unknown device 'gpu'"),
    ("sparsity=1.5", "sparsity must be a number in [0, 1)"),
] + ([] if torch.cuda.is_available() else [("model.device=cuda", "Device 'cuda' is not available")])


@pytest.mark.parametrize("override,message", BAD_INPUTS, ids=[b[0].split("/")[-1] for b in BAD_INPUTS])
def test_cli_bad_input_one_line_exit_2_before_the_model_loads(override, message, bad, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli([*SMOKE, override.format(bad), f"hydra.run.dir={run_dir}", f"paths.outputs={tmp_path / 'out'}"],
               tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("spon-exp: error: "), proc.stderr[-3000:]
    assert message.format(bad) in lines[0]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and message.format(bad) in results["error"]
    assert "load_model" not in results["timings"]  # stopped before the model loaded


@pytest.mark.parametrize("how", [["--verbose"], "SPON_EXP_VERBOSE", "HYDRA_FULL_ERROR"])
def test_verbose_adds_the_traceback_to_the_one_line(how, tmp_path):
    flag = how if isinstance(how, list) else []
    env = {} if flag else {how: "1"}
    proc = cli([*flag, *SMOKE, "eval.ppl.seq_len=100000", f"hydra.run.dir={tmp_path / 'run'}",
                f"paths.outputs={tmp_path / 'out'}"], tmp_path, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert lines[-1].startswith("spon-exp: error: eval.ppl.seq_len=100000")


def in_subprocess(patch: str, args, tmp_path) -> subprocess.Popen:
    """The CLI with ``args``, after running ``patch`` (Python source) in the same process. Ctrl-C
    raises KeyboardInterrupt there, as in a terminal, even when this suite runs with SIGINT
    ignored (started with ``&`` from a script, whose children inherit the ignore)."""
    script = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n" + \
        textwrap.dedent(patch) + textwrap.dedent(f"""
        import sys
        sys.argv = ["spon-exp", *{list(args)!r}]
        from spon_exp.cli import main
        main()
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)


def test_a_bug_still_shows_its_traceback(tmp_path):
    patch = """
        import spon_exp.runner
        def broken(*args, **kwargs):
            raise RuntimeError("a bug, not a user error")
        spon_exp.runner._run_stages = broken
    """
    proc = in_subprocess(patch, [*SMOKE, f"hydra.run.dir={tmp_path / 'run'}", f"paths.outputs={tmp_path / 'out'}"],
                         tmp_path)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1
    assert "Traceback" in err and "RuntimeError: a bug, not a user error" in err and "spon-exp: error" not in err


def test_multirun_records_the_failing_job_and_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(["--multirun", *SMOKE, "sparsity=1.5,0.5", f"hydra.sweep.dir={sweep}",
                f"paths.outputs={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]  # the sweep reports its failed job ...
    assert "Traceback" not in proc.stderr  # ... in one line, and the rest ran
    errors = [line.rsplit("\r", 1)[-1] for line in proc.stderr.splitlines() if "spon-exp: error:" in line]
    assert errors[0] == "spon-exp: error: sparsity=1.5: sparsity must be a number in [0, 1), got 1.5 (e.g. sparsity=0.5 for 50 %)"
    assert errors[1].startswith("spon-exp: error: 1 job(s) of the sweep failed") and len(errors) == 2
    results = {json.loads(p.read_text())["sparsity"]["target"]: json.loads(p.read_text())
               for p in sweep.rglob("results.json")}
    assert results[1.5]["status"] == "failed" and "sparsity must be a number in [0, 1)" in results[1.5]["error"]
    assert results[0.5]["status"] == "ok"


# ---------------------------------------------------------------- Ctrl-C

def train_steps(run_dir: Path) -> list[int]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [e["step"] for e in events if e.get("event") == "train"]


def test_ctrl_c_in_training_says_where_and_the_rerun_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMOKE, "spon.steps=60", "spon.checkpoint_every=10", f"hydra.run.dir={run_dir}",
            f"paths.outputs={tmp_path / 'out'}"]
    # Ctrl-C arrives during step 25 (after two checkpoints), from inside the process: the point
    # is fixed, however fast or busy the machine
    patch = """
        import os, signal
        from spon_exp.spon import train
        original = train._step
        def step(*args, **kwargs):
            if args[-1] == 25:
                os.kill(os.getpid(), signal.SIGINT)
            return original(*args, **kwargs)
        train._step = step
    """
    proc = in_subprocess(patch, args, tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    prefix = "spon-exp: interrupted at step "
    assert last.startswith(prefix) and "Traceback" not in err, err[-3000:]
    step, resume = last.removeprefix(prefix).split("; re-run the same command to resume from step ")
    step, resume = int(step), int(resume)
    assert (step, resume) == (25, 20)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and results["error"] == last.removeprefix("spon-exp: ")
    rerun = cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and results["spon"]["resumed_from"] == resume


def test_ctrl_c_outside_training_says_the_stage_and_the_rerun_continues(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMOKE, f"hydra.run.dir={run_dir}", f"paths.outputs={tmp_path / 'out'}"]
    patch = """
        import os, signal
        from spon_exp.sparsifiers.teal import TealSparsifier
        original = TealSparsifier.calibrate
        def calibrate(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives during calibration
            return original(self, *args, **kwargs)
        TealSparsifier.calibrate = calibrate
    """
    proc = in_subprocess(patch, args, tmp_path)
    _, err = proc.communicate(timeout=180)
    message = ("interrupted during calibrate; re-run the same command to continue "
               "(calibration and finished stages are cached)")
    assert proc.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if line.strip()] == [f"spon-exp: {message}"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and results["error"] == message
    rerun = cli(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"


def test_run_raises_run_interrupted_with_the_message(tmp_path, monkeypatch):
    from spon_exp.sparsifiers.teal import TealSparsifier

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TealSparsifier, "calibrate", interrupted)
    with pytest.raises(RunInterrupted, match="interrupted during calibrate; re-run the same command to continue"):
        run(strip_hydra(compose_cfg(SMALL + ["logger=none"], tmp_path)), tmp_path / "run")


# ------------------------------------------------- folders spon-exp cannot write

NO_WRITE = """
    import os
    real_access = os.access
    def access(path, mode, *args, **kwargs):  # as a user without write permission there (CI runs as root)
        if str(path).startswith({denied!r}) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)
    os.access = access
"""


def assert_no_stage_ran(folder: Path) -> None:
    """The run under ``folder`` failed before its first stage (loading the model): its
    results.json says failed and timed no stage. What "early" means, without a clock."""
    results = [json.loads(p.read_text()) for p in folder.rglob("results.json")]
    assert len(results) == 1 and results[0]["status"] == "failed", results
    assert results[0]["timings"] == {}, f"stages ran before the error: {results[0]['timings']}"


@pytest.mark.parametrize("which", ["outputs", "cache", "env_cache"])
def test_an_unwritable_folder_is_one_line_before_anything_runs(which, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    args = [*SMOKE, f"paths.outputs={tmp_path / 'out'}"]
    env_cache = None
    if which == "outputs":
        args[-1] = f"paths.outputs={locked / 'out'}"
        expected = f"spon-exp: error: paths.outputs={locked / 'out'} cannot be created: {locked} is not writable"
    elif which == "cache":
        args.append(f"paths.cache={locked}")
        expected = f"spon-exp: error: paths.cache={locked} is not writable (permission denied); choose a writable"
    else:
        env_cache = locked / "cache"
        expected = f"spon-exp: error: $SPON_EXP_CACHE={env_cache} cannot be created: {locked} is not writable"
    patch = NO_WRITE.format(denied=str(locked)) + (f"    os.environ['SPON_EXP_CACHE'] = {str(env_cache)!r}\n"
                                                   if env_cache else "")
    proc = in_subprocess(patch, args, tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), err[-2000:]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("results.json"))


def test_spon_exp_cache_pointing_at_a_file_names_the_variable(tmp_path):
    a_file = tmp_path / "cache.txt"
    a_file.write_text("not a folder")
    proc = cli([*SMOKE, f"paths.outputs={tmp_path / 'out'}"], tmp_path, env={"SPON_EXP_CACHE": str(a_file)})
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"spon-exp: error: $SPON_EXP_CACHE={a_file} is a file, not a folder; point SPON_EXP_CACHE at a writable "
        f"folder (or unset it)"]


@pytest.mark.parametrize("damage,message", [
    ("no_tokenizer", "has no tokenizer (none of tokenizer.json"),
    ("truncated", "model.safetensors is damaged (its tensors need"),
    ("random", "model.safetensors is damaged (its header claims"),
])
def test_a_damaged_model_folder_is_one_line_before_loading(damage, message, tmp_path):
    from spon_exp.models.loading import load_model

    folder = tmp_path / "model"
    loaded = load_model("tiny-random:llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    if damage == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.write_bytes(bytes(range(256)) * 64)
    proc = cli([*SMOKE, f"model.path={folder}", f"paths.outputs={tmp_path / 'out'}"], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert_no_stage_ran(tmp_path / "out")


@pytest.mark.parametrize("args,message", [
    (["sparsifier=teel"], "spon-exp: error: sparsifier=teel is not a sparsifier config; choose one of: dense, larosa,"),
    (["--multirun", "sparsifier=teal,teel"], "spon-exp: error: sparsifier=teel is not a sparsifier config"),
    (["calib.corpus=/data/café.txt"], "spon-exp: error: the value of calib.corpus holds non-ASCII characters, which "
                                      "Hydra reads only inside quotes: write calib.corpus='/data/café.txt'"),
])
def test_compose_errors_hydra_would_not_explain_are_one_line(args, message, tmp_path):
    proc = cli([*args, f"paths.outputs={tmp_path}"], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [lines[0]] and lines[0].startswith(message), proc.stderr[-2000:]
    assert "_schema" not in proc.stderr


def test_a_quoted_non_ascii_path_reaches_spon_exp(tmp_path):
    proc = cli([*SMOKE, "calib.corpus='/data/café.txt'", f"paths.outputs={tmp_path}"], tmp_path)
    assert proc.returncode == 2 and "Corpus file '/data/café.txt' does not exist" in proc.stderr


def test_collect_errors_go_to_stderr_and_an_unreadable_result_makes_no_table_row(tmp_path, capsys):
    from spon_exp.collect import main as collect_main

    assert collect_main([str(tmp_path / "nowhere")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"spon-exp-collect: error: {tmp_path / 'nowhere'} is not a folder")
    (tmp_path / "empty").mkdir()
    assert collect_main([str(tmp_path / "empty")]) == 2
    assert "no results.json under" in capsys.readouterr().err
    run = tmp_path / "runs" / "broken"
    run.mkdir(parents=True)
    (run / "results.json").write_text('{"status": "ok", "ppl": {"wiki')
    assert collect_main([str(tmp_path / "runs"), "--out", str(tmp_path / "t")]) == 0
    out, err = capsys.readouterr()
    assert "is unreadable" in err and "None" not in (tmp_path / "t" / "ppl_(none).md").read_text()
    assert "unreadable" in (tmp_path / "t" / "runs.md").read_text()


OFFLINE = """
    from spon_exp import hub
    hub.hub_reachable = lambda timeout=3.0, refresh=False: False  # no network
"""


@pytest.mark.parametrize("override,message", [
    ("calib=wikitext2", "spon-exp: error: calib=wikitext2 needs the Hugging Face hub, which is unreachable from here, "
                        "and it is not in the local datasets cache; work offline with the packaged corpora"),
    ("model=llama3_8b", "spon-exp: error: model.path=meta-llama/Meta-Llama-3-8B is a hub id, the Hugging Face hub is "
                        "unreachable from here and the model is not in the local cache; work offline with the "
                        "packaged model (model=smollm2_135m)"),
])
def test_hub_access_without_a_network_is_one_line_within_seconds(override, message, tmp_path):
    proc = in_subprocess(OFFLINE, ["experiment=smoke", override, "model.device=cpu", "model.dtype=float32",
                                   f"paths.outputs={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), err[-2000:]
    assert_no_stage_ran(tmp_path / "run")
