"""The benchmarks: each command end to end in its quick form (functional, not timed), and their pure parts."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.__main__ import parser
from bench.core import Check, Interval, Summary, interleave, time_calls
from bench.http_load import hey_available, server_timing
from bench.report import pareto_front, table, update_section
from bench.sweep import ensemble, single, size_for
from ensemble_contract.modes import Mode

ROOT = Path(__file__).resolve().parents[1]
COMMAND_TIMEOUT_S = 300
MODES = tuple(mode.value for mode in Mode)  # the test build ships the int8 graph: every mode is served


def bench(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m bench ARGS --quick --runs 5` from the repository root; fails the test with its output."""
    command = [sys.executable, "-m", "bench", *map(str, args), "--quick", "--runs", "5"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-3000:]}"
    return done


def test_sweep_quick_builds_measures_charts_and_writes_the_docs(model_dir: Path, tmp_path: Path) -> None:
    # The quick sweep trains like the test preset, so the conftest's members are reused, not retrained; the
    # conftest's model stands in for models/default as the model the targets are checked on.
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\nMethod, written by hand.\n")
    out = tmp_path / "out"
    bench(
        "sweep",
        "--widths",
        "2",
        "--ensembles",
        "2xw2",
        "--reuse-members",
        model_dir,
        "--targets-model-dir",
        model_dir,
        "--out",
        out,
        "--docs",
        docs,
    )
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    configs = {(r["model"], r["config"]) for r in rows}
    target = "test:2xw2@32px"
    assert {("w2", c) for c in ("separate-default", "separate-nospin", "fused-default", "fused-nospin")} <= configs
    for model in ("2xw2", target):
        assert {(model, c) for c in ("separate-default", "parallel", "fused-default", "alone:0", "alone:1")} <= configs
    # Two interleaved rounds of 5 timed runs: a median per round, kept in the CSV for the intervals.
    assert all(float(r["median_ms"]) > 0 and int(r["runs"]) == 10 and r["cpu"] and r["onnxruntime"] for r in rows)
    assert all(len(r["rounds_ms"].split()) == 2 and int(r["training_steps"]) == 12 for r in rows)
    assert all(0 < float(r["mean_label_accuracy"]) <= 1 for r in rows)
    for png in (out / "sweep.png", docs.parent / "sweep.png"):
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    assert (docs.parent / "sweep.csv").read_text() == (out / "sweep.csv").read_text()
    text = (out / "sweep.md").read_text()
    assert "| 2xw2 |" in text and f"Targets (on `{target}`" in text
    assert "separate-default ÷ fused-default [95 % CI]" in text
    assert "separate sessions in a loop, default options ÷ fused: " in text and "[95% CI " in text
    published = docs.read_text()
    assert published.startswith("# Benchmarks\n\nMethod, written by hand.")
    assert "<!-- bench:sweep:start -->" in published and "![sweep](sweep.png)" in published
    assert "cores, onnxruntime" in published and "python -m bench sweep" in published

    # The chart and the section again from the CSV alone, no build and no timing.
    again = tmp_path / "again"
    bench("sweep", "--from-csv", docs.parent / "sweep.csv", "--out", again, "--docs", again / "benchmarks.md")
    rendered = (again / "benchmarks.md").read_text()
    assert "re-rendered from its CSV" in rendered and "| 2xw2 |" in rendered
    assert (again / "sweep.png").stat().st_size > 10_000 and (again / "sweep.csv").is_file()


def test_scale_quick_builds_the_pair_times_both_sides_per_layout_and_charts(tmp_path: Path) -> None:
    bench("scale", "--out", tmp_path)
    rows = json.loads((tmp_path / "scale.json").read_text())
    assert {r["size"] for r in rows} == {32}
    assert {(r["threads"], r["spinning"]) for r in rows} == {(2, True), (2, False), (1, True)}
    assert all(r["rounds"] == 2 and r["runs"] == 10 and r["separate_ms"] > 0 and r["fused_ms"] > 0 for r in rows)
    assert all(r["ratio"]["low"] <= r["ratio"]["mean"] <= r["ratio"]["high"] for r in rows)
    assert (tmp_path / "models" / "32px" / "ensemble.onnx").is_file()
    assert (tmp_path / "scale.png").stat().st_size > 10_000
    text = (tmp_path / "scale.md").read_text()
    assert "separate ÷ fused [95 % CI]" in text and "| **32** |" in text and "python -m bench scale" in text


