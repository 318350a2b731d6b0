"""The reference pass (Ray Data batch inference before training) and its cache, on a real local Ray: scores
equal the plain path's, a run from another model (or dtype) scores afresh, a β sweep from one model scores
once, and a pass killed at 80% leaves 80% on disk for its re-run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from fspo_ray.config import InputError
from fspo_ray.data.episodes import build_episodes, shot_sets
from fspo_ray.data.readers import read_pairs
from fspo_ray.data.synthetic import write_synthetic
from fspo_ray.data.tokenize import PromptStyle, fit_shot_set, load_tokenizer
from fspo_ray.logprobs import pack, plain_logps
from fspo_ray.models import build_tiny_model
from fspo_ray.train.config import parse_train_config
from fspo_ray.train.pipeline import add_reference, prepare
from fspo_ray.train.reference import ReferenceScoring, file_digest, reference_scoring

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
SCORER = "MapWorker(MapBatches(CompletionScorer))"  # the reference pass's replicas, as Ray Data names them


def _prepare(users, model, length_window=0, limit=24, shots=2, max_length=1024, which="train", targets=1,
             min_shots=None, seed=0, fitted_cache=None):  # fmt: skip
    return prepare(
        [users[which]], split=None, shots=shots, passes=1, purpose="train", tokenizer_path=model,
        max_length=max_length, max_prompt_length=max_length * 3 // 4, style=PromptStyle(), seed=seed,
        rows_per_step=4, limit=limit, length_window=length_window, targets=targets, min_shots=min_shots,
        fitted_cache=fitted_cache,
    )  # fmt: skip


def _scored(users, model, reference, **kwargs):
    """The prepared rows with the reference pass's columns, and how many rows that pass scored."""
    prepared = _prepare(users, model, **kwargs)
    return prepared, add_reference([prepared], reference)


def _rows(prepared):
    return list(prepared.rows.iter_rows())


def _scoring(storage, model, *overrides):
    """The reference pass a `jobs.train ... loss=ipo` run from `model` under `storage` would run."""
    cfg = parse_train_config([f"model={model}", "datasets=[unused]", "loss=ipo", f"storage_path={storage}", *overrides])
    return reference_scoring(cfg, model, model, use_gpu=False)


