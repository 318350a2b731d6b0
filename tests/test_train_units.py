"""Training pieces that run without Ray: archives, collation, the batch loss, the DeepSpeed config."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fspo_ray.config import InputError
from fspo_ray.logprobs import CompletionLogps
from fspo_ray.models import archive_to_folder, build_tiny_model, load_policy_state, resolve_archive, resolve_model
from fspo_ray.train.config import LossConfig, parse_train_config
from fspo_ray.train.loop import deepspeed_config
from fspo_ray.train.step import batch_loss, collate

CHANGED = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "m"))


def _mark(path):  # what unpickling an Evil would run
    open(path, "w").close()


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _mark, (self.marker,)


def _save_policy(tmp_path, state, **extra):
    path = str(tmp_path / "policy.pt")
    torch.save({"step_idx": 3, "state": state, "metrics": {"loss": 1.0}, **extra}, path)
    return path


def test_policy_pt_applied_to_base_model(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        model.state_dict()[CHANGED].add_(1.0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    policy_pt = _save_policy(tmp_path, model.state_dict())
    assert torch.equal(load_policy_state(policy_pt)[CHANGED], expected[CHANGED])

    out = archive_to_folder(policy_pt, tiny, str(tmp_path / "out"))
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert torch.equal(loaded[CHANGED], base[CHANGED] + 1.0)
    # a HF folder (the export) needs no conversion: it is used as is
    assert archive_to_folder(out, tiny, str(tmp_path / "unused")) == out
    assert not (tmp_path / "unused").exists()


def test_policy_pt_with_pickled_object_refused(tmp_path):
    marker = tmp_path / "ran"
    policy_pt = _save_policy(tmp_path, {"w": torch.zeros(2)}, metrics=Evil(str(marker)))
    with pytest.raises(InputError, match="not a plain tensor checkpoint"):
        load_policy_state(policy_pt)
    assert not marker.exists()  # nothing was unpickled
    torch.save({"w": torch.zeros(2)}, policy_pt)  # plain tensors, but not the DPO codebase's layout
    with pytest.raises(InputError, match="'state'"):
        load_policy_state(policy_pt)


def test_policy_pt_with_wrong_keys_names_them(tiny, tmp_path):
    state = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    state["model.layers.0.mlp.renamed.weight"] = state.pop(CHANGED)
    policy_pt = _save_policy(tmp_path, state)
    with pytest.raises(InputError, match="does not fit") as e:
        archive_to_folder(policy_pt, tiny, str(tmp_path / "out"))
    assert CHANGED in str(e.value) and "model.layers.0.mlp.renamed.weight" in str(e.value)
    assert "missing" in str(e.value) and "unexpected" in str(e.value)


def test_policy_pt_of_another_model_size_is_input_error(tiny, tmp_path):
    state = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    state[CHANGED] = torch.zeros(3, 3)  # same keys, another architecture's shapes
    policy_pt = _save_policy(tmp_path, state)
    with pytest.raises(InputError, match="does not fit"):
        archive_to_folder(policy_pt, tiny, str(tmp_path / "out"))


def test_resolve_archive(tmp_path):
    latest = tmp_path / "run" / "LATEST"
    latest.mkdir(parents=True)
    (latest / "config.json").write_text("{}")
    assert resolve_archive(str(tmp_path / "run")) == (str(latest), None)
    assert resolve_archive(str(latest)) == (str(latest), None)
    assert resolve_archive(str(latest / "policy.pt")) == (str(latest), None)  # the seed's spelling
    pt = tmp_path / "old" / "policy.pt"
    pt.parent.mkdir()
    pt.write_bytes(b"x")
    assert resolve_archive(str(pt)) == (None, str(pt))
    for bad in (tmp_path / "nope", tmp_path / "nope" / "policy.pt", tmp_path / "old"):
        with pytest.raises(InputError, match="model.archive="):
            resolve_archive(str(bad))


def test_resolve_model(tmp_path):
    for bad in (tmp_path, tmp_path / "missing"):
        with pytest.raises(InputError, match="no config.json"):
            resolve_model(str(bad))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


ROWS = {  # two examples: prompt [5, 6], then the completions
    "prompt_ids": [[5, 6], [5, 6]],
    "chosen_ids": [[7, 8, 9], [10, 11]],
    "rejected_ids": [[12], [13, 14, 15, 16]],
}


def _batch(rows=ROWS, with_rejected=True):
    return collate(rows, 0, torch.device("cpu"), with_rejected=with_rejected)


def _model(seed):
    """A tiny random Llama as batch_loss calls it: in the CompletionLogps training hands to DeepSpeed."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    return CompletionLogps(LlamaForCausalLM(config))


