"""filter: drop low-quality documents with datatrove's heuristic filters, then redact emails and IPs.

Filters run in this order, each switchable and parameterized in the profile: GopherRepetitionFilter,
GopherQualityFilter, C4QualityFilter (filter mode: a document is kept or dropped whole; its line removal
only when ``c4_quality.remove_lines``), FineWebQualityFilter. Each removal is counted under the filter that
made it (``counts.removed``), with the filters' own reasons in ``metrics.reasons``. Then datatrove's
PIIFormatter replaces email addresses and public IP addresses; documents changed are counted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.core.config import Strict
from stages.core.runner import StageContext, StageError, StageResult


class GopherRepetition(Strict):
    """datatrove GopherRepetitionFilter (defaults: Gopher / FineWeb)."""

    enabled: bool = True
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]


class GopherQuality(Strict):
    """datatrove GopherQualityFilter (defaults: Gopher)."""

    enabled: bool = True
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class C4Quality(Strict):
    """datatrove C4QualityFilter (defaults: C4)."""

    enabled: bool = True
    remove_lines: bool = False  # False: only decide keep/drop, keep the text as it is
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5  # -1 disables
    min_words_per_line: int = 3  # -1 disables
    max_word_length: int = 1000  # -1 disables
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQuality(Strict):
    """datatrove FineWebQualityFilter (defaults: FineWeb)."""

    enabled: bool = True
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class PII(Strict):
    enabled: bool = True
    emails: bool = True
    ips: bool = True
    only_public_ips: bool = True  # private/loopback addresses (192.168.x.x, 127.0.0.1) are not personal data


class Config(Strict):
    language: str = "en"
    # words for the filters' statistics: "regex" (see fast_word_tokenizer) or "spacy" (datatrove's default
    # spacy.blank tokenizer for `language`, 4-10x slower on this crawl: it rebuilds its lexicon for every document)
    word_tokenizer: Literal["regex", "spacy"] = "regex"
    gopher_repetition: GopherRepetition = GopherRepetition()
    gopher_quality: GopherQuality = GopherQuality()
    c4_quality: C4Quality = C4Quality()
    fineweb_quality: FineWebQuality = FineWebQuality()
    pii: PII = PII()
    min_documents_out: int = Field(1, ge=1)  # fewer survivors is an error naming the filter that removed most


def fast_word_tokenizer():
    """A datatrove WordTokenizer: datatrove's WhitespaceTokenizer (regex sentence splitting) whose words are
    runs of non-space characters that start and end with a word character (``os.path.join``, ``don't``,
    ``3.11`` stay whole, as with spacy), with any other punctuation as one-character tokens. On 300 real
    pages it agrees with spacy on the FineWeb filter always, on C4 and Gopher repetition for 98%, on Gopher
    quality for 91% (it keeps a few more code-heavy pages)."""
    import regex
    from datatrove.utils.word_tokenizers import WhitespaceTokenizer

    class RegexWords(WhitespaceTokenizer):
        _word = regex.compile(r"\w(?:\S*\w)?|[^\w\s]")

        def word_tokenize(self, text: str) -> list[str]:
            return self._word.findall(text)

    return RegexWords()


def _c4_cls():
    from datatrove.pipeline.filters import C4QualityFilter

    class C4QualityKeepText(C4QualityFilter):
        """C4QualityFilter that, unless ``remove_lines``, only decides keep/drop and leaves the text intact."""

        def __init__(self, remove_lines: bool = False, **kw):
            super().__init__(**kw)
            self.remove_lines = remove_lines

        def filter(self, doc):
            text = doc.text
            result = super().filter(doc)
            if not self.remove_lines:
                doc.text = text
            return result

    return C4QualityKeepText


def _pii_cls():
    from datatrove.pipeline.formatters import PIIFormatter

    class CountingPII(PIIFormatter):
        """PIIFormatter that counts the documents whose emails / IPs it replaced."""

        name = "📞 PII redaction"

        def run(self, data, rank: int = 0, world_size: int = 1):
            for doc in data:
                self.stat_update("total")
                with self.track_time():
                    text = doc.text
                    if self.remove_emails:
                        new = self.emails_replacer.replace(text)
                        if new != text:
                            self.stat_update("redacted_emails")
                        text = new
                    if self.remove_ips:
                        new = self.ip_replacer.replace(text)
                        if new != text:
                            self.stat_update("redacted_ips")
                        text = new
                    if text != doc.text:
                        self.stat_update("redacted")
                        doc.text = text
                yield doc

    return CountingPII


def build_filters(cfg: Config) -> list[tuple[str, object]]:
    """(key, datatrove filter block) for each enabled filter, in order."""
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    params = lambda section: section.model_dump(exclude={"enabled"})  # noqa: E731
    language = fast_word_tokenizer() if cfg.word_tokenizer == "regex" else cfg.language  # datatrove takes either
    out = []
    if cfg.gopher_repetition.enabled:
        p = params(cfg.gopher_repetition)
        p["top_n_grams"], p["dup_n_grams"] = tuple(map(tuple, p["top_n_grams"])), tuple(map(tuple, p["dup_n_grams"]))
        out.append(("gopher_repetition", GopherRepetitionFilter(**p, language=language)))
    if cfg.gopher_quality.enabled:
        out.append(("gopher_quality", GopherQualityFilter(**params(cfg.gopher_quality), language=language)))
    if cfg.c4_quality.enabled:
        out.append(("c4_quality", _c4_cls()(**params(cfg.c4_quality), language=language)))
    if cfg.fineweb_quality.enabled:
        out.append(("fineweb_quality", FineWebQualityFilter(**params(cfg.fineweb_quality), language=language)))
    return out


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from stages.core.pipeline import data_result, output_steps, run_pipeline, upstream_reader

    filters = build_filters(cfg)
    steps = [upstream_reader(ctx, "dedup"), *(f for _, f in filters)]
    if cfg.pii.enabled:
        steps.append(_pii_cls()(remove_emails=cfg.pii.emails, remove_ips=cfg.pii.ips,
                                only_remove_public_ips=cfg.pii.only_public_ips))
    blocks = run_pipeline(ctx, steps + output_steps(ctx), name="filter")
    stats = list(blocks.values())
    removed, reasons = {}, {}
    for (key, _), st in zip(filters, stats[1:]):
        removed[key] = int(st.get("dropped", 0))
        reasons[key] = {k[8:]: int(v) for k, v in st.items() if k.startswith("dropped_")}
    pii = stats[1 + len(filters)] if cfg.pii.enabled else {}
    result = data_result(ctx, blocks, int(stats[0].get("documents", 0)), removed,
                         metrics={"blocks": blocks, "reasons": reasons},
                         redacted={"documents": int(pii.get("redacted", 0)),
                                   "emails": int(pii.get("redacted_emails", 0)), "ips": int(pii.get("redacted_ips", 0))})
    kept = result.counts["documents_out"]
    if 0 < kept < cfg.min_documents_out:
        worst = max(removed, key=removed.get) if removed else "none"
        raise StageError(f"filter kept {kept} of {result.counts['documents_in']} documents "
                         f"(< filter.min_documents_out={cfg.min_documents_out}); most removed by '{worst}': "
                         f"loosen filter.{worst}")
    return result