def _plain(model_path, rows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return plain_logps(model, pack(*([list(r[c]) for r in rows] for c in COLUMNS), 0)).float()


def _scorer_actors() -> set[str]:
    """The ids of every reference replica this Ray has had, dead ones included (the GCS's actor table)."""
    return {a["ActorID"] for a in ray._private.state.actors().values() if a["ActorClassName"] == SCORER}


def _scores(rows):
    return torch.tensor([r["reference_chosen"] for r in rows] + [r["reference_rejected"] for r in rows])


def test_precomputed_reference_equals_the_plain_path_and_runs_share_it(local_ray, tmp_path):
    users = write_synthetic(str(tmp_path / "users"), n_train_users=8, n_test_users=2, pairs_per_user=12)
    model = build_tiny_model(str(tmp_path / "tiny"), seed=3)
    storage = tmp_path / "runs"
    scoring = _scoring(storage, model, "exp_name=ipo", "loss.beta=0.1")
    assert scoring.dtype == "float32" and scoring.cache_dir.startswith(f"{storage}/reference_logps/")

    plain = _prepare(users, model)
    # A run's training and held-out rows are scored in one pass, by one set of replicas (here one).
    scored, held_out = _prepare(users, model), _prepare(users, model, limit=None, which="test")
    scorers = _scorer_actors()
    assert add_reference([scored, held_out], scoring) == 24 + held_out.examples == 24 + 8  # 2 users x 12 / 3
    assert len(_scorer_actors() - scorers) == 1
    rows = _rows(scored)
    assert [r["episode_id"] for r in rows] == [r["episode_id"] for r in _rows(plain)]  # same rows, same order
    torch.testing.assert_close(_scores(rows), _plain(model, rows), rtol=1e-5, atol=0)
    held_out_rows = _rows(held_out)
    torch.testing.assert_close(_scores(held_out_rows), _plain(model, held_out_rows), rtol=1e-5, atol=0)

    # A β sweep from the same model: another run, another β, the same cache; nothing is scored again.
    sweep = _scoring(storage, model, "exp_name=ipo-beta05", "loss.beta=0.5")
    assert sweep.cache_dir == scoring.cache_dir
    again, count = _scored(users, model, sweep)
    assert count == 0
    assert [(r["reference_chosen"], r["reference_rejected"]) for r in _rows(again)] == [
        (r["reference_chosen"], r["reference_rejected"]) for r in rows
    ]

    # Another model's run (same tokenizer, other weights): the cached scores are not its own; every episode
    # is scored afresh, with that model's numbers.
    other = build_tiny_model(str(tmp_path / "other"), seed=4)
    fresh, count = _scored(users, other, _scoring(storage, other, "exp_name=other"))
    assert count == 24
    torch.testing.assert_close(_scores(_rows(fresh)), _plain(other, _rows(fresh)), rtol=1e-5, atol=0)
    # The same model scored in bf16 (model.reference_dtype=auto is that on a GPU): other numbers, scored afresh.
    bf16, count = _scored(users, model, _scoring(storage, model, "exp_name=bf16", "model.reference_dtype=bfloat16"))
    assert count == 24
    assert not torch.allclose(_scores(_rows(bf16)), _scores(rows), rtol=1e-5, atol=0)


def test_the_weights_digest_is_read_once_per_file_version(tmp_path, monkeypatch):
    monkeypatch.setattr("fspo_ray.train.reference.CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = file_digest(str(weights))
    stat = os.stat(weights)
    weights.write_bytes(b"b" * 1000)  # new bytes, the same size, the old modification time: the digest is not re-read
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(str(weights)) == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: read again
    assert file_digest(str(weights)) != first


# A driver of its own, on the test's Ray: the reference pass of 160 episodes in parts of 8 rows, SIGKILLed by
# itself in the middle of writing its 16th part (80%), so the kill lands at the same place every time.
KILLED_PASS = """
import os, signal, sys, ray
import pyarrow.parquet as pq
from fspo_ray.train import reference
from test_reference import _scored

write_part, written = reference._write_part, []

def write_then_die(cache_dir, part):  # the 16th part of 20 dies half-written: its temporary file is left behind
    if len(written) == 15:
        pq.write_table(part, f"{cache_dir}/.part-killed.tmp")
        os.kill(os.getpid(), signal.SIGKILL)
    write_part(cache_dir, part)
    written.append(part)

reference._write_part = write_then_die
ray.init(address=sys.argv[1])
_scored({"train": sys.argv[2]}, sys.argv[3], reference.ReferenceScoring(sys.argv[3], "float32", sys.argv[4],
        rows_per_part=8), limit=200)
"""


def _rows_on_disk(cache: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in cache.glob("part-*.parquet")) if cache.exists() else 0


def test_rows_that_come_in_another_order_are_cut_into_the_same_batches_and_scores(local_ray, tmp_path):
    """Each part the pass writes is one scoring batch. The same rows, shuffled two ways, are written as the same
    parts with the same scores to the bit: a score's last bits depend on its batch, and an IPO run's trajectory
    on those bits (the order in which Ray Data streams rows varies from run to run). A shot set's targets share
    a part (one packed row)."""
    import dataclasses

    import pyarrow.parquet as pq

    from fspo_ray.train.reference import score_reference

    users = write_synthetic(str(tmp_path / "users"), n_train_users=8, n_test_users=2, pairs_per_user=12)
    model = build_tiny_model(str(tmp_path / "tiny"), seed=3)
    rows = _prepare(users, model, limit=None, targets=2).rows
    shot_set = {r["fingerprint"]: r["order"] for r in rows.iter_rows()}
    written = []
    for seed in (1, 2):
        scoring = dataclasses.replace(_scoring(tmp_path / f"runs-{seed}", model), rows_per_part=8)
        score_reference([rows.random_shuffle(seed=seed)], scoring)
        tables = [pq.read_table(path).to_pydict() for path in Path(scoring.cache_dir).glob("*.parquet")]
        written.append({frozenset(zip(t["fingerprint"], t["reference_chosen"], t["reference_rejected"]))
                        for t in tables})  # fmt: skip
    assert written[0] == written[1]
    assert len(written[0]) == -(-len(shot_set) // 8) > 2
    for part in written[0]:  # a shot set cut by a part's edge is one whose part begins or ends with it
        sets = [shot_set[f] for f, _, _ in part]
        assert sum(1 for o in set(sets) if sets.count(o) != 2) <= 2, sets


def test_a_killed_pass_scores_only_the_rest_when_run_again(local_ray, tmp_path):
    users = write_synthetic(str(tmp_path / "users"), n_train_users=20, n_test_users=2, pairs_per_user=24)
    model = build_tiny_model(str(tmp_path / "tiny"))
    cache = tmp_path / "cache"
    driver = subprocess.Popen(
        [sys.executable, "-c", KILLED_PASS, local_ray.get_runtime_context().gcs_address, users["train"], model,
         str(cache)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert driver.wait() == -signal.SIGKILL, driver.stderr.read()[-3000:]
    on_disk = _rows_on_disk(cache)
    assert on_disk == 15 * 8 and (cache / ".part-killed.tmp").exists()

    scoring = ReferenceScoring(model, "float32", str(cache), rows_per_part=8)
    resumed, count = _scored(users, model, scoring, limit=200)
    rows = _rows(resumed)
    assert len(rows) == 160 and count == 160 - on_disk and _rows_on_disk(cache) == 160
    sample = rows[::8]  # the parts scored before the kill and after it are the model's numbers alike
    torch.testing.assert_close(_scores(sample), _plain(model, sample), rtol=1e-5, atol=0)


def test_length_windows_cut_padding_and_keep_the_rows(local_ray, tmp_path):
    users = write_synthetic(str(tmp_path / "users"), n_train_users=8, n_test_users=2, pairs_per_user=12)
    model = build_tiny_model(str(tmp_path / "tiny"))

    def padding(prepared, micro=2):
        padded = real = 0
        for shard in prepared.shards(2):
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


def test_a_second_stage_on_the_same_data_reuses_the_first_ones_episodes(local_ray, tmp_path):
    """The demo's IPO stage takes the episodes its SFT stage built (a shared fitted_cache): the file is gone by
    then, so reading it again would fail; its rows are the first ones of the same order, counted as such."""
    users = write_synthetic(str(tmp_path / "users"), n_train_users=8, n_test_users=2, pairs_per_user=12)
    model = build_tiny_model(str(tmp_path / "tiny"))
    cache = {}
    first = _prepare(users, model, limit=None, fitted_cache=cache)
    os.remove(users["train"])
    second = _prepare(users, model, limit=8, fitted_cache=cache)
    assert [r["episode_id"] for r in _rows(second)] == [r["episode_id"] for r in _rows(first)][:8]
    assert second.examples == 8 and second.stats["episodes_left_out"] == first.examples - 8
    assert {k: v for k, v in second.stats.items() if k not in ("episodes_left_out", "shots_dropped_for_length")} == \
        {k: v for k, v in first.stats.items() if k not in ("episodes_left_out", "shots_dropped_for_length")}
    with pytest.raises(InputError, match="train.jsonl: no such file"):  # another seed: other episodes, from the file
        _prepare(users, model, limit=8, seed=1, fitted_cache=cache)


@pytest.mark.parametrize("length_window, min_shots", [(0, None), (4, None), (4, 1)])
def test_a_shot_sets_targets_stay_together_and_are_scored_exactly(local_ray, tmp_path, length_window, min_shots):
    """K=2: each shot set's two targets are consecutive rows of one shard beginning with the same shot ids
    (so they share a micro-batch's packed row), and the reference pass, which packs them, scores each as
    the plain path does; with min_shots=1 too, where shot sets hold 1 or 2 shots."""
    users = write_synthetic(str(tmp_path / "users"), n_train_users=4, n_test_users=2, pairs_per_user=8)
    model = build_tiny_model(str(tmp_path / "tiny"), seed=3)
    scoring = ReferenceScoring(model, "float32", None)
    prepared, scored = _scored(users, model, scoring, length_window=length_window, limit=None, targets=2,
                               min_shots=min_shots)  # fmt: skip
    assert prepared.stats["targets_per_prompt"] == 2
    if min_shots is None:
        assert prepared.examples == scored == 4 * 2 * 2  # users × windows of 2 + 2 pairs × K
    else:  # each row's prompt holds the shots its window drew: the plain episodes' prompts, 1 or 2 shots
        expected, _ = build_episodes(read_pairs(users["train"]), shots=2, passes=1, seed=0, targets=2, min_shots=1)
        assert {len(e.shots) for e in expected} == {1, 2} and prepared.stats["min_shots"] == 1
        tokenizer, fit = load_tokenizer(model), dict(max_length=1024, max_prompt_length=768, style=PromptStyle())
        want = {e.episode_id: list(f.tokens["prompt_ids"])
                for group in shot_sets(expected) for e, f in zip(group, fit_shot_set(group, tokenizer, **fit))}
        got = {r["episode_id"]: list(r["prompt_ids"]) for r in _rows(prepared)}
        assert len(got) == prepared.examples == scored == len(expected) and got == want
    for shard in prepared.shards(2):
        rows = list(shard.iter_rows())
        for first, second in zip(rows[::2], rows[1::2]):
            assert first["episode_id"][:-2] == second["episode_id"][:-2]  # "{user}/{pass}/{window}/{target}"
            shared = first["shots_length"]
            assert shared == second["shots_length"] > 0
            assert list(first["prompt_ids"][:shared]) == list(second["prompt_ids"][:shared])
    rows = _rows(prepared)
    torch.testing.assert_close(_scores(rows), _plain(model, rows), rtol=1e-5, atol=0)
