"""The recipe search's Optuna study (``sweeps/tune_spon*.yaml``): ask, launch, tell.

Only the launching process (``spon-exp --multirun``) touches the study. It asks Optuna for a
batch of ``hydra.sweeper.n_jobs`` recipes, launches them as Hydra jobs (in this process, or as
SLURM jobs through submitit) and tells Optuna each job's objective. A SLURM job never opens the
study, so SLURM workers need no database server: the SQLite file beside the sweep serves any
number of them. A server (``hydra.sweeper.storage=postgresql://...``) is needed only when
several launching processes on different machines, or several users, share one study; SQLite
serves several launches on one machine.

What this adds to hydra-optuna-sweeper's loop (whose search-space syntax it keeps):

- a storage URL that cannot work (unknown scheme, a SQLite file in a missing folder, a server URL
  whose driver is not installed, a server that refuses) is one line before any trial runs;
- creating a new study is safe when two launches start at once (SQLite: under a lock file
  beside the database; other storages: retried);
- every trial records the launch that runs it (host, pid); a re-launch fails the trials left
  ``RUNNING`` by a launch that is gone (killed), so they do not stay ``RUNNING`` for good;
- a failed trial is one line naming its folder, whose ``trial.json`` says why, and is told to
  Optuna as failed; the study goes on (``max_failure_rate``), and a study in which no trial
  completed ends in one line and exit code 2.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

TRIAL_FILE = "trial.json"
LAUNCH_ATTR = "spon_exp_launch"  # a trial's user attribute: the launch (host, pid) that runs it


class StudyError(ValueError):
    """A user error about the study (its storage, its settings): one line, exit code 2."""


# ------------------------------------------------------------------------------------ storage

def shown(storage: str) -> str:
    """The storage URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True)


def check_storage(storage: str | None, sweep_dir: str | Path) -> None:
    """One clear :class:`StudyError` when ``storage`` (``hydra.sweeper.storage``) cannot work:
    not a database URL, an unknown database, a SQLite file in a missing folder, a missing
    driver. The folder of a SQLite file inside ``sweep_dir`` (the default: ``optuna.db`` beside
    the sweep) is created. Connecting is left to :func:`open_study`."""
    if storage is None:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    key = "hydra.sweeper.storage"
    try:
        url = make_url(str(storage))
        dialect = url.get_dialect()
    except NoSuchModuleError:  # (an ArgumentError too: first)
        raise StudyError(f"{key}={storage}: unknown database {str(storage).split(':', 1)[0]!r}; give sqlite:///<file> "
                         f"(the default) or a server's URL such as postgresql://user@host/db") from None
    except ArgumentError:
        raise StudyError(f"{key}={storage} is not a database URL: give sqlite:///<file> (the default, beside the "
                         f"sweep) or a server's URL") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).expanduser().resolve().parent
        if folder.is_relative_to(Path(sweep_dir).expanduser().resolve()):
            folder.mkdir(parents=True, exist_ok=True)  # the sweep's own folder
        if not folder.is_dir():
            raise StudyError(f"{key}={storage}: the folder {folder} does not exist; create it, or leave "
                             f"{key} at its default (optuna.db beside the sweep)")
    try:
        dialect.dbapi()
    except ImportError as e:
        raise StudyError(f"{key}={shown(storage)} needs the Python driver {e.name or 'of that database'}, which is "
                         f"not installed (pip install it); or leave {key} at its default (SQLite)") from None


def lock_file(storage: str | None, sweep_dir: str | Path) -> Path:
    """The lock launches of one study share: beside a SQLite database, else in the sweep folder."""
    from sqlalchemy.engine import make_url

    url = make_url(str(storage)) if storage else None
    if url is not None and url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return Path(f"{Path(url.database).expanduser()}.lock")
    return Path(sweep_dir) / ".study.lock"


