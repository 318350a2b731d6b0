"""Two Ray nodes on one machine, with token auth: training placed on both and one node lost mid-run,
evaluation's batch inference on both, and Serve keeping a user answered while a node goes and comes back.

The cluster is what `ray start` makes on real machines: a head (GCS, dashboard, job server) and a worker
node that joins it, each with its own temp dir (two nodes on one machine that share one garbage-collect
each other's job packages), its own object store and a custom resource naming it. The test talks to it as
a user would: `ray job submit`, `serve deploy`, HTTP to the proxy, the dashboard's state API. Losing a
node is SIGKILL of its raylet and every process under it (its workers, its object store, its agents):
what a spot instance's end looks like to Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from fspo_ray.data.synthetic import write_synthetic

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `serve`


def _wait_for(what: str, happened, timeout: float = 300) -> None:
    """Until `happened()` is true: the test waits for events, never for a span of time (a busy box is slow).
    The timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not happened():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


class TwoNodeCluster:
    """A head and a worker node started with `ray start`, torn down by process id."""

    def __init__(self):
        # A short folder of its own, not pytest's (which pytest-xdist makes longer): Ray's socket paths, under
        # each node's temp dir, must stay under 107 characters.
        self.root = Path(tempfile.mkdtemp(prefix="two-nodes-"))
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # PYTHONPATH: every node's Ray processes import the Serve app (serve/) from the checkout, as
        # cluster.yaml's nodes do; only fspo_ray is installed.
        # RAY_health_check_period_ms: the GCS marks a lost node dead after 5 missed checks, 5 s at this
        # period where Ray's default 3 s takes 15 (a check still waits 10 s for a busy node's answer).
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "PYTHONPATH": str(REPO),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_health_check_period_ms": "1000"}  # fmt: skip
        self.env.pop("RAY_ADDRESS", None)

    def _temp_dir(self, role: str) -> Path:
        return self.root / role[0]

    def start(self, role: str) -> str:
        """Start the head or a worker node; return its new node id (a killed node stays ALIVE in the GCS until
        its death is noticed, so only ids the cluster has not had before count)."""
        known = {n["node_id"] for n in self.state("nodes")} if role != "head" else set()
        args = ["--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}"] if role == "head" else [
                f"--address=127.0.0.1:{self.gcs_port}"]  # fmt: skip
        subprocess.run(
            # The agent's HTTP port defaults to 52365 on every node: a second Ray on this machine (another
            # node, or another test file's Ray) would leave this node's agent without one, and the head's job
            # server needs its agent.
            [BIN / "ray", "start", *args, "--num-cpus=2", f"--resources={json.dumps({role: 1})}",
             f"--dashboard-agent-listen-port={free_port()}",
             f"--temp-dir={self._temp_dir(role)}", "--object-store-memory=500000000", "--disable-usage-stats"],
            env=self.env, check=True, capture_output=True, cwd=self.root,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            alive = [n for n in self.state("nodes") if n["state"] == "ALIVE"
                     and role in n["resources_total"] and n["node_id"] not in known]  # fmt: skip
            if alive and (role != "head" or self._accepts_jobs()):
                return alive[0]["node_id"]
            time.sleep(0.5)
        raise TimeoutError(f"the {role} node did not join")

    def _accepts_jobs(self) -> bool:
        """The job server answers 500 'No available agent' until the head's agent has registered."""
        reply = httpx.post(f"{self.dashboard}/api/jobs/", json={"entrypoint": "true"}, timeout=30,
                           headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
        return reply.status_code == 200

    def _processes(self, role: str | None = None) -> list:
        """The processes of one node (its temp dir is in their command line, or they run under them), or of
        the whole cluster."""
        import psutil

        marks = [str(self._temp_dir(r)) for r in ([role] if role else ["head", "worker"])]
        if role in (None, "head"):
            marks.append(f":{self.gcs_port}")
        roots = [p for p in psutil.process_iter(["cmdline"])
                 if any(m in arg for arg in (p.info["cmdline"] or []) for m in marks)]  # fmt: skip
        found = {p.pid: p for p in roots}
        for p in roots:
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        if role == "head":  # the worker node's own processes also name the GCS port
            found = {pid: p for pid, p in found.items() if pid not in {q.pid for q in self._processes("worker")}}
        return list(found.values())

    def kill(self, role: str = "worker") -> None:
        """Lose a node at once: SIGKILL its raylet and everything under it."""
        import psutil

        victims = self._processes(role)
        assert victims, f"no process of the {role} node found"
        for p in victims:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=10)

    def wait_dead(self, node_id: str) -> None:
        """Until the GCS has marked the node dead (it notices a lost raylet by its missed health checks)."""
        dead = lambda: any(n["node_id"] == node_id and n["state"] == "DEAD" for n in self.state("nodes"))  # noqa: E731
        _wait_for(f"node {node_id} marked dead", dead)

    def stop(self) -> None:
        """Kill the whole cluster, as `ray stop --force` does: the test is over and nothing is kept (a SIGTERM
        waits out processes that take 10 s to go)."""
        for role in ("worker", "head"):
            if self._processes(role):
                self.kill(role)
        shutil.rmtree(self.root, ignore_errors=True)

    def state(self, kind: str, **filters) -> list[dict]:
        """The dashboard's state API (`ray list <kind>`), dead entries included."""
        params: dict = {"limit": 10000, "detail": 1, "filter_keys": [], "filter_predicates": [], "filter_values": []}
        for key, value in filters.items():
            params["filter_keys"].append(key)
            params["filter_predicates"].append("=")
            params["filter_values"].append(value)
        reply = httpx.get(f"{self.dashboard}/api/v0/{kind}", params=params, timeout=30,
                          headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
        reply.raise_for_status()
        return reply.json()["data"]["result"]["result"]

    def submit(self, *entrypoint: str, env_vars: dict[str, str] | None = None) -> subprocess.Popen:
        """`ray job submit` of `python -m ...` from this checkout, with `env_vars` in the job's environment;
        the process follows the job to its end."""
        runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
        return subprocess.Popen(
            [BIN / "ray", "job", "submit", f"--address={self.dashboard}", f"--working-dir={REPO}", *runtime_env,
             "--", "python", "-m", *entrypoint],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip


def _finish(job: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = job.communicate(timeout=timeout)
    assert job.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def cluster():
    two = TwoNodeCluster()
    try:
        two.nodes = {"head": two.start("head"), "worker": two.start("worker")}
        yield two
    finally:
        two.stop()


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> dict[str, str]:
    return write_synthetic(str(tmp_path_factory.mktemp("users")), n_train_users=24, n_test_users=16, pairs_per_user=12)


def _train_args(users: dict, storage: Path, name: str) -> list[str]:
    return ["jobs.train", "model=tiny", f"datasets=[{users['train']}]", f"eval_datasets=[{users['test']}]",
            "shots=1", "passes=1", "loss=ipo", "reference_concurrency=2", "batch_size=4", "n_epochs=1",
            "eval_every=64", "n_eval_examples=32", "eval_batch_size=8", "lr=1e-3", "optimizer=AdamW",
            "warmup_steps=5", "max_failures=2", "log_example_ids=true", "placement_strategy=STRICT_SPREAD",
            f"storage_path={storage}", f"exp_name={name}", "do_first_eval=false"]  # fmt: skip


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_workers(cluster: TwoNodeCluster) -> dict[int, str]:
    """{pid: node id} of every Ray Train worker the cluster has had."""
    return {a["pid"]: a["node_id"] for a in cluster.state("actors", class_name="RayTrainWorker")}


def _workers_by_node(cluster: TwoNodeCluster, earlier: dict[int, str]) -> dict[str, int]:
    """{node id: Ray Train workers started there since `earlier`}."""
    counts: dict[str, int] = {}
    for pid, node in _train_workers(cluster).items():
        if pid not in earlier:
            counts[node] = counts.get(node, 0) + 1
    return counts


@dataclass
class Trained:
    storage: Path
    run_dir: Path
    workers: dict[str, int]  # {node id: Ray Train workers it ran there}


@pytest.fixture(scope="module")
def uninterrupted(cluster, users, tmp_path_factory) -> Trained:
    """A training run on both nodes that nothing interrupts: the other runs' yardstick, and a model to
    evaluate and serve."""
    storage, earlier = tmp_path_factory.mktemp("runs"), _train_workers(cluster)
    _finish(cluster.submit(*_train_args(users, storage, "whole")))
    return Trained(storage, storage / "whole", _workers_by_node(cluster, earlier))


def test_a_job_submitted_with_the_token_trains_one_worker_on_each_node(cluster, uninterrupted):
    refused = httpx.get(f"{cluster.dashboard}/api/jobs/", timeout=10)
    assert refused.status_code in (401, 403)  # token auth is on: without the token, no jobs
    assert uninterrupted.workers == {cluster.nodes["head"]: 1, cluster.nodes["worker"]: 1}
    assert (uninterrupted.run_dir / "LATEST" / "model.safetensors").exists()


def test_a_node_lost_mid_run_costs_no_episode_and_no_accuracy(cluster, users, uninterrupted):
    seen_before = _train_workers(cluster)
    # Beside the uninterrupted run, as a second run of a sweep: its reference scores come from their cache.
    job = cluster.submit(*_train_args(users, uninterrupted.storage, "lost"))
    run_dir = uninterrupted.storage / "lost"
    def checkpointed() -> bool:  # Ray Train wrote a checkpoint
        assert job.poll() is None, "no checkpoint before the run ended"
        return (run_dir / "checkpoint_manager_snapshot.json").exists()

    _wait_for("a checkpoint", checkpointed)
    lost_node = cluster.nodes["worker"]
    cluster.kill("worker")
    # Fixed scaling with one worker a node (STRICT_SPREAD): the run waits for a second node, then resumes.
    # The new node joins once the cluster knows the old one is gone.
    cluster.wait_dead(lost_node)
    cluster.nodes["worker"] = cluster.start("worker")
    assert cluster.nodes["worker"] != lost_node
    out = _finish(job)
    assert "; reference scored for 0 (" in out, out[-3000:]

    workers = _workers_by_node(cluster, seen_before)
    assert workers.get(lost_node) == 1 and workers.get(cluster.nodes["worker"]) == 1, (workers, out[-3000:])
    assert workers.get(cluster.nodes["head"]) == 2  # the head's worker was restarted with the group

    log, whole = _metrics(run_dir), _metrics(uninterrupted.run_dir)
    assert [m["counters/examples"] for m in log if "loss/train" in m] == list(range(4, 145, 4))  # replays logged once
    for rank in (0, 1):  # every planned episode trained on exactly once, at the same step as without the loss
        lost_ids, whole_ids = ([json.loads(line) for line in (run / "example_ids" / f"rank{rank}.jsonl").open()]
                               for run in (run_dir, uninterrupted.run_dir))  # fmt: skip
        assert [e["step"] for e in lost_ids] == list(range(1, 37))
        assert lost_ids == whole_ids
    # The resumed run restores weights, optimizer, schedule and RNG: it ends where the uninterrupted one did.
    for key in ("loss/train", "loss/eval"):
        last_lost, last_whole = ([m[key] for m in run if key in m][-1] for run in (log, whole))
        print(f"\n{key}: {last_lost} after the node loss, {last_whole} uninterrupted")
        assert last_lost == pytest.approx(last_whole, rel=1e-3), key


def test_evaluation_batch_inference_runs_on_both_nodes(cluster, users, uninterrupted, tmp_path):
    seen_before = {a["actor_id"] for a in cluster.state("actors")}
    _finish(cluster.submit(
        "jobs.evaluate", f"model={uninterrupted.run_dir}", f"datasets=[{users['test']}]",
        f"users_file={users['users']}", f"out={tmp_path / 'eval'}", "shots=[0,1]", "n_episodes=16", "n_queries=4",
        "max_new_tokens=8", "concurrency=2", "backend=transformers",
        # Each stage's work takes a replica a moment: on a busy machine the first replica up finished it
        # before the second's process had started, and Ray Data dropped the unplaced one (CI saw it). Ray Data
        # waits for the whole pool before a stage starts, so both are placed, as a cluster's are anyway.
        env_vars={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"},
    ))  # fmt: skip
    replicas = [a for a in cluster.state("actors")
                if a["actor_id"] not in seen_before and "MapWorker" in a["class_name"]]  # fmt: skip
    placed = [(a["class_name"], a["node_id"]) for a in replicas]  # the scorers' and the generators' replicas
    # Between them they ran on both nodes (a replica that a stage finished without placing has no node).
    assert {node for _, node in placed if node} == set(cluster.nodes.values()), placed
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [row["n"] for row in report["accuracy_by_shots"]] == [16, 16]


def _serve_config(cluster: TwoNodeCluster, model: Path, port: int) -> dict:
    """serve/config.yaml as shipped, but for a fixed two replicas of each deployment, at most one a node."""
    import yaml

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # one machine: a second node's proxy could not bind the same port
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(model=str(model), backend="transformers")
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment.update(num_replicas=2, max_replicas_per_node=1)
    return config


def _replica_nodes(cluster: TwoNodeCluster) -> dict[str, list[str]]:
    """{deployment: node ids of its RUNNING replicas}, from the dashboard's Serve API."""
    reply = httpx.get(f"{cluster.dashboard}/api/serve/applications/", timeout=30,
                      headers={"Authorization": f"Bearer {cluster.token}"})  # fmt: skip
    reply.raise_for_status()
    apps = reply.json()["applications"]
    if "fspo" not in apps:
        return {}
    return {name: sorted(r["node_id"] for r in d["replicas"] if r["state"] == "RUNNING")
            for name, d in apps["fspo"]["deployments"].items()}  # fmt: skip


def _wait_for_replicas(cluster: TwoNodeCluster, timeout: float) -> None:
    both = sorted(cluster.nodes.values())
    placed = lambda: (nodes := _replica_nodes(cluster)) and all(n == both for n in nodes.values())  # noqa: E731
    _wait_for("replicas one on each node", placed, timeout)


def test_serving_survives_losing_a_node_and_recovers_its_replicas(cluster, users, uninterrupted, tmp_path):
    import yaml

    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(_serve_config(cluster, uninterrupted.run_dir, port)))
    subprocess.run([BIN / "serve", "deploy", str(config), f"--address={cluster.dashboard}"], env=cluster.env,
                   check=True, capture_output=True)  # fmt: skip
    _wait_for_replicas(cluster, 240)

    pairs = [json.loads(line) for line in open(users["test"])]
    results: list[tuple[float, float, int | str]] = []  # (sent, answered, status or the exception's name)
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(timeout=60) as http:
            n = 0
            while not stop.is_set():
                pair = pairs[(k * 7 + n) % len(pairs)]
                request = {"user_id": f"user-{k}-{n % 5}", "query": pair["question"], "max_new_tokens": 8,
                           "history": [{k: pair[k] for k in ("question", "preferred", "dispreferred")}]}  # fmt: skip
                sent = time.monotonic()
                try:
                    status: int | str = http.post(f"http://127.0.0.1:{port}/v1/personalize", json=request).status_code
                except httpx.HTTPError as error:
                    status = type(error).__name__
                results.append((sent, time.monotonic(), status))
                n += 1

    def answered(since: float, count: int):
        """Whether `count` requests sent after `since` have their answer (of any status)."""
        return lambda: sum(sent >= since for sent, _, _ in list(results)) >= count

    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in clients:
        t.start()
    try:
        _wait_for("requests answered before the loss", answered(0, 20))
        killed_at, lost_node = time.monotonic(), cluster.nodes["worker"]
        cluster.kill("worker")
        cluster.wait_dead(lost_node)  # the node is gone: the head's replicas answer alone
        _wait_for("requests answered with the node gone", answered(time.monotonic(), 20))
        returned_at = time.monotonic()
        cluster.nodes["worker"] = cluster.start("worker")
        _wait_for_replicas(cluster, 240)  # Serve starts the lost replicas again, on the returned node
        _wait_for("requests answered after the return", answered(time.monotonic(), 20))
    finally:
        stop.set()
        for t in clients:
            t.join()
    subprocess.run([BIN / "serve", "shutdown", "-y", f"--address={cluster.dashboard}"], env=cluster.env,
                   capture_output=True)  # fmt: skip

    def failures(window) -> tuple[int, int]:
        statuses = [status for sent, answered, status in results if window(sent, answered)]
        return sum(s != 200 for s in statuses), len(statuses)

    failed = [(round(sent - killed_at, 1), status) for sent, _, status in results if status != 200]
    before = failures(lambda sent, answered: answered < killed_at)
    during = failures(lambda sent, answered: answered >= killed_at and sent < returned_at)  # in flight at the loss too
    after = failures(lambda sent, answered: sent >= returned_at)
    print(f"\nserving across a node loss: before {before}, during {during}, after {after} (failed, sent); "
          f"failures at s after the kill: {failed}")
    assert before[0] == 0 and before[1] > 0, (before, failed)
    # Only requests in flight through the lost node's ingress replica die with it (Serve's proxy answers them
    # 500; one a client at most); one whose engine replica died is tried again on the other. Nothing sent
    # after the loss fails. (5% of requests were allowed before: 4 in flight of 62 broke it on CI's box.)
    assert during[1] >= 20, (during, failed)
    assert all(sent < killed_at for sent, _, status in results if status != 200), (during, failed)
    assert after[0] == 0 and after[1] > 0, (after, failed)
