"""The benchmarks: each command end to end in its quick form (functional, never timed: what it writes exists and is
well formed), and their pure parts."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.core.auto import layouts
from app.engine.resources import usable_cores
from bench.__main__ import COMMANDS, parser
from bench.common import Budget, Interval, interleave, table, update_section
from bench.compare import Ratio, trimmed_mean, verdict
from bench.service import free_port, server_process, v2_json_body
from bench.serving import Run, Target, load_table, v2_body
from bench.sweep import ensemble, pareto_front, single
from ensemble_contract.manifest import Manifest, load_manifest
from ensemble_contract.modes import Mode, served_modes

ROOT = Path(__file__).resolve().parents[1]
COMMAND_TIMEOUT_S = 300
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
LITSERVE_PYTHON = ROOT / ".venv-litserve" / "bin" / "python"
needs_hey = pytest.mark.skipif(shutil.which("hey") is None, reason="no hey (Debian: apt-get install hey)")


def bench(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m bench ARGS --quick` from the repository root; fails the test with its output."""
    command = [sys.executable, "-m", "bench", *map(str, args), "--quick"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-3000:]}"
    return done


def markdown_rows(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of every markdown table in `text` whose first column is headed `first_header`, as dicts."""
    rows: list[dict[str, str]] = []
    headers: list[str] = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and cells[0] == first_header:
            headers = cells
        elif cells and headers and not set(cells[0]) <= {"-"}:
            rows.append(dict(zip(headers, cells, strict=True)))
        elif not cells:
            headers = []
    return rows


def test_sweep_quick_builds_measures_charts_and_writes_the_docs(model_dir: Path, tmp_path: Path) -> None:
    # The quick sweep trains like the test preset, so the conftest's members are reused, not retrained.
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\nMethod, written by hand.\n")
    out = tmp_path / "out"
    sweep = ("sweep", "--widths", "2", "--ensembles", "2xw2", "--reuse-members", model_dir, "--runs", "5")
    printed = bench(*sweep, "--out", out, "--docs", docs).stdout
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    configs = {(r["model"], r["config"]) for r in rows}
    single_configs = ("separate-default", "separate-nospin", "fused-default", "fused-nospin")
    assert configs == {("w2", c) for c in single_configs} | {
        ("2xw2", c) for c in (*single_configs, "parallel", "alone:0", "alone:1")
    }
    # Two interleaved rounds of 5 timed runs: a median per round, kept in the CSV for the intervals.
    assert all(float(r["median_ms"]) > 0 and int(r["runs"]) == 10 and r["cpu"] and r["onnxruntime"] for r in rows)
    assert all(len(r["rounds_ms"].split()) == 2 and int(r["training_steps"]) == 12 for r in rows)
    assert all(0 < float(r["mean_label_accuracy"]) <= 1 for r in rows)
    for png in (out / "sweep.png", docs.parent / "sweep.png"):
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    assert (docs.parent / "sweep.csv").read_text() == (out / "sweep.csv").read_text()
    text = (out / "sweep.md").read_text()
    assert text.strip() == printed.strip()
    assert [r["model"] for r in markdown_rows(text, "model")] == ["w2", "2xw2"]
    ensemble_row = markdown_rows(text, "model")[1]
    assert ensemble_row["separate-default ÷ fused-default [95 % CI]"].count("[") == 1
    assert "Against the published claims (on `2xw2`" in text
    assert "separate sessions in a loop ÷ fused, spinning on: " in text
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


def test_sweep_rerenders_the_published_csv(tmp_path: Path) -> None:
    # docs/sweep.csv holds a configuration no longer measured (one global thread pool): still readable.
    bench("sweep", "--from-csv", ROOT / "docs" / "sweep.csv", "--out", tmp_path, "--no-docs")
    rows = markdown_rows((tmp_path / "sweep.md").read_text(), "model")
    assert [r["model"] for r in rows] == ["w2", "w3", "w4", "w5", "w6", "w7", "2xw2", "3xw2", "2xw3", "w2+w3", "w2+w7"]


@needs_hey
def test_compare_quick_times_every_mode_of_a_users_ensemble_in_process_and_over_v2(
    tabular_dir: Path, tmp_path: Path
) -> None:
    text = bench("compare", "--model-dir", tabular_dir, "--out", tmp_path).stdout
    rows = markdown_rows(text, "mode")
    assert tuple(r["mode"] for r in rows) == served_modes(load_manifest(tabular_dir))
    assert all(r["in-process"].endswith(" ms") and r["over /v2"].endswith(" ms") for r in rows)
    assert rows[0]["÷ fused [95 % CI]"] == "1.00 [1.00-1.00]"  # fused against itself
    assert "\n\nIn-process: " in text and "\n\nOver /v2: " in text


def load_rows(text: str) -> list[dict[str, str]]:
    """The rows of the load tables (peers, workers), checked for what every row must hold."""
    rows = markdown_rows(text, "server")
    assert rows and all(float(r["goodput /s [95 % CI]"].split()[0]) > 0 and r["failed"] == "0" for r in rows)
    return rows


@needs_hey
def test_peers_quick_measures_us_against_triton_kserve_litserve_and_the_naive_server_when_installed(
    model_dir: Path, tmp_path: Path
) -> None:
    done = bench(
        "peers", "--model-dir", model_dir, "--out", tmp_path, "--kserve-python", KSERVE_PYTHON,
        "--triton-python", TRITON_PYTHON, "--litserve-python", LITSERVE_PYTHON,
    )  # fmt: skip
    tritons = ["triton", "triton-tuned"] if TRITON_PYTHON.is_file() else []
    litserves = ["litserve", "litserve-tuned"] if LITSERVE_PYTHON.is_file() else []
    peers = [*tritons, *(["kserve"] if KSERVE_PYTHON.is_file() else []), *litserves]
    rows = load_rows(done.stdout)
    servers = ["ours", *peers, "naive"]
    assert [(r["server"], r["clients"]) for r in rows] == [(s, c) for s in servers for c in ("1", "4", "16")]
    assert ("kserve is left out" in done.stderr) != KSERVE_PYTHON.is_file()
    assert ("triton is left out" in done.stderr) != TRITON_PYTHON.is_file()
    assert ("litserve is left out" in done.stderr) != LITSERVE_PYTHON.is_file()
    assert "the request asks for class_probs;" in done.stdout  # the same outputs of every server
    for peer in peers:  # the targets against each, one line each, whether met or not
        for target in ("p50 at 1", "goodput at 4", "goodput at 16", "p99 at 16"):
            assert f"- {target} ours ÷ {peer}: " in done.stdout
    assert "÷ naive" not in done.stdout


@pytest.mark.skipif(not LITSERVE_PYTHON.is_file(), reason="no .venv-litserve (`make litserve-venv` makes it)")
def test_the_litserve_peer_answers_each_request_of_its_batches_as_we_do(
    model_dir: Path, manifest: Manifest, client: httpx.Client, tmp_path: Path
) -> None:
    # Eight different images sent at once, which LitServe's batcher runs together: each answer is its own request's.
    path, port = f"/v2/models/{manifest.name}", free_port()
    bodies = [v2_json_body(manifest.example_inputs(seed=seed), ["class_probs"], mode="fused") for seed in range(8)]
    command = [LITSERVE_PYTHON, "-m", "bench.peer_servers", "litserve", "--model-dir", model_dir, "--port", port]
    peer = server_process(list(map(str, command)), port, tmp_path / "litserve.log", ready_path=f"{path}/ready")
    with peer as litserve, litserve.client() as http, ThreadPoolExecutor(len(bodies)) as pool:
        theirs = list(pool.map(lambda body: http.post(f"{path}/infer", json=body), bodies))
    for body, answer in zip(bodies, theirs, strict=True):
        ours = client.post(f"{path}/infer", json=body)
        assert answer.status_code == ours.status_code == 200, answer.text
        mine, their = ours.json()["outputs"], answer.json()["outputs"]
        described = [[(t["name"], t["shape"], t["datatype"]) for t in outputs] for outputs in (mine, their)]
        assert described == [[("class_probs", [1, 4], "FP32")]] * 2
        np.testing.assert_allclose(their[0]["data"], mine[0]["data"], rtol=1e-5, atol=1e-6)


@needs_hey
def test_workers_quick_measures_the_default_against_each_fixed_number_of_workers(
    model_dir: Path, tmp_path: Path
) -> None:
    text = bench("workers", "--model-dir", model_dir, "--out", tmp_path).stdout
    many = f"{usable_cores().count} workers"
    assert [(r["server"], r["clients"]) for r in load_rows(text)] == [
        (server, clients) for server in ("default", "1 worker", many) for clients in ("1", "4", "16")
    ]
    for fixed in ("1 worker", many):  # the targets, one line each, whether met or not
        assert f"- p50 at 1 default ÷ {fixed}: " in text and f"- goodput at 16 default ÷ {fixed}: " in text


@needs_hey
def test_frontend_quick_builds_the_trivial_ensemble_and_measures_each_lever(tmp_path: Path) -> None:
    done = bench("frontend", "--out", tmp_path, "--triton-python", TRITON_PYTHON)
    servers = ["ours", "asyncio", "h11", "threaded", *(["triton"] if TRITON_PYTHON.is_file() else [])]
    rows = load_rows(done.stdout)
    assert [(r["server"], r["clients"]) for r in rows] == [(s, c) for s in servers for c in ("1", "16")]
    assert load_manifest(tmp_path / "trivial").name == "trivial"
    assert ("triton is left out" in done.stderr) != TRITON_PYTHON.is_file()


@needs_hey
def test_batching_quick_compares_batched_and_unbatched_in_process_and_over_http(
    model_dir: Path, tmp_path: Path
) -> None:
    text = bench("batching", "--model-dir", model_dir, "--out", tmp_path, "--modes", "fused", "--rows", "4").stdout
    rows = markdown_rows(text, "mode")
    assert [(r["mode"], r["layout"]) for r in rows] == [
        ("fused", str(layout)) for layout in layouts(usable_cores().count)
    ]
    assert all(float(r["batched ÷ unbatched"].split()[0]) > 0 for r in rows)
    http = markdown_rows(text, "setup")
    assert [r["setup"] for r in http] == [f"fused {layout} batches of 4" for layout in layouts(usable_cores().count)]
    assert all(float(r["HTTP ÷ in-process"].split()[0]) > 0 for r in http)
    assert "- best batched (fused " in text and text.count("- HTTP ÷ in-process, fused ") == len(http)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args([command, "--help"] if command else ["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    if command is None:
        assert all(c in text for c in COMMANDS)
    else:  # the experiment's own module describes it
        assert f"`python -m bench {command}" in text and "--quick" in text and "--out" in text


def test_ensemble_labels_give_members_distinct_seeds() -> None:
    spec = ensemble("2xw2+w3")
    assert [(m.width_scale, m.seed) for m in spec.members] == [(2, 1), (2, 2), (3, 1)]
    assert spec.dir_name == "2xw2_w3" and spec.is_ensemble
    assert single(5).members[0].name == "unet-w5-s1" and not single(5).is_ensemble
    for bad in ("w2", "2w2", "x3"):
        with pytest.raises(ValueError):
            ensemble(bad)


def test_a_budget_times_up_to_its_runs_or_its_seconds() -> None:
    calls: list[int] = []
    assert len(Budget(warmup=2, runs=3, max_seconds=60).time(lambda: calls.append(1))) == 3 and len(calls) == 5
    # Past max_seconds after its first timed call, it stops there, however many runs were asked for.
    assert len(Budget(warmup=0, runs=10**9, max_seconds=0.01).time(lambda: time.sleep(0.02))) == 1


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
    assert Interval.of([1.0, float("nan")]).brief() == "n/a" and Interval.of_ratios([1.0], [0.0]).brief() == "n/a"


def test_pareto_front_keeps_what_nothing_beats_on_both_counts() -> None:
    points = [(5.0, 0.90), (6.0, 0.89), (7.0, 0.93), (7.0, 0.91), (12.0, 0.93), (20.0, 0.95)]
    assert pareto_front(points) == [(5.0, 0.90), (7.0, 0.93), (20.0, 0.95)]


def test_update_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nHand-written method.\n")
    update_section(docs, "sweep", table(["a"], [[1.0]]))
    update_section(docs, "other", "first")
    update_section(docs, "other", "second")
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written method.")
    assert "| 1.00 |" in text and "second" in text and "first" not in text


def test_the_verdict_needs_the_whole_interval() -> None:
    fused = Ratio(Mode.FUSED, 1.0, Interval(1.0, 1.0, 1.0))
    assert verdict([fused, Ratio(Mode.PARALLEL, 0.8, Interval(0.8, 0.7, 0.9))]).startswith("parallel beats fused")
    unclear = Ratio(Mode.PARALLEL, 0.8, Interval(0.8, 0.7, 1.1))
    assert verdict([fused, unclear]).startswith("fused is not beaten; parallel") and "**" not in unclear.cell()
    slower = Ratio(Mode.SEQUENTIAL, 1.2, Interval(1.2, 1.1, 1.3))
    assert verdict([fused, slower]).startswith("fused is the fastest") and slower.cell() == "**1.20 [1.10-1.30]**"
    assert trimmed_mean([0.001] * 8 + [1.0, -1.0]) == pytest.approx(1.0)  # ms; the extremes are cut


def test_load_table_takes_each_ratio_within_its_round(tmp_path: Path) -> None:
    ours, theirs = Target("ours", "http://ours", tmp_path), Target("theirs", "http://theirs", tmp_path)
    runs = {
        (ours, 1): [Run([0.01] * 100, 0, 0, 1.0), Run([0.02] * 50, 0, 0, 1.0)],
        (theirs, 1): [Run([0.02] * 50, 3, 0, 1.0), Run([0.04] * 25, 2, 0, 1.0)],
    }
    rows = markdown_rows(load_table(runs, [ours, theirs], [1]), "server")
    assert rows[1]["goodput ÷ ours"] == "0.50 [0.50-0.50]" and rows[1]["p50 ÷ ours"] == "2.00 [2.00-2.00]"
    assert rows[1]["refused (503)"] == "5" and rows[0]["goodput /s [95 % CI]"].startswith("75.00 [")


def test_the_v2_body_is_the_models_example_input(model_dir: Path, tmp_path: Path) -> None:
    manifest = load_manifest(model_dir)
    body = json.loads(v2_body(manifest, Mode.PARALLEL, tmp_path / "body.json").read_text())
    assert body["parameters"] == {"mode": "parallel"}
    [tensor] = body["inputs"]
    example = manifest.example_inputs()[tensor["name"]]
    assert tensor["shape"] == list(example.shape) and len(tensor["data"]) == example.size
