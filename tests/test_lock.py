"""The dependency lock: parsed, compared with the environment, recorded in env.json."""

from importlib import metadata

from spon_exp.tracking.files import environment
from spon_exp.tracking.lock import LOCK_FILE, lock_status, read_lock


def test_lock_pins_the_stack_install_sh_installs():
    pins = read_lock()
    for package in ("torch", "transformers", "lm-eval", "hydra-core", "omegaconf", "wandb", "pytest"):
        assert package in pins, package
    assert "spon-exp" not in pins  # the package itself is installed editable, not pinned


def test_lock_status_names_every_package_that_differs(tmp_path):
    lock = tmp_path / "requirements.lock"
    torch_version = metadata.version("torch").split("+")[0]
    lock.write_text(f"# comment\ntorch=={torch_version}\nPyYAML==0.0.1\nno-such-package==1.0\n")
    status = lock_status(lock)
    assert status["packages"] == 3 and not status["matches"]
    assert status["differs"] == {"pyyaml": {"locked": "0.0.1", "installed": metadata.version("PyYAML")},
                                 "no-such-package": {"locked": "1.0", "installed": None}}
    lock.write_text(f"torch=={torch_version}\n")
    assert lock_status(lock)["matches"]
    assert lock_status(tmp_path / "missing.lock") is None


def test_env_json_records_the_lock():
    env = environment()
    assert env["lock"]["file"] == str(LOCK_FILE)
    assert len(env["lock"]["sha256"]) == 64
