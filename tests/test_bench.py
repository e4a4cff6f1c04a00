"""The benchmark: its interleaved rounds and ratios on made-up timings (a machine slowing down
during the run, passes timed apart from the step), and the real thing on tiny settings: a
well-formed table and CSV, no timing assertions."""
import csv

import pytest
import torch

from bench import __main__ as bench
from bench import batched
from bench.measure import busy_cores
from bench.cases import BUILDERS, TINY
from bench.measure import Session
from bench.rounds import PASSES, STEP, schedule, summarise

MODES = ("base", "afan", "advprop")
# Made-up step and passes times (s), about the CPU's classification case.
TRUE = {("base", STEP): 0.44, ("afan", STEP): 1.9, ("advprop", STEP): 3.0, ("afan", PASSES): 1.85}


def timed(order, slowdown) -> dict:
    """The timings a machine whose speed follows ``slowdown(fraction of the run done)`` gives
    for the visits in ``order``, each taken at its middle."""
    total, clock, times = sum(TRUE[visit] for visit in order), 0.0, {}
    for visit in order:
        times.setdefault(visit, []).append(TRUE[visit] * slowdown((clock + TRUE[visit] / 2) / total))
        clock += TRUE[visit]
    return times


def summaries(times):
    return summarise(times, MODES, "base", "advprop")


