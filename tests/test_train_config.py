"""The training job's command line: the seed's (DPO codebase's) overrides parse onto TrainConfig."""

import math
import json
import os
import re

import pytest

from fspo_ray.config import ConfigError
from fspo_ray.train.config import parse_train_config

# fspo-method.md §3, with model=llama3-8b swapped for the local preset and the data path filled in.
SEED_SFT = (
    "model=tiny datasets=[/x.json] n_epochs=1 loss=sft lr=1e-7 exp_name=X trainer=FSDPTrainer "
    "sample_during_eval=false eval_every=1_000_000 do_first_eval=false debug=false wandb.project=P "
    "batch_size=8 max_prompt_length=2048 max_length=2048"
).split()
SEED_IPO = (
    "model=tiny datasets=[/x.json] n_epochs=2 loss=ipo lr=1e-7 loss.beta=0.05 exp_name=X trainer=FSDPTrainer "
    "sample_during_eval=false eval_every=1_000_000 do_first_eval=false debug=false wandb.project=P "
    "batch_size=4 max_prompt_length=2048 max_length=2048 model.archive=/SFT_RUN/LATEST/policy.pt"
).split()


def parse(*args):
    return parse_train_config(["datasets=[/x.json]", *args])


def test_seed_sft_command_line(capsys):
    cfg = parse_train_config(SEED_SFT)
    assert cfg.model.name_or_path == "tiny"
    assert cfg.datasets == ["/x.json"]
    assert cfg.loss.name == "sft"
    assert cfg.loss.beta == 0.1  # untouched default
    assert cfg.stage == 3  # FSDPTrainer: full sharding
    assert cfg.eval_every == 1_000_000
    assert cfg.model.archive is None
    assert cfg.batch_size == 8
    assert cfg.micro_batch_size == 8 // (1 * 2)  # default gradient_accumulation_steps=1, num_workers=2
    assert cfg.lr == 1e-7 and cfg.n_epochs == 1 and cfg.exp_name == "X"
    assert cfg.do_first_eval is False and cfg.wandb.project == "P"
    assert cfg.max_length == 2048 and cfg.max_prompt_length == 2048
    assert os.path.isabs(cfg.storage_path)
    assert cfg.storage_path == os.path.join(os.getcwd(), "runs")
    out = capsys.readouterr().out
    assert re.search(r"note: sample_during_eval has no effect", out)


def test_seed_ipo_command_line(capsys):
    cfg = parse_train_config(SEED_IPO)
    assert cfg.model.name_or_path == "tiny"
    assert cfg.loss.name == "ipo"
    assert cfg.loss.beta == 0.05
    assert cfg.stage == 3
    assert cfg.eval_every == 1_000_000
    assert cfg.model.archive == "/SFT_RUN/LATEST/policy.pt"
    assert cfg.batch_size == 4
    assert cfg.micro_batch_size == 2
    assert cfg.n_epochs == 2
    assert os.path.isabs(cfg.storage_path)
    assert "sample_during_eval" in capsys.readouterr().out


def test_no_note_without_ignored_keys(capsys):
    parse("loss=dpo")
    assert capsys.readouterr().out == ""


def test_relative_storage_path_made_absolute_uri_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse("storage_path=out/runs").storage_path == str(tmp_path / "out" / "runs")
    assert parse("storage_path=s3://bucket/runs").storage_path == "s3://bucket/runs"


def test_trainer_picks_zero_stage():
    assert parse("trainer=BasicTrainer").stage == 0
    assert parse("trainer=FSDPTrainer").stage == 3
    assert parse("trainer=TensorParallelTrainer").stage == 3
    assert parse().stage == 0  # default trainer is BasicTrainer


def test_zero_stage_overrides_trainer():
    assert parse("trainer=FSDPTrainer", "zero_stage=2").stage == 2
    assert parse("trainer=BasicTrainer", "zero_stage=1").stage == 1


