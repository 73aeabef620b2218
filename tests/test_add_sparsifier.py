"""Adding a sparsifier is its module, its YAML file and its docs: every registered method
keeps the contract the rest of the package relies on, and the worked example of
docs/new-sparsifier.md ("A worked example") runs as written, end to end, with no other
file edited: its Python block is executed as a module of its own, its YAML block is written
into a config folder on Hydra's search path."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

import spon_exp.sparsifiers as sparsifiers_package
from spon_exp.sparsifiers import REGISTRY, Sparsifier, build_sparsifier
from spon_exp.spon import Spon, TrainConfig, fold_alpha, load_sparse_state, save_sparse_state, train_alpha
from tests.helpers import random_ids, tiny

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "new-sparsifier.md"
EXAMPLE_HEADING = "A worked example"
PACKAGE_METHODS = sorted(REGISTRY)  # at collection: the package's own methods


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------ the registry
def test_every_method_module_of_the_package_is_registered():
    """A Sparsifier subclass with its own name in a module of the package is in REGISTRY
    (importing the package imported its module; the class carries @register)."""
    found = {}
    for module in pkgutil.iter_modules(sparsifiers_package.__path__):
        mod = importlib.import_module(f"spon_exp.sparsifiers.{module.name}")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, Sparsifier) and cls is not Sparsifier and cls.__module__ == mod.__name__ and "name" in cls.__dict__:
                found[cls.name] = cls
    assert found and all(REGISTRY.get(name) is cls for name, cls in found.items()), found
    assert {"dense", "teal", "wina", "rsparse", "larosa"} <= set(REGISTRY)


@pytest.mark.parametrize("name", PACKAGE_METHODS)
def test_every_method_has_its_yaml_and_schema(name):
    from spon_exp.config import sparsifier_schema

    text = (ROOT / "conf" / "sparsifier" / f"{name}.yaml").read_text()
    assert f"- {name}_schema" in text
    import dataclasses

    fields = [f.name for f in dataclasses.fields(sparsifier_schema(name))]
    assert fields == ["name", "label", "sparsity", *(f.name for f in dataclasses.fields(REGISTRY[name].Options))]


def test_register_checks_the_contract():
    from spon_exp.sparsifiers import register

    class Nameless(Sparsifier):
        pass

    with pytest.raises(ValueError, match="must set its own name"):
        register(Nameless)

    class Taken(Sparsifier):
        name = "teal"

    with pytest.raises(ValueError, match="is taken"):
        register(Taken)

    class BadOptions(Sparsifier):
        name = "bad_options"
        Options = dict

    with pytest.raises(TypeError, match="Options must be a dataclass"):
        register(BadOptions)
    assert "bad_options" not in REGISTRY and REGISTRY["teal"].__name__ == "TealSparsifier"


# ------------------------------------------------------- the contract, every method
@pytest.mark.parametrize("name", PACKAGE_METHODS)
def test_every_registered_method_keeps_the_contract(name, tmp_path):
    """Attach, calibrate, measure; SPON's bias folds exactly; the saved state re-attaches
    to a fresh model without recalibrating and gives the same logits."""
    contract(name, tmp_path)


def contract(name: str, tmp_path: Path) -> None:
    lm = tiny()
    sp = build_sparsifier(name, sparsity=0.5).attach(lm.model)
    ids = random_ids(4, 32)
    sp.calibrate(lm.model, ids.split(2))
    with torch.no_grad(), sp.measuring():
        lm.model(ids)
    measured = sp.measured_sparsity()["model"]
    biases = {}
    if REGISTRY[name].sparsifies:
        assert 0.2 < measured < 0.8, measured
        spon = Spon(sp, 1)
        train_alpha(lm.model, sp, spon, ids, TrainConfig(lr=3e-2, steps=2, batch_size=2))
        with torch.no_grad():
            before = lm.model(ids).logits
            biases = fold_alpha(spon)
    else:
        assert measured == 0
        with torch.no_grad():
            before = lm.model(ids).logits
    with torch.no_grad():
        after = lm.model(ids).logits
    assert (before - after).abs().max() <= 1e-4
    save_sparse_state(tmp_path, sp, biases)
    fresh = tiny()  # same seed -> same random weights
    loaded = load_sparse_state(fresh.model, tmp_path)
    assert loaded.describe() == sp.describe() and type(loaded) is REGISTRY[name]
    with torch.no_grad():
        assert torch.allclose(fresh.model(ids).logits, after, atol=1e-6)


# ---------------------------------------------------- the guide's worked example
def guide_blocks() -> tuple[str, str]:
    """The Python and YAML blocks of the guide's worked example section."""
    text = GUIDE.read_text()
    heading = re.search(rf"^#+ {EXAMPLE_HEADING}\s*$", text, re.M)
    assert heading, f"{GUIDE} has no '{EXAMPLE_HEADING}' section"
    lines, fenced = [], False
    for line in text[heading.end():].splitlines(keepends=True):  # up to the next heading outside a code block
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,2} ", line):
            break
        lines.append(line)
    section = "".join(lines)
    python = re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)
    yaml = re.findall(r"^```yaml\n(.*?)^```", section, re.M | re.S)
    assert len(python) == 1 and len(yaml) == 1, "the worked example is one Python block and one YAML block"
    return python[0], yaml[0]


