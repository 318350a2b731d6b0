import os
import socket

import pytest

# `make test` runs two test files at once on two cores, each with more busy processes (Ray workers, replicas,
# engines) than cores. libgomp's default makes a thread that waits at the end of a parallel region spin for
# a while first, burning a core another process needs; a passive wait sleeps instead. Set before torch is
# imported here or in any process started from here (Ray's workers, jobs run as subprocesses). Two files
# (test_lora, test_reference, test_evaluate, test_smollm2_lora) at a time: 334 s -> 313 s, medians of two.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray Train starts a preemption watcher actor with every fit (a process importing Ray Train, ~1.5 CPU-seconds):
# it polls for nodes being drained, which no test's cluster does. The suite runs about a dozen fits.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# The longest test files, longest first (fresh-clone CI, 2 cores, 2026-12-04). `make test` runs the files
# on two pytest-xdist workers in collection order (--no-loadscope-reorder): the long ones start first and the
# short ones fill in at the end, instead of one long file running alone at the end.
LONGEST_FIRST = ("test_two_nodes.py", "test_demo.py", "test_smollm2_lora.py", "test_serve_vllm.py",
                 "test_train_cli.py", "test_generate_data.py", "test_openai.py", "test_serve.py", "test_lora.py",
                 "test_evaluate.py", "test_serve_scaling.py", "test_reference.py", "test_real_people.py",
                 "test_playground.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def _ray_down_at_the_end():
    yield
    import ray

    if ray.is_initialized():  # before pytest's summary, which would otherwise end in Ray's last worker lines
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_ray_down_at_the_end):
    """A real local Ray, sized like the machine CI runs on. The modules one pytest process runs share it (a
    start-up costs seconds of both CPUs, and its pooled workers have their imports done); each module leaves
    nothing running in it. A module that needs a Ray of its own shuts this one down first, and the next module
    starts it again. What its workers print stays in Ray's logs: forwarded to this process, it would reach the
    console between tests, where pytest does not capture."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        start_local_ray(log_to_driver=False)
    return ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray(**options) -> None:
    """ray.init for a test's own cluster: 2 CPUs, and a dashboard on a port of its own.

    Without a dashboard, the cluster's state API address is still 127.0.0.1:8265, the default port, which the
    dashboard of another Ray on this machine (a job run as a subprocess by the other pytest worker) may hold.
    Ray Train's placement-group cleaner asks that address whether the run's controller is alive, finds no such
    actor in the other cluster, and removes the live run's placement group: the workers die mid-run ("A worker
    health check failed"), as CI saw in the demo test."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(), **options)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> str:
    """The tiny model after ~15 s of SFT on synthetic users' 1-shot episodes (plain PyTorch, no Ray):
    its greedy answers are non-empty and depend on the prompt, so "served answer == direct answer"
    compares real text (the random tiny model writes only newlines, and "" == "" proves nothing). Trained once
    per run: pytest-xdist's workers share it (their temp dirs sit in this run's own)."""
    from fspo_ray.files import file_lock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained_tiny"
    with file_lock(f"{root}.lock"):
        if not (root / "trained").is_dir():
            _train_tiny(root)
    return str(root / "trained")


def _train_tiny(root) -> None:
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fspo_ray.data.episodes import build_episodes
    from fspo_ray.data.readers import read_pairs
    from fspo_ray.data.synthetic import write_synthetic
    from fspo_ray.data.tokenize import render_episode, tokenize_text
    from fspo_ray.files import staged_folder
    from fspo_ray.models import build_tiny_model

    path = build_tiny_model(str(root / "random"))
    data = write_synthetic(str(root / "data"), n_train_users=16, n_test_users=0, pairs_per_user=8)
    episodes, _ = build_episodes(read_pairs(data["train"]), shots=1, passes=1, seed=0)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    rows = []
    for episode in episodes:
        tokens = tokenize_text(tokenizer, render_episode(episode))
        prompt, answer = tokens["prompt_ids"], tokens["chosen_ids"]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))  # the loss on the answer only
    torch.manual_seed(0)
    optimizer, rng = torch.optim.AdamW(model.parameters(), lr=3e-3), random.Random(0)
    for _ in range(150):
        batch = rng.sample(rows, 8)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [tokenizer.eos_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in batch])
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with staged_folder(str(root / "trained")) as staging:  # the folder appears whole, or not at all
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)


@pytest.fixture
def judge_endpoint():
    """Start a local OpenAI-compatible chat endpoint: `judge_endpoint(verdict)` returns its URL, where
    `verdict(prompt)` is the reply's content, or None for an HTTP 500. The requests it got (path,
    Authorization header, prompt) are in `judge_endpoint.seen`. It stops at the test's end."""
    import http.server
    import json
    import threading

    servers, seen = [], []

    def start(verdict) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
                seen.append((self.path, self.headers.get("Authorization"), prompt))
                said = verdict(prompt)
                data = b"" if said is None else json.dumps({"choices": [{"message": {"content": said}}]}).encode()
                self.send_response(500 if said is None else 200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    start.seen = seen
    yield start
    for server in servers:
        server.shutdown()


def first_answer(judge_prompt: str) -> str:
    """The answer a judge prompt labels m (shown first)."""
    return judge_prompt.split("Answer m:\n", 1)[1].split("\n\nAnswer M:", 1)[0]
