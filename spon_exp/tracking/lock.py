"""The dependency lock: which versions the suite passed with, and whether this environment has them.

``requirements.lock`` (repository root) is a pip constraints file written by
``./install.sh --write-lock``; ``./install.sh`` installs from it. ``lock_status()`` goes into
every run's ``env.json``, so a number can be traced to the exact versions that produced it.
``python -m spon_exp.tracking.lock`` prints the packages that differ from the lock.
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


def lock_status(path: Path = LOCK_FILE) -> dict | None:
    """The lock file's hash and every locked package whose installed version differs
    (``{name: {"locked": v, "installed": v | None}}``); None where no lock file exists
    (a non-editable install)."""
    path = Path(path)
    if not path.exists():
        return None
    pins = read_lock(path)
    have = installed_versions()
    differs = {}
    for name, version in sorted(pins.items()):
        got = have.get(name)
        if got is None or got.split("+")[0] != version.split("+")[0]:
            differs[name] = {"locked": version, "installed": got}
    return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "packages": len(pins), "matches": not differs, "differs": differs}


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
