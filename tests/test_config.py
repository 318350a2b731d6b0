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