class LaunchLock:
    """Held (shared) by every launch of one study for its whole sweep. ``alone`` says whether
    this launch was the only one: it then holds the lock exclusively, while it creates the
    study and fails the trials of launches that are gone, until :meth:`share`."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.alone = False

    def __enter__(self) -> LaunchLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.alone = True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            fcntl.flock(self.fd, fcntl.LOCK_SH)  # waits while another launch creates the study
        return self

    def share(self) -> None:
        """Other launches of the study may join from now on."""
        if self.alone:
            fcntl.flock(self.fd, fcntl.LOCK_SH)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # releases the lock


def open_study(name: str | None, storage: str | None, sampler, directions: list[str]):
    """Create the study, or load it when it exists; a second launch racing to create the same
    new study loads the first one's (retried: the tables may be half created), and a storage
    that refuses is one :class:`StudyError`."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "A new study created" line: the log says it
    logging.getLogger("alembic").setLevel(logging.WARNING)  # a "setup plugin" line per schema plugin
    for attempt in range(5):
        try:
            return optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions,
                                       load_if_exists=True)
        except SQLAlchemyError as e:
            if attempt == 4:
                detail = " ".join(str(getattr(e, "orig", e)).split())[:300]
                raise StudyError(f"could not open the study {name!r} in hydra.sweeper.storage={shown(storage)}: "
                                 f"{detail}") from None
            time.sleep(0.5 + attempt)


# ------------------------------------------------------------------------------------ launches

def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: /proc), telling a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_launch() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _gone(launch: dict) -> bool:
    """Whether the launch (on this host) has ended; a launch on another host is never judged."""
    if launch.get("host") != socket.gethostname():
        return False
    pid = int(launch.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return launch.get("start") is not None and _process_start(pid) not in (None, launch["start"])


def fail_abandoned_trials(study, alone: bool) -> list:
    """Tell Optuna that the trials left ``RUNNING`` by a launch that is gone failed (with no
    other launch of this study running, ``alone``, every ``RUNNING`` trial is such a one);
    returns them."""
    import optuna

    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        launch = t.user_attrs.get(LAUNCH_ATTR)
        if alone or (launch and _gone(launch)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            failed.append(t)
    if failed:
        log.warning("Trials %s of study %s were left RUNNING by a launch that ended (killed?): recorded as failed",
                    [t.number for t in failed], study.study_name)
    return failed


# ------------------------------------------------------------------------------------ trials

def record_trial_failure(trial_dir: str | Path, error: str, overrides: Sequence[str] | None = None) -> None:
    """``trial.json`` of a failed trial says why (unless the trial wrote its own already)."""
    from spon_exp.tracking.files import read_json, write_json_atomic

    path = Path(trial_dir) / TRIAL_FILE
    previous = read_json(path) or {}
    if previous.get("status") == "failed" and previous.get("error"):
        return
    write_json_atomic(path, {**previous, "status": "failed", "error": error,
                             "overrides": previous.get("overrides", list(overrides or []))})


def trial_error(trial_dir: Path) -> str | None:
    from spon_exp.tracking.files import read_json

    return (read_json(trial_dir / TRIAL_FILE) or {}).get("error")


def objective_of(ret) -> tuple[list[float] | None, str | None, BaseException | None]:
    """``(values, None, None)`` for a job that returned finite objective values, else
    ``(None, why, exception or None)``: its trial failed."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.COMPLETED:
        with contextlib.redirect_stderr(io.StringIO()):  # Hydra writes "Error executing job" for the raise below
            try:
                ret.return_value
            except Exception as e:  # noqa: BLE001 - a job's failure, whatever it is, fails its trial
                return None, f"{type(e).__name__}: {' '.join(str(e).split())}", e
        return None, "the job did not finish", None
    value = ret.return_value
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if value is None or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None, f"the job returned {value!r}, not a finite objective", None
    return [float(v) for v in values], None, None


def say_failed(number: int, folder: Path | None, why: str, exception: BaseException | None) -> None:
    """One line per failed trial, after its traceback when its job raised: a trial's user errors
    return instead (its trial.json says why), so what a job raises is a bug or a crash."""
    if exception is not None:
        traceback.print_exception(exception)
    where = f" ({folder.name}; its {TRIAL_FILE} says why)" if folder is not None else ""
    print(f"spon-exp: error: trial {number}{where}: {why}", file=sys.stderr)


def write_summary(study, sweep_dir: str | Path, directions: list[str]) -> None:
    """``optimization_results.yaml`` as hydra-optuna-sweeper writes it (best recipe and value)."""
    from omegaconf import OmegaConf

    if len(directions) == 1:
        best = study.best_trial
        summary = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        log.info("Best parameters: %s", best.params)
        log.info("Best value: %s", best.value)
    else:
        summary = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values} for t in study.best_trials]}
    OmegaConf.save(OmegaConf.create(summary), Path(str(sweep_dir)) / "optimization_results.yaml")
