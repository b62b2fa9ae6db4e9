"""Extraction of ingest: HTML documents -> main text, deterministically.

Interface used by ``stages.ingest.run`` (keep it stable):
- ``ExtractConfig``: the ``ingest.extract`` config section;
- ``extractor_block(cfg)``: a datatrove block that replaces the HTML of documents whose
  ``metadata["format"]`` is ``"html"`` (or missing: older data) by their main text and passes text documents
  (``"text"``: WET, JSONL, Parquet) through unchanged;
- ``removed_counts(stats)``: that block's stats -> {reason: documents removed}, reasons in ``REASONS``.

Why not datatrove's ``Trafilatura`` block: it runs each page in a subprocess under a wall-clock timeout, so
which of the largest pages survive depends on how busy the machine is (4-13 of the sample crawl's largest
pages were dropped at random, run to run). This block calls the extractor in-process and bounds trafilatura's
work with a deterministic cap instead. Measured on the sample crawl (bench/bench_extraction.py), trafilatura's
time per page follows the number of ``<`` in the page (log-log slope 0.97, R² 0.95; bytes: R² 0.94), ~55 µs
per ``<`` on ordinary pages and ~100 µs on the two big index pages (contents.html 2.5 MB / 98k ``<`` and
genindex-all.html 1.7 MB / 70k: ~8 s each); the next largest page (os.html, 33k) takes 1.8 s. So a page
with more than ``max_tags`` ``<`` (default 40,000) or more than ``max_html_bytes`` UTF-8 bytes (default 1 MB,
for tag-poor giants) is not given to trafilatura: by default (``over_cap: resiliparse``) resiliparse, which is
linear-time and ~20x faster, extracts it and it is counted as ``extract_fallback``, so no page is dropped for
its size; ``over_cap: skip`` drops it under the removed reason ``extract_too_complex``. On the sample crawl the
cap concerns exactly those two index pages (resiliparse keeps only their titles: a list of links is not main
text). The cap only concerns trafilatura; resiliparse extracts every page. Same input and options -> same
output, whatever the load, the task count or the document order (trafilatura's ``deduplicate`` would break
the last one: its cache spans documents, hence off by default).

Default extractor: resiliparse. On the 181 pages of the article-extraction benchmark it scores F1 0.927
(precision 0.879, recall 0.981) against trafilatura's 0.949 with our options, at ~11x the pages/s there and
~19x on the sample crawl: the best F1 per second by far. Known misses of its main-content heuristics on the
sample crawl: index pages (Sphinx genindex, tables of contents: title only), and pages whose container id says
"related" or "whatsnext" (3 Django pages) or "comment" (PostgreSQL's COMMENT command page) come out empty
(14 pages of the sample crawl in all, among them 4 with 6-52 kB of real text): with ``on_empty: other``
(default) such a page goes to the other extractor (trafilatura, within the cap), which keeps them, and is
counted as ``extract_empty_fallback``; ``resiliparse.comments: true`` recovers only the last one and costs
1 F1 point on the news benchmark (reader comments), so it stays off.

Stats of the block: ``html`` (pages extracted), ``passthrough`` (text documents), ``extracted`` (by the chosen
extractor), ``extract_fallback`` (over the cap, by resiliparse), ``extract_empty_fallback`` (empty with
the chosen extractor, text from the other one), and the removed reasons: ``extract_binary``
(over 1% control characters: binary bytes that a charset decoder accepted, which resiliparse would return as
"text"), ``extract_error`` (not a str, or the extractor raised), ``extract_empty`` (no main text),
``extract_too_complex`` (over the cap with ``over_cap: skip``). Nothing raises out of the block.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from stages.core.config import Strict

_INLINE_CODE = re.compile(r"<(/?)(?:code|tt|kbd|samp)\b", re.I)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # C0 controls but \t \n \f \r; DEL
# keys of counts.removed this block adds
REASONS = ("extract_too_complex", "extract_binary", "extract_error", "extract_empty")


class TrafilaturaOptions(Strict):
    favour_precision: bool = False  # True drops more borderline text (e.g. code-heavy sections)
    include_tables: bool = True  # keep text inside <table> (reference docs use many tables)
    deduplicate: bool = False  # in-document duplicate removal; its LRU cache spans documents (order-dependent)
    fallback: bool = True  # trafilatura's fallback extractors when its main one finds little (slower, better)
    inline_code_as_text: bool = True  # treat inline <code>/<tt>/<kbd>/<samp> as text (see _trafilatura)


class ResiliparseOptions(Strict):
    """Options of ``resiliparse.extract.html2text.extract_plain_text`` (``main_content`` is always on)."""

    preserve_formatting: bool = True  # keep line breaks / paragraphs (line-based filters downstream need them)
    list_bullets: bool = True  # "• " / "1. " before list items
    alt_texts: bool = False  # image alt texts ("Logo", "Photo by ...") are rarely part of the text
    links: bool = False  # append link target URLs
    noscript: bool = False  # text of <noscript> ("please enable JavaScript")
    comments: bool = False  # treat comment sections as main content
    skip_elements: list[str] = []  # extra CSS selectors to drop, e.g. [".headerlink", "nav"]


class ExtractConfig(Strict):
    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"  # best F1 per second (bench_extraction)
    # trafilatura only: pages above either cap are not given to trafilatura (deterministic, replaces a timeout)
    max_html_bytes: int = Field(1_000_000, ge=1)  # UTF-8 bytes of the page
    max_tags: int = Field(40_000, ge=1)  # number of "<" in the page
    over_cap: Literal["resiliparse", "skip"] = "resiliparse"  # extract with resiliparse, or drop (counted)
    # when the chosen extractor finds no main text: "other" tries the other one (trafilatura within the cap),
    # counted as extract_empty_fallback; "skip" drops the page as extract_empty
    on_empty: Literal["other", "skip"] = "other"
    trafilatura: TrafilaturaOptions = TrafilaturaOptions()
    resiliparse: ResiliparseOptions = ResiliparseOptions()


# ---------------------------------------------------------------------------------------------------------
# the extractors: html (str) -> text (str, possibly empty); they may raise

def _trafilatura(html: str, o: TrafilaturaOptions) -> str:
    """trafilatura.extract with our options. Inline code tags optionally become spans first: trafilatura treats
    <code> as a block, which splits every sentence of a documentation page that names a function
    ("parsing, argparse⏎, was introduced") and glues the next word on ("andhttp.client")."""
    from trafilatura import extract

    if o.inline_code_as_text:
        html = _INLINE_CODE.sub(r"<\1span", html)
    return extract(html, favor_precision=o.favour_precision, include_comments=False, deduplicate=o.deduplicate,
                   include_tables=o.include_tables, no_fallback=not o.fallback) or ""


def _resiliparse(html: str, o: ResiliparseOptions) -> str:
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, main_content=True, preserve_formatting=o.preserve_formatting,
                              list_bullets=o.list_bullets, alt_texts=o.alt_texts, links=o.links,
                              noscript=o.noscript, comments=o.comments,
                              skip_elements=list(o.skip_elements) or None) or ""


def over_cap(html: str, cfg: ExtractConfig) -> bool:
    """True when the page is too big for trafilatura: more UTF-8 bytes than ``max_html_bytes`` or more ``<``
    than ``max_tags`` (both linear scans in C, ~1 ms for a 2.5 MB page)."""
    return len(html.encode("utf-8", "surrogatepass")) > cfg.max_html_bytes or html.count("<") > cfg.max_tags


def looks_binary(html: str) -> bool:
    """More than 1% control characters in the first 64k characters: bytes of an image, archive or PDF that
    a charset decoder accepted (latin-1 accepts anything). Text and HTML have next to none."""
    head = html[:65536]
    return len(_CONTROL.findall(head)) > 0.01 * len(head)


def extract_text(html: str, cfg: ExtractConfig) -> tuple[str, str]:
    """(outcome, text) for one page, outcome in "extracted", "extract_fallback", "extract_empty_fallback",
    "extract_too_complex", "extract_binary", "extract_error", "extract_empty". Deterministic; never raises."""
    outcome, fn, opts = "extracted", _resiliparse, cfg.resiliparse
    try:
        if not isinstance(html, str):
            raise TypeError(f"HTML must be str, got {type(html).__name__}")
        if looks_binary(html):
            return "extract_binary", ""
        capped = over_cap(html, cfg)
        if cfg.extractor == "trafilatura":
            if not capped:
                fn, opts = _trafilatura, cfg.trafilatura
            elif cfg.over_cap == "skip":
                return "extract_too_complex", ""
            else:
                outcome = "extract_fallback"
        text = fn(html, opts).strip()
        if not text and cfg.on_empty == "other":
            if fn is _trafilatura:
                text = _resiliparse(html, cfg.resiliparse).strip()
            elif not capped and outcome == "extracted":
                text = _trafilatura(html, cfg.trafilatura).strip()
            outcome = "extract_empty_fallback"
    except Exception:  # malformed / binary input: counted by the caller
        return "extract_error", ""
    return (outcome, text) if text else ("extract_empty", "")


def _block_cls():
    from datatrove.pipeline.base import PipelineStep

    class MainText(PipelineStep):
        """HTML documents -> main text with the configured extractor; text documents pass through."""

        type = "🛢 - EXTRAC"
        name = "⛏ MainText"

        def __init__(self, cfg: ExtractConfig):
            super().__init__()
            self.cfg = cfg

        def run(self, data, rank: int = 0, world_size: int = 1):
            # imported here, not closed over: dill pickles this class by value, and loguru's logger holds
            # sys.stderr (unpicklable under pytest's capture)
            from datatrove.utils.logging import logger
            from datatrove.utils.typeshelper import StatHints

            warned = False
            for doc in data:
                self.stat_update(StatHints.total)
                if (doc.metadata or {}).get("format", "html") != "html":
                    self.stat_update("passthrough", StatHints.forwarded)
                    self.update_doc_stats(doc)
                    yield doc
                    continue
                self.stat_update("html")
                with self.track_time():
                    outcome, text = extract_text(doc.text or "", self.cfg)
                self.stat_update(outcome)
                if not text:
                    if outcome == "extract_error" and not warned:
                        logger.warning(f"extraction failed on {doc.id} (counted as extract_error; logged once)")
                        warned = True
                    continue
                doc.text = text
                self.stat_update(StatHints.forwarded)
                self.update_doc_stats(doc)
                yield doc

    return MainText


def extractor_block(cfg: ExtractConfig):
    """The datatrove block for ``cfg`` (see module docstring)."""
    return _block_cls()(cfg)


def removed_counts(stats: dict) -> dict[str, int]:
    """The block's stats -> documents removed per reason (all of ``REASONS``, zeros included)."""
    return {r: int(stats.get(r, 0)) for r in REASONS}
