"""The sweep: its YAML schema (good and bad files, the options each server kind takes, GPU entries
refused), the service command lines, core planning, resume (with a stubbed entry runner: pure logic),
and one short end-to-end sweep against the real baseline server (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import sweep as sw
from loadtest.records import STATUSES, EntryRecord
from loadtest.services import (
    SERVICES,
    ServiceStartError,
    plan_cores,
    port_open,
    service_command,
    service_environment,
)
from loadtest.sweep_config import SWEEPS_DIR as SWEEPS
from loadtest.sweep_config import VARIANT_NAMES, Entry, ServiceSpec, Sweep, SweepFileError, load_sweep
from models.paths import REPO_ROOT
from serve.config import ServiceConfig


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
    service: {server: ray, variant: onnx-int8-dynamic, batching: false, cache: false}
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
    sweep = load_sweep(SWEEPS / f"{profile}.yaml")
    assert sweep.name == profile
    assert sweep.baseline_entry() == "baseline"
    assert {100, 1000} <= set(sweep.list_sizes)
    assert sweep.trials >= (3 if profile == "full" else 2)
    names = [e.name for e in sweep.entries]
    # the lab's quick ladder joins HAProxy ingress and the colocated deployment in one step (its time budget)
    for step in ("baseline", "int8", "colocated", "msgpack", "cache", *(["haproxy"] if profile == "full" else [])):
        assert step in names
    # Each ladder step names the step before it as its base.
    ladder = [e for e in sweep.entries if e.group == "ladder"]
    for previous, entry in zip(ladder, ladder[1:], strict=False):
        if entry.base is not None and entry.name != "two-replicas":
            assert entry.base == previous.name
    assert any(e.slo_search and e.service.server == "baseline" for e in sweep.entries)
    # the lab's quick profile searches three entries only (its time budget); the full one a cache entry too
    assert profile == "quick" or any(e.slo_search and "cache-mix" in e.scenarios for e in sweep.entries)
    assert profile == "full" or any(e.slo_search and e.service.server == "uvicorn" for e in sweep.entries)


def test_full_profile_has_every_ladder_step_and_isolated_effects() -> None:
    sweep = load_sweep(SWEEPS / "full.yaml")
    variants = {e.service.variant for e in sweep.entries}
    assert {"torch-eager", "onnx-fp32", "onnx-fp32-opt", "onnx-int8-dynamic"} <= variants
    assert any(e.service.encoding == "feature-store" for e in sweep.entries)
    assert any(e.group == "isolated" for e in sweep.entries)


def test_base_inherits_the_service_and_overrides_fields(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, GOOD))
    by_name = {e.name: e for e in sweep.entries}
    msgpack = by_name["msgpack"].service
    assert (msgpack.server, msgpack.variant, msgpack.batching, msgpack.max_batch_docs, msgpack.encoding) == (
        "ray", "onnx-int8-dynamic", True, 2048, "msgpack")
    assert by_name["int8"].service.batching is False  # the base itself is untouched
    assert by_name["baseline"].scenarios == ["steady"]
    # trials x scenarios + one probe trial (one connection), per list size
    assert sw.entry_steps(sweep, by_name["msgpack"]) == (2 * 2 + 1) * 2
    assert sw.entry_steps(sweep, by_name["baseline"]) == (2 + 1) * 2 + 1  # + the SLO search at 100 docs


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
    with pytest.raises(SweepFileError) as error:
        load_sweep(write(tmp_path, text))
    assert expected in str(error.value)
    assert str(tmp_path / "sweep.yaml") in str(error.value)


def test_cli_reports_a_bad_file_and_exits_2(tmp_path: Path) -> None:
    text = GOOD.replace("batching: false, cache: false}", "batching: false, cache: false, replica: 2}")
    assert text != GOOD  # a valid file would start services
    bad = write(tmp_path, text)
    done = subprocess.run([sys.executable, sw.__file__, "--sweep", str(bad), "--out", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "entries.1.service.replica" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_gpu_entries_are_refused_naming_the_field(tmp_path: Path) -> None:
    text = GOOD + "  - name: int8-gpu\n    base: int8\n    service: {device: gpu}\n"
    with pytest.raises(SweepFileError) as error:
        load_sweep(write(tmp_path, text))
    assert "entries.4.service.device" in str(error.value)
    assert "GPU serving entries are not supported by serve/ yet" in str(error.value)
    assert load_sweep(write(tmp_path, GOOD.replace("batching: true,", "device: cpu, batching: true,")))


@pytest.mark.parametrize(("service", "expected"), [
    ("{server: baseline, batching: true}", "batching: not for server 'baseline'"),
    ("{server: baseline, cache: true, replicas: 2}", "cache, replicas: not for server 'baseline'"),
    ("{server: uvicorn, max_batch_docs: 512}", "max_batch_docs: not for server 'uvicorn'"),
    ("{server: uvicorn, ingress: haproxy}", "ingress: not for server 'uvicorn'"),
    # a ServiceConfig field that no server's command line takes
    ("{server: ray, redis_timeout_s: 0.2}", "redis_timeout_s: not for server 'ray'"),
    # the sweep reaches every service at http://127.0.0.1:<port>/ and starts its own Ray
    ("{server: ray, route_prefix: /v1}", "route_prefix: not for server 'ray'"),
])
def test_an_option_the_server_kind_does_not_take_is_an_error_naming_it(tmp_path: Path, service: str,
                                                                       expected: str) -> None:
    text = GOOD.replace("{server: baseline, variant: torch-eager}", service)
    with pytest.raises(SweepFileError) as error:
        load_sweep(write(tmp_path, text))
    assert "entries.0.service" in str(error.value) and expected in str(error.value)


def test_an_option_inherited_from_a_base_of_another_kind_is_checked_too(tmp_path: Path) -> None:
    text = GOOD + "  - name: plain\n    base: batching\n    service: {server: uvicorn}\n"
    with pytest.raises(SweepFileError, match="batch_wait_ms|batching"):
        load_sweep(write(tmp_path, text))
    # The kind's own values are no error: the baseline server never batches, and runs one replica.
    spec = ServiceSpec(server="baseline", batching=False, replicas=1, cache=False)
    assert (spec.batching, spec.cache, spec.port) == (False, False, 8001)


def test_service_spec_fields_come_from_service_config() -> None:
    assert issubclass(ServiceSpec, ServiceConfig)
    own = set(ServiceSpec.model_fields) - set(ServiceConfig.model_fields)
    assert own == {"server", "encoding", "device"}
    # A ServiceConfig field the spec does not declare is accepted and reaches the command line.
    spec = ServiceSpec(server="ray", deadline_ms=250, cache_ttl_s=60)
    command = service_command(spec)
    assert command[command.index("--deadline-ms") + 1] == "250.0"
    assert command[command.index("--cache-ttl-s") + 1] == "60.0"
    # Each kind's defaults: ServiceConfig's for Ray Serve (colocated, so unbatched); no batching and no
    # cache on plain uvicorn.
    assert (ServiceSpec().topology, ServiceSpec().batching, ServiceSpec().cache, ServiceSpec().port) == (
        "colocated", False, True, 8000)
    assert ServiceSpec(topology="split").batching is True
    assert (ServiceSpec(server="uvicorn").batching, ServiceSpec(server="uvicorn").port) == (False, 8002)
    for kind in SERVICES.values():
        assert set(kind.options) <= set(ServiceConfig.model_fields)


def test_variant_names_are_the_exports() -> None:
    from export.variants import VARIANTS

    assert VARIANT_NAMES == tuple(VARIANTS)


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_a_dumped_sweep_reloads_to_the_same_sweep(profile: str) -> None:
    sweep = load_sweep(SWEEPS / f"{profile}.yaml")
    assert Sweep.model_validate(sweep.model_dump(mode="json")) == sweep
    baseline = next(e for e in sweep.entries if e.service.server == "baseline").service.model_dump()
    assert "replicas" not in baseline and baseline["batching"] is False  # only what the kind takes or sets


def test_null_means_the_kinds_default(tmp_path: Path) -> None:
    """Run folders written before ServiceSpec extended ServiceConfig hold `port: null` and the like."""
    text = GOOD.replace("{server: baseline, variant: torch-eager}",
                        "{server: baseline, variant: torch-eager, port: null, max_batch_docs: null, replicas: 1}")
    spec = load_sweep(write(tmp_path, text)).entries[0].service
    assert (spec.port, spec.max_batch_docs) == (8001, ServiceConfig().max_batch_docs)


# ---------------------------------------------------------------------------------------------- commands
def test_service_commands_map_every_option() -> None:
    ray = ServiceSpec(server="ray", variant="onnx-fp32", batching=True, max_batch_docs=512, batch_wait_ms=1.5,
                         cache=True, ingress="haproxy", replicas=2, threads=3, model="mlp-x")
    command = service_command(ray)
    assert command[1].endswith("serve/run.py")
    for flag in (["--variant", "onnx-fp32"], ["--replicas", "2"], ["--threads", "3"], ["--ingress", "haproxy"],
                 ["--max-batch-docs", "512"], ["--batch-wait-ms", "1.5"], ["--model", "mlp-x"],
                 ["--port", "8000"]):
        i = command.index(flag[0])
        assert command[i:i + 2] == flag
    assert "--batching" in command and "--cache" in command
    assert "--no-cache" in service_command(ServiceSpec(cache=False))
    baseline = service_command(ServiceSpec(server="baseline", variant="torch-eager"))
    assert baseline[1].endswith("serve/baseline.py") and baseline[2:] == [
        "--port", "8001", "--variant", "torch-eager", "--threads", "1"]
    env = service_environment(ray, "redis://127.0.0.1:1/0")
    assert env["REDIS_URL"] == "redis://127.0.0.1:1/0" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_each_command_line_parses_back_to_the_spec_in_its_server() -> None:
    """The flags are the servers' own: their parsers rebuild the same ServiceConfig from them."""
    from serve import baseline as baseline_server
    from serve import run as ray_server
    from serve import uvicorn_server

    ray = ServiceSpec(server="ray", variant="onnx-fp32", model="mlp-x", topology="split", batching=False,
                      max_batch_docs=512, batch_wait_ms=0.5, inference_workers=2, max_ongoing_requests=9, cache=False,
                      cache_ttl_s=9, feature_dataset="other", replicas=3, autoscaling_max_replicas=4,
                      ingress_replicas=2, threads=2, ingress="haproxy", port=8100, num_cpus=2, deadline_ms=99,
                      max_docs=50, max_body_bytes=4096, manifest_path="/tmp/m.json")
    parsed = ray_server.parse_args(service_command(ray)[2:])
    for name in SERVICES["ray"].options:
        assert getattr(parsed, name) == getattr(ray, name), name
    for kind, server, parse_mode in (("baseline", baseline_server, "naive"), ("uvicorn", uvicorn_server, "fast")):
        cache = {"cache": True} if kind == "uvicorn" else {}
        spec = ServiceSpec(server=kind, variant="onnx-fp32", model="mlp-x", threads=2, port=8101, deadline_ms=99,
                           max_docs=50, max_body_bytes=4096, feature_dataset="other", **cache)
        assert service_command(spec)[1].endswith(f"serve/{server.__name__.rsplit('.', 1)[1]}.py")
        parsed, mode = server.parse_args(service_command(spec)[2:])
        assert mode == parse_mode and parsed.batching is False
        for name in SERVICES[kind].options:
            assert getattr(parsed, name) == getattr(spec, name), (kind, name)


