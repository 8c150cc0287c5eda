"""The sweep: its YAML schema (good and bad files), the service command lines, core planning, resume
(with a stubbed entry runner: pure logic), and one short end-to-end sweep against the real baseline
server (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import sweep as sw

SWEEPS = Path(sw.__file__).parent / "sweeps"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


GOOD = """
name: tiny
trials: 2
trial_duration_s: 1
list_sizes: [100, 1000]
entries:
  - name: baseline
    service: {server: baseline, variant: torch-eager}
    slo_search: true
  - name: int8
    service: {server: ray, variant: onnx-int8-dynamic, batching: false}
  - name: batching
    base: int8
    service: {batching: true, max_batch_docs: 2048}
  - name: msgpack
    base: batching
    service: {encoding: msgpack}
    scenarios: [steady, cache-mix]
"""


# ---------------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("profile", ["quick", "full"])
def test_shipped_profiles_are_valid_ladders(profile: str) -> None:
    sweep = sw.load_sweep(SWEEPS / f"{profile}.yaml")
    assert sweep.name == profile
    assert sweep.baseline_entry() == "baseline"
    assert {100, 1000} <= set(sweep.list_sizes)
    assert sweep.trials >= 3
    names = [e.name for e in sweep.entries]
    for step in ("baseline", "int8", "batching", "haproxy", "msgpack", "cache"):
        assert step in names
    # Each ladder step names the step before it as its base.
    ladder = [e for e in sweep.entries if e.group == "ladder"]
    for previous, entry in zip(ladder, ladder[1:], strict=False):
        if entry.base is not None and entry.name != "two-replicas":
            assert entry.base == previous.name
    assert any(e.slo_search and e.service.server == "baseline" for e in sweep.entries)
    assert any(e.slo_search and "cache-mix" in e.scenarios for e in sweep.entries)


def test_full_profile_has_every_ladder_step_and_isolated_effects() -> None:
    sweep = sw.load_sweep(SWEEPS / "full.yaml")
    variants = {e.service.variant for e in sweep.entries}
    assert {"torch-eager", "onnx-fp32", "onnx-fp32-opt", "onnx-int8-dynamic"} <= variants
    assert any(e.service.encoding == "feature-store" for e in sweep.entries)
    assert any(e.group == "isolated" for e in sweep.entries)


def test_base_inherits_the_service_and_overrides_fields(tmp_path: Path) -> None:
    sweep = sw.load_sweep(write(tmp_path, GOOD))
    by_name = {e.name: e for e in sweep.entries}
    msgpack = by_name["msgpack"].service
    assert (msgpack.server, msgpack.variant, msgpack.batching, msgpack.max_batch_docs, msgpack.encoding) == (
        "ray", "onnx-int8-dynamic", True, 2048, "msgpack")
    assert by_name["int8"].service.batching is False  # the base itself is untouched
    assert by_name["baseline"].scenarios == ["steady"]
    assert sw.entry_steps(sweep, by_name["msgpack"]) == 2 * 2 * 2
    assert sw.entry_steps(sweep, by_name["baseline"]) == 2 * 2 + 1  # + the SLO search at 100 docs


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace("batching: true,", "batchng: true,"), "entries.2.service.batchng"),
    (GOOD.replace("trials: 2", "trails: 2"), "trails"),
    (GOOD.replace("encoding: msgpack", "encoding: protobuf"), "entries.3.service.encoding"),
    (GOOD.replace("variant: torch-eager", "variant: torch-eagre"), "entries.0.service.variant"),
    (GOOD.replace("cache-mix]", "cache-mixx]"), "entries.3.scenarios.1"),
    (GOOD.replace("trials: 2", "trials: 0"), "trials"),
    (GOOD.replace("base: int8", "base: int9"), "'int9' is not an earlier entry's name"),
    (GOOD.replace("name: int8", "name: batching").replace("base: int8", "base: batching"), "duplicate names"),
    (GOOD.replace("{server: baseline, variant: torch-eager}", "{server: baseline, cache: true}"),
     "cache: not for server 'baseline'"),
    ("name: x\nentries: []\n", "entries"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_bad_files_give_a_clear_error_naming_the_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(sw.SweepFileError) as error:
        sw.load_sweep(write(tmp_path, text))
    assert expected in str(error.value)
    assert str(tmp_path / "sweep.yaml") in str(error.value)


def test_cli_reports_a_bad_file_and_exits_2(tmp_path: Path) -> None:
    bad = write(tmp_path, GOOD.replace("replicas", "replica").replace("batching: false}", "batching: false, replica: 2}"))
    done = subprocess.run([sys.executable, sw.__file__, "--sweep", str(bad), "--out", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "entries.1.service.replica" in done.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- commands
def test_service_commands_map_every_option() -> None:
    ray = sw.ServiceSpec(server="ray", variant="onnx-fp32", batching=True, max_batch_docs=512, batch_wait_ms=1.5,
                         cache=True, ingress="haproxy", replicas=2, threads=3, model="mlp-x")
    command = sw.service_command(ray)
    assert command[1].endswith("serve/run.py")
    for flag in (["--variant", "onnx-fp32"], ["--replicas", "2"], ["--threads", "3"], ["--ingress", "haproxy"],
                 ["--max-batch-docs", "512"], ["--batch-wait-ms", "1.5"], ["--model", "mlp-x"],
                 ["--port", "8000"]):
        i = command.index(flag[0])
        assert command[i:i + 2] == flag
    assert "--batching" in command and "--cache" in command
    assert "--no-cache" in sw.service_command(sw.ServiceSpec(cache=False))
    baseline = sw.service_command(sw.ServiceSpec(server="baseline", variant="torch-eager"))
    assert baseline[1].endswith("serve/baseline.py") and baseline[2:] == [
        "--port", "8001", "--variant", "torch-eager", "--threads", "1"]
    env = sw.service_environment(ray, "redis://127.0.0.1:1/0")
    assert env["REDIS_URL"] == "redis://127.0.0.1:1/0" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_cores_are_split_between_service_and_load_generator() -> None:
    two = sw.plan_cores([0, 1])
    assert two["pinned"] and two["service_cores"] == [0] and two["loadgen_cores"] == [1]
    eight = sw.plan_cores(list(range(8)))
    assert eight["service_cores"] == [0, 1, 2, 3] and eight["loadgen_cores"] == [4, 5, 6, 7]
    assert not sw.plan_cores([0])["pinned"]
    command = sw.service_command(sw.ServiceSpec(server="baseline"), two)
    assert command[:3] == ["taskset", "-c", "0"]


def test_plan_lists_every_entry_with_a_time_estimate() -> None:
    sweep = sw.load_sweep(SWEEPS / "quick.yaml")
    text = sw.plan_text(sweep)
    for entry in sweep.entries:
        assert f"  {entry.name} " in text
    assert "estimated at most ~" in text and "serve/run.py" in text and "serve/baseline.py" in text
    done = subprocess.run([sys.executable, sw.__file__, "--profile", "quick", "--plan"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "sweep quick" in done.stdout


# ---------------------------------------------------------------------------------------------- resume
class StubRunner:
    """Records which entries ran; fails the ones named in `fail`."""

    def __init__(self, fail: frozenset[str] = frozenset()) -> None:
        self.ran: list[str] = []
        self.fail = fail

    def __call__(self, entry: sw.Entry, ctx: sw.RunContext) -> dict:
        self.ran.append(entry.name)
        if entry.name in self.fail:
            raise sw.ServiceStartError("stub: did not start")
        return {"entry": entry.name, "service": entry.service.model_dump(), "trials": [], "slo": []}


def _run(sweep: sw.Sweep, run_dir: Path, runner: StubRunner) -> dict[str, str]:
    return sw.run_sweep(sweep, run_dir, entry_runner=runner, show_progress=False, build_payloads=False, pin=False)


def test_resume_skips_entries_whose_raw_file_exists(tmp_path: Path) -> None:
    sweep = sw.load_sweep(write(tmp_path, GOOD))
    run_dir = tmp_path / "run"
    first = StubRunner(fail=frozenset({"batching"}))
    status = _run(sweep, run_dir, first)
    assert first.ran == ["baseline", "int8", "batching", "msgpack"]
    assert status["batching"].startswith("failed: ServiceStartError")
    assert sorted(p.name for p in (run_dir / "raw").iterdir()) == [
        "baseline.json", "batching.error.json", "int8.json", "msgpack.json"]
    assert (run_dir / "environment.json").exists() and (run_dir / "sweep.yaml").exists()

    # Resume: only the failed entry runs again; its error file goes once it is recorded.
    second = StubRunner()
    status = _run(sw.load_sweep(run_dir / "sweep.yaml"), run_dir, second)
    assert second.ran == ["batching"]
    assert status["baseline"] == "skipped (already recorded)" and status["batching"] == "done"
    assert not (run_dir / "raw" / "batching.error.json").exists()
    assert json.loads((run_dir / "raw" / "batching.json").read_text())["entry"] == "batching"

    third = StubRunner()
    _run(sweep, run_dir, third)
    assert third.ran == []


def test_environment_records_the_pinning(tmp_path: Path) -> None:
    sweep = sw.load_sweep(write(tmp_path, GOOD))
    before = os.sched_getaffinity(0)
    sw.run_sweep(sweep, tmp_path / "run", entry_runner=StubRunner(), show_progress=False, build_payloads=False)
    assert os.sched_getaffinity(0) == before  # the test process gets its cores back
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["pinning"] == sw.plan_cores(sorted(before))
    assert env["device"] in ("cpu", "gpu") and "cpu" in env and "libraries" in env


def test_gpu_entries_are_skipped_without_a_gpu(tmp_path: Path) -> None:
    text = GOOD + "  - name: int8-gpu\n    base: int8\n    service: {device: gpu}\n"
    sweep = sw.load_sweep(write(tmp_path, text))
    runner = StubRunner()
    status = _run(sweep, tmp_path / "run", runner)
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    if not env["gpu"]:
        assert status["int8-gpu"] == "skipped (no GPU)" and "int8-gpu" not in runner.ran


# ---------------------------------------------------------------------------------------------- end to end
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained MLP and its torch-eager variant in a private artifacts folder."""
    root = tmp_path_factory.mktemp("artifacts")
    env = {**os.environ, "RANKSERVE_ARTIFACTS": str(root)}
    done = subprocess.run(
        [sys.executable, str(sw.REPO_ROOT / "export" / "quantize.py"), "--arch", "mlp", "--variants", "torch-eager",
         "--skip-bench", "--train-seconds", "5", "--results-dir", str(root / "tables")],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


@pytest.mark.slow
def test_short_sweep_end_to_end_against_the_baseline_server(tiny_artifacts: Path, tmp_path: Path) -> None:
    port, broken_port = _free_port(), _free_port()
    sweep_file = write(tmp_path, f"""
name: e2e
trials: 1
trial_duration_s: 2
warmup_s: 0.5
users: 2
list_sizes: [10]
n_queries: 4
start_timeout_s: 120
stop_timeout_s: 15
slo: {{p99_ms: 1000, list_sizes: [10], profile: quick, min_duration_s: 1, min_queries: 5, max_steps: 2,
       time_budget_s: 30, tolerance: 0.5}}
entries:
  - name: baseline
    service: {{server: baseline, variant: torch-eager, port: {port}}}
    slo_search: true
  - name: not-built
    description: a variant the manifest does not have, so the service exits at start
    service: {{server: baseline, variant: onnx-fp16, port: {broken_port}}}
""")
    out = tmp_path / "runs"
    env = {**os.environ, "RANKSERVE_ARTIFACTS": str(tiny_artifacts)}
    done = subprocess.run([sys.executable, sw.__file__, "--sweep", str(sweep_file), "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # one entry failed
    (run_dir,) = out.iterdir()
    assert run_dir.name.endswith("-e2e")

    record = json.loads((run_dir / "raw" / "baseline.json").read_text())
    (trial,) = record["trials"]
    assert trial["requests"] > 0 and trial["failures"] == 0 and trial["list_size"] == 10
    assert trial["latency_ms"]["p50"] > 0 and trial["server_timings_ms"]["total"] > 0
    (search,) = record["slo"]
    assert search["status"] in ("VALID", "INVALID") and search["trials"]
    assert "READY" in (run_dir / "logs" / "baseline.log").read_text()

    error = json.loads((run_dir / "raw" / "not-built.error.json").read_text())
    assert "ServiceStartError" in error["error"]
    assert not (run_dir / "raw" / "not-built.json").exists()

    summary = (run_dir / "summary.md").read_text()
    assert "| baseline " in summary and "`not-built`: ServiceStartError" in summary
    assert "| baseline " in done.stdout  # the table is printed at the end
    assert (run_dir / "plots" / "latency_bars_cpu_10.png").exists()
    env_record = json.loads((run_dir / "environment.json").read_text())
    assert "pinning" in env_record and env_record["sweep"] == "e2e"
    assert (run_dir / "payloads").exists()  # kept: the run is incomplete and can be resumed
    for used in (port, broken_port):
        assert not sw._port_open(used)  # every service was stopped
