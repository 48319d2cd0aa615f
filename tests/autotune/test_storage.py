"""``--storage``: a journal file in a folder that exists, or an RDB URL that opens; anything else is refused
before any work, with a TuningOptionError, and creates nothing."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import optuna
import pytest
from autotune_helpers import FakeTimer, example, qkv
from catalogue import EXAMPLES

from einflash.cli import main
from einflash.compiler.tuning.storage import open_storage
from einflash.errors import TuningOptionError


def test_a_journal_in_a_folder_that_does_not_exist_is_refused_and_no_folder_is_made(cache_dir, tmp_path):
    where = tmp_path / "no" / "such" / "study.journal"
    with pytest.raises(TuningOptionError, match=r"the folder .*/no/such does not exist; create it"):
        example("causal").tune(*qkv(), trials=1, storage=str(where), timer=FakeTimer())
    assert not (tmp_path / "no").exists()


def test_the_command_refuses_it_too(cache_dir, capsys, tmp_path):
    where = tmp_path / "missing" / "study.journal"
    shape = ["--shape", "1,2,24,24,16", "--trials", "1"]
    assert main(["tune", str(EXAMPLES / "causal.py"), *shape, "--storage", str(where)]) == 2
    assert "TuningOptionError" in capsys.readouterr().err and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("kind", ["folder", "fifo", "symlink-loop"])
def test_a_journal_path_that_is_no_file_is_refused(cache_dir, tmp_path, kind):
    where = tmp_path / "study.journal"
    {"folder": os.mkdir, "fifo": os.mkfifo, "symlink-loop": lambda p: os.symlink(p.name, p)}[kind](where)
    with pytest.raises(TuningOptionError, match="is not a regular file"):
        example("causal").tune(*qkv(), trials=1, storage=str(where), timer=FakeTimer())


def test_a_database_that_cannot_be_opened_is_refused(cache_dir, tmp_path):
    with pytest.raises(TuningOptionError, match=r"storage sqlite://\.\.\.: cannot open it"):
        example("causal").tune(*qkv(), trials=1, storage=f"sqlite:///{tmp_path}/missing/s.db", timer=FakeTimer())
    assert not (tmp_path / "missing").exists()


_KILLED_WORKER = """
import pathlib, sys, time
sys.path[:0] = {paths!r}
from autotune_helpers import example, qkv

def hang(run, schedule):  # killed while it times its first schedule, the heuristic default
    pathlib.Path({marker!r}).write_text("timing")
    time.sleep(600)

example("causal").tune(*qkv(), trials=1, storage={journal!r}, timer=hang)
"""


def test_trials_a_killed_tuner_left_running_are_measured_again(cache_dir, tmp_path):
    journal, marker = tmp_path / "study.journal", tmp_path / "timing"
    here = pathlib.Path(__file__).resolve().parent
    script = _KILLED_WORKER.format(paths=[str(here), str(here.parent)], marker=str(marker), journal=str(journal))
    worker = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "EINFLASH_CACHE_DIR": str(cache_dir)})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), f"the worker never started timing (exit code {worker.poll()})"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()

    timer = FakeTimer()
    result = example("causal").tune(*qkv(), trials=2, storage=str(journal), timer=timer)
    assert result.default_ms is not None and not result.failed
    assert result.default in timer.timed  # measured again, not taken for done
    study = optuna.load_study(study_name=result.study, storage=open_storage(str(journal), journal))
    stale = [t for t in study.trials if "stale" in t.user_attrs]
    assert [t.state for t in stale] == [optuna.trial.TrialState.FAIL]
    assert f":{worker.pid} is gone" in stale[0].user_attrs["stale"]
    assert not [t for t in study.trials if t.state is optuna.trial.TrialState.RUNNING]