def test_cores_are_split_between_service_and_load_generator() -> None:
    two = plan_cores([0, 1])
    assert two["pinned"] and two["service_cores"] == [0] and two["loadgen_cores"] == [1]
    eight = plan_cores(list(range(8)))
    assert eight["service_cores"] == [0, 1, 2, 3] and eight["loadgen_cores"] == [4, 5, 6, 7]
    assert not plan_cores([0])["pinned"]
    command = service_command(ServiceSpec(server="baseline"), two)
    assert command[:3] == ["taskset", "-c", "0"]


def test_plan_lists_every_entry_with_a_time_estimate() -> None:
    sweep = load_sweep(SWEEPS / "quick.yaml")
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

    def __call__(self, entry: Entry, ctx: sw.RunContext) -> dict:
        self.ran.append(entry.name)
        if entry.name in self.fail:
            raise ServiceStartError("stub: did not start")
        return {"entry": entry.name, "service": entry.service.model_dump(), "trials": [], "slo": []}


def _run(sweep: Sweep, run_dir: Path, runner: StubRunner) -> dict[str, str]:
    return sw.run_sweep(sweep, run_dir, entry_runner=runner, show_progress=False, build_payloads=False, pin=False)


def test_resume_skips_entries_whose_raw_file_exists(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, GOOD))
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
    status = _run(load_sweep(run_dir / "sweep.yaml"), run_dir, second)
    assert second.ran == ["batching"]
    assert status["baseline"] == "skipped (already recorded)" and status["batching"] == "done"
    assert not (run_dir / "raw" / "batching.error.json").exists()
    assert json.loads((run_dir / "raw" / "batching.json").read_text())["entry"] == "batching"

    third = StubRunner()
    _run(sweep, run_dir, third)
    assert third.ran == []


