"""Where a study's trials live, and the repair of trials a killed worker left running.

A study lives in an Optuna storage: a journal file, shared by the processes of one machine, or an RDB
(``postgresql://``, ``sqlite:///``) shared across machines. A user's ``--storage`` is checked before any
work: a journal must be a regular file (or none yet) in a folder that exists, since making a folder tree
for a mistyped path is never what was meant, and a database must open.

A worker killed mid-trial (SIGKILL, an out-of-memory kill, a lost machine) leaves its trial RUNNING
forever, and a later worker that took that schedule for measured would report it failed or never time
it. So a study starts by failing the trials whose worker is gone, marked ``stale``, and queueing their
schedules again. A trial's worker is ``host:pid``: on this machine a dead pid is certain; a trial of
another machine is left to the RDB's heartbeat (a trial whose worker stops beating is failed by Optuna).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import socket
import time
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from ...errors import TuningOptionError

RDB_ATTEMPTS = 5  # tries to open an RDB storage that other workers may be initialising
UNNAMED_STALE_SECONDS = 600  # a running trial that never named its worker (killed while the sampler drew it)


def open_storage(url: str | None, default: pathlib.Path) -> optuna.storages.BaseStorage:
    """An Optuna storage: an RDB for a URL (``postgresql://``, ``sqlite:///``), else a journal file at that
    path (``default``, whose folder is made, when None). Raises TuningOptionError for a storage that
    cannot be what it names.

    >>> import tempfile, pathlib
    >>> type(open_storage(None, pathlib.Path(tempfile.mkdtemp()) / "s.journal")).__name__
    'JournalStorage'
    >>> open_storage("/no/such/folder/s.journal", pathlib.Path("unused"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    einflash.errors.TuningOptionError: storage /no/such/folder/s.journal: the folder /no/such/folder does not exist; ...
    """
    if url and "://" in url:
        return _rdb(url)
    if url:
        path = pathlib.Path(url)
        if not path.parent.is_dir():
            raise TuningOptionError(
                f"storage {url}: the folder {path.parent} does not exist; create it, or name a journal file in "
                f"a folder that exists"
            )
    else:
        path = default
        path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path) and not path.is_file():  # a folder, a FIFO, a link that leads nowhere
        raise TuningOptionError(f"storage {path} is not a regular file; name a journal file (or a new one)")
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def _rdb(url: str) -> optuna.storages.BaseStorage:
    import sqlalchemy.exc

    scheme = url.split("://")[0]
    for attempt in range(RDB_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # the heartbeat (a dead worker's trial fails) is "experimental"
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        except ImportError as e:
            raise TuningOptionError(
                f"storage {scheme}://...: {e} (for postgresql:// install einflash[postgres])"
            ) from None
        except sqlalchemy.exc.ArgumentError as e:
            raise TuningOptionError(f"storage URL not understood: {e}") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # workers starting at once on an empty database race to create Optuna's tables: the loser
            # finds them made when it tries again
            if attempt == RDB_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
        except sqlalchemy.exc.OperationalError as e:
            raise TuningOptionError(
                f"storage {scheme}://...: cannot open it ({e.orig}); check the URL, and that its folder or "
                f"server exists"
            ) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the trials left RUNNING by a worker that is gone, mark them ``stale``, and queue their schedules
    again; returns their numbers. Safe while other workers run: a trial another worker repaired first is
    skipped."""
    repaired = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = _gone(t)
        if why is None:
            continue
        # Optuna has no public call that finishes another process's trial; its storage API is stable
        storage, trial_id = study._storage, t._trial_id
        try:
            storage.set_trial_user_attr(trial_id, "stale", why)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        params = t.system_attrs.get("fixed_params") or t.params
        if params:
            kept = {k: v for k, v in t.user_attrs.items() if k == "warm_start"}
            study.enqueue_trial(params, user_attrs=kept)
        repaired.append(t.number)
    return repaired


def _gone(t: FrozenTrial) -> str | None:
    """Why ``t``'s worker is known to be gone, or None while it may be alive."""
    worker = t.user_attrs.get("worker")
    if worker is None:
        started = t.datetime_start
        age = None if started is None else (datetime.datetime.now() - started).total_seconds()
        if age is not None and age > UNNAMED_STALE_SECONDS:
            return f"running for {age:.0f} s without naming its worker"
        return None
    host, _, pid = str(worker).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return f"its worker {worker} is gone"
    except PermissionError:  # alive, another user's
        return None
    return None
