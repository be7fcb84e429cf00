"""Texts to vectors with WordLlama's default model (l2_supercat, 256 dimensions), whose weights and tokenizer ship
inside its wheel: loaded from site-packages, never downloaded (`disable_download`), so a worker with no network
embeds as well as one with.

The embedding runs in the worker's process pool (`in_process_pool`), a batch at a time, so the event loop keeps
heartbeating however long a job's texts take, and a cancel ends the job at the next batch's end at the latest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from worker.job import Context, JobError, in_process_pool

MODEL = "wordllama/l2_supercat/256"  # stored with a collection made from texts: its queries need the same
DIMENSIONS = 256
BATCH_TEXTS = 512  # ~30 ms of short texts: a batch is what a cancel may still wait for
BATCH_CHARS = 500_000


@functools.cache
def _model() -> Any:
    """The model, once per pool process. Its package directory is passed as the cache: WordLlama looks for its
    bundled tokenizer under `tokenizer/` but the wheel holds it in `tokenizers/`, which the cache layout matches."""
    from pathlib import Path

    import wordllama

    return wordllama.WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)


def embed_batch(texts: Sequence[str]) -> Any:
    """Unit vectors of `texts`, an (n, 256) float32 array; runs in a pool process."""
    return _model().embed(list(texts), norm=True)


def batches(texts: Sequence[str]) -> list[Sequence[str]]:
    """`texts` cut into batches of at most BATCH_TEXTS texts and, past the first text, BATCH_CHARS characters."""
    out: list[Sequence[str]] = []
    start, chars = 0, 0
    for n, text in enumerate(texts):
        if n > start and (n - start >= BATCH_TEXTS or chars + len(text) > BATCH_CHARS):
            out.append(texts[start:n])
            start, chars = n, 0
        chars += len(text)
    if start < len(texts):
        out.append(texts[start:])
    return out


async def embed(
    texts: Sequence[str], ctx: Context, *, batch: Callable[[Sequence[str]], Any] = embed_batch, share: float = 0.9
) -> list[list[float]]:
    """Every text's vector, in order, batch by batch in the process pool, with progress up to `share`. `batch` is
    a module-level function (it is pickled to the pool): the model's, or a test's stand-in."""
    vectors: list[list[float]] = []
    done = 0
    for part in batches(texts):
        try:
            array = await in_process_pool(batch, part)
        except ImportError as exc:
            raise JobError(f"the embedding model is not installed here: {exc}", type="embedder_unavailable") from None
        vectors.extend(array.tolist() if hasattr(array, "tolist") else array)
        done += len(part)
        await ctx.progress(share * done / len(texts), f"embedded {done} of {len(texts)} texts")
    return vectors
