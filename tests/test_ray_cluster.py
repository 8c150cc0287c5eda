"""Past one machine: a real two-node Ray cluster on loopback, deployed to as a user deploys to a cluster.

(The last test is fast and needs no cluster: it checks the KubeRay RayService in docs/serving.md.)

The cluster (tests/ray_cluster.py): `ray start --head --num-cpus 1`, then a second raylet with
`ray start --address <head> --num-cpus 1`, isolated from any Ray on the machine (a private temp dir,
HOME and auth token, explicit RAY_ADDRESS for every command, free ports) and torn down by killing
exactly its own processes; the module's fixture then checks with psutil that none survives (no
raylet, gcs_server, agent or worker of it).

Two ways onto it, each checking that the 2 replicas of the scoring deployment run one per node
(the Serve controller's view, which `serve status` reads: each replica's node id; for run.py see
"Placement"), that both answer through the ingress on the head (`/readyz` names the replica), and
that /rank answers like the offline scorer, with a repeat served from the shared Redis:
- `python serve/run.py --address <head> --replicas 2 ...` (after `serve start`, see below), stopped
  with SIGTERM: its application goes, the cluster stays;
- `serve deploy` of serve/config.yaml (a copy with the test model, 2 replicas and a free port) through
  the head's dashboard, then `serve shutdown -y`.

Placement: Serve schedules replicas with Ray's SPREAD strategy, which is best effort. Ours reserve no
resources (`num_cpus: 0`), so the GCS hands each one to a random raylet, whose round-robin may well
put both on the same node (it did in 2 of our first 3 deploys). One replica per node is therefore asked
for with Serve's `max_replicas_per_node: 1` (an implicit per-node resource): in the YAML as a
`deployments:` override, and on serve/run.py's command line when ServiceConfig has the field
(`--max-replicas-per-node`). Without it, the run.py test still deploys, ranks and stops, checks that
both replicas answer, and warns with the placement it saw instead of asserting one per node.

Two accommodations for two nodes on one machine, both Serve settings rather than changes to our app:
- **One HTTP proxy, on the head** (`proxy_location: HeadOnly`, as serve/config.yaml has it; before
  serve/run.py, whose `serve.start` keeps Serve's default `EveryNode`, by `serve start
  --proxy-location HeadOnly`). With a proxy on every node, both would bind the same loopback port.
- **`RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0`** in the cluster's environment: by default a
  proxy sends requests to replicas on its own node while they have room, so the head's proxy would
  never show the worker's replica answering.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from loadtest_rank_app import wait_for_line
from ray_cluster import SERVE, LocalRayCluster, free_ports, port_open
from serving_artifacts import build_test_artifacts

from models.paths import REPO_ROOT
from serve.config import ServiceConfig

SCORING_DEPLOYMENT = "RankingService"  # the colocated topology's one deployment (serve/app.py)
DEPLOY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0
CLUSTER_ENV = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
# serve/run.py can ask for one replica per node (its flags are ServiceConfig's fields).
RUN_PY_SPREADS = "max_replicas_per_node" in ServiceConfig.model_fields


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_artifacts(tmp_path_factory.getbasetemp() / "serve-artifacts")


@pytest.fixture(scope="module")
def n_features(manifest: Path) -> int:
    return int(json.loads(manifest.read_text())["model"]["n_features"])


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    """A head (1 CPU) and a worker raylet (1 CPU) on loopback; afterwards, no process of it is left."""
    cluster = LocalRayCluster(extra_env=CLUSTER_ENV)
    left: list[str] = []
    try:
        cluster.start(num_cpus=1)
        cluster.add_worker(num_cpus=1)
        yield cluster
        # The finder sees the cluster (so "nothing left" below is not vacuous): both raylets, one GCS.
        names = cluster.process_names()
        assert names.count("raylet") == 2 and names.count("gcs_server") == 1, names
    finally:
        left = cluster.stop()
        if left:
            print("left behind by the cluster:\n" + "\n".join(left))
    assert not left, f"processes of the test cluster survived its stop: {left}"


# ----------------------------------------------------------------------------------------------
# Checks shared by both ways of deploying.
# ----------------------------------------------------------------------------------------------
def wait_until(check: Callable[[], Any], what: str, timeout_s: float, last: Callable[[], Any] = lambda: None) -> Any:
    """Poll `check` until it returns something truthy (bounded); return it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout_s:.0f} s; last seen: {last()}")


def running_replicas(cluster: LocalRayCluster, app: str) -> dict[str, str]:
    """{replica id: node id} of the scoring deployment's RUNNING replicas, from the Serve controller."""
    application = cluster.serve_details().get("applications", {}).get(app)
    if not application:
        return {}
    deployment = application["deployments"].get(SCORING_DEPLOYMENT, {})
    return {r["replica_id"]: r["node_id"] for r in deployment.get("replicas", []) if r["state"] == "RUNNING"}


