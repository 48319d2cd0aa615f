"""The demo command: a variant that fails in any step is a row with its reason, never the demo's end; the
summary counts; the JSON records; the exit status. Variants are tiny files in a temporary catalogue."""

from __future__ import annotations

import io
import json
import textwrap

import pytest
import torch

import einflash as ef
from einflash import demo

TINY = ef.Shape(1, 1, 16, 16, 16, 16, 1)
KEYS = {
    "name",
    "passes_as_written",
    "passes",
    "backend",
    "max_error",
    "tolerance",
    "ok",
    "ms",
    "reason",
    "grad_ok",
    "grad_max_error",
    "grad_reason",
}

FILES = {
    "sigmoid": """
        import einflash as ef

        @ef.attention
        def sigmoid(q, k, v):
            return ef.sigmoid(q @ k * ef.scale - ef.log(ef.N)) @ v
        """,
    "softmax_over_m": """
        import einflash as ef

        @ef.attention
        def softmax_over_m(q, k, v):
            return ef.softmax(q @ k * ef.scale, "m") @ v
        """,
    "broken": """
        raise RuntimeError("broken at import")
        """,
    "misnamed": """
        import einflash as ef

        @ef.attention
        def other(q, k, v):
            return ef.softmax(q @ k, "n") @ v
        """,
    "wrong_slope": """
        import torch
        import einflash as ef

        @ef.attention
        def wrong_slope(q, k, v, slope: ef.Tensor["h"]):
            return ef.softmax(q @ k * ef.scale + slope * (ef.n - ef.m), "n") @ v

        def extra_inputs(shape, device="cpu", dtype=torch.float32):
            return {"slope": torch.ones(shape.Hq + 1, device=device, dtype=dtype)}
        """,
}


@pytest.fixture
def catalogue(tmp_path):
    """A directory holding the named variant files."""

    def make(*names):
        for name in names:
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(FILES[name]))
        return tmp_path

    return make


def _row(path, name, **kwargs) -> dict:
    return demo.run_variant(path / f"{name}.py", "cpu", torch.float16, "interpreter", TINY, **kwargs)


def test_a_file_that_raises_on_import_or_declares_no_op_of_its_name_is_a_failed_row(catalogue):
    path = catalogue("broken", "misnamed")
    broken, misnamed = _row(path, "broken"), _row(path, "misnamed")
    assert broken["status"] == "failed" and broken["reason"] == "import: RuntimeError: broken at import"
    assert misnamed["reason"].startswith("import: DeclarationError:") and "misnamed" in misnamed["reason"]


def test_a_call_that_raises_is_a_failed_row(catalogue):
    rec = _row(catalogue("wrong_slope"), "wrong_slope")
    assert rec["status"] == "failed" and rec["ok"] is False and rec["reason"].startswith("run: ShapeError:")
    assert rec["passes"] == 1  # what came before the failing step is kept


def test_a_variant_without_a_kernel_is_not_lowered_not_failed(catalogue):
    rec = _row(catalogue("softmax_over_m"), "softmax_over_m")
    assert (rec["status"], rec["ok"], rec["passes"]) == ("not lowered", None, 1) and "query rank m" in rec["reason"]


@pytest.mark.parametrize("failing", ["explain", "inputs", "run", "check", "timing", "gradients", "gradient check"])
def test_a_step_that_raises_ends_the_row_with_its_reason(catalogue, monkeypatch, failing):
    real = demo._step

    def step(name, fn, progress):
        if name == failing:

            def fn():
                raise RuntimeError(f"injected in {name}")

        return real(name, fn, progress)

    monkeypatch.setattr(demo, "_step", step)
    steps = []
    rec = _row(catalogue("sigmoid"), "sigmoid", progress=steps.append)
    assert steps[-1] == failing and rec["status"] == "failed"
    reason = f"{failing}: RuntimeError: injected in {failing}"
    if failing.startswith("gradient"):  # the forward's results stand
        assert rec["ok"] is True and rec["grad_ok"] is False and rec["grad_reason"] == reason
    else:
        assert rec["ok"] is False and rec["reason"] == reason


def test_after_running_out_of_memory_the_memory_is_given_back_and_the_next_variant_runs(catalogue, monkeypatch):
    path = catalogue("sigmoid", "softmax_over_m")
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    real = demo.check

    def check(op, *args, **kwargs):
        if op.name == "sigmoid":
            raise torch.OutOfMemoryError("Tried to allocate 128.00 GiB")
        return real(op, *args, **kwargs)

    monkeypatch.setattr(demo, "check", check)
    records = demo.run_demo(path, shape=TINY)
    assert records[0]["reason"] == "check: OutOfMemoryError: Tried to allocate 128.00 GiB"
    assert emptied == [True] and records[1]["status"] == "not lowered"


def test_the_summary_counts_each_kind_of_row():
    rows = [
        {"name": "a", "status": "ok", "grad_ok": True},
        {"name": "b", "status": "ok", "grad_ok": None},
        {"name": "c", "status": "ok", "grad_ok": None},
        {"name": "d", "status": "not lowered", "grad_ok": None},
        {"name": "e", "status": "failed"},
        {"name": "f", "status": "failed"},
    ]
    line = demo.summary(rows)
    assert line.startswith("3 of 6 variants ok (output and gradients within tolerance; 2 of them have no backward")
    assert "1 not lowered (no kernel yet: not a failure)" in line and line.endswith("out of tolerance: e, f)")


def test_the_command_streams_rows_then_the_summary_and_fails_when_a_variant_failed(catalogue, capsys):
    path = catalogue("softmax_over_m", "broken")
    assert demo.main(path, shape=TINY) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == demo.HEADER and [line.split()[0] for line in lines[1:3]] == ["broken", "softmax_over_m"]
    assert lines[3] == (
        "0 of 2 variants ok (output and gradients within tolerance), 1 not lowered (no kernel yet: "
        "not a failure), 1 failed (a step raised or a result is out of tolerance: broken)"
    )


def test_json_records_keep_their_keys_and_a_passing_catalogue_exits_0(catalogue, capsys):
    path = catalogue("sigmoid", "softmax_over_m")
    assert demo.main(path, as_json=True, shape=TINY) == 0
    records = json.loads(capsys.readouterr().out)
    assert all(set(r) >= KEYS for r in records)
    sigmoid = records[0]
    assert (sigmoid["status"], sigmoid["ok"], sigmoid["grad_ok"]) == ("ok", True, True)
    assert sigmoid["max_error"] <= sigmoid["tolerance"] and sigmoid["ms"] > 0


def test_on_a_terminal_a_progress_display_runs_beside_the_rows(catalogue, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert demo.main(catalogue("sigmoid"), shape=TINY) == 0
    out = capsys.readouterr().out
    assert "sigmoid" in out and out.rstrip().endswith("0 failed (a step raised or a result is out of tolerance)")
    assert "sigmoid: " in terminal.getvalue()  # the bar told the step (its kernel runs for seconds here)