def test_environment_records_the_pinning(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, GOOD))
    before = os.sched_getaffinity(0)
    sw.run_sweep(sweep, tmp_path / "run", entry_runner=StubRunner(), show_progress=False, build_payloads=False)
    assert os.sched_getaffinity(0) == before  # the test process gets its cores back
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["pinning"] == plan_cores(sorted(before))
    assert env["device"] in ("cpu", "gpu") and "cpu" in env and "libraries" in env


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
        [sys.executable, str(REPO_ROOT / "export" / "quantize.py"), "--arch", "mlp", "--variants", "torch-eager",
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
slo: {{p99_ms: 1000, list_sizes: [10], profile: quick, min_duration_s: 1, min_queries: 5, confidence: 0.04,
       max_steps: 2,
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

    record = EntryRecord.load(run_dir / "raw" / "baseline.json")
    trial, probe = record.trial_records()  # trials: 1, then the one-connection probe
    assert trial.role == "load" and trial.users == 2 and probe.role == "probe" and probe.users == 1
    assert trial.requests > 0 and trial.failures == 0 and trial.degraded == 0 and trial.list_size == 10
    assert trial.latency_ms["p50"] > 0 and trial.server_timings_ms["total"] > 0
    assert trial.generator.startswith("Locust") and trial.generator_cpu["utilization"] > 0
    (search,) = record.slo_results()
    assert search.status in STATUSES and search.steps and search.entry == "baseline" and search.list_size == 10
    assert all(step.trial_record.extra["count_based"] for step in search.step_records())
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
        assert not port_open(used)  # every service was stopped