def check_replicas(cluster: LocalRayCluster, app: str, url: str, one_per_node: bool = True) -> dict[str, list[str]]:
    """2 RUNNING replicas (one on each node, unless told otherwise); both answer /readyz through the
    ingress on the head, the only proxy. Returns {"head"|"worker": [replica ids]}."""
    nodes = cluster.node_ids()
    replicas = wait_until(lambda: (r := running_replicas(cluster, app)) and len(r) == 2 and r,
                          f"2 RUNNING replicas of {app}", 60, last=lambda: cluster.serve_details())
    on = {node: sorted(rid for rid, n in replicas.items() if n == node_id) for node, node_id in nodes.items()}
    if one_per_node:
        assert all(len(ids) == 1 for ids in on.values()), f"replicas by node: {on} (nodes {nodes})"

    details = cluster.serve_details()
    assert details["proxy_location"] == "HeadOnly" and set(details["proxies"]) == {nodes["head"]}, details["proxies"]

    seen: set[str] = set()
    with httpx.Client(timeout=30) as client:
        for _ in range(200):
            ready = client.get(f"{url}/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["model_loaded"] is True
            seen.add(ready.json()["replica"])
            if seen >= set(replicas):
                break
    assert seen == set(replicas), f"answered /readyz: {sorted(seen)}; running: {replicas}"
    return on


def check_rank(url: str, manifest: Path, variant: str, n_features: int) -> None:
    """POST /rank through the ingress: the offline scorer's scores, sorted; the repeat is a cache hit."""
    from export.runtime import load_scorer

    rng = np.random.default_rng(11)
    X = rng.normal(size=(12, n_features)).astype(np.float32)
    ids = [f"doc-{i}" for i in range(len(X))]
    body = {"query_id": f"two-node-{time.time_ns()}",
            "documents": [{"id": i, "features": row} for i, row in zip(ids, X.tolist(), strict=True)]}
    with httpx.Client(timeout=60) as client:
        first = client.post(f"{url}/rank", json=body)
        assert first.status_code == 200, first.text
        second = client.post(f"{url}/rank", json=body)
    answer = first.json()
    assert answer["model"]["variant"] == variant and answer["degraded"] is False
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == len(ids)
    offline = load_scorer(variant, manifest_path=manifest).score_documents(X)
    served = {r["id"]: r["score"] for r in answer["results"]}
    np.testing.assert_allclose([served[i] for i in ids], offline, atol=1e-5)
    assert second.status_code == 200 and second.json()["cached"] is True  # one Redis for both nodes
    assert second.json()["results"] == answer["results"]


def shutdown_serve(cluster: LocalRayCluster, port: int) -> None:
    """`serve shutdown -y`, then wait until the controller is gone and the proxy's port is closed."""
    cluster.run([SERVE, "shutdown", "-y", "-a", cluster.dashboard_url])

    def gone() -> bool:
        details = cluster.serve_details()
        return not details.get("applications") and not (details.get("controller_info") or {}).get("node_id") \
            and not port_open(port)

    wait_until(gone, "Serve shut down", STOP_TIMEOUT_S, last=lambda: cluster.serve_details())


# ----------------------------------------------------------------------------------------------
# The two ways onto the cluster.
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_py_address_deploys_ranks_and_stops_on_two_nodes(cluster: LocalRayCluster, manifest: Path,
                                                             n_features: int, redis_url: str) -> None:
    port, = free_ports(1)
    app = "rankserve-two-node"
    # Serve's cluster-wide HTTP options first: serve/run.py's serve.start joins a running Serve as it is.
    cluster.run([SERVE, "start", f"--address={cluster.address}", "--http-host=127.0.0.1", f"--http-port={port}",
                 "--proxy-location=HeadOnly"])
    command = [sys.executable, "serve/run.py", "--address", cluster.address, "--variant", "onnx-fp32",
               "--manifest-path", str(manifest), "--replicas", "2", "--port", str(port), "--app-name", app,
               "--redis-url", redis_url, *(["--max-replicas-per-node", "1"] if RUN_PY_SPREADS else [])]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=cluster.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        ready = wait_for_line(proc, "READY ", lines, DEPLOY_TIMEOUT_S)
        url = f"http://127.0.0.1:{port}"
        assert ready == f"READY {url}", lines
        on = check_replicas(cluster, app, url, one_per_node=RUN_PY_SPREADS)
        if not RUN_PY_SPREADS:
            warnings.warn(f"serve/run.py has no --max-replicas-per-node, so one replica per node is Serve's "
                          f"best effort, not checked; this run placed them {on}", stacklevel=1)
        check_rank(url, manifest, "onnx-fp32", n_features)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, lines[-30:]
        # A joined cluster loses our application only: Serve and both nodes stay.
        assert app not in cluster.serve_details().get("applications", {})
        assert len(cluster.node_ids()) == 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutdown_serve(cluster, port)


@pytest.mark.slow
def test_serve_deploy_config_yaml_spreads_replicas_over_both_nodes(cluster: LocalRayCluster, manifest: Path,
                                                                   n_features: int, redis_url: str,
                                                                   tmp_path: Path) -> None:
    config = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())
    port, = free_ports(1)
    config["proxy_location"] = "HeadOnly"  # as the file has it: one proxy, on the head
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    application = config["applications"][0]
    args = application["args"]
    assert args.get("topology", "colocated") == "colocated", "this test checks the colocated deployment's replicas"
    args.update(manifest_path=str(manifest), replicas=2, redis_url=redis_url)
    # One replica per node: Serve's own option, as a per-deployment override of what the code sets.
    application["deployments"] = [{"name": SCORING_DEPLOYMENT, "max_replicas_per_node": 1}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    app = application["name"]
    url = f"http://127.0.0.1:{port}{application.get('route_prefix', '/').rstrip('/')}"

    try:
        cluster.run([SERVE, "deploy", str(path), "-a", cluster.dashboard_url])

        def status() -> bool:
            state = cluster.serve_details().get("applications", {}).get(app)
            if state and state["status"] == "DEPLOY_FAILED":
                raise AssertionError(f"{app} failed to deploy: {state.get('message')}")
            return bool(state) and state["status"] == "RUNNING"

        wait_until(status, f"{app} RUNNING", DEPLOY_TIMEOUT_S, last=lambda: cluster.serve_details().get("applications"))
        assert f"{app}" in cluster.run([SERVE, "status", "-a", cluster.dashboard_url])
        check_replicas(cluster, app, url)
        check_rank(url, manifest, args["variant"], n_features)
    finally:
        shutdown_serve(cluster, port)


# ----------------------------------------------------------------------------------------------
# The KubeRay RayService in docs/serving.md: documentation (no Kubernetes here), checked for what can be.
# ----------------------------------------------------------------------------------------------
def test_rayservice_in_the_docs_is_serve_config_yaml_with_autoscaling_and_redis_from_a_secret() -> None:
    """Its serveConfigV2 is a valid Serve config holding serve/config.yaml's application (the same args but
    the replica range), its override names our scoring deployment, and every Ray container gets REDIS_URL
    from the Secret next to it."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    from serve.app import deployment_options

    def known(fields: dict, schema: Any) -> bool:  # Serve's schemas let unknown keys through silently
        return set(fields) <= set(schema.model_fields)

    section = (REPO_ROOT / "docs" / "serving.md").read_text().split("## Past one machine", 1)[1]
    manifests = [doc for block in re.findall(r"```yaml\n(.*?)```", section, re.S)
                 for doc in yaml.safe_load_all(block) if doc]
    (service,) = [m for m in manifests if m.get("kind") == "RayService"]
    secrets = {m["metadata"]["name"]: m for m in manifests if m.get("kind") == "Secret"}
    assert service["apiVersion"] == "ray.io/v1"

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    workers = cluster["workerGroupSpecs"]
    assert workers and all(0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"] for w in workers)
    containers = [c for t in [cluster["headGroupSpec"]["template"], *(w["template"] for w in workers)]
                  for c in t["spec"]["containers"]]
    for container in containers:
        ref = {e["name"]: e for e in container["env"]}["REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]]["stringData"], container["name"]

    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema(**serve_config)
    (app,) = serve_config["applications"]
    assert known(serve_config, ServeDeploySchema) and known(serve_config["http_options"], HTTPOptionsSchema)
    assert known(app, ServeApplicationSchema)
    assert all(known(d, DeploymentSchema) and known(d.get("autoscaling_config", {}), AutoscalingConfig)
               and known(d.get("ray_actor_options", {}), RayActorOptionsSchema) for d in app["deployments"])
    (ours,) = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())["applications"]
    assert {k: app[k] for k in ("name", "route_prefix", "import_path")} == \
        {k: ours[k] for k in ("name", "route_prefix", "import_path")}
    scale = {"replicas", "autoscaling_max_replicas"}
    assert {k: v for k, v in app["args"].items() if k not in scale} == \
        {k: v for k, v in ours["args"].items() if k not in scale}, "serve/config.yaml's args changed: update the docs"

    config = ServiceConfig(**app["args"])
    options = deployment_options(config)
    (override,) = app["deployments"]
    assert override["name"] in options
    autoscaling = AutoscalingConfig(**override["autoscaling_config"])
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (config.replicas, config.autoscaling_max_replicas)
    assert options[override["name"]]["autoscaling_config"]["max_replicas"] == autoscaling.max_replicas
    assert autoscaling.target_ongoing_requests <= config.colocated_ongoing_requests
    assert override["ray_actor_options"]["num_cpus"] >= 1  # pending replicas are demand the autoscaler sees
