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
    assert status["differs"] == {"pyyaml": {"locked": "0.0.1", "installed": metadata.version("PyYAML")}}
    assert status["not_installed"] == ["no-such-package"]  # nothing installed asks for it
    lock.write_text(f"torch=={torch_version}\n")
    assert lock_status(lock)["matches"]
    assert lock_status(tmp_path / "missing.lock") is None


def test_env_json_records_the_lock():
    env = environment()
    assert env["lock"]["file"] == str(LOCK_FILE)
    assert len(env["lock"]["sha256"]) == 64


def test_a_plain_install_without_the_test_tools_matches(monkeypatch):
    from spon_exp.tracking import lock

    required = lock.required_packages()
    assert {"torch", "numpy", "hydra-core", "packaging"} <= required
    absent = {name for name in read_lock() if name not in required}  # what ./install.sh without test leaves out
    assert {"pytest", "pytest-timeout", "triton"} <= absent
    installed = lock.installed_versions()
    before = lock.lock_status()
    monkeypatch.setattr(lock, "installed_versions", lambda: {k: v for k, v in installed.items() if k not in absent})
    plain = lock.lock_status()
    assert set(plain["differs"]) == set(before["differs"]) - absent  # the missing test tools are no difference
    assert absent <= set(plain["not_installed"])
    monkeypatch.setattr(lock, "installed_versions", lambda: {k: v for k, v in installed.items() if k != "numpy"})
    assert lock.lock_status()["differs"]["numpy"]["installed"] is None  # required and missing: a difference


def test_env_json_records_the_machine():
    env = environment()
    cpu = env["cpu"]
    assert cpu["model"] and cpu["logical_cores"] >= 1 and isinstance(cpu["isa"], list)
    assert cpu["torch_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256", "NEON") or \
        cpu["torch_capability"] is None
    assert ("gpu" in env) and (env["gpu"] is None) == (not env["torch"]["cuda"])


def test_cpu_model_and_instruction_sets_come_from_cpuinfo(tmp_path):
    from spon_exp.tracking.machine import cpu_info

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2\n")
    cpu = cpu_info(info)
    assert cpu["model"] == "AMD EPYC 7B13" and cpu["isa"] == ["sse4_2", "avx", "avx2", "fma", "avx512f"]