@pytest.fixture
def one_thread():
    """The in-process cases on one thread: on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_round_visits_the_modes_forward_then_back():
    assert schedule(MODES, ["afan"]) == [("base", STEP), ("afan", STEP), ("advprop", STEP), ("afan", PASSES),
                                         ("afan", PASSES), ("advprop", STEP), ("afan", STEP), ("base", STEP)]


def test_the_ratios_survive_a_machine_slowing_down_threefold_during_the_run():
    """Slowing linearly to 3x over ten rounds, with a burst of another job doubling the times in
    one of them: each ratio's median stays within 1% of the truth. Timed one mode after the
    other, as the benchmark did before, the same machine puts them off by a third or more."""

    def slowdown(done):
        return (1 + 2 * done) * (2 if 0.42 < done < 0.47 else 1)

    interleaved = summaries(timed(schedule(MODES, ["afan"]) * 10, slowdown))["afan"]
    assert interleaved.x_ref.median == pytest.approx(1.9 / 0.44, rel=0.01)
    assert interleaved.x_versus.median == pytest.approx(1.9 / 3.0, rel=0.01)
    assert interleaved.step_over_needed.median == pytest.approx(1.9 / 1.85, rel=0.01)
    assert interleaved.reliable and not interleaved.overhead
    apart = summaries(timed([visit for visit in TRUE for _ in range(20)], slowdown))["afan"]
    assert apart.x_ref.median > 1.3 * 1.9 / 0.44 and apart.step_over_needed.median < 0.75 * 1.9 / 1.85
    assert not apart.reliable  # step / needed below 0.9: the passes' conditions were not the step's


def measured(times, profiles=None) -> dict:
    """What ``measure_rounds`` returns, for ``times`` made up."""
    info = {mode: {"device": "cpu", "precision": "fp32", "description": "tiny"} for mode in MODES}
    return {"times": times, "summaries": summaries(times), "profiles": profiles or {},
            "peaks": {"base": 100 * 2 ** 20, "afan": 150 * 2 ** 20, "advprop": 180 * 2 ** 20}, "info": info}


def test_rows_give_ratios_with_their_range_and_mark_impossible_ones_unreliable():
    steady = timed(schedule(MODES, ["afan"]) * 3, lambda done: 1.0)
    base, afan_row, advprop = bench.rows_of("t", measured(steady), "base", "advprop")
    assert base["x_ref"] == 1 and base["needed_ms"] is None and base["reliable"] and base["note"] is None
    assert afan_row["x_ref"] == pytest.approx(1.9 / 0.44) and afan_row["mem_x_ref"] == pytest.approx(1.5)
    assert afan_row["x_versus"] == pytest.approx(1.9 / 3.0) and advprop["x_versus"] == 1
    assert afan_row["rounds"] == 3 and afan_row["step_over_needed_low"] == pytest.approx(1.9 / 1.85)
    table = bench.format_table([base, afan_row, advprop])
    assert table.splitlines()[0] == ("| task | mode | device | precision | step ms | × base | × advprop | peak MiB | "
                                     "mem × base | needed ms | step / needed |")
    assert "| t | afan | cpu | fp32 | 1900 | 4.32 (4.32–4.32) | 0.63 (0.63–0.63) | 150 | 1.50 | 1850 | 1.03" in table

    slow_passes = {**steady, ("afan", PASSES): [t * 1.25 for t in steady[("afan", PASSES)]]}  # 1.9 / 2.31
    rows = bench.rows_of("t", measured(slow_passes), "base", "advprop")
    assert not rows[1]["reliable"] and rows[1]["step_over_needed"] == pytest.approx(1.9 / 1.85 / 1.25)
    table = bench.format_table(rows)
    assert "| 150 | 1.50 | unreliable | unreliable |" in table
    assert "t afan: unreliable: step / needed 0.82 (0.82–0.82) is below 0.9" in table


def test_a_step_above_its_passes_names_what_it_spends_the_difference_on():
    times = timed(schedule(MODES, ["afan"]) * 2, lambda done: 1.0)
    times[("afan", PASSES)] = [t / 1.1 for t in times[("afan", PASSES)]]
    rows = bench.rows_of("t", measured(times, {"afan": [("aten::add_", 12.5, 150)]}), "base", "advprop")
    assert rows[1]["reliable"] and "step minus passes: aten::add_ +12.5 ms (+150 calls)" in rows[1]["note"]


@pytest.mark.parametrize("task", sorted(BUILDERS))
def test_each_task_times_its_afan_step_and_passes_in_process(task, tmp_path, device, one_thread):
    overrides = [*TINY[task], *([f"data.root={tmp_path}"] if task == "detection" else [])]
    session = Session(BUILDERS[task], "afan", str(device), overrides, warmup=0)
    assert session.step() > 0 and session.passes() > 0 and session.info["description"]
    expected = {"clean", "se_attack", "se_strength"} | ({"sd_attack", "sd_strength"} if task != "classification" else set())
    assert set(session.info["passes"]) == expected
    assert session.info["passes"]["se_strength"] == {"classification": 1, "detection": 4, "segmentation": 2}[task]
    if task == "classification":
        profile = session.profile()
        assert all(isinstance(name, str) and ms > 0 for name, ms, _ in profile)


def test_the_batched_benchmark_times_the_same_afan_step_in_both_modes(one_thread):
    """Built alike, the per-strength and the joined (``AFAN(batched=True)``) steps give the
    same loss and gradients."""
    results = []
    for mode in batched.MODES:
        torch.manual_seed(0)
        case = batched.groupnorm(mode, torch.device("cpu"), ["batch_size=2", "image_size=16"])
        loss = case.step()
        results.append((loss.detach(), [p.grad for p in case.model.parameters()]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_the_batched_detection_case_runs_the_task_step_with_its_strengths_joined(one_thread, tmp_path):
    overrides = [*batched.TINY["detection"], f"data.root={tmp_path}"]
    for mode in batched.MODES:
        torch.manual_seed(0)
        case = batched.detection(mode, torch.device("cpu"), overrides)
        assert torch.isfinite(case.step()) and case.passes == {}
        assert ("strengths joined" in case.description) == (mode == "batched")


def test_busy_cores_from_two_readings_of_proc_stat():
    """Between the readings 370 ticks passed; 150 of them busy (user, nice, system, irq, softirq,
    steal), 220 idle or waiting for I/O; the guest column is part of user already."""
    before = "cpu  100 0 50 800 50 0 0 0 20 0\ncpu0 1 2 3 4\n"
    after = "cpu  200 10 70 1010 60 5 5 10 60 0\ncpu0 1 2 3 4\n"
    assert busy_cores(before, after, 4) == pytest.approx(4 * 150 / 370)
    assert busy_cores(before, before, 4) == 0


def test_command_line_writes_the_table_and_csv(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert bench.main(["--tiny", "--device", "cpu", "--tasks", "segmentation", "--modes", "afan", "--warmup", "0",
                       "--repeats", "1", "--threads", "1", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| segmentation | base | cpu | fp32 |" in printed and "| segmentation | afan | cpu | fp32 |" in printed
    rows = list(csv.DictReader(open(out)))
    assert [r["mode"] for r in rows] == ["base", "afan"] and float(rows[1]["step_over_needed"]) > 0
    assert rows[1]["rounds"] == "1" and float(rows[1]["x_ref_low"]) <= float(rows[1]["x_ref_high"])
    assert bench.main(["--tasks", "segmentaton"]) == 2
    assert "unknown task or mode ['segmentaton']" in capsys.readouterr().err


def test_command_line_advprop_in_bf16(tmp_path):
    out = tmp_path / "bench.csv"
    assert bench.main(["--tiny", "--device", "cpu", "--tasks", "classification", "--modes", "advprop", "--warmup",
                       "0", "--repeats", "1", "--threads", "1", "--precision", "bf16", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["mode"], r["precision"]) for r in rows] == [("base", "bf16"), ("advprop", "bf16")]


def test_command_line_batched_cases(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert bench.main(["--batched", "--tiny", "--device", "cpu", "--tasks", "groupnorm", "--warmup", "0",
                       "--repeats", "1", "--threads", "1", "--csv", str(out)]) == 0
    assert "| groupnorm | batched | cpu | fp32 |" in capsys.readouterr().out
    assert [r["ref"] for r in csv.DictReader(open(out))] == ["per_strength", "per_strength"]
