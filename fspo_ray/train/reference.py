"""Reference log-probs computed once, before training, by Ray Data batch inference.

DPO and IPO compare the policy with a frozen reference. Scoring every episode under the reference in a
pass of its own means training holds one model instead of two, the reference runs with inference-grade
batching (shortest rows together, no gradients) on `reference_concurrency` replicas (GPUs when the
cluster has them), and the scores are kept, one row per episode's tokens, in a cache that every run from
the same start model shares (`<storage_path>/reference_logps/<key>/`): a resumed, repeated or multi-epoch
run, or a β sweep, scores nothing twice.

The key names everything that decides a score: the weights, config.json, the tokenizer's files, the
dtype scored in (resolved: `auto` is bf16 on a GPU and fp32 on a CPU, two different sets of numbers) and
the scorer's version. Scores are written in parts as the pass streams them in, so a pass that dies keeps
what it finished and a re-run scores only the rest. Reading a large model's weights to key it would take
minutes at every start: each file's digest is remembered under its path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass

from fspo_ray.logprobs import SCORER_VERSION, CompletionScorer
from fspo_ray.models import CACHE_DIR, resolve_dtype
from fspo_ray.scheduling import replica_cpus
from fspo_ray.train.config import REFERENCE_CACHE, TrainConfig

COLUMNS = ("reference_chosen", "reference_rejected")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")  # fmt: skip


@dataclass(frozen=True)
class ReferenceScoring:
    model_path: str
    dtype: str  # resolved: float32 | bfloat16 | float16 (the cache is keyed on it)
    cache_dir: str | None  # an absolute local path or a URI; None: no cache
    concurrency: int = 1
    use_gpu: bool = False
    rows_per_part: int = 64  # rows per scoring batch, each written to the cache as one file when it is done


def reference_scoring(
    cfg: TrainConfig, start_model: str, tokenizer_path: str, use_gpu: bool
) -> ReferenceScoring | None:
    """How a run scores its reference before training; None when it does not (sft, precompute_reference=false).
    The cache is the start model's, beside the runs: every run from it under this storage_path shares it."""
    if cfg.loss.name == "sft" or not cfg.precompute_reference:
        return None
    dtype = resolve_dtype(cfg.model.reference_dtype, use_gpu)  # the replicas score on GPUs when training does
    cache = f"{cfg.storage_path.rstrip('/')}/{REFERENCE_CACHE}/{reference_key(start_model, tokenizer_path, dtype)}"
    return ReferenceScoring(start_model, dtype, cache, cfg.reference_concurrency, use_gpu)


def file_digest(path: str) -> str:
    """blake2b of a file's bytes, remembered under its path, size and modification time (CACHE_DIR/digests)."""
    stat = os.stat(path)
    name = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = os.path.join(CACHE_DIR, "digests", hashlib.blake2b(name.encode(), digest_size=16).hexdigest())
    if os.path.exists(memo):
        with open(memo) as f:
            return f.read()
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    os.makedirs(os.path.dirname(memo), exist_ok=True)
    tmp = f"{memo}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        f.write(digest.hexdigest())
    os.replace(tmp, memo)  # concurrent writers write the same text
    return digest.hexdigest()


def reference_key(model_path: str, tokenizer_path: str, dtype: str) -> str:
    """The cache's key: a digest of the weights, config.json, the tokenizer's files, the resolved dtype and the
    scorer's version."""
    if dtype == "auto":
        raise ValueError("the reference cache is keyed on a resolved dtype, not 'auto'")
    files = {f"model/{name}": os.path.join(model_path, name) for name in sorted(os.listdir(model_path))
             if name.endswith(WEIGHT_SUFFIXES) or name == "config.json"}  # fmt: skip
    files |= {f"tokenizer/{name}": os.path.join(tokenizer_path, name) for name in TOKENIZER_FILES
              if os.path.isfile(os.path.join(tokenizer_path, name))}  # fmt: skip
    what = {"dtype": dtype, "scorer": SCORER_VERSION, **{key: file_digest(path) for key, path in files.items()}}
    return hashlib.blake2b(json.dumps(what, sort_keys=True).encode(), digest_size=12).hexdigest()


