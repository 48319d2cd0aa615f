"""Several tuning processes on one study: two real worker processes sharing a journal file, then a
PostgreSQL server (Debian's package, started here) as the storage machines on a network would share."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest

WORKER = pathlib.Path(__file__).resolve().parent / "tune_worker.py"
TRIALS = 3  # per worker; the tiny causal problem has 8 schedules


def _workers(storage: str, cache: pathlib.Path, n: int = 2) -> list[dict]:
    env = {**os.environ, "EINFLASH_CACHE_DIR": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), storage, str(TRIALS)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _check_shared_study(results: list[dict], storage) -> None:
    assert all(r["here"] == TRIALS for r in results)
    study = optuna.load_study(study_name=results[0]["study"], storage=storage)
    measured = [
        t for t in study.trials if t.state is optuna.trial.TrialState.COMPLETE and "repeat_of" not in t.user_attrs
    ]
    workers = {t.user_attrs["worker"] for t in measured}
    assert len(workers) == 2 and len(measured) == 2 * TRIALS  # both contributed to one study
    schedules = [json.dumps(t.user_attrs["schedule"], sort_keys=True) for t in measured]
    assert len(set(schedules)) == len(schedules)  # neither measured what the other had
    # whichever finished last wrote the union of both into the cache entry
    (path,) = {r["cache"] for r in results}
    (entry,) = json.loads(pathlib.Path(path).read_text())["entries"].values()
    assert len(entry["measured"]) == 2 * TRIALS and set(entry["workers"]) == workers
    assert entry["best"]["ms"] == min(t.value for t in measured)


def test_two_processes_tune_one_study_through_a_journal_file(tmp_path):
    journal = tmp_path / "study.journal"
    results = _workers(str(journal), tmp_path / "cache")
    from einflash.compiler.tuning.storage import open_storage

    _check_shared_study(results, open_storage(str(journal), journal))


# -- PostgreSQL ---------------------------------------------------------------------------------


def _pg_bin() -> pathlib.Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return pathlib.Path(found[-1]).parent if found else None


def _install_postgres() -> str | None:
    """Install Debian's postgresql package when this runs as root with apt; say why not otherwise."""
    if _pg_bin() is not None:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "PostgreSQL is not installed and this is not a root shell with apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
    ):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if run.returncode:
            return f"`{' '.join(cmd)}` failed: {run.stderr[-500:]}"
    return None if _pg_bin() is not None else "apt-get installed postgresql but no initdb was found"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 with trust authentication; yields its URL."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is missing: pip install 'einflash[postgres]'")
    why = _install_postgres()
    if why:
        pytest.skip(why)
    bin_dir, port = _pg_bin(), _free_port()
    # a folder of its own under /tmp (pytest's are private to root); initdb and postgres refuse to
    # run as root, so a root shell runs them as the package's postgres user
    data = pathlib.Path(tempfile.mkdtemp(prefix="einflash-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")

    def pg(*args):
        run = subprocess.run(as_user + [str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"{args[0]} failed: {run.stdout[-1000:]}{run.stderr[-1000:]}")

    try:
        pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
        pg(
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(data / "server.log"),
            "-w",
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            "start",
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow  # starts a database server (and may install it: about a minute more, once per machine)
def test_two_processes_tune_one_study_through_postgresql(tmp_path, postgres):
    t0 = time.monotonic()
    results = _workers(postgres, tmp_path / "cache")
    assert time.monotonic() - t0 < 240
    _check_shared_study(results, optuna.storages.RDBStorage(postgres))
    assert {r["cache"] for r in results} and json.loads(pathlib.Path(results[0]["cache"]).read_text())["entries"][
        results[0]["bucket"]
    ]["storage"] == "rdb"