def test_load_quick_against_the_service_and_the_baseline(model_dir: Path, tmp_path: Path) -> None:
    bench("load", "--model-dir", model_dir, "--out", tmp_path, "--requests", "4", "--rate", "20")
    report = json.loads((tmp_path / "load.json").read_text())
    assert set(report["floor"]) == set(MODES)
    points = {(r["target"], r["mode"], r["pattern"], r["concurrency"]) for r in report["results"]}
    for mode in (*MODES, "compare"):
        assert {("service", mode, "closed", c) for c in (1, 2, 4, 8)} <= points
        assert ("service", mode, "open", None) in points
    assert ("baseline", "default", "closed", 1) in points
    closed = [r for r in report["results"] if r["pattern"] == "closed"]
    assert all(r["error_rate"] == 0 and r["ok"] > 0 for r in closed), [r["statuses"] for r in closed]
    compare = next(r for r in closed if r["mode"] == "compare" and r["concurrency"] == 4)
    assert set(compare["by_mode"]) <= set(MODES) and compare["by_mode"]
    assert report["service_rss_idle_bytes"] > 0
    service_c1 = [r for r in closed if r["target"] == "service" and r["concurrency"] == 1]
    assert all({"inference", "total"} <= set(r["server_timing_p50_ms"]) for r in service_c1)
    text = (tmp_path / "load.md").read_text()
    assert "Where a request's time goes" in text
    # The overload rounds: a service of one slot under 4x its saturation, and an upload that stalls.
    assert len(report["overload"]) == 2
    for turn in report["overload"]:
        assert turn["stalled_upload_status"] == 408 and turn["stalled_upload_s"] >= 1.0
        assert turn["saturated"]["ok"] > 0 and turn["overload"]["rate_rps"] == 4 * turn["saturated"]["throughput_rps"]
        assert set(turn["overload"]["statuses"]) <= {"200", "503"}, turn["overload"]["statuses"]
    overload = [line for line in text.splitlines() if line.startswith(("- MET", "- MISSED"))]
    assert [line.split(":")[0].split(maxsplit=2)[2] for line in overload] == [
        "refusals' p50, ms",
        "refusals' p95 / accepted p50",
        "accepted p99 / p99 of one client alone",
        "goodput / throughput at 4 clients",
        "stalled upload's 408 after / BODY_TIMEOUT_S",
    ]
    assert all("[95% CI " in line for line in overload)


def test_interference_quick(model_dir: Path, tmp_path: Path) -> None:
    bench("interference", "--model-dir", model_dir, "--out", tmp_path)
    rows = json.loads((tmp_path / "interference.json").read_text())
    assert {(r["allow_spinning"], r["mode"]) for r in rows} == {
        (spinning, mode) for spinning in (False, True) for mode in MODES
    }
    assert "interleaved ÷ alone" in (tmp_path / "interference.md").read_text()


def test_quant_quick_scores_int8_next_to_fp32(model_dir: Path, tmp_path: Path) -> None:
    bench("quant", "--model-dir", model_dir, "--out", tmp_path, "--calibration-images", "4")
    variants = {v["name"]: v for v in json.loads((tmp_path / "quant.json").read_text())}
    assert set(variants) == {"fp32", "int8-dynamic", "int8-static"}
    assert variants["int8-static"]["size_bytes"] < variants["fp32"]["size_bytes"] / 2
    assert all(v["metrics"]["images"] == variants["fp32"]["metrics"]["images"] for v in variants.values())