def _read_cache(cache_dir: str) -> dict[int, tuple[float, float]]:
    import pyarrow.fs
    import pyarrow.parquet as pq

    fs, root = pyarrow.fs.FileSystem.from_uri(cache_dir)  # an absolute path or a URI (storage_path is one)
    scores: dict[int, tuple[float, float]] = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if info.path.endswith(".parquet"):
            table = pq.read_table(info.path, filesystem=fs).to_pydict()
            scores.update(zip(table["fingerprint"], zip(*(table[c] for c in COLUMNS))))
    return scores


def _write_part(cache_dir: str, part) -> None:
    """One finished batch of scores (a pyarrow table) as a file of its own; readers never see half a file."""
    import pyarrow.fs
    import pyarrow.parquet as pq

    fs, root = pyarrow.fs.FileSystem.from_uri(cache_dir)
    fs.create_dir(root, recursive=True)
    tmp = f"{root}/.part-{uuid.uuid4().hex}.tmp"
    pq.write_table(part, tmp, filesystem=fs)
    fs.move(tmp, f"{root}/part-{uuid.uuid4().hex}.parquet")


def _attach(batch: dict, scores: dict[int, tuple[float, float]]) -> dict:
    pairs = [scores[int(f)] for f in batch["fingerprint"]]
    return {**batch, COLUMNS[0]: [p[0] for p in pairs], COLUMNS[1]: [p[1] for p in pairs]}


def score_reference(datasets: list, scoring: ReferenceScoring) -> tuple[list, int]:
    """Each of `datasets` (Ray Datasets of tokenized episodes with `fingerprint`: a run's training and held-out
    rows) with the two reference columns added, and the number of rows that had to be scored (0 when the cache
    held them all). One pass scores what all of them miss: one set of replicas starts and loads the model."""
    fingerprints = [{int(f) for f in rows.unique("fingerprint")} for rows in datasets]
    cached = _read_cache(scoring.cache_dir) if scoring.cache_dir else {}
    missing = set().union(*fingerprints) - cached.keys()
    if missing:
        # Materialized first: the scoring actors may take every CPU, and then no upstream task could run.
        # One block per part: a map task emits one block per input block, so the cache's grain (what a killed pass
        # loses) is set here, not by the batch size.
        # Sorted by the rows' own keys (prepare's): rows of about one length share a batch, a shot set's targets
        # stay together (one packed row), and every pass cuts the same batches. A score's last bits depend on its
        # batch, and an IPO run's trajectory on those bits: the order a filter and a union stream rows in varies a
        # little from run to run (3 of the demo test's 201 batches), and its reduced run read +2.7 or +7.3 points.
        todo = [rows.filter(lambda row: int(row["fingerprint"]) in missing) for rows in datasets]
        todo = (todo[0].union(*todo[1:]) if len(todo) > 1 else todo[0]).sort(["length", "order", "target"])
        todo = todo.repartition(target_num_rows_per_block=scoring.rows_per_part, strict=True).materialize()
        scored = todo.map_batches(
            CompletionScorer,
            fn_constructor_kwargs={"models": {"reference": scoring.model_path}, "dtype": scoring.dtype},
            batch_size=scoring.rows_per_part,
            concurrency=scoring.concurrency,
            num_cpus=replica_cpus(scoring.concurrency, scoring.use_gpu),
            num_gpus=1 if scoring.use_gpu else 0,
            scheduling_strategy="SPREAD",
        ).select_columns(["fingerprint", *COLUMNS])
        for part in scored.iter_batches(batch_size=None, batch_format="pyarrow"):  # as each batch is done
            if scoring.cache_dir:
                _write_part(scoring.cache_dir, part)
            part = part.to_pydict()
            cached.update(zip(part["fingerprint"], zip(*(part[c] for c in COLUMNS))))
    attached = [rows.map_batches(_attach, fn_kwargs={"scores": {f: cached[f] for f in mine}}, batch_size=256)
                for rows, mine in zip(datasets, fingerprints)]  # fmt: skip
    return attached, len(missing)
