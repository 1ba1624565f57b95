"""`recmerge data prepare` as a user runs it: one summary line, one-line errors, never a traceback.

A few cases run a real subprocess (`python -m app.cli`); the others call `app.cli.main` in-process,
the same code path, because each subprocess pays the CLI's full import time (torch) again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from models.data import PreparedDataset

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "data"
PYTHON = ROOT / ".venv" / "bin" / "python"


def recmerge(*args, env=None) -> subprocess.CompletedProcess:
    exe = str(PYTHON) if PYTHON.exists() else sys.executable
    return subprocess.run([exe, "-m", "app.cli", "data", "prepare", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    rc = main(["data", "prepare", *map(str, args)])
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, cap.out, cap.err)


def assert_one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recmerge data: error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_prepare_ml100k_prints_summary(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is absent")
    res = recmerge("--source", DATA / "ml-100k", "--out", tmp_path / "ml")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    out = res.stdout.strip().splitlines()
    assert out[:3] == ["read 100,000 interactions of 943 users and 1,682 items",
                       "--min-item 0: removed nothing", "--min-user 5: removed nothing"]
    fp = PreparedDataset.load(tmp_path / "ml").fingerprint
    assert len(out) == 4 and "943 users, 1,682 items, 100,000 interactions" in out[3] and out[3].endswith(fp)


def test_prepare_csv_with_column_options_and_format(tmp_path, capsys):
    f = tmp_path / "events.txt"
    f.write_text("when,who,what\n" + "".join(f"{t},u{t % 2},{t % 5}\n" for t in range(12)))
    res = in_process(capsys, "--source", f, "--format", "csv", "--user-col", "who", "--item-col", "what",
                   "--order-col", "when", "--min-user", "3", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    ds = PreparedDataset.load(tmp_path / "out")
    assert ds.user_ids == ["u0", "u1"] and ds.n_interactions == 12
    assert [ds.item_ids[i - 1] for i in ds.sequence(0)] == ["0", "2", "4", "1", "3", "0"]


def test_prepare_prints_what_each_filter_removed(tmp_path, capsys):
    # u1..u3 have 5 events each; u4 has 2 (dropped by --min-user 5). Item 9 is seen once (dropped by
    # --min-item 2), which leaves u3 with 4 events: the user filter then drops u3 as well, and with it
    # item 8, which only u3 and u4 had.
    rows = [("u1", i) for i in (1, 2, 3, 4, 5)] + [("u2", i) for i in (1, 2, 3, 4, 5)]
    rows += [("u3", i) for i in (1, 2, 3, 8, 9)] + [("u4", 8), ("u4", 1)]
    f = write(tmp_path / "r.csv", "user,item,ts\n" + "".join(f"{u},{i},{t}\n" for t, (u, i) in enumerate(rows)))
    res = in_process(capsys, "--source", f, "--min-item", "2", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:3] == [
        "read 17 interactions of 4 users and 7 items",
        "--min-item 2: removed 1 item with fewer than 2 interactions (1 interaction)",
        "--min-user 5: removed 2 users with fewer than 5 interactions (6 interactions; left 1 item with none)",
    ]
    assert len(res.stdout.splitlines()) == 4  # and the summary
    assert PreparedDataset.load(tmp_path / "out").n_interactions == 10


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_missing_source_subprocess(tmp_path):
    res = recmerge("--source", tmp_path / "nope.csv", "--out", tmp_path / "out")
    assert_one_line_error(res, "nope.csv", "no such file")
    assert res.returncode == 2


ERRORS = {  # case: (file name, content, extra options, fragments the message must hold)
    "empty": ("u.data", "", [], ["u.data", "empty"]),
    "columns": ("r.csv", "a,b,c\n1,2,3\n", [], ["r.csv", "no user column"]),
    "order": ("r.csv", "user,item,time\n1,2,soon\n", [], ["r.csv", "order column 'time' is not numeric"]),
    "filtered": ("r.csv", "user,item,ts\n1,2,3\n1,3,4\n", [], ["r.csv", "no interactions left after filtering"]),
    "min_user": ("r.csv", "user,item,ts\n1,2,3\n", ["--min-user", "2"], ["min_user must be >= 3"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_are_one_line(tmp_path, capsys, case):
    name, content, options, fragments = ERRORS[case]
    out = tmp_path / "out"
    res = in_process(capsys, "--source", write(tmp_path / name, content), *options, "--out", out)
    assert_one_line_error(res, *fragments)
    assert res.returncode == 2
    assert not out.exists()


def test_existing_out_is_protected(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    f = write(tmp_path / "r.csv", "user,item,ts\n" + "".join(f"1,{i},{i}\n" for i in range(5)))
    res = in_process(capsys, "--source", f, "--out", out)
    assert_one_line_error(res, str(out), "not a prepared dataset")
    assert (out / "keep.txt").read_text() == "precious"


def test_unreachable_download_is_one_line(tmp_path):
    from tests.offline_pip import pip_env

    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "RECMERGE_ML100K_URL": "http://127.0.0.1:9/ml-100k.zip",
           "RECMERGE_DOWNLOAD_TIMEOUT": "3", **pip_env(tmp_path, None)}
    res = recmerge("--source", "ml-100k", "--out", tmp_path / "out", env=env)
    assert_one_line_error(res, "could not download ml-100k", "127.0.0.1:9/ml-100k.zip", "pip download recbole==1.2.1")