COMMANDS = ("sweep", "scale", "load", "interference", "quant", "compare", "layouts", "peers")
QUICK = COMMANDS[:5]  # the commands with a smoke-test form


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args([command, "--help"] if command else ["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    if command is None:
        assert all(c in text for c in COMMANDS)
    else:  # the experiment's own module describes it; those with a smoke-test form take --quick
        assert f"`python -m bench {command}" in text
        assert ("--quick" in text) == (command in QUICK)


def test_server_timing_header_is_parsed() -> None:
    assert server_timing("preprocess;dur=0.5, queue;dur=0.012,inference;dur=2, total;dur=2.6") == {
        "preprocess": 0.5,
        "queue": 0.012,
        "inference": 2.0,
        "total": 2.6,
    }
    assert server_timing("") == {} and server_timing("cache;desc=hit, x;dur=nan?") == {}


def test_ensemble_labels_give_members_distinct_seeds() -> None:
    spec = ensemble("2xw2+w3")
    assert [(m.width_scale, m.seed) for m in spec.members] == [(2, 1), (2, 2), (3, 1)]
    assert spec.dir_name == "2xw2_w3" and spec.widths == "2+2+3" and spec.is_ensemble
    assert single(5).members[0].name == "unet-w5-s1" and not single(5).is_ensemble
    for bad in ("w2", "2w2", "x3"):
        with pytest.raises(ValueError):
            ensemble(bad)


def test_time_calls_rotates_and_respects_its_bounds() -> None:
    order: list[str] = []
    samples = time_calls([lambda: order.append("a"), lambda: order.append("b")], warmup=1, runs=3, max_seconds=60)
    assert order == ["a", "b"] * 4 and [len(s) for s in samples] == [3, 3]
    # Past max_seconds after its first timed round, it stops there, however many rounds were asked for.
    assert len(time_calls([lambda: time.sleep(0.02)], warmup=0, runs=10**9, max_seconds=0.01)[0]) == 1


def test_interleave_rotates_the_order_each_round() -> None:
    order: list[str] = []
    figures = interleave(["a", "b", "c"], 3, lambda key: order.append(key) or len(order))
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert figures == {"a": [1, 6, 8], "b": [2, 4, 9], "c": [3, 5, 7]}


def test_ratio_intervals_are_taken_within_rounds() -> None:
    # The machine halves its speed in round 2: both sides move, the ratio does not.
    interval = Interval.of_ratios([10.0, 20.0, 10.0], [5.0, 10.0, 5.0])
    assert interval.mean == pytest.approx(2.0) and interval.low == pytest.approx(2.0)
    assert Interval.of_ratios([3.0], [1.0]).brief() == "3.00 [-inf-inf]"


def test_size_for_a_target_latency_probes_towards_it() -> None:
    probed: list[int] = []

    def latency_ms(size: int) -> float:  # grows with the pixels: 170 ms at 400x400
        probed.append(size)
        return 170 * (size / 400) ** 2

    assert size_for(170, latency_ms, start=48) == 384  # 157 ms: within 10 % of the target, the search stops
    assert probed == [48, 96, 192, 384]  # at most a doubling a probe
    assert size_for(170, lambda size: 170 * (size / 400) ** 2, start=48, largest=256) == 256
    assert size_for(1.0, lambda size: 10.0, start=64) == 64  # nothing moves it: no probe is repeated


def test_pareto_front_keeps_what_nothing_beats_on_both_counts() -> None:
    points = [(5.0, 0.90), (6.0, 0.89), (7.0, 0.93), (7.0, 0.91), (12.0, 0.93), (20.0, 0.95)]
    assert pareto_front(points) == [(5.0, 0.90), (7.0, 0.93), (20.0, 0.95)]


def test_summary_and_checks() -> None:
    summary = Summary.of([0.001 * i for i in range(1, 101)])
    assert summary.count == 100 and summary.median_ms == pytest.approx(50.5) and summary.p95_ms > summary.median_ms
    assert Check("x", 1.05, 1.10).verdict == "met" and Check("x", 1.2, 1.5, at_most=False).verdict == "MISSED"
    assert Check("x", float("nan"), 1.0).verdict == "not measured"


def test_update_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nHand-written method.\n")
    update_section(docs, "sweep", table(["a"], [[1.0]]))
    update_section(docs, "load", "first")
    update_section(docs, "load", "second")
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written method.")
    assert "| 1.00 |" in text and "second" in text and "first" not in text


def report_of(*args: str | Path) -> list[str]:
    """The lines `python -m bench ARGS` prints (a command without a quick form); fails the test if it fails."""
    command = [sys.executable, "-m", "bench", *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-3000:]}"
    return done.stdout.splitlines()


def test_compare_times_every_mode_of_a_users_ensemble_in_process_and_over_v2(tabular_dir: Path) -> None:
    report = report_of("compare", "--model-dir", tabular_dir, "--rounds", "2", "--calls", "3", "--requests", "5")
    assert any(line.startswith("machine: ") for line in report)
    for section in ("in-process", "through the service, /v2"):
        start = next(i for i, line in enumerate(report) if line.startswith(section))
        rows = report[start + 1 : start + 1 + len(Mode)]
        assert tuple(row.split()[0] for row in rows) == MODES
        assert rows[0].split()[3] == "1.00x"  # fused against itself
        assert report[start + 1 + len(Mode)].startswith("verdict: ")


def test_the_verdict_needs_the_whole_interval() -> None:
    from bench.compare import Ratio, verdict

    fused = Ratio(Mode.FUSED, 1.0, 1.0, 1.0, 1.0)
    assert verdict([fused, Ratio(Mode.PARALLEL, 0.8, 0.8, 0.7, 0.9)]).startswith("parallel beats fused")
    assert verdict([fused, Ratio(Mode.PARALLEL, 0.8, 0.8, 0.7, 1.1)]).startswith("fused is not beaten; parallel")
    assert verdict([fused, Ratio(Mode.SEQUENTIAL, 1.2, 1.2, 1.1, 1.3)]).startswith("fused is the fastest")


@pytest.mark.skipif(not hey_available(), reason="no hey (Debian: apt-get install hey); .ci/run installs it")
def test_layouts_compares_one_slot_with_autos_layout_and_checks_goodput(model_dir: Path) -> None:
    report = report_of("layouts", "--model-dir", model_dir, "--rounds", "2", "--seconds", "0.5", "--auto-budget-s", "2")
    assert report[0].startswith("machine: ") and report[2].startswith("auto chose ")
    checks = [line for line in report if line.startswith(("MET", "MISSED"))]
    assert [line.split(":")[0].split(maxsplit=1)[1] for line in checks] == [
        "auto's choice / the best, all measured again in-process",
        "saturated throughput, fused",
        "saturated throughput, fused-int8",
        "goodput at 32 retrying clients / throughput at 4",
        "refusals' p99 at 32 clients, ms",
        "accepted p99 at 32 clients, ms",
    ]
    assert all("[95% CI " in line for line in checks)


KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"


@pytest.mark.skipif(not hey_available(), reason="no hey (Debian: apt-get install hey); .ci/run installs it")
@pytest.mark.skipif(not KSERVE_PYTHON.exists(), reason="no .venv-kserve: `make kserve-venv` (.ci/run makes it)")
def test_peers_measures_us_against_kserve_on_the_same_graph(model_dir: Path) -> None:
    report = report_of(
        "peers", "--model-dir", model_dir, "--rounds", "2", "--seconds", "0.5", "--kserve-python", KSERVE_PYTHON
    )
    checks = [line for line in report if line.startswith(("MET", "MISSED"))]
    assert len(checks) == 9 and all("[95% CI " in line for line in checks)
    assert {line.split()[0] for line in report if " goodput c=32: " in line} == {"ours", "kserve", "naive"}
