"""`report`: a CSV and a Parquet file, written with ctx.output, of the tenant's jobs per type and UTC day over a date
range (at most a year), or of the summary of an uploaded CSV (`upload`: its id from POST /v1/uploads); the result
lists the files with their links. polars reads, summarises and writes, in a thread: it releases the GIL, so the
loop keeps heartbeating while a large CSV is parsed.

A CSV that does not parse (ragged rows, an unterminated quote, bytes that are not UTF-8 text) fails the job with
`invalid_csv`; one past REPORT_MAX_CSV_BYTES with `too_large`; an id that names none of the tenant's uploads with
`unknown_upload`.
"""

from __future__ import annotations

import asyncio
import codecs
import io
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Annotated, Final, Literal
from uuid import UUID

import msgspec
from databases import Database

from worker import sql
from worker.blobs import File
from worker.job import Context, JobError, JobType

if TYPE_CHECKING:
    import polars as pl

MAX_DAYS: Final = 366
DEFAULT_DAYS: Final = 30
MAX_CSV_BYTES: Final = 256 << 20  # parsed in memory: a larger upload is refused rather than risking the worker


class DailyJobs(msgspec.Struct, frozen=True):
    """A type's jobs created on one UTC day, by how they stand, and their mean run time (started to finished)."""

    day: date
    type: str
    jobs: int
    succeeded: int
    failed: int
    cancelled: int
    expired: int
    live: int  # queued or running
    mean_run_s: float | None


# Through jobs_tenant_newest (tenant_id, id): v7 ids sort by creation, so the day range is an id range too.
_DAILY = """
SELECT CAST(created_at AT TIME ZONE 'UTC' AS date) AS day, type, count(*) AS jobs,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE status = 'expired') AS expired,
       count(*) FILTER (WHERE status IN ('queued', 'running')) AS live,
       CAST(avg(extract(epoch FROM finished_at - started_at)) AS float8) AS mean_run_s
  FROM jobs
 WHERE tenant_id = :tenant AND id >= :low AND id < :high AND created_at >= :since AND created_at < :until
 GROUP BY 1, 2
 ORDER BY 1, 2
"""


def _v7_floor(at: datetime) -> UUID:
    """The smallest UUIDv7 of the millisecond `at`: every job id made from then on sorts at or after it."""
    return UUID(int=int(at.timestamp() * 1000) << 80)


async def job_stats(db: Database, tenant: str, since: date, until: date) -> list[DailyJobs]:
    """The tenant's jobs per type and UTC day from `since` to `until`, both included."""
    start = datetime.combine(since, time(), UTC)
    end = datetime.combine(until + timedelta(days=1), time(), UTC)
    values = {"tenant": tenant, "since": start, "until": end, "low": _v7_floor(start), "high": _v7_floor(end)}
    return [msgspec.convert(dict(r), DailyJobs) for r in await sql.fetch_all(db, _DAILY, values)]


class Input(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Either a date range of the tenant's jobs (UTC days, both included; by default the last 30 up to today) or
    `upload`, the id of an uploaded CSV to summarise."""

    since: date | None = None
    until: date | None = None
    upload: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] | None = None

    def __post_init__(self) -> None:
        if self.upload is not None and (self.since is not None or self.until is not None):
            raise ValueError("give either `upload` or a date range (`since`, `until`), not both")
        if self.since is not None and self.until is not None:
            if self.since > self.until:
                raise ValueError("`since` is after `until`")
            if (self.until - self.since).days >= MAX_DAYS:
                raise ValueError(f"a report covers at most {MAX_DAYS} days")


class Report(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    source: Literal["jobs", "upload"]
    rows: int  # rows of the table written
    files: list[File]
    since: date | None = None
    until: date | None = None
    columns: list[str] | None = None  # an uploaded CSV's columns


_SCHEMA: Final = {
    "day": "Date",
    "type": "String",
    "jobs": "Int64",
    "succeeded": "Int64",
    "failed": "Int64",
    "cancelled": "Int64",
    "expired": "Int64",
    "live": "Int64",
    "mean_run_s": "Float64",
}


def _frame(rows: list[DailyJobs]) -> pl.DataFrame:
    import polars as pl

    schema = {name: getattr(pl, dtype) for name, dtype in _SCHEMA.items()}
    return pl.DataFrame([msgspec.structs.asdict(r) for r in rows], schema=schema, orient="row")


def _files(frame: pl.DataFrame) -> tuple[bytes, bytes]:
    """The frame as CSV and as Parquet."""
    parquet = io.BytesIO()
    frame.write_parquet(parquet)
    return frame.write_csv().encode(), parquet.getvalue()


def _summary(data: bytes) -> tuple[pl.DataFrame, int, list[str]]:
    """The CSV's per-column statistics (count, nulls, mean, spread, quartiles), its row count and columns."""
    import polars as pl

    try:
        frame = pl.read_csv(io.BytesIO(data), infer_schema_length=10_000)
    except pl.exceptions.PolarsError as exc:
        raise JobError(
            f"the upload is not a CSV this can read: {str(exc).splitlines()[0]}", type="invalid_csv"
        ) from None
    return frame.describe(), frame.height, frame.columns


async def _text(ctx: Context, upload_id: str) -> bytes:
    """The upload's bytes, checked as UTF-8 text without NUL as they arrive."""
    upload = await ctx.open(upload_id)
    if upload.size > MAX_CSV_BYTES:
        raise JobError(f"the upload is {upload.size} bytes; a report reads at most {MAX_CSV_BYTES}", type="too_large")
    decoder = codecs.getincrementaldecoder("utf-8")()
    data = bytearray()
    try:
        async for piece in upload.chunks():
            decoder.decode(piece)
            if b"\x00" in piece:
                raise UnicodeDecodeError("utf-8", piece, piece.index(b"\x00"), piece.index(b"\x00") + 1, "a NUL")
            data += piece
            await ctx.progress(0.5 * len(data) / max(1, upload.size), "reading the upload")
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise JobError(
            f"the upload is not UTF-8 text ({exc.reason} near byte {exc.start})", type="invalid_csv"
        ) from None
    return bytes(data)


async def run(input: Input, ctx: Context) -> Report:
    if input.upload is not None:
        data = await _text(ctx, input.upload)
        summary, rows, columns = await asyncio.to_thread(_summary, data)
        csv, parquet = await asyncio.to_thread(_files, summary)
        files = [
            await ctx.output("summary.csv", csv, content_type="text/csv"),
            await ctx.output("summary.parquet", parquet, content_type="application/vnd.apache.parquet"),
        ]
        return Report(source="upload", rows=rows, files=files, columns=columns)
    until = input.until or datetime.now(UTC).date()
    since = input.since or min(until, until - timedelta(days=DEFAULT_DAYS - 1))
    if (until - since).days >= MAX_DAYS:
        raise JobError(f"a report covers at most {MAX_DAYS} days", type="invalid_input")
    daily = await ctx.job_stats(since, until)
    await ctx.progress(0.5, f"{len(daily)} rows")
    csv, parquet = await asyncio.to_thread(_files, _frame(daily))
    files = [
        await ctx.output("jobs-per-day.csv", csv, content_type="text/csv"),
        await ctx.output("jobs-per-day.parquet", parquet, content_type="application/vnd.apache.parquet"),
    ]
    return Report(source="jobs", rows=len(daily), files=files, since=since, until=until)


JOB_TYPE = JobType(
    "report",
    Input,
    run,
    timeout_s=600,
    description="A CSV and a Parquet file of the tenant's jobs per type and day (`since`, `until`), or the summary of"
    " an uploaded CSV (`upload`), listed with their links.",
)
