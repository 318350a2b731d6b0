"""The stored histories, on both back ends through the same tests: SQLite (a file) and a real PostgreSQL
server (a private one started here, or FSPO_TEST_POSTGRES_URL). Checked with SQL, not through the store."""

import glob
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_port

from fspo_ray.serve.store import StoredPair, StoreError, open_store


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on loopback (Debian's postgresql package: `.ci/run` installs it), or
    the one FSPO_TEST_POSTGRES_URL names. Without either the tests skip — but never in CI."""
    if os.environ.get("FSPO_TEST_POSTGRES_URL"):
        yield os.environ["FSPO_TEST_POSTGRES_URL"]
        return
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if initdb is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run installs Debian's postgresql")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="fspo-postgres-"))  # not under pytest's folder, which only root may enter
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses to run as root
    if as_user:
        shutil.chown(folder, "postgres")
    port = free_port()
    data, bin_dir = str(folder / "data"), os.path.dirname(initdb)
    subprocess.run([*as_user, initdb, "-D", data, "--auth=trust", "-U", "postgres"], check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
    subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", data, "-o", options, "-l", f"{folder}/log", "-w", "start"],
                   check=True, capture_output=True)  # fmt: skip
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty store of each kind."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'histories.db'}"
    url = request.getfixturevalue("postgres_url")
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        for table in ("pairs", "answers", "users"):
            db.execute(f"DROP TABLE IF EXISTS {table}")
    return url


def sql(url: str, query: str, *params) -> list[tuple]:
    """A query run straight on the database, beside the store."""
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url) as db:
            return db.execute(query.replace("?", "%s"), params).fetchall()
    with sqlite3.connect(url.removeprefix("sqlite://")) as db:
        return db.execute(query, params).fetchall()


def pair(i: int, **changes) -> StoredPair:
    return StoredPair(**{"pair_id": f"p{i}", "question": f"Q{i}?", "preferred": f"yes {i}", "dispreferred": f"no {i}",
                         **changes})  # fmt: skip


def test_appends_are_idempotent_and_read_back_newest_first(store_url):
    store = open_store(store_url)
    assert store.append("ada", [pair(0), pair(1)]) == [True, True]
    assert store.append("ada", [pair(1), pair(2)]) == [False, True]  # a retry of p1 stores nothing
    with pytest.raises(StoreError) as conflict:
        store.append("ada", [pair(3), pair(2, preferred="other")])
    assert conflict.value.status == 409 and "'p2'" in str(conflict.value)
    assert [p.pair_id for p in store.recent("ada", 10)] == ["p2", "p1", "p0"]  # p3 went with the failed call
    page = store.recent("ada", 2)
    assert [p.pair_id for p in store.recent("ada", 2, before=page[-1].seq)] == ["p0"]
    assert sql(store_url, "SELECT pair_id, question, preferred FROM pairs WHERE user_id = ? ORDER BY seq", "ada") == [
        ("p0", "Q0?", "yes 0"), ("p1", "Q1?", "yes 1"), ("p2", "Q2?", "yes 2")]  # fmt: skip
    assert store.recent("bob", 10) == []


def test_a_user_holds_at_most_the_limit(store_url):
    store = open_store(store_url, max_pairs_per_user=3)
    store.append("ada", [pair(i) for i in range(3)])
    with pytest.raises(StoreError) as full:
        store.append("ada", [pair(3)])
    assert full.value.status == 413 and "limit is 3" in str(full.value)
    assert store.append("ada", [pair(2)]) == [False]  # a retry is still fine at the limit
    store.append("bob", [pair(0)])  # others are not affected


def test_delete_leaves_no_row_of_the_user(store_url):
    store = open_store(store_url)
    store.append("ada", [pair(i) for i in range(5)])
    store.remember_answer("ada", "a1", "Q?", "An answer.")
    store.append("bob", [pair(0)])
    assert store.answer("ada", "a1") == ("Q?", "An answer.")
    assert store.delete_user("ada") == 5
    for table in ("pairs", "answers", "users"):
        assert sql(store_url, f"SELECT COUNT(*) FROM {table} WHERE user_id = ?", "ada") == [(0,)]
    assert sql(store_url, "SELECT COUNT(*) FROM pairs WHERE user_id = ?", "bob") == [(1,)]
    with pytest.raises(StoreError) as gone:
        store.answer("ada", "a1")
    assert gone.value.status == 404


@pytest.mark.parametrize("user_id", ["", "a" * 129, "x'; DROP TABLE pairs; --", "../../etc/passwd", "-a", "é"])
def test_user_ids_are_validated_and_never_sql(store_url, user_id):
    store = open_store(store_url)
    with pytest.raises(StoreError) as bad:
        store.append(user_id, [pair(0)])
    assert bad.value.status == 422
    # A text with SQL in it is stored as text: it is a value, never part of a query.
    store.append("ada", [pair(0, question="x'); DROP TABLE pairs; --")])
    assert store.recent("ada", 1)[0].question == "x'); DROP TABLE pairs; --"


def test_two_writers_appending_at_once_lose_and_duplicate_nothing(store_url):
    """Two stores (two replicas' connections), 8 threads each, 200 pairs for one user, every pair sent twice."""
    stores = [open_store(store_url), open_store(store_url)]

    def write(i: int) -> None:
        stores[i % 2].append("ada", [pair(i)])
        stores[(i + 1) % 2].append("ada", [pair(i)])  # a retry, through the other replica

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(200)))
    ids = [row[0] for row in sql(store_url, "SELECT pair_id FROM pairs WHERE user_id = ?", "ada")]
    assert len(ids) == 200 and set(ids) == {f"p{i}" for i in range(200)}


