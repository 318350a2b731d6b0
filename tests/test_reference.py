"""The reference pass (Ray Data batch inference before training) and its cache, on a real local Ray."""

import os

import pytest
import torch

from fspo_ray.data.synthetic import write_synthetic
from fspo_ray.data.tokenize import PromptStyle
from fspo_ray.logprobs import concatenated_logps
from fspo_ray.models import build_tiny_model
from fspo_ray.train.pipeline import prepare
from fspo_ray.train.reference import ReferenceScoring, weights_digest

pytestmark = pytest.mark.slow


def _prepare(users, model, reference=None, length_window=0, limit=24, targets=1):
    return prepare(
        [users["train"]], split=None, shots=2, passes=1, purpose="train", tokenizer_path=model, max_length=1024,
        max_prompt_length=768, style=PromptStyle(), seed=0, num_workers=2, rows_per_step=4, limit=limit,
        length_window=length_window, reference=reference, targets=targets,
    )  # fmt: skip


def _rows(prepared):
    return [row for shard in prepared.shards for row in shard.iter_rows()]


def _assert_scores_are_the_plain_paths(rows, model):
    """The on-the-fly reference: the same model, every row through the plain concatenated path."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa").eval()
    with torch.no_grad():
        expected = concatenated_logps(
            reference, *([list(r[c]) for r in rows] for c in ("prompt_ids", "chosen_ids", "rejected_ids")), 0
        )
    got = torch.tensor([r["reference_chosen"] for r in rows] + [r["reference_rejected"] for r in rows])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_precomputed_reference_equals_the_reference_on_the_fly_and_is_cached(local_ray, tmp_path):
    users = write_synthetic(str(tmp_path / "users"), n_train_users=8, n_test_users=2, pairs_per_user=12)
    model = build_tiny_model(str(tmp_path / "tiny"), seed=3)
    cache = str(tmp_path / "run" / "reference_logps" / weights_digest(model, "float32"))
    scoring = ReferenceScoring(model, "float32", cache)

    plain = _prepare(users, model)
    scored = _prepare(users, model, scoring)
    assert scored.stats["reference_scored"] == scored.examples == 24
    rows = _rows(scored)
    assert [r["episode_id"] for r in rows] == [r["episode_id"] for r in _rows(plain)]  # same rows, same order

    _assert_scores_are_the_plain_paths(rows, model)

    again = _prepare(users, model, scoring)  # a re-run scores nothing: every score comes from the cache
    assert again.stats["reference_scored"] == 0
    assert [(r["reference_chosen"], r["reference_rejected"]) for r in _rows(again)] == [
        (r["reference_chosen"], r["reference_rejected"]) for r in rows
    ]
    assert [f for f in os.listdir(cache) if f.endswith(".parquet")]

    other = build_tiny_model(str(tmp_path / "other"), seed=4)  # other weights: another key, scored afresh
    assert weights_digest(other, "float32") != weights_digest(model, "float32")
    assert weights_digest(model, "bfloat16") != weights_digest(model, "float32")


def test_length_windows_cut_padding_and_keep_the_rows(local_ray, tmp_path):
    users = write_synthetic(str(tmp_path / "users"), n_train_users=8, n_test_users=2, pairs_per_user=12)
    model = build_tiny_model(str(tmp_path / "tiny"))

    def padding(prepared, micro=2):
        padded = real = 0
        for shard in prepared.shards:
            rows = list(shard.iter_rows())
            for i in range(0, len(rows), micro):
                lengths = [r["length"] for r in rows[i : i + micro]]
                padded += max(lengths) * len(lengths)
                real += sum(lengths)
        return (padded - real) / padded

    plain, grouped = _prepare(users, model, limit=None), _prepare(users, model, length_window=8, limit=None)
    assert sorted(r["episode_id"] for r in _rows(grouped)) == sorted(r["episode_id"] for r in _rows(plain))
    assert padding(grouped) < padding(plain)
    again = _prepare(users, model, length_window=8, limit=None)  # the order is fixed: resume stays exact
    assert [r["episode_id"] for r in _rows(again)] == [r["episode_id"] for r in _rows(grouped)]


@pytest.mark.parametrize("length_window", [0, 4])
def test_a_shot_sets_targets_stay_together_and_are_scored_exactly(local_ray, tmp_path, length_window):
    """K=2: each shot set's two targets are consecutive rows of one shard beginning with the same shot ids
    (so they share a micro-batch's packed row), and the reference pass, which packs them, scores each as
    the plain path does."""
    users = write_synthetic(str(tmp_path / "users"), n_train_users=4, n_test_users=2, pairs_per_user=8)
    model = build_tiny_model(str(tmp_path / "tiny"), seed=3)
    scoring = ReferenceScoring(model, "float32", None)
    prepared = _prepare(users, model, scoring, length_window=length_window, limit=None, targets=2)
    assert prepared.stats["targets_per_prompt"] == 2 and prepared.examples == 4 * 2 * 2  # users × windows × K
    for shard in prepared.shards:
        rows = list(shard.iter_rows())
        for first, second in zip(rows[::2], rows[1::2]):
            assert first["episode_id"][:-2] == second["episode_id"][:-2]  # "{user}/{pass}/{window}/{target}"
            shared = first["shots_length"]
            assert shared == second["shots_length"] > 0
            assert list(first["prompt_ids"][:shared]) == list(second["prompt_ids"][:shared])
    _assert_scores_are_the_plain_paths(_rows(prepared), model)
