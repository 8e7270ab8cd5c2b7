"""A real model on the CPU: ``wordllama-embed``, text embeddings from WordLlama.

The weights (``l2_supercat``, 256 dimensions, 16 MB) ship inside the ``wordllama`` wheel,
and the model is loaded from the installed package with downloads disabled: nothing is
fetched from a model hub at run time. Install it with ``pip install 'gridqueue[model]'``;
without the extra this module still imports, and a job fails with an error that says so.

Payload: ``{"texts": [str, ...], "ms_per_text": int}`` (``ms_per_text``, default 0, paces
the work, for drills). Each text's embedding is one chunk of the job's stream,
``{"index": i, "embedding": [float, ...]}`` (rounded to 6 decimals), in order; the handler
checkpoints after every text and resumes from its checkpoint, so a failover re-embeds
nothing the reader already has. The result: ``{"model", "dim", "count"}``.

    gridqueue worker --handlers workers.embedding --models wordllama-embed
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path
from typing import Any

from gridqueue import Context, InvalidInput, handler
from gridqueue.errors import ExtraNotInstalledError

MODEL = "wordllama-embed"
WEIGHTS = "l2_supercat"
DIM = 256
MAX_TEXTS = 10_000


@cache
def load_model() -> Any:
    """The model, loaded once per process from the files inside the wheel."""
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError as exc:
        raise ExtraNotInstalledError(
            f"model {MODEL!r} needs the 'model' extra: pip install 'gridqueue[model]' ({exc})"
        ) from exc
    # wordllama looks for its tokenizer under <cache_dir>/tokenizers; the wheel ships it in
    # <package>/tokenizers, so the package directory is the cache, and downloads are off.
    package_dir = Path(wordllama.__file__).parent
    return WordLlama.load(config=WEIGHTS, dim=DIM, cache_dir=package_dir, disable_download=True)


def embed(texts: list[str]) -> list[list[float]]:
    vectors = load_model().embed(texts)
    return [[round(float(x), 6) for x in row] for row in vectors]


@handler(MODEL, gpu_memory_gb=0.0)
def wordllama_embed(payload: Any, ctx: Context) -> dict[str, Any]:
    texts = payload.get("texts") if isinstance(payload, dict) else None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise InvalidInput(f'{MODEL} needs a payload {{"texts": [str, ...]}}')
    if len(texts) > MAX_TEXTS:
        raise InvalidInput(f"{MODEL}: at most {MAX_TEXTS} texts a job; split the batch")
    pace_ms = payload.get("ms_per_text", 0)
    if not isinstance(pace_ms, int) or isinstance(pace_ms, bool) or not 0 <= pace_ms <= 60_000:
        raise InvalidInput(f"{MODEL}: 'ms_per_text' must be an integer within 0..60000")
    load_model()
    start = 0
    if ctx.resume is not None and isinstance(ctx.resume.state, dict):
        start = int(ctx.resume.state.get("next", 0))
        ctx.seek(ctx.resume.position)
    for i in range(start, len(texts)):
        time.sleep(pace_ms / 1000)
        [vector] = embed([texts[i]])
        if not ctx.emit({"index": i, "embedding": vector}):
            break  # superseded
        ctx.checkpoint({"next": i + 1})
        ctx.progress(f"{i + 1}/{len(texts)} texts")
    return {"model": f"wordllama-{WEIGHTS}-{DIM}", "dim": DIM, "count": len(texts)}