def _logp(model, prompt, completion):
    """Σ log p(completion_t | prompt, completion_<t), from one unpadded forward."""
    tokens = prompt + completion
    with torch.no_grad():
        logps = F.log_softmax(model.lm(input_ids=torch.tensor([tokens])).logits[0].double(), -1)
    return sum(logps[len(prompt) + t - 1, token].item() for t, token in enumerate(completion))


def _expected_logps(model, side):
    return [_logp(model, p, c) for p, c in zip(ROWS["prompt_ids"], ROWS[f"{side}_ids"])]


METRIC_KEYS = {f"rewards_train/{k}" for k in ("chosen", "rejected", "accuracies", "margins")}
METRIC_KEYS |= {"logps_train/chosen", "logps_train/rejected", "loss/train"}


@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_ipo_and_dpo_against_itself(beta):
    model, batch = _model(0), _batch()
    loss, metrics = batch_loss(model, model, batch, LossConfig(name="ipo", beta=beta), "chosen", "train")
    assert set(metrics) == METRIC_KEYS
    assert all(count == 2 for _, count in metrics.values())
    for key in ("chosen", "rejected", "margins", "accuracies"):
        assert metrics[f"rewards_train/{key}"][0].item() == 0.0, key
    assert loss.item() == pytest.approx((1 / (2 * beta)) ** 2, rel=1e-6)
    assert metrics["loss/train"][0].item() == pytest.approx(2 * (1 / (2 * beta)) ** 2, rel=1e-6)
    assert metrics["logps_train/chosen"][0].item() == pytest.approx(sum(_expected_logps(model, "chosen")), abs=1e-3)
    assert metrics["logps_train/rejected"][0].item() == pytest.approx(sum(_expected_logps(model, "rejected")), abs=1e-3)

    loss, metrics = batch_loss(model, model, batch, LossConfig(name="dpo", beta=beta), "chosen", "eval")
    assert set(metrics) == {k.replace("_train", "_eval").replace("/train", "/eval") for k in METRIC_KEYS}
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["rewards_eval/chosen"][0].item() == 0.0


def test_dpo_against_another_reference():
    policy, reference, beta, batch = _model(0), _model(1), 0.1, _batch()
    loss, metrics = batch_loss(policy, reference, batch, LossConfig(name="dpo", beta=beta), "chosen", "train")
    pc, pr = _expected_logps(policy, "chosen"), _expected_logps(policy, "rejected")
    rc, rr = _expected_logps(reference, "chosen"), _expected_logps(reference, "rejected")
    h = [(pc[i] - pr[i]) - (rc[i] - rr[i]) for i in range(2)]
    expected = [-math.log(1 / (1 + math.exp(-beta * hi))) for hi in h]
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-4)
    rewards_chosen = [beta * (pc[i] - rc[i]) for i in range(2)]
    rewards_rejected = [beta * (pr[i] - rr[i]) for i in range(2)]
    assert metrics["rewards_train/chosen"][0].item() == pytest.approx(sum(rewards_chosen), abs=1e-4)
    assert metrics["rewards_train/accuracies"][0].item() == sum(c > r for c, r in zip(rewards_chosen, rewards_rejected))
    assert loss.requires_grad  # the policy is trained, the reference is not