KILLED_WRITER = """
import sys
from fspo_ray.serve.store import StoredPair, open_store
store, batch = open_store(sys.argv[1], max_pairs_per_user=10**9), 0  # no limit: it writes until killed
while True:  # batches of 5 pairs, each one transaction, until killed
    store.append("ada", [StoredPair(f"b{batch}-{i}", "Q?", "yes " * 200, "no") for i in range(5)])
    batch += 1
    print(batch, flush=True)
"""


def test_a_writer_killed_mid_write_leaves_the_store_consistent(store_url):
    """SIGKILL while it writes batches of 5 pairs: every batch is all there or not at all, and the store
    takes writes and reads after."""
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, store_url], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})  # fmt: skip
    while int(writer.stdout.readline() or 0) < 20:  # 20 batches written, then killed in the middle of more
        assert writer.poll() is None, "the writer died by itself"
    time.sleep(0.05)
    writer.kill()
    writer.wait()
    rows = sql(store_url, "SELECT pair_id FROM pairs WHERE user_id = ?", "ada")
    batches = {}
    for (pair_id,) in rows:
        batches.setdefault(pair_id.split("-")[0], []).append(pair_id)
    assert len(batches) >= 20 and all(len(ids) == 5 for ids in batches.values())
    if store_url.startswith("sqlite"):
        assert sql(store_url, "PRAGMA integrity_check") == [("ok",)]
    store = open_store(store_url, max_pairs_per_user=10**9)  # the writer may have outrun the limit before the kill
    store.append("ada", [pair(0)])
    assert store.recent("ada", 1)[0].pair_id == "p0"


def test_the_export_is_canonical_jsonl_split_by_user_that_training_reads(store_url, tmp_path):
    """Every stored pair once, each user's pairs all in one file, read back by training's reader as written."""
    from fspo_ray.data.readers import read_pairs
    from jobs.export_preferences import main as export

    store = open_store(store_url)
    users = [f"user{u}" for u in range(12)]
    for u, user in enumerate(users):
        store.append(user, [pair(i, question=f"Q{u}.{i}? 漢字") for i in range(3)])
    counts = export([f"store={store_url}", f"out={tmp_path / 'out'}", "test_fraction=0.5"])
    read = {split: list(read_pairs(str(tmp_path / "out" / f"{split}.jsonl"))) for split in ("train", "test")}
    by_user = {split: {p.user_id for p in pairs} for split, pairs in read.items()}
    assert by_user["train"] | by_user["test"] == set(users) and not by_user["train"] & by_user["test"]
    assert by_user["train"] and by_user["test"]  # 12 users at 0.5: both sides have some
    assert counts == {"train_pairs": 3 * len(by_user["train"]), "test_pairs": 3 * len(by_user["test"]),
                      "train_users": len(by_user["train"]), "test_users": len(by_user["test"])}  # fmt: skip
    ada = [p for pairs in read.values() for p in pairs if p.user_id == "user3"]
    assert [(p.question, p.preferred, p.dispreferred) for p in ada] == [(f"Q3.{i}? 漢字", f"yes {i}", f"no {i}")
                                                                      for i in range(3)]  # fmt: skip
