"""The deploy files say what the code does: every variable they set is a setting, every command is the Procfile's,
every stop timeout outlasts the worker's shutdown grace, the KEDA queries count what they claim on an index, and the
locks pin every dependency pyproject.toml names."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT, free_port, wait_ready
from worker.config import Config, env_name, from_env

SETTINGS = {env_name(f.name) for f in msgspec.structs.fields(Config)}
# Read by uvicorn, not Config (docs/operations.md, "Read elsewhere").
READ_ELSEWHERE = {"WEB_CONCURRENCY"}
HEROKU_STOP_S = 30  # SIGTERM to SIGKILL on a dyno; not a setting


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict((name, command.strip()) for name, _, command in (line.partition(":") for line in lines if line))


def app_json() -> dict[str, Any]:
    return dict(json.loads((ROOT / "app.json").read_text()))


def render() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "render.yaml").read_text()))


def fly() -> dict[str, Any]:
    return tomllib.loads((ROOT / "fly.toml").read_text())


def kubernetes() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]


def k8s(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in kubernetes() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    return dict(k8s(kind, name)["spec"]["template"]["spec"])


def render_service(kind: str) -> dict[str, Any]:
    (found,) = [s for s in render()["services"] if s["type"] == kind]
    return found


def variables_set() -> dict[str, dict[str, str]]:
    """Each deploy file's variables, with their literal values ('' where the platform fills one in)."""
    heroku = {name: str(spec.get("value", "")) for name, spec in app_json()["env"].items()}
    blueprint = render()
    entries = [e for group in blueprint["envVarGroups"] for e in group["envVars"]]
    entries += [e for service in blueprint["services"] for e in service.get("envVars", [])]
    render_vars = {e["key"]: str(e.get("value", "")) for e in entries if "key" in e}
    k8s_vars = {}
    for doc in kubernetes():
        k8s_vars |= {name: str(value) for name, value in {**doc.get("data", {}), **doc.get("stringData", {})}.items()}
        if doc["kind"] in ("Deployment", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                k8s_vars |= {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}
    return {"app.json": heroku, "render.yaml": render_vars, "fly.toml": dict(fly()["env"]), "kubernetes": k8s_vars}


def configured(variables: dict[str, str], tmp_path: Path) -> Config:
    """The Config a process given these variables builds, through the code's own parsing."""
    literal = {name: value for name, value in variables.items() if value and "CHANGE-ME" not in value}
    return from_env({**literal, "OUTLAST_DATA_DIR": str(tmp_path)}, needs=())


def test_every_variable_a_deploy_file_sets_is_a_setting_the_code_reads() -> None:
    found = variables_set()
    unknown = {f: sorted(set(names) - SETTINGS - READ_ELSEWHERE) for f, names in found.items()}
    assert unknown == {f: [] for f in found}
    assert all(found.values())  # each file was read, and sets something


def test_every_value_a_deploy_file_sets_is_one_the_code_accepts(tmp_path: Path) -> None:
    for variables in variables_set().values():
        configured(variables, tmp_path)  # a bad value stops the process: SystemExit naming its variable


def test_every_deploy_file_runs_the_procfiles_commands() -> None:
    commands = procfile()
    assert set(commands) == {"release", "web", "worker"}
    assert set(app_json()["formation"]) == {"web", "worker"}  # Heroku and Dokku run the Procfile itself
    web, worker = render_service("web"), render_service("worker")
    assert (web["startCommand"], worker["startCommand"]) == (commands["web"], commands["worker"])
    assert web["preDeployCommand"] == worker["preDeployCommand"] == commands["release"]
    assert fly()["processes"] == {"web": commands["web"], "worker": commands["worker"]}
    assert fly()["deploy"]["release_command"] == commands["release"]
    in_pods = {
        name: shlex.join(pod_spec(kind, name)["containers"][0]["command"])
        for kind, name in [("Deployment", "outlast-web"), ("Deployment", "outlast-worker"), ("Job", "outlast-migrate")]
    }
    assert in_pods == {
        "outlast-web": commands["web"],
        "outlast-worker": commands["worker"],
        "outlast-migrate": commands["release"],
    }
    cmd = re.search(r"^CMD (.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert cmd and shlex.join(json.loads(cmd[1])) == commands["web"]


def test_every_stop_timeout_outlasts_the_workers_shutdown_grace(tmp_path: Path) -> None:
    variables = variables_set()
    stop_and_grace = {
        "heroku": (HEROKU_STOP_S, configured(variables["app.json"], tmp_path).shutdown_grace_s),
        "render": (
            render_service("worker")["maxShutdownDelaySeconds"],
            configured(variables["render.yaml"], tmp_path).shutdown_grace_s,
        ),
        "fly": (fly()["kill_timeout"], configured(variables["fly.toml"], tmp_path).shutdown_grace_s),
        "kubernetes": (
            pod_spec("Deployment", "outlast-worker")["terminationGracePeriodSeconds"],
            configured(variables["kubernetes"], tmp_path).shutdown_grace_s,
        ),
    }
    assert {where: stop > grace for where, (stop, grace) in stop_and_grace.items()} == dict.fromkeys(
        stop_and_grace, True
    ), stop_and_grace


# -- KEDA: the scaler's queries, run on the real schema -------------------------------------------------------------


def keda_trigger(name: str) -> dict[str, Any]:
    (trigger,) = [t for t in k8s("ScaledObject", "outlast-worker")["spec"]["triggers"] if t["name"] == name]
    return trigger


def test_the_backlog_trigger_wants_one_pod_per_workers_worth_of_slots(tmp_path: Path) -> None:
    backlog = keda_trigger("backlog")
    slots = configured(variables_set()["kubernetes"], tmp_path).worker_max_jobs
    # AverageValue: the HPA wants ceil(value / target) pods, so the target must be one worker's slots.
    assert (backlog["metricType"], int(backlog["metadata"]["targetQueryValue"])) == ("AverageValue", slots)
    assert k8s("ScaledObject", "outlast-worker")["spec"]["minReplicaCount"] >= 1  # the sweep and cron need one


_INSERT = """
INSERT INTO jobs (id, type, status, input, max_attempts, timeout_s, retry_safe, expires_at, next_run_at,
                  lease_owner, lease_expires_at, finished_at, waiting)
SELECT gen_random_uuid(), 'noop', $1, '{}', 1, 60, true, now() + interval '1 day', now() + $2::text::interval,
       CASE WHEN $1 = 'running' THEN 'w' END, CASE WHEN $1 = 'running' THEN now() + interval '30 s' END,
       CASE WHEN $1 = 'succeeded' THEN now() END, $3
FROM generate_series(1, $4)
"""


_KINDS = [  # (status, next_run_at - now(), waiting, how many)
    ("succeeded", "-1 hour", False, 20_000),  # the bulk of a real table: the queries must not read it
    ("running", "-1 minute", False, 2),
    ("queued", "-90 seconds", False, 1),  # the oldest due: it has waited 90 s
    ("queued", "-5 seconds", False, 2),
    ("queued", "1 hour", False, 4),  # scheduled: needs no slot yet
    ("queued", "0 s", True, 1),  # a parent waiting for its children: due never (worker/spawn.py)
]


@contextlib.asynccontextmanager
async def jobs_of_every_kind(conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """The jobs above, in a transaction rolled back afterwards (so its now() is one instant throughout)."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("TRUNCATE jobs CASCADE")
        for status, due_in, waiting, count in _KINDS:
            await conn.execute(_INSERT, status, due_in, waiting, count)
        await conn.execute("UPDATE jobs SET next_run_at = 'infinity' WHERE waiting")
        await conn.execute("ANALYZE jobs")
        yield conn
    finally:
        await transaction.rollback()


async def test_the_keda_queries_count_jobs_needing_a_slot_and_the_oldest_due_wait(
    pg_connection: asyncpg.Connection,
) -> None:
    async with jobs_of_every_kind(pg_connection) as conn:
        backlog = await conn.fetchval(keda_trigger("backlog")["metadata"]["query"])
        oldest = await conn.fetchval(keda_trigger("oldest-wait")["metadata"]["query"])
    # 2 running + 3 due; neither the scheduled jobs nor the waiting parent. One now() throughout: exactly 90.
    assert (backlog, oldest) == (5, 90)


async def test_the_keda_queries_read_partial_indexes_not_the_table(pg_connection: asyncpg.Connection) -> None:
    async with jobs_of_every_kind(pg_connection) as conn:
        plans = {
            name: "\n".join(row[0] for row in await conn.fetch("EXPLAIN " + keda_trigger(name)["metadata"]["query"]))
            for name in ("backlog", "oldest-wait")
        }
    assert [name for name, plan in plans.items() if "Seq Scan" in plan] == [], plans
    assert all("jobs_queued_due" in plan for plan in plans.values()), plans
    assert re.search(r"jobs_(running_lease|live_expiry)", plans["backlog"]), plans


# -- the locks -------------------------------------------------------------------------------------------------------


def pins(lock: str) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", (ROOT / lock).read_text(), re.M)
    return {canonicalize_name(name): version for name, version in found}


def requirements(pyproject: Path, extras: set[str]) -> set[str]:
    """The distributions a pyproject's dependencies and these extras name, its own extras followed."""
    project = tomllib.loads(pyproject.read_text())["project"]
    own, names, todo, seen = canonicalize_name(project["name"]), set(), set(extras), set()
    specs = [Requirement(s) for s in project["dependencies"]]
    while todo:
        extra = todo.pop()
        seen.add(extra)
        specs += [Requirement(s) for s in project["optional-dependencies"][extra]]
        todo |= {e for r in specs if canonicalize_name(r.name) == own for e in r.extras} - seen
    names = {canonicalize_name(r.name) for r in specs}
    return names - {own}


def test_the_runtime_lock_pins_every_dependency_pyproject_names() -> None:
    missing = requirements(ROOT / "pyproject.toml", set()) - set(pins("requirements.lock"))
    assert missing == set(), f"{sorted(missing)} not in requirements.lock: run `make lock`"


def test_the_dev_lock_pins_every_dev_dependency_and_the_clients() -> None:
    wanted = requirements(ROOT / "pyproject.toml", {"dev"}) | requirements(ROOT / "client" / "pyproject.toml", set())
    missing = wanted - set(pins("requirements-dev.lock"))
    assert missing == set(), f"{sorted(missing)} not in requirements-dev.lock: run `make lock`"


def test_ci_tests_the_versions_that_ship() -> None:
    shipped, tested = pins("requirements.lock"), pins("requirements-dev.lock")
    assert {name: (v, tested.get(name)) for name, v in shipped.items() if tested.get(name) != v} == {}


def test_the_image_and_the_platforms_install_from_the_lock() -> None:
    assert "-r /app/requirements.lock" in (ROOT / "Dockerfile").read_text()
    assert "-r requirements.lock" in (ROOT / "requirements.txt").read_text().splitlines()
    assert {render_service(k)["buildCommand"] for k in ("web", "worker")} == {"pip install -r requirements.txt"}
    assert "-c requirements-dev.lock" in (ROOT / "Makefile").read_text()


# -- deploy/audit.py: what a pip-audit run means --------------------------------------------------------------------


def audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_audit", ROOT / "deploy" / "audit.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(*dependencies: dict[str, Any]) -> str:
    return json.dumps({"dependencies": list(dependencies), "fixes": []})


def test_a_known_vulnerability_fails_the_audit_naming_it() -> None:
    vuln = {"id": "PYSEC-2099-1", "fix_versions": ["2.0"], "aliases": [], "description": ""}
    out = report({"name": "arq", "version": "0.28.0", "vulns": []}, {"name": "h11", "version": "0.1", "vulns": [vuln]})
    code, message = audit().verdict(1, out, "")
    assert code == 1 and "h11 0.1: PYSEC-2099-1 (fixed in 2.0)" in message


def test_an_audit_of_clean_pins_passes() -> None:
    code, message = audit().verdict(0, report({"name": "arq", "version": "0.28.0", "vulns": []}), "")
    assert (code, message) == (0, "pip-audit: no known vulnerabilities in 1 pinned packages")


def test_advisories_out_of_reach_pass_saying_nothing_was_audited() -> None:
    skipped = {"name": "arq", "skip_reason": "Dependency not found on PyPI and could not be audited: arq (0.28.0)"}
    trace = (
        "Traceback ...\nrequests.exceptions.ConnectionError: HTTPSConnectionPool(host='pypi.org'): Max retries exceeded"
    )
    for run in [(0, report(skipped), ""), (1, "", trace)]:
        code, message = audit().verdict(*run)
        assert (code, message.startswith("pip-audit: NOT AUDITED")) == (0, True)


def test_an_audit_that_breaks_otherwise_fails() -> None:
    code, message = audit().verdict(2, "", "usage: pip-audit: error: unrecognized arguments: --nope")
    assert code == 2 and "unrecognized arguments" in message


# -- the image -------------------------------------------------------------------------------------------------------

BUILDAH = ["buildah", "--storage-driver", "overlay"]


def built(args: list[str], storage: Path) -> str:
    """One buildah command in a storage of this test's own, daemonless (no docker engine runs here)."""
    where = ["--root", str(storage / "root"), "--runroot", str(storage / "run")]
    done = subprocess.run([*BUILDAH, *where, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"buildah {args[0]}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout.strip()


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Path]:
    if not (shutil.which("buildah") and shutil.which("mmdebstrap")):
        pytest.skip("needs Debian's buildah and mmdebstrap (.ci/run installs them)")
    yield tmp_path
    # unmount and delete what the build made (hundreds of MB), then its directory
    for args in (["rm", "--all"], ["rmi", "--all", "--force"]):
        subprocess.run([*BUILDAH, "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"), *args])
    shutil.rmtree(tmp_path, ignore_errors=True)


def build_image(storage: Path) -> str:
    """A working container of the Dockerfile's image, built here; its id."""
    # No registry but the package indexes is reachable here, so the base is python:3.11-slim's equal made from
    # Debian's packages (bookworm, its python3.11 with venv), given to the Dockerfile as PYTHON_IMAGE.
    rootfs = storage / "rootfs.tar"
    base = ["--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(rootfs)]
    debootstrap = subprocess.run(["mmdebstrap", "--quiet", *base], capture_output=True, text=True, timeout=600)
    assert debootstrap.returncode == 0, debootstrap.stderr[-3000:]
    scratch = built(["from", "scratch"], storage)
    built(["add", scratch, str(rootfs), "/"], storage)
    built(["config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", scratch], storage)
    built(["commit", "--quiet", scratch, "localhost/outlast-base"], storage)
    # This machine reaches PyPI through a proxy only its own trust store (and pip.conf) knows: mounted for the RUN
    # steps, never part of the image.
    trust = ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro"]
    trust += ["-v", "/etc/pip.conf:/etc/pip.conf:ro"] if Path("/etc/pip.conf").exists() else []
    arg = ["--build-arg", "PYTHON_IMAGE=localhost/outlast-base"]
    built(["bud", "--quiet", "--isolation", "chroot", *trust, *arg, "-t", "localhost/outlast:test", str(ROOT)], storage)
    return built(["from", "--quiet", "localhost/outlast:test"], storage)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_the_image_builds_runs_as_non_root_migrates_from_its_own_tree_and_serves(
    storage: Path, config: Config, pg_connection: asyncpg.Connection
) -> None:
    container = await asyncio.to_thread(build_image, storage)

    async def run(*command: str, **env: str) -> str:
        variables = [a for name, value in env.items() for a in ("--env", f"{name}={value}")]
        args = ["run", "--isolation", "chroot", *variables, container, "--", *command]
        return await asyncio.to_thread(built, args, storage)

    assert await run("id", "-u") == "10001"
    imports = "import server, worker, server.app, worker.migrate; print('imported')"
    assert await run("python", "-c", imports) == "imported"
    assert await run("sh", "-c", "touch /app/x 2>/dev/null && echo writable || echo read-only") == "read-only"
    # the release command, from the image's own tree, on a database of its own: every migration applies
    name = "outlast_image_test"
    await pg_connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await pg_connection.execute(f'CREATE DATABASE "{name}"')
    database_url = config.database_url.rpartition("/")[0] + f"/{name}"
    await run("python", "-m", "worker.migrate", DATABASE_URL=database_url)
    applied = await asyncpg.connect(database_url)
    try:
        names = {r["name"] for r in await applied.fetch("SELECT name FROM schema_migrations")}
    finally:
        await applied.close()
    await pg_connection.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    # every file of migrations/ (an optional track in a folder of its own applies where its extension exists)
    folder = ROOT / "migrations"
    every = {p.relative_to(folder).as_posix() for p in folder.rglob("*.sql")}
    assert {p.name for p in folder.glob("*.sql")} <= names <= every

    # the web, as the image's default command, on this session's stores: it serves, and reaches both
    port = free_port()
    env = {"PORT": str(port), "DATABASE_URL": config.database_url, "REDIS_URL": config.redis_url}
    env["OUTLAST_SECRET_KEY"] = config.secret_key
    where = ["--root", str(storage / "root"), "--runroot", str(storage / "run")]
    variables = [a for name, value in env.items() for a in ("--env", f"{name}={value}")]
    run_web = [*BUILDAH, *where, "run", "--isolation", "chroot", *variables, container, "--", "python", "-m", "server"]
    web = await asyncio.create_subprocess_exec(*run_web)
    try:
        await wait_ready(f"http://127.0.0.1:{port}", within=60)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            ready = (await client.get("/readyz")).json()
    finally:
        web.terminate()  # buildah passes it on to the process in the container
        await asyncio.wait_for(web.wait(), 30)
    assert (ready["status"], ready["database"], ready["redis"]) == ("ok", "ok", "ok")


# -- the guides ------------------------------------------------------------------------------------------------------


def anchors(markdown: str) -> set[str]:
    """GitHub's ids for a page's headings."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_link_in_the_readme_and_the_deploy_guides_leads_somewhere() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs" / "deploy").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # another site
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and file.is_file() and anchor not in anchors(file.read_text())):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
    assert {p.stem for p in pages} >= {"heroku", "render", "fly", "dokku", "kubernetes"}
