"""The README's commands stay true.

Every `python -m jobs.*` command line in it parses with its job's settings; the data commands run as
written. The long ones run elsewhere at a smaller size: training in test_train_cli.py and test_demo.py,
evaluation in test_evaluate.py, data generation (and training on its folder) in test_generate_data.py,
`serve run` in test_serve_cli.py, the curl request in test_serve.py, `ray start` and `ray job submit` with
token auth in test_two_nodes.py, and `make demo` / `make test` themselves in CI.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from fspo_ray.config import parse_overrides
from fspo_ray.evaluate.run import EvaluateConfig
from fspo_ray.generate.run import GenerateDataConfig
from fspo_ray.train.config import parse_train_config
from jobs.build_episodes import BuildEpisodesConfig
from jobs.demo import DemoConfig
from jobs.synthetic_users import SyntheticUsersConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

PARSERS = {
    "jobs.train": parse_train_config,
    "jobs.evaluate": lambda argv: parse_overrides(EvaluateConfig, argv),
    "jobs.synthetic_users": lambda argv: parse_overrides(SyntheticUsersConfig, argv),
    "jobs.build_episodes": lambda argv: parse_overrides(BuildEpisodesConfig, argv),
    "jobs.demo": lambda argv: parse_overrides(DemoConfig, argv),
    "jobs.generate_data": lambda argv: parse_overrides(GenerateDataConfig, argv),
}


def job_commands() -> list[tuple[str, list[str]]]:
    """(module, arguments) of every `python -m jobs.X ...` in the README's bash blocks, in order."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "-m jobs." not in line:
                continue  # the curl example's quotes span lines
            words = shlex.split(line, comments=True)
            if "-m" in words and words[words.index("-m") + 1].startswith("jobs."):
                at = words.index("-m")
                found.append((words[at + 1], words[at + 2 :]))
    return found


def test_every_job_command_line_parses():
    commands = job_commands()
    assert {module for module, _ in commands} >= {"jobs.train", "jobs.evaluate", "jobs.synthetic_users"}
    for module, argv in commands:
        assert module in PARSERS, f"README runs {module}: add its settings to PARSERS"
        PARSERS[module]([arg.replace("$PWD", str(REPO)) for arg in argv])


def test_the_data_commands_run_as_written(tmp_path):
    for module, argv in job_commands():
        if module in ("jobs.synthetic_users", "jobs.build_episodes"):
            done = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
    users = json.loads((tmp_path / "data" / "synthetic" / "users.json").read_text())
    episodes = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert episodes and {e["user_id"] for e in episodes} <= set(users)
    assert set(episodes[0]) >= {"user_id", "prompt", "chosen", "rejected", "shots", "query", "shots_dropped"}


def curl_request() -> dict:
    """The JSON body of the README's curl example."""
    body = re.search(r"curl -s http://127\.0\.0\.1:8000/v1/personalize .*?-d '(\{.*?\})'", README, re.S)
    assert body, "the README's curl example is gone"
    return json.loads(body[1])