def test_plus_prefix_means_plain_key(capsys):
    plain = parse("loss.beta=0.3", "zero_stage=2", "loss=dpo")
    plus = parse("+loss.beta=0.3", "++zero_stage=2", "+loss=dpo")
    assert plus == plain
    assert (plus.loss.beta, plus.stage, plus.loss.name) == (0.3, 2, "dpo")
    parse("+sample_during_eval=true")
    assert "sample_during_eval has no effect" in capsys.readouterr().out


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"loss\.bta.*Did you mean: 'beta'"):
        parse("loss.bta=1")
    with pytest.raises(ConfigError, match=r"Did you mean.*'batch_size'"):
        parse("bach_size=8")


def test_batch_size_not_divisible_by_accumulation_times_workers():
    with pytest.raises(ConfigError) as e:
        parse("batch_size=10", "gradient_accumulation_steps=3", "num_workers=2")
    message = str(e.value)
    assert "batch_size=10" in message
    assert {"10", "3", "2", "6"} <= set(re.findall(r"\d+", message))  # batch, accumulation, workers, product
    # smaller than one micro-batch per worker per accumulation step
    with pytest.raises(ConfigError, match="batch_size=2"):
        parse("batch_size=2", "gradient_accumulation_steps=2", "num_workers=2")
    cfg = parse("batch_size=12", "gradient_accumulation_steps=3", "num_workers=2")
    assert cfg.micro_batch_size == 2


def test_eval_batch_size_must_be_multiple_of_workers():
    with pytest.raises(ConfigError, match=r"eval_batch_size=9.*num_workers=2"):
        parse("eval_batch_size=9")
    assert parse("eval_batch_size=9", "num_workers=3", "batch_size=6").eval_batch_size == 9


def test_prompt_longer_than_sequence():
    with pytest.raises(ConfigError, match=r"max_prompt_length=600.*max_length=512"):
        parse("max_prompt_length=600")
    assert parse("max_prompt_length=512").max_prompt_length == 512


def test_unknown_loss_lists_choices():
    with pytest.raises(ConfigError) as e:
        parse("loss=kto")
    message = str(e.value)
    assert "kto" in message
    for name in ("sft", "dpo", "ipo"):
        assert name in message


def test_unknown_trainer_rejected():
    with pytest.raises(ConfigError, match="BasicTrainer"):
        parse("trainer=MegatronTrainer")


def test_offload_optimizer_needs_a_zero_stage():
    with pytest.raises(ConfigError, match="offload_optimizer=true needs zero_stage 1, 2 or 3"):
        parse("offload_optimizer=true")  # BasicTrainer: stage 0
    assert parse("offload_optimizer=true", "zero_stage=1").offload_optimizer is True


def test_offload_params_needs_stage_3():
    with pytest.raises(ConfigError, match="offload_params.*zero_stage=3"):
        parse("offload_params=true", "zero_stage=2")
    with pytest.raises(ConfigError, match="offload_params"):
        parse("offload_params=true")  # BasicTrainer: stage 0
    assert parse("offload_params=true", "trainer=FSDPTrainer").offload_params is True


def test_datasets_required():
    with pytest.raises(ConfigError, match="datasets"):
        parse_train_config(["loss=dpo"])
    with pytest.raises(ConfigError, match="datasets"):
        parse_train_config([])


def test_bad_type_is_config_error():
    with pytest.raises(ConfigError, match="batch_size=many"):
        parse("batch_size=many")


@pytest.mark.parametrize("arg", ["num_workers=0", "gradient_accumulation_steps=0", "num_workers=-2"])
def test_non_positive_workers_or_accumulation_is_config_error(arg):
    with pytest.raises(ConfigError, match=arg.partition("=")[0]):
        parse(arg)


