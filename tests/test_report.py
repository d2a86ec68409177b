"""`missrec summarize`: seeds of one model become one mean ± std row; bad runs are named."""

from __future__ import annotations

import json

import pytest

from datapipes.schema import DataError
from missrec_torchrec.cli import main
from missrec_torchrec.report import summarize


def fake_run(path, **test):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"test": test}))
    return path


def test_seeds_are_mean_and_sample_std(tmp_path, capsys):
    runs = [fake_run(tmp_path / f"id-s{i}", **{"hr@10": hr, "ndcg@10": 0.1}) for i, hr in enumerate([0.2, 0.3, 0.4])]
    runs.append(fake_run(tmp_path / "text", **{"hr@10": 0.25, "ndcg@10": 0.125}))
    table = summarize(runs, ["ID-only"] * 3 + ["text"], ["hr@10", "ndcg@10"])
    lines = table.splitlines()
    assert lines[0] == "| run | runs | hr@10 | ndcg@10 |"
    # mean(.2, .3, .4) = .3; sample std = sqrt(((.1)^2 + 0 + (.1)^2) / 2) = .1
    assert lines[2] == "| ID-only | 3 | .3000 ± .1000 | .1000 ± .0000 |"
    assert lines[3] == "| text | 1 | .2500 | .1250 |"
    assert main(["summarize", str(runs[3]), "--metric", "hr@10"]) == 0
    assert "| text | 1 | .2500 |" in capsys.readouterr().out


def test_unfinished_run_and_missing_metric_are_named(tmp_path, capsys):
    (tmp_path / "running").mkdir()
    assert main(["summarize", str(tmp_path / "running")]) == 2
    assert "running: no results.json" in capsys.readouterr().err
    run = fake_run(tmp_path / "short", **{"hr@10": 0.1})
    with pytest.raises(DataError, match="short: results.json has no test hr@200"):
        summarize([run], metrics=["hr@200"])


def test_fixed_rows_and_the_bar_chart_carry_the_table(tmp_path, capsys):
    from missrec_torchrec.plots import plot_bars
    from missrec_torchrec.report import rows_of

    runs = [fake_run(tmp_path / f"m-s{i}", **{"hr@10": hr, "ndcg@10": 0.1}) for i, hr in enumerate([0.2, 0.4])]
    spec = "Markov:hr@10=.1092,ndcg@10=.0552"
    assert main(["summarize", *map(str, runs), "--group", "m", "--group", "m", "--metric", "hr@10",
                 "--metric", "ndcg@10", "--row", spec, "--bars", str(tmp_path / "bars.png")]) == 0
    out = capsys.readouterr().out
    assert "| m | 2 | .3000 ± .1414 | .1000 ± .0000 |" in out and "| Markov | 1 | .1092 | .0552 |" in out
    assert (tmp_path / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = plot_bars(rows_of(runs, ["m", "m"], ["hr@10"], [spec]), ["hr@10"], tmp_path / "again.png")
    assert drawn["hr@10"]["m"] == pytest.approx((0.3, 0.1414213), abs=1e-6)
    assert drawn["hr@10"]["Markov"] == (0.1092, 0.0)
    for bad in ("Markov", "Markov:hr@10=x", "Markov:ndcg@10=.05"):
        assert main(["summarize", str(runs[0]), "--metric", "hr@10", "--row", bad]) == 2
        assert "--row" in capsys.readouterr().err
