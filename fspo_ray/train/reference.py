"""Reference log-probs computed once, before training, by Ray Data batch inference.

DPO and IPO compare the policy with a frozen reference. Scoring every episode under the reference in a
pass of its own means training holds one model instead of two, the reference runs with inference-grade
batching (shortest rows together, no gradients) on `reference_concurrency` replicas (GPUs when the
cluster has them), and the scores are kept: they are cached in the run folder under the reference's
weights, one row per episode's tokens, so a resumed, repeated or multi-epoch run scores nothing twice.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

from fspo_ray.logprobs import CompletionScorer
from fspo_ray.scheduling import replica_cpus

COLUMNS = ("reference_chosen", "reference_rejected")


@dataclass(frozen=True)
class ReferenceScoring:
    model_path: str
    dtype: str  # model.reference_dtype
    cache_dir: str | None  # an absolute local path or a URI; None: no cache
    concurrency: int = 1
    use_gpu: bool = False


def weights_digest(model_path: str, dtype: str) -> str:
    """A short digest of a model folder's weight files (and the dtype it is scored in): the cache's key."""
    digest = hashlib.blake2b(dtype.encode(), digest_size=12)
    for name in sorted(os.listdir(model_path)):
        if name.endswith((".safetensors", ".bin")):
            with open(os.path.join(model_path, name), "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()


def _read_cache(cache_dir: str) -> dict[int, tuple[float, float]]:
    import pyarrow.fs
    import pyarrow.parquet as pq

    fs, root = pyarrow.fs.FileSystem.from_uri(cache_dir)  # an absolute path or a URI (run_dir is one)
    scores: dict[int, tuple[float, float]] = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if info.path.endswith(".parquet"):
            table = pq.read_table(info.path, filesystem=fs).to_pydict()
            scores.update(zip(table["fingerprint"], zip(*(table[c] for c in COLUMNS))))
    return scores


def _write_cache(cache_dir: str, scores: dict[int, tuple[float, float]]) -> None:
    import pyarrow as pa
    import pyarrow.fs
    import pyarrow.parquet as pq

    fs, root = pyarrow.fs.FileSystem.from_uri(cache_dir)  # an absolute path or a URI (run_dir is one)
    fs.create_dir(root, recursive=True)
    fingerprints = list(scores)
    table = pa.table({"fingerprint": pa.array(fingerprints, pa.int64()),
                      **{c: [scores[f][i] for f in fingerprints] for i, c in enumerate(COLUMNS)}})  # fmt: skip
    tmp = f"{root}/.part-{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, f"{root}/part-{uuid.uuid4().hex}.parquet")  # readers never see half a file


def _attach(batch: dict, scores: dict[int, tuple[float, float]]) -> dict:
    pairs = [scores[int(f)] for f in batch["fingerprint"]]
    return {**batch, COLUMNS[0]: [p[0] for p in pairs], COLUMNS[1]: [p[1] for p in pairs]}


def score_reference(rows, scoring: ReferenceScoring):
    """`rows` (a Ray Dataset of tokenized episodes with `fingerprint`) with the two reference columns added,
    and the number of rows that had to be scored (0 when the cache held them all)."""
    fingerprints = {int(f) for f in rows.unique("fingerprint")}
    cached = _read_cache(scoring.cache_dir) if scoring.cache_dir else {}
    missing = fingerprints - cached.keys()
    if missing:
        # Materialized first: the scoring actors may take every CPU, and then no upstream task could run.
        todo = rows.filter(lambda row: int(row["fingerprint"]) in missing).materialize()
        scored = todo.map_batches(
            CompletionScorer,
            fn_constructor_kwargs={"models": {"reference": scoring.model_path}, "dtype": scoring.dtype},
            batch_size=64,
            concurrency=scoring.concurrency,
            num_cpus=replica_cpus(scoring.concurrency, scoring.use_gpu),
            num_gpus=1 if scoring.use_gpu else 0,
            scheduling_strategy="SPREAD",
        ).select_columns(["fingerprint", *COLUMNS])
        new = {int(r["fingerprint"]): (r[COLUMNS[0]], r[COLUMNS[1]]) for r in scored.iter_rows()}
        if scoring.cache_dir:
            _write_cache(scoring.cache_dir, new)
        cached.update(new)
    needed = {f: cached[f] for f in fingerprints}
    return rows.map_batches(_attach, fn_kwargs={"scores": needed}, batch_size=256), len(missing)
