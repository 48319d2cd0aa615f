"""``einflash tune`` and ``einflash cache``: what a person sees, and the JSON a script reads."""

from __future__ import annotations

import json

import pytest
from catalogue import EXAMPLES

from einflash.cli import main

CAUSAL = str(EXAMPLES / "causal.py")
TINY = ["--shape", "1,4,24,24,16", "--kv-heads", "2"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_tune_then_list_show_export_clear_import(cache_dir, capsys, tmp_path):
    rc, out, _ = _run(capsys, "tune", CAUSAL, *TINY, "--dtype", "float32", "--trials", "3", "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["name"] == "causal" and result["bucket"] == "forward m32 n32 bkv2 g2 e16 f16"
    assert result["here"] == 3 and result["best_ms"] > 0 and result["space"]["feasible"] >= 3

    rc, out, _ = _run(capsys, "tune", CAUSAL, *TINY, "--trials", "2")  # float32 by default here; a table
    assert rc == 0 and "speedup" in out and "forward m32 n32 bkv2 g2 e16 f16" in out
    rc, out, _ = _run(capsys, "cache", "list", "--json")
    (f,) = json.loads(out)["files"]
    assert f["ok"] and f["here"] and f["name"] == "causal" and f["entries"] == [result["bucket"]]
    rc, out, _ = _run(capsys, "cache", "show", "causal")
    assert result["bucket"] in out and "measured" in out
    rc, out, _ = _run(capsys, "cache", "show", "--json")
    (shown,) = json.loads(out)
    assert len(shown["entries"][result["bucket"]]["measured"]) == 5  # one study: both runs' trials

    bundle = tmp_path / "bundle.json"
    assert _run(capsys, "cache", "export", str(bundle))[0] == 0
    rc, out, _ = _run(capsys, "cache", "clear", "--json")
    assert json.loads(out) == {"removed": 1}
    assert json.loads(_run(capsys, "cache", "list", "--json")[1])["files"] == []
    rc, out, _ = _run(capsys, "cache", "import", str(bundle))
    assert rc == 0 and "imported 1 entries" in out


def test_a_corrupt_file_is_listed_not_fatal(cache_dir, capsys):
    folder = cache_dir / "autotune"
    folder.mkdir(parents=True)
    (folder / "broken.json").write_text('{"kind": "einflash-autotune", "format": 1, "entries": {"x": 1}')
    rc, out, _ = _run(capsys, "cache", "list")
    assert rc == 0 and "CORRUPT  broken.json: not valid JSON" in out
    rc, out, _ = _run(capsys, "cache", "list", "--json")
    (f,) = json.loads(out)["files"]
    assert not f["ok"] and "not valid JSON" in f["problem"]


def test_tune_refuses_bfloat16_under_the_interpreter(cache_dir, capsys):
    rc, _, err = _run(capsys, "tune", CAUSAL, *TINY, "--dtype", "bfloat16")
    assert rc == 2 and "DTypeError" in err and "interpreter computes bfloat16 wrongly" in err


def test_import_of_a_bad_bundle_says_so(cache_dir, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    rc, _, err = _run(capsys, "cache", "import", str(bad))
    assert rc == 2 and "CacheError" in err and "bundle" in err


@pytest.mark.parametrize("command", [["explain", CAUSAL], ["tune", CAUSAL]])
def test_commands_that_take_a_shape_take_it_alike(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--shape", "--kv-heads", "--head-dim-v"))