@pytest.mark.parametrize("target", ["chosen", "both"])
def test_sft_is_mean_negative_logp(target):
    model, batch = _model(0), _batch(with_rejected=target == "both")
    loss, metrics = batch_loss(model, None, batch, LossConfig(name="sft"), target, "train")
    chosen = _expected_logps(model, "chosen")
    targets = chosen + (_expected_logps(model, "rejected") if target == "both" else [])
    assert loss.item() == pytest.approx(-sum(targets) / len(targets), abs=1e-4)
    assert set(metrics) == {"logps_train/chosen", "loss/train"} and metrics["logps_train/chosen"][1] == 2
    assert metrics["logps_train/chosen"][0].item() == pytest.approx(sum(chosen), abs=1e-4)
    assert metrics["loss/train"][0].item() == pytest.approx(2 * loss.item(), rel=1e-6)


DS_ARGS = "datasets=[/x.json] batch_size=8 gradient_accumulation_steps=2 num_workers=2 max_grad_norm=3.5".split()


@pytest.mark.parametrize(
    "extra, dtype, stage, offload",
    [
        ("trainer=FSDPTrainer", torch.float32, 3, ""),
        ("zero_stage=2 offload_optimizer=true", torch.bfloat16, 2, "offload_optimizer"),
        ("zero_stage=3 offload_params=true", torch.float16, 3, "offload_param"),
        (
            "zero_stage=3 offload_params=true offload_optimizer=true",
            torch.bfloat16,
            3,
            "offload_param offload_optimizer",
        ),
    ],
)
def test_deepspeed_config(extra, dtype, stage, offload):
    ds, offload = deepspeed_config(parse_train_config(DS_ARGS + extra.split()), dtype), set(offload.split())
    sizes = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    assert sizes == (8, 2, 2)
    assert ds["gradient_clipping"] == 3.5
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert {k for k in zero if k.startswith("offload")} == offload
    assert all(zero[k] == {"device": "cpu"} for k in offload)
    assert ds["bf16"] == {"enabled": dtype is torch.bfloat16} and ds["fp16"] == {"enabled": dtype is torch.float16}


def test_dtype():
    from fspo_ray.models import resolve_dtype

    assert (resolve_dtype("auto", on_gpu=True), resolve_dtype("auto", on_gpu=False)) == ("bfloat16", "float32")
    assert (resolve_dtype("float16", on_gpu=True), resolve_dtype("bfloat16", on_gpu=False)) == ("float16", "bfloat16")


def test_precomputed_reference_scores_replace_the_reference_model():
    policy, reference = _model(0), _model(1)
    rows = dict(ROWS, reference_chosen=_expected_logps(reference, "chosen"),
                reference_rejected=_expected_logps(reference, "rejected"))  # fmt: skip
    on_the_fly = batch_loss(policy, reference, _batch(), LossConfig(name="ipo", beta=0.1), "chosen", "train")
    precomputed = batch_loss(policy, None, _batch(rows), LossConfig(name="ipo", beta=0.1), "chosen", "train")
    assert precomputed[0].item() == pytest.approx(on_the_fly[0].item(), rel=1e-5)
    for key, (value, count) in on_the_fly[1].items():
        assert precomputed[1][key][0].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-5), key
    with pytest.raises(ValueError, match="needs a reference model or precomputed reference scores"):
        batch_loss(policy, None, _batch(), LossConfig(name="dpo"), "chosen", "train")


def test_a_shot_sets_episodes_share_one_packed_row_and_keep_their_loss():
    """Rows that say their prompts begin with the same shots (`shots_length`, numpy as Ray Data hands them
    over) run as one packed row, with every loss and metric of the two separate rows."""
    import numpy as np

    columns = {c: np.array([np.array(v) for v in values] + [None], dtype=object)[:-1] for c, values in ROWS.items()}
    shared = _batch({**columns, "shots_length": np.array([1, 1])})
    assert shared.packed.input_ids.shape[0] == 1 and _batch().packed.input_ids.shape[0] == 2
    policy, reference = _model(0), _model(1)
    for loss_cfg, target in ((LossConfig(name="ipo", beta=0.1), "chosen"), (LossConfig(name="sft"), "both")):
        alone = batch_loss(policy, reference, _batch(), loss_cfg, target, "train")
        together = batch_loss(policy, reference, shared, loss_cfg, target, "train")
        assert together[0].item() == pytest.approx(alone[0].item(), rel=1e-5)
        for key, (value, count) in alone[1].items():
            assert together[1][key][1] == count == 2, key
            assert together[1][key][0].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
