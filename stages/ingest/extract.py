"""Extraction of ingest: HTML documents -> main text.

Interface used by ``stages.ingest.run`` (keep it stable):
- ``ExtractConfig``: the ``ingest.extract`` config section;
- ``extractor_block(cfg)``: a datatrove block that replaces the HTML of documents whose
  ``metadata["format"] == "html"`` by their main text and passes text documents (WET, JSONL, Parquet) through;
- ``removed_counts(stats)``: that block's stats -> {reason: documents removed}, reasons in ``REASONS``.
"""

from __future__ import annotations

import re

from pydantic import Field

from stages.core.config import Strict

_INLINE_CODE = re.compile(r"<(/?)(?:code|tt|kbd|samp)\b", re.I)
REASONS = ("extract_timeout", "extract_error", "extract_empty")  # keys of counts.removed this block adds


class ExtractConfig(Strict):
    timeout: float = Field(10.0, gt=0)  # seconds per page for trafilatura before it counts as a timeout
    favour_precision: bool = False  # trafilatura: True drops more borderline text (e.g. code-heavy sections)
    include_tables: bool = True  # trafilatura: keep text inside <table> (reference docs use many tables)
    deduplicate: bool = False  # trafilatura's in-document duplicate segment removal
    fallback: bool = True  # trafilatura's fallback extractors when its main one finds little (slower, better)
    inline_code_as_text: bool = True  # treat inline <code>/<tt>/<kbd>/<samp> as text (see TextTrafilatura)


def _extractor_cls():
    from datatrove.pipeline.extractors import Trafilatura

    class TextTrafilatura(Trafilatura):
        """datatrove's Trafilatura block, optionally turning inline code tags into spans first: trafilatura
        treats <code> as a block, which splits every sentence of a documentation page that names a function
        ("parsing, argparse⏎, was introduced") and glues the next word on ("andhttp.client")."""

        def __init__(self, inline_code_as_text: bool = True, **kw):
            super().__init__(**kw)
            self.inline_code_as_text = inline_code_as_text

        def extract(self, text: str) -> str:
            if self.inline_code_as_text:
                text = _INLINE_CODE.sub(r"<\1span", text)
            return super().extract(text)

    return TextTrafilatura


def extractor_block(cfg: ExtractConfig):
    return _extractor_cls()(inline_code_as_text=cfg.inline_code_as_text, timeout=cfg.timeout,
                            favour_precision=cfg.favour_precision, deduplicate=cfg.deduplicate,
                            include_tables=cfg.include_tables, no_fallback=not cfg.fallback)


def removed_counts(stats: dict) -> dict[str, int]:
    n = lambda k: int(stats.get(k, 0))  # noqa: E731
    return {"extract_timeout": n("timeout") + n("broken_process"), "extract_error": n("clean_error"),
            "extract_empty": n("dropped")}