@pytest.fixture
def guide_method(tmp_path):
    """The guide's module, executed as ``random_channels_from_guide``; its YAML file in a
    config folder of its own. Takes the method out of the registry afterwards."""
    code, yaml = guide_blocks()
    name = re.search(r'^\s+name = "(\w+)"', code, re.M).group(1)
    assert name not in REGISTRY, f"{name} already registered: the guide's example must be a new method"
    module = types.ModuleType("random_channels_from_guide")
    sys.modules[module.__name__] = module
    registry_before = dict(REGISTRY)
    try:
        exec(compile(code, f"{GUIDE}:random_channels.py", "exec"), module.__dict__)  # noqa: S102 - our own docs
        assert set(REGISTRY) - set(registry_before) == {name}, "the guide's module registers its method"
        conf = tmp_path / "conf_extra"
        (conf / "sparsifier").mkdir(parents=True)
        (conf / "sparsifier" / f"{name}.yaml").write_text(yaml)
        yield name, module, conf
    finally:
        REGISTRY.clear()
        REGISTRY.update(registry_before)
        del sys.modules[module.__name__]


def test_guide_example_runs_without_editing_any_other_file(guide_method, tmp_path):
    from omegaconf import OmegaConf

    from spon_exp.config import ConfigError, validate
    from spon_exp.runner import run
    from tests.test_app import compose_cfg, strip_hydra

    name, module, conf = guide_method
    searchpath = f"hydra.searchpath=[file://{conf}]"
    # the YAML's first lines show a command that uses it (as tests/test_app.py asks of every file)
    assert any(line.startswith("#") and f"sparsifier={name}" in line
               for line in (conf / "sparsifier" / f"{name}.yaml").read_text().splitlines()[:4])

    # the schema derived from Options: defaults, and misspelt or mistyped keys fail at compose time
    cfg = compose_cfg([searchpath, f"sparsifier={name}"])
    assert OmegaConf.to_container(cfg.sparsifier) == {
        "name": name, "label": None, "sparsity": None, "projections": "all", "token_policy": "all",
        "token_fraction": 0.5, "token_rounding": "ceil", "same_in_every_layer": False}
    from spon_exp import config

    assert OmegaConf.get_type(cfg.sparsifier) is config.RandomChannelsConfig
    for bad in ("sparsifier.same_in_every_layr=true", "sparsifier.same_in_every_layer=maybe"):
        with pytest.raises(ConfigCompositionException):
            compose_cfg([searchpath, f"sparsifier={name}", bad])
    # the checks derived from Options (the base class's range checks here)
    with pytest.raises(ConfigError, match="token_fraction"):
        validate(strip_hydra(compose_cfg([searchpath, "experiment=smoke", f"sparsifier={name}",
                                          "sparsifier.token_policy=last_fraction", "sparsifier.token_fraction=2"])))

    # the whole run: calibrate, measure, SPON, evaluation, the run's export and the cache
    cfg = compose_cfg([searchpath, "experiment=smoke", f"sparsifier={name}", "sparsifier.same_in_every_layer=true",
                       "spon.steps=2"], tmp_path)
    results = run(strip_hydra(cfg), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "ok" and saved["sparsifier"] == name
    assert results["cache"]["sparsifier"] == "miss"
    ppl = results["ppl"]["wikipedia"]
    assert all(ppl[v] > 1 for v in ("dense", "sparse", "spon")), ppl
    assert results["fold"]["max_abs_logit_diff"] == 0
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").sparsifier.same_in_every_layer is True

    # and the contract every packaged method keeps
    contract(name, tmp_path / "contract")
