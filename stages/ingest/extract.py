"""Extraction of ingest: HTML documents -> main text."""

from __future__ import annotations

import re

_INLINE_CODE = re.compile(r"<(/?)(?:code|tt|kbd|samp)\b", re.I)


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


