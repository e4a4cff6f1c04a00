"""The benchmark on its tiny setting: a well-formed table and CSV (no timing assertions), and
its arithmetic on made-up measurements."""
import csv

import pytest

from bench import __main__ as bench
from bench.cases import BUILDERS, TINY
from bench.measure import measure


def test_rows_are_ratios_to_base_and_the_needed_passes():
    results = [
        {"task": "t", "mode": "base", "device": "cpu", "precision": "fp32", "description": "d", "step_s": 0.2, "peak_bytes": 100, "passes": {}},
        {"task": "t", "mode": "afan", "device": "cpu", "precision": "fp32", "description": "d", "step_s": 0.5, "peak_bytes": 150,
         "passes": {"clean": {"seconds": 0.2, "count": 1}, "se_attack": {"seconds": 0.05, "count": 2},
                    "se_strength": {"seconds": 0.1, "count": 2}}},
    ]
    base, afan = bench.rows_of(results)
    assert base["x_base"] == 1 and base["needed_ms"] is None
    assert afan["x_base"] == pytest.approx(2.5) and afan["mem_x_base"] == pytest.approx(1.5)
    assert afan["needed_ms"] == pytest.approx(500) and afan["step_over_needed"] == pytest.approx(1.0)
    table = bench.format_table([base, afan])
    assert table.splitlines()[0].startswith("| task | mode |") and "| t | afan | cpu | fp32 | 500 | 2.50 |" in table


@pytest.mark.parametrize("task", sorted(BUILDERS))
def test_each_task_measures_every_mode_in_process(task, tmp_path, device):
    overrides = [*TINY[task], *([f"data.root={tmp_path}"] if task == "detection" else [])]
    afan = measure(task, "afan", str(device), overrides, warmup=0, repeats=1)
    assert afan["step_s"] > 0 and afan["description"]
    expected = {"clean", "se_attack", "se_strength"} | ({"sd_attack", "sd_strength"} if task != "classification" else set())
    assert set(afan["passes"]) == expected and all(p["seconds"] > 0 for p in afan["passes"].values())
    assert afan["passes"]["se_strength"]["count"] == {"classification": 1, "detection": 4, "segmentation": 2}[task]
    for mode in ("base", "advprop"):
        assert measure(task, mode, str(device), overrides, warmup=0, repeats=1)["passes"] == {}


def test_command_line_writes_the_table_and_csv(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert bench.main(["--tiny", "--device", "cpu", "--tasks", "segmentation", "--modes", "afan", "--warmup", "0",
                       "--repeats", "1", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| segmentation | base | cpu | fp32 |" in printed and "| segmentation | afan | cpu | fp32 |" in printed
    rows = list(csv.DictReader(open(out)))
    assert [r["mode"] for r in rows] == ["base", "afan"] and float(rows[1]["step_over_needed"]) > 0
    assert bench.main(["--tiny", "--device", "cpu", "--tasks", "classification", "--modes", "base", "--warmup", "0",
                       "--repeats", "1", "--precision", "bf16", "--csv", str(out)]) == 0
    assert list(csv.DictReader(open(out)))[0]["precision"] == "bf16"
    assert bench.main(["--tasks", "segmentaton"]) == 2
    assert "unknown task or mode ['segmentaton']" in capsys.readouterr().err