@pytest.mark.parametrize(
    "args, message",
    [
        (["loss=dpo", "loss.beta=0"], "loss.beta=0.0 must be > 0"),
        (["loss=dpo", "loss.label_smoothing=0.7"], "must be in [0, 0.5)"),
        (["loss=ipo", "loss.label_smoothing=0.1"], "applies to loss=dpo only"),
        (["n_examples=-5"], "n_examples=-5 must be >= 1"),
        (["eval_every=0"], "eval_every=0 must be >= 1"),
    ],
)
def test_loss_and_schedule_values_checked_before_any_work(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(*args)


def test_a_run_folder_records_its_config_and_refuses_to_resume_another(tmp_path):
    """The seed's flow without a new exp_name: SFT, then IPO from it under the same name. Ray Train would
    resume the SFT run's last step and train nothing; here the second run stops, naming what differs."""
    from fspo_ray.train.run import claim_run_dir

    common = ["datasets=[data/train.jsonl]", f"storage_path={tmp_path}"]
    sft = parse_train_config([*common, "loss=sft", "lr=1e-5"])
    assert claim_run_dir(sft) is False
    recorded = json.loads((tmp_path / "fspo" / "fspo_config.json").read_text())
    assert recorded["loss"]["name"] == "sft" and recorded["lr"] == 1e-5
    assert claim_run_dir(sft) is True  # the same config: resume
    assert claim_run_dir(parse_train_config([*common, "loss=sft", "lr=1e-5", "max_failures=3"])) is True
    ipo = parse_train_config([*common, "loss=ipo", "lr=1e-5", f"model.archive={tmp_path}/fspo"])
    with pytest.raises(ConfigError, match=r"loss\.name: 'sft' -> 'ipo'; model\.archive: None -> '.*fspo'"):
        claim_run_dir(ipo)
    with pytest.raises(ConfigError, match="exists and resume=never"):
        claim_run_dir(parse_train_config([*common, "loss=sft", "lr=1e-5", "resume=never"]))
    with pytest.raises(ConfigError, match="resume=must, but .* holds no run"):
        claim_run_dir(parse_train_config([*common, "exp_name=new", "resume=must"]))
    (tmp_path / "unrecorded").mkdir()
    with pytest.raises(ConfigError, match="records no config"):
        claim_run_dir(parse_train_config([*common, "exp_name=unrecorded"]))


@pytest.mark.parametrize("override, message", [
    ("shots=-1", "shots=-1 must be >= 0"),
    ("passes=0", "passes=0 must be >= 1"),
    ("min_shots=0", "min_shots=0 must be >= 1"),
    ("shots=3 min_shots=4", "min_shots=4 must be <= shots=3"),
    ("description_mode=generated", "preferred_only=true has no description_mode=generated prompt"),
    ("resume=sometimes", "resume"),
])  # fmt: skip
def test_bad_values_are_refused_up_front(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_train_config(["datasets=[x.jsonl]", "preferred_only=true", *override.split()])


def test_reference_free_is_refused_where_the_reference_ignores_it():
    with pytest.raises(ConfigError, match="reference_free applies to loss=dpo only"):
        parse_train_config(["datasets=[x.jsonl]", "loss=ipo", "loss.reference_free=true"])
    assert parse_train_config(["datasets=[x.jsonl]", "loss=dpo", "loss.reference_free=true"]).loss.reference_free


def test_the_preferred_answers_nll_weight_is_for_preference_losses_and_not_negative():
    for loss, weight in (("sft", "1.0"), ("ipo", "-0.5")):
        with pytest.raises(ConfigError, match=f"loss.sft_weight={float(weight)}: it is a weight >= 0"):
            parse_train_config(["datasets=[x.jsonl]", f"loss={loss}", f"loss.sft_weight={weight}"])
    assert parse_train_config(["datasets=[x.jsonl]", "loss=ipo", "loss.sft_weight=0.5"]).loss.sft_weight == 0.5


def test_the_learning_rate_warms_up_then_holds_or_follows_a_half_cosine():
    from fspo_ray.train.loop import lr_factor

    assert [lr_factor(s, 3, 11, "constant") for s in (0, 1, 2, 3, 10)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = [lr_factor(s, 3, 11, "cosine") for s in (0, 3, 5, 7, 11)]  # 8 steps of decay after 3 of warmup
    assert cosine == pytest.approx([0.25, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.0])
    with pytest.raises(ConfigError, match="lr_schedule"):
        parse_train_config(["datasets=[x.jsonl]", "lr_schedule=linear"])
