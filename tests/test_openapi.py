"""/openapi.json is a document tools take whole (openapi-spec-validator passes; openapi-python-client generates every
operation without a warning, and the client it makes runs jobs), and /docs renders it from Outlast's own files."""

from __future__ import annotations

import asyncio
import contextlib
import html.parser
import importlib
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import msgspec
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from server import openapi
from server.app import create_app
from tests.conftest import eventually, open_app
from tests.sse import Live, live_server
from worker import Config, Deps, JobType, load_job_types

Drain = Callable[[], Awaitable[None]]
BIN = Path(sys.executable).parent
GENERATED = "outlast_generated"  # not outlast_client: that name is the project's own client's
# Not in the document: the files /docs is made of, which are no API.
UNDOCUMENTED = {("GET", "/docs/assets/{name}")}


@pytest.fixture
async def doc(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


# -- the document -----------------------------------------------------------------------------------


async def test_the_document_passes_openapi_spec_validator(doc: dict[str, Any]) -> None:
    validate(doc)  # raises, naming the first error, on an invalid document


async def test_every_ref_names_a_whole_component_and_every_component_a_unique_title(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    found = set(refs(doc))
    assert found and all(re.fullmatch(r"#/components/schemas/[A-Za-z][A-Za-z0-9]*", ref) for ref in found), found
    assert {ref.rsplit("/", 1)[1] for ref in found} <= set(schemas)
    titles = [schema.get("title") for schema in schemas.values()]
    assert titles == list(schemas), "generators name their classes by title: each must be its component's name"


async def test_each_job_type_has_an_input_schema_named_after_it(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    assert {"SquareSumInput", "CubeSumInput", "SleepInput", "FlakyInput"} <= set(schemas)
    assert schemas["SquareSumInput"]["properties"]["data"]["maxItems"] == 100_000
    assert schemas["SquareSumSubmit"]["properties"]["input"] == {"$ref": "#/components/schemas/SquareSumInput"}
    assert "Input" not in schemas and not any("." in name for name in schemas)


async def test_the_submit_body_is_a_union_discriminated_by_type_one_variant_per_job_type(
    config: Config, doc: dict[str, Any]
) -> None:
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    mapping = body["discriminator"]["mapping"]
    assert body["discriminator"]["propertyName"] == "type"
    assert set(mapping) == set(load_job_types(config.job_modules))
    assert body["oneOf"] == [{"$ref": ref} for ref in mapping.values()]
    schemas = doc["components"]["schemas"]
    for name, ref in mapping.items():
        variant = schemas[ref.rsplit("/", 1)[1]]
        assert variant["properties"]["type"] == {"type": "string", "const": name}
        assert variant["additionalProperties"] is False
    jobs = schemas["SubmitBatch"]["properties"]["jobs"]["items"]
    assert jobs["discriminator"]["mapping"]["square_sum"] == "#/components/schemas/SquareSumBatchItem"
    assert set(jobs["discriminator"]["mapping"]) == set(mapping)
    assert "idempotency_key" in schemas["SquareSumBatchItem"]["properties"]
    assert "idempotency_key" not in schemas["SquareSumSubmit"]["properties"]  # refused there by name


class Point(msgspec.Struct):
    x: int
    y: int


class Shape(msgspec.Struct, forbid_unknown_fields=True):
    """A polygon."""

    points: list[Point]
    parent: Shape | None = None


class Status(msgspec.Struct):
    phase: str


class Report(msgspec.Struct):
    status: Status


async def _draw(input: Shape, ctx: Any) -> None:
    return None


async def _report(input: Report, ctx: Any) -> None:
    return None


async def test_alike_type_names_shared_structs_and_built_in_names_still_give_unique_schema_names() -> None:
    alike = (JobType("draw_shape", Shape, _draw), JobType("draw-shape", Shape, _draw), JobType("job", Report, _report))
    job_types = {t.name: t for t in alike}
    doc = openapi.build(job_types)
    validate(doc)
    schemas = doc["components"]["schemas"]
    assert {"DrawShapeInput", "DrawShapePoint", "DrawShape2Input", "DrawShape2Point"} <= set(schemas)
    assert [schema["title"] for schema in schemas.values()] == list(schemas)
    shape = schemas["DrawShape2Input"]
    assert shape["properties"]["points"]["items"] == {"$ref": "#/components/schemas/DrawShape2Point"}
    assert {"$ref": "#/components/schemas/DrawShape2Input"} in shape["properties"]["parent"]["anyOf"]  # itself
    assert set(refs(doc)) <= {f"#/components/schemas/{name}" for name in schemas}
    assert "input" in schemas["DrawShapeSubmit"]["required"]  # `points` has no default: `{}` would be refused
    assert schemas["JobStatus"]["enum"][0] == "queued"  # not the `job` type's Status struct, which is Job2Status
    assert schemas["Job2Input"]["properties"]["status"] == {"$ref": "#/components/schemas/Job2Status"}


async def test_every_route_of_the_app_is_an_operation_of_the_document(config: Config, doc: dict[str, Any]) -> None:
    routes = {
        (method, route.path)
        for route in create_app(config).routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(method.upper(), path) for path, operations in doc["paths"].items() for method in operations}
    assert documented == routes - UNDOCUMENTED
    assert {("POST", "/v1/jobs/batch"), ("POST", "/v1/jobs/{id}/retry")} <= documented
    ids = [op["operationId"] for operations in doc["paths"].values() for op in operations.values()]
    assert len(ids) == len(set(ids))


async def test_submit_says_prefer_wait_answers_200_with_preference_applied_and_otherwise_202(
    doc: dict[str, Any],
) -> None:
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert {p["name"] for p in submit["parameters"]} == {"Idempotency-Key", "Prefer"}
    assert "Preference-Applied" in submit["responses"]["200"]["headers"]
    assert {"Location", "Retry-After", "Idempotent-Replayed"} <= set(submit["responses"]["202"]["headers"])
    assert submit["responses"]["200"]["content"] == submit["responses"]["202"]["content"]


async def test_the_job_read_routes_and_only_they_take_the_read_token(doc: dict[str, Any]) -> None:
    reads = {"/v1/jobs/{id}", "/v1/jobs/{id}/events", "/v1/jobs/{id}/result"}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            takes = any(p["name"] == "token" and p["in"] == "query" for p in operation.get("parameters", ()))
            assert takes == (path in reads and method == "get"), (method, path)
            if takes:
                assert {"jobReadToken": []} in operation["security"]


async def test_every_error_answer_is_problem_json(doc: dict[str, Any]) -> None:
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                if int(status) >= 400:
                    assert set(answer["content"]) == {"application/problem+json"}, (path, status)
                    assert path == "/readyz" or answer["content"]["application/problem+json"]["schema"] == {
                        "$ref": "#/components/schemas/Problem"
                    }


async def test_list_jobs_filters_by_the_job_status_component(doc: dict[str, Any]) -> None:
    [status] = [p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "status"]
    assert status["schema"] == {"$ref": "#/components/schemas/JobStatus"}
    job_status = doc["components"]["schemas"]["JobStatus"]
    assert job_status["enum"] == ["queued", "running", "succeeded", "failed", "cancelled", "expired"]
    assert doc["components"]["schemas"]["Job"]["properties"]["status"] == status["schema"]


# -- a generated client -----------------------------------------------------------------------------


async def generate(url: str, into: Path) -> str:
    """openapi-python-client's output for the document at `url`, its package written to `into`/outlast_generated."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "openapi-python-client"),
        "generate",
        "--url",
        url,
        "--meta",
        "none",
        "--output-path",
        str(into / GENERATED),
        "--fail-on-warning",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},  # its ruff post-hooks
    )
    output, _ = await process.communicate()
    text = output.decode()
    assert process.returncode == 0, text
    return text


@contextlib.contextmanager
def importable(folder: Path) -> Iterator[Any]:
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(GENERATED)
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if n == GENERATED or n.startswith(f"{GENERATED}.")]:
            del sys.modules[name]


@pytest.fixture
async def live(config: Config, deps: Deps) -> AsyncIterator[Live]:
    async with live_server(config) as server:
        yield server


async def test_openapi_python_client_generates_every_operation_without_a_warning_and_its_client_runs_jobs(
    live: Live, drain: Drain, tmp_path: Path
) -> None:
    output = await generate(f"{live.url}/openapi.json", tmp_path)
    assert "warning" not in output.lower() and "error" not in output.lower(), output
    async with live.client() as http:
        doc = (await http.get("/openapi.json")).json()
    operations = {op["operationId"] for operations in doc["paths"].values() for op in operations.values()}
    modules = {re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower() for op in operations}
    generated = {p.stem for p in (tmp_path / GENERATED / "api").rglob("*.py") if p.stem != "__init__"}
    assert generated == modules
    with importable(tmp_path) as package:
        await run_jobs_with(package, live, drain)


async def run_jobs_with(package: Any, live: Live, drain: Drain) -> None:
    """submit -> get (polled until done) -> result, a Prefer: wait submit, a batch and a list, all through the
    generated client."""
    api = importlib.import_module(f"{GENERATED}.api.jobs")
    jobs = {name: importlib.import_module(f"{api.__name__}.{name}") for name in _OPERATIONS}
    models = importlib.import_module(f"{GENERATED}.models")
    async with package.AuthenticatedClient(base_url=live.url, token=live.key) as client:
        body = models.SquareSumSubmit(type_="square_sum", input_=models.SquareSumInput(data=[1, 2, 3]))
        job = await jobs["submit_job"].asyncio(client=client, body=body)
        assert isinstance(job, models.Job) and job.status == models.JobStatus.QUEUED, job
        worker = asyncio.create_task(drain())

        async def finished() -> Any:
            seen = await jobs["get_job"].asyncio(job.id, client=client)
            assert isinstance(seen, models.Job), seen
            return seen if seen.done else None

        done = await eventually(finished)
        await worker
        assert done.status == models.JobStatus.SUCCEEDED
        assert await jobs["get_job_result"].asyncio(job.id, client=client) == 14

        waited = asyncio.create_task(
            jobs["submit_job"].asyncio_detailed(
                client=client,
                body=models.CubeSumSubmit(type_="cube_sum", input_=models.CubeSumInput(data=[2])),
                prefer="wait=30",
            )
        )

        async def answered() -> Any:
            await drain()  # until the waiting submit's job was inserted, rung and run
            return waited.result() if waited.done() else None

        answer = await eventually(answered)
        assert answer.status_code == 200 and answer.headers["preference-applied"] == "wait=30"
        assert answer.parsed.status == models.JobStatus.SUCCEEDED and answer.parsed.result == 8

        batch = models.SubmitBatch(
            jobs=[models.SleepBatchItem(type_="sleep", input_=models.SleepInput(seconds=0.0), idempotency_key="b-1")]
        )
        items = await jobs["submit_jobs"].asyncio(client=client, body=batch)
        assert isinstance(items, models.JobItems) and [j.type_ for j in items.items] == ["sleep"]
        page = await jobs["list_jobs"].asyncio(client=client, status=models.JobStatus.SUCCEEDED)
        assert isinstance(page, models.JobList) and {j.id for j in page.items} == {job.id, answer.parsed.id}


_OPERATIONS = ("submit_job", "submit_jobs", "get_job", "get_job_result", "list_jobs")


# -- /docs ------------------------------------------------------------------------------------------


class References(html.parser.HTMLParser):
    """Every URL a page loads: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.urls.append(value)


ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


async def test_docs_and_everything_it_loads_come_from_outlast_without_a_key(config: Config, api_key: str) -> None:
    async with open_app(config) as anonymous:
        page = await anonymous.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        parser = References()
        parser.feed(page.text)
        assert len(parser.urls) >= 4, parser.urls
        texts = [page.text]
        for url in parser.urls:
            resolved = urlsplit(urljoin("http://test/docs", url))
            assert (resolved.scheme, resolved.netloc) == ("http", "test"), url  # relative: this host
            asset = await anonymous.get(resolved.path)
            assert asset.status_code == 200, url
            assert asset.headers["content-type"].startswith(ASSET_TYPES[Path(resolved.path).suffix]), url
            assert asset.headers["x-content-type-options"] == "nosniff"
            if not resolved.path.endswith("-bundle.js"):  # the UI's code names hosts in strings it never loads
                texts.append(asset.text if "image" not in asset.headers["content-type"] else "")
        assert (await anonymous.get("/openapi.json")).status_code == 200
        assert (await anonymous.get("/v1/jobs")).status_code == 401  # a key exists: this is no open mode
    for text in texts:
        css_urls = re.findall(r"url\(\s*['\"]?([^'\")]+)", text)
        assert all(u.startswith("data:") for u in css_urls), css_urls
        without_data = re.sub(r"url\([^)]*\)", "", text)
        assert re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", without_data, re.I) == []
    assert any("validatorUrl: null" in text for text in texts)  # else the UI calls validator.swagger.io


async def test_an_unknown_docs_asset_is_a_404_problem(config: Config, api_key: str) -> None:
    async with open_app(config) as anonymous:
        for name in ("swagger-editor-bundle.js", "..%2fLICENSE", "index.html"):
            response = await anonymous.get(f"/docs/assets/{name}")
            assert response.status_code == 404, name
            assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="NO CHROMIUM: apt-get install chromium to run this")
async def test_docs_renders_every_operation_in_chromium_with_every_other_host_unreachable(live: Live) -> None:
    """Offline for real: Chromium resolves no name but 127.0.0.1, and the page still shows its operations."""
    process = await asyncio.create_subprocess_exec(
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=15000",
        "--dump-dom",
        f"{live.url}/docs",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    dom, _ = await process.communicate()
    text = dom.decode()
    async with live.client() as http:
        doc = (await http.get("/openapi.json")).json()
    ids = {op["operationId"] for operations in doc["paths"].values() for op in operations.values()}
    assert 'class="swagger-ui' in text, text[:2000]
    shown = set(re.findall(r'id="operations-(?!tag-)[^"-]+-([A-Za-z]+)"', text))
    assert shown == ids, ids ^ shown
