"""`key=value` overrides in the DPO codebase's syntax, onto typed dataclass configs."""

from dataclasses import dataclass, field

import pytest

from fspo_ray.config import ConfigError, parse_overrides


@dataclass
class Loss:
    name: str = "sft"
    beta: float = 0.1


@dataclass
class Run:
    datasets: list[str] = field(default_factory=list)
    eval_every: int = 20_000
    exp_name: str = "run"
    loss: Loss = field(default_factory=Loss)


def test_seed_style_overrides():
    cfg = parse_overrides(Run, ["datasets=[a.json,elix:/d/e.jsonl]", "eval_every=1_000_000", "loss.beta=0.05"])
    assert cfg == Run(datasets=["a.json", "elix:/d/e.jsonl"], eval_every=1_000_000, loss=Loss(beta=0.05))


def test_unknown_key_suggests_the_close_match():
    with pytest.raises(ConfigError, match=r"bad override 'loss\.bta=1'.*Did you mean: 'beta'"):
        parse_overrides(Run, ["loss.bta=1"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"'eval_every=often'.*'often'"):
        parse_overrides(Run, ["eval_every=often"])


def test_not_key_value():
    with pytest.raises(ConfigError, match="expected key=value, got 'loss'"):
        parse_overrides(Run, ["loss"])


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("exp_name: demo\nloss:\n  name: ipo\n  beta: 0.01\n")
    cfg = parse_overrides(Run, ["loss.beta=0.5", f"config={path}"])
    assert (cfg.exp_name, cfg.loss) == ("demo", Loss("ipo", 0.5))  # the file first, whatever the order
    with pytest.raises(ConfigError, match="config file .*nope.yaml"):
        parse_overrides(Run, [f"config={tmp_path}/nope.yaml"])


@pytest.mark.parametrize("job", ["jobs.train", "jobs.evaluate", "jobs.build_episodes", "jobs.synthetic_users",
                                 "jobs.demo"])  # fmt: skip
def test_every_job_answers_help_with_every_key_default_and_meaning(job):
    """`--help` lists each key of the job's config dataclass with its default and the comment that
    documents it, and every key has one."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", job, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    keys = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ") and "=" in line.split()[0]]
    undocumented = [line for line in done.stdout.splitlines() if line.startswith("  ") and len(line.split()) == 1]
    assert len(keys) >= 7 and not undocumented, done.stdout


def test_train_help_shows_defaults_and_missing_keys_are_one_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "jobs.train", "--help"], capture_output=True, text=True, timeout=120)
    assert "  loss.beta=0.1 " in done.stdout and "dpo/ipo strength" in done.stdout
    bare = subprocess.run([sys.executable, "-m", "jobs.evaluate"], capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "Traceback" not in bare.stderr
    assert bare.stderr.strip() == "error: missing required key(s): datasets, model (see --help)"
