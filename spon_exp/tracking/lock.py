"""The dependency lock: which versions the suite passed with, and whether this environment has them.

``requirements.lock`` (repository root) is a pip constraints file written by
``./install.sh --write-lock``; ``./install.sh`` installs from it. ``lock_status()`` goes into
every run's ``env.json``, so a number can be traced to the exact versions that produced it.
``python -m spon_exp.tracking.lock`` prints the packages that differ from the lock. Only what
the install asked for is compared: a plain ``./install.sh`` leaves out the test tools (pytest,
pytest-timeout, triton) and still matches.
"""

from __future__ import annotations

import hashlib
import re
import sys
from importlib import metadata
from pathlib import Path

LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements.lock"
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """``{normalised name: version}`` of every pinned line."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = _LINE.match(line.strip())
        if m:
            pins[_normalise(m.group(1))] = m.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    return {_normalise(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def required_packages(root: str = "spon-exp") -> set[str] | None:
    """The normalised names of what installing ``root`` without extras asked for: its
    dependencies and theirs, as the installed packages declare them (markers evaluated for this
    machine); None where ``root`` is not installed."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        metadata.distribution(root)
    except metadata.PackageNotFoundError:
        return None
    seen: set[str] = set()
    todo: list[tuple[str, frozenset]] = [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # required but missing: named by lock_status, nothing below it to follow
        for line in requires:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            key = _normalise(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((req.name, frozenset(req.extras)))
    return seen


def lock_status(path: Path = LOCK_FILE) -> dict | None:
    """The lock file's hash and every locked package that differs from it: installed at another
    version, or missing although the install asked for it (``{name: {"locked": v, "installed":
    v | None}}``). A locked package that is not installed and that nothing installed requires
    (the test tools after a plain ``./install.sh``, an extra not chosen) is no difference: it is
    listed in ``not_installed``. None where no lock file exists (a non-editable install)."""
    path = Path(path)
    if not path.exists():
        return None
    pins = read_lock(path)
    have = installed_versions()
    required = required_packages()
    differs, not_installed = {}, []
    for name, version in sorted(pins.items()):
        got = have.get(name)
        if got is None and required is not None and name not in required:
            not_installed.append(name)
        elif got is None or got.split("+")[0] != version.split("+")[0]:
            differs[name] = {"locked": version, "installed": got}
    return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "packages": len(pins), "matches": not differs, "differs": differs, "not_installed": not_installed}


def main() -> int:
    status = lock_status()
    if status is None:
        print(f"[lock] no {LOCK_FILE.name} next to this package", file=sys.stderr)
        return 0
    if status["matches"]:
        print(f"[lock] all {status['packages']} packages at the locked versions", file=sys.stderr)
        return 0
    for name, v in status["differs"].items():
        print(f"[lock] {name}: installed {v['installed']}, locked {v['locked']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
