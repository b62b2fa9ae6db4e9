"""Heuristic filters (datatrove's, unchanged decisions) and the one block that runs the filter chain.

Filters: datatrove's URLFilter (the blocklists that ship in its wheel, offline), GopherRepetitionFilter,
GopherQualityFilter, C4QualityFilter (keep/drop only unless ``remove_lines``) and FineWebQualityFilter, each
parameterized from its config section with the published defaults.

``FilterChain`` runs the configured filters in order inside one datatrove block, so that it can
- pick each document's filter instances by its ``metadata.domain`` (``filter.per_domain`` overrides),
- count per filter: documents, the filter's own reasons, whitespace words and UTF-8 bytes removed, and seconds,
- keep a sample of removed documents per filter that does not depend on the task split: per filter the
  ``samples_per_filter`` documents with the smallest blake2b(id), merged over tasks (``merge_samples``).
Each filter's ``filter(doc)`` is datatrove's own, so decisions are exactly those of the separate blocks.

Shared features: all filters of a chain get one tokenizer object (``shared_word_tokenizer``) that remembers the
word split of the last text; the text is not changed between filters (C4 keeps it unless ``remove_lines``), so
each document is split into words once, not once per filter (tested: one ``word_tokenize`` per document, and
the same decisions as each datatrove filter alone with its own tokenizer).

URL filter cost: its integrated lists hold 4.56 M domains, 19.6 k URLs and 424 words; datatrove parses them
into Python sets in every process (~4.6 s and ~0.8 GB each, measured here). Here the domains are looked up in a
sorted array of their 64-bit hashes (``HashedSet``, built once into a cache file, memory-mapped), the lists are
read once per process and shared by all copies of the filter; ``filter()`` is datatrove's.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import json
import time

from pydantic import Field

from stages.core.config import Strict


class URL(Strict):
    """datatrove URLFilter: domain / subdomain / URL blocklists and banned (sub)words shipped in its wheel,
    plus extra entries (e.g. spam hosts of your crawl that the lists miss)."""

    enabled: bool = True
    use_integrated_lists: bool = True
    extra_domains: list[str] = []  # registered domains or full hostnames
    extra_urls: list[str] = []
    banned_words: list[str] = []  # a URL word (split at non-alphanumerics) equal to one of these
    banned_subwords: list[str] = []  # a substring of the normalized URL
    soft_banned_words: list[str] = []
    soft_word_threshold: int = Field(2, ge=1)  # this many soft-banned URL words drop the document


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


def _shared_words_cls():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SharedWords(WordTokenizer):
        """Wraps a WordTokenizer and remembers the word split of the last text: the filters of a chain call it
        one after the other on the same document, so each document is split once. (datatrove's own
        ``split_into_parts`` lru_cache(5) does not survive C4, which fills it with one sentence split per line;
        and with a language code it builds a new spaCy pipeline at every miss.) The words list is shared: the
        filters only read it."""

        def __init__(self, inner):
            super().__init__(getattr(inner, "language", None))
            self.inner, self._text, self._words = inner, None, None

        def word_tokenize(self, text: str) -> list[str]:
            if text is not self._text and text != self._text:
                self._words, self._text = self.inner.word_tokenize(text), text
            return self._words

        def sent_tokenize(self, text: str) -> list[str]:
            return self.inner.sent_tokenize(text)

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return self.inner.span_tokenize(text)

    return SharedWords


def shared_word_tokenizer(kind: str = "regex", language: str = "en"):
    """The tokenizer one chain's filters share: ``fast_word_tokenizer`` ("regex") or datatrove's tokenizer for
    ``language`` ("spacy": spacy.blank), behind a last-text word cache."""
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    return _shared_words_cls()(fast_word_tokenizer() if kind == "regex" else load_word_tokenizer(language))


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


def _h64(x: str) -> int:
    return int.from_bytes(hashlib.blake2b(x.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class HashedSet:
    """Membership in a large set of strings through the sorted 64-bit blake2b hashes of its entries (a numpy
    array, memory-mapped from a cache file). For the 4.56 M blocklisted domains: 36 MB instead of ~0.8 GB, and
    ~0.05 s to open instead of ~4.6 s to parse per process. A false match needs a 64-bit collision: with
    4.56 M entries, about 2.5e-13 per lookup."""

    def __init__(self, hashes):
        self.hashes = hashes

    def __contains__(self, x) -> bool:
        import numpy as np

        if not isinstance(x, str):
            return False
        h = np.uint64(_h64(x))
        i = int(np.searchsorted(self.hashes, h))
        return i < len(self.hashes) and self.hashes[i] == h

    def __len__(self) -> int:
        return len(self.hashes)


def url_lists_folder() -> str:
    """The folder of datatrove's unpacked ``domains`` / ``urls`` lists (unpacked from its wheel on first use)."""
    import os
    import tarfile

    from datatrove.io import safely_create_file
    from datatrove.utils._import_utils import ASSETS_PATH
    from huggingface_hub import cached_assets_path

    folder = str(cached_assets_path(library_name="datatrove", namespace="filters", subfolder="url_filter"))
    tar_name = "url_filterblacklistsv0_3_0.tar.gz"

    def extract():
        with tarfile.open(os.path.join(ASSETS_PATH, tar_name), "r:gz") as tar:
            tar.extractall(folder)

    safely_create_file(os.path.join(folder, tar_name), extract)
    return folder


@functools.lru_cache(maxsize=1)
def integrated_url_lists() -> dict:
    """datatrove's URL blocklists from its wheel (``datatrove/assets``), read without network: the domain and
    URL lists are unpacked from ``url_filterblacklistsv0_3_0.tar.gz`` into the Hugging Face assets cache once
    (as datatrove does), the word lists read from the assets folder (datatrove's own ``get_list``). The domain
    list becomes a ``HashedSet`` whose hash file is built once beside the unpacked lists. One copy per process."""
    import os

    import numpy as np
    from datatrove.io import safely_create_file
    from datatrove.pipeline.filters.url_filter import get_list
    from datatrove.utils._import_utils import ASSETS_PATH

    folder = url_lists_folder()
    hashes_path = os.path.join(folder, "domains.blake2b64.npy")

    def build():  # once per machine (~15 s), under datatrove's file lock: concurrent workers wait for it
        domains = get_list(folder, "domains", set(), do_normalize=False)
        hashes = np.unique(np.fromiter((_h64(d) for d in domains), dtype=np.uint64, count=len(domains)))
        tmp = f"{hashes_path}.tmp-{os.getpid()}.npy"
        np.save(tmp, hashes)
        os.replace(tmp, hashes_path)

    safely_create_file(hashes_path, build)
    return {"domains": HashedSet(np.load(hashes_path, mmap_mode="r")),
            "urls": get_list(folder, "urls", set(), do_normalize=False),
            "banned_words": get_list(ASSETS_PATH, "banned_words.txt", set()),
            "banned_subwords": get_list(ASSETS_PATH, "banned_subwords.txt", set()),
            "soft_banned_words": get_list(ASSETS_PATH, "soft_banned_words.txt", set())}


class SetUnion:
    """``big | small`` for ``in``, iteration and ``len``, without copying the 4.56 M-entry list to add a few
    extra entries."""

    def __init__(self, big, small):
        self.big, self.small = big, {x for x in small if x not in big}  # disjoint

    def __contains__(self, x) -> bool:
        return x in self.small or x in self.big

    def __iter__(self):
        yield from self.small
        yield from self.big

    def __len__(self) -> int:
        return len(self.big) + len(self.small)


def _url_cls():
    from datatrove.pipeline.filters import URLFilter

    class OfflineURLFilter(URLFilter):
        """datatrove's URLFilter with the public-suffix snapshot bundled in tldextract (no suffix-list download)
        and the integrated lists from the per-process cache (``integrated_url_lists``). ``filter`` is
        datatrove's."""

        def __init__(self, **kw):
            from tldextract import TLDExtract

            super().__init__(**kw)
            self.tldextractor = TLDExtract(suffix_list_urls=())

        def download_data(self):
            if self._downloaded or not self.use_integrated_lists:
                return
            lists = integrated_url_lists()
            for attr, key in (("block_listed_domains", "domains"), ("block_listed_url", "urls"),
                              ("banned_words", "banned_words"), ("banned_subwords", "banned_subwords"),
                              ("soft_banned_words", "soft_banned_words")):
                extra = getattr(self, attr)
                setattr(self, attr, SetUnion(lists[key], extra) if extra else lists[key])
            for word in self.banned_subwords:
                self.banned_subwords_automaton.add_word(word, len(self.banned_subwords_automaton))
            self.banned_subwords_automaton.make_automaton()
            self._downloaded = True

    return OfflineURLFilter


def build_heuristic(key: str, section, tokenizer):
    """The datatrove filter for one heuristic config section (``key`` names it)."""
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    p = section.model_dump(exclude={"enabled"})
    if key == "url":
        lists = {k: p[k] or None for k in ("extra_domains", "extra_urls", "banned_words", "banned_subwords",
                                           "soft_banned_words")}
        return _url_cls()(**lists, soft_word_threshold=p["soft_word_threshold"],
                          use_integrated_lists=p["use_integrated_lists"])
    if key == "gopher_repetition":
        p["top_n_grams"], p["dup_n_grams"] = tuple(map(tuple, p["top_n_grams"])), tuple(map(tuple, p["dup_n_grams"]))
        return GopherRepetitionFilter(**p, language=tokenizer)
    if key == "gopher_quality":
        return GopherQualityFilter(**p, language=tokenizer)
    if key == "c4_quality":
        return _c4_cls()(**p, language=tokenizer)
    if key == "fineweb_quality":
        return FineWebQualityFilter(**p, language=tokenizer)
    raise KeyError(key)


def sample_key(doc_id: str) -> int:
    """Sample order: the documents with the smallest keys are sampled (independent of tasks and order)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")


def _chain_cls():
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.filters.base_filter import get_filter_result

    class FilterChain(PipelineStep):
        """Runs ``filters`` ([(key, filter)], in order) on each document; ``per_domain`` maps a domain to its
        own list (same keys; None = that filter off for the domain). A document is removed by the first filter
        that drops it. Stats per filter key: ``<key>/dropped``, ``<key>/reason/<reason>``, ``<key>/words``,
        ``<key>/bytes``, ``<key>/seconds``, ``<key>/bytes_cut`` (lines a keeping filter removed: C4 with
        ``remove_lines``); ``documents`` in, ``domain_overridden`` documents. Removed samples of
        task ``rank`` go to ``samples_folder/<rank>.jsonl`` (see ``merge_samples``); with ``redact_heads`` their
        first lines have every PII kind replaced by its placeholder (``stages.filter.pii.redact``, all kinds on)."""

        name = "🔻 filter chain"
        type = "🔻 - FILTER"

        def __init__(self, filters, per_domain=None, samples_folder=None, samples_per_filter: int = 20,
                     sample_lines: int = 5, sample_chars: int = 600, redact_heads: bool = True):
            super().__init__()
            self.redact_heads = redact_heads
            self.filters, self.per_domain = filters, per_domain or {}
            self.samples_folder, self.samples_per_filter = samples_folder, samples_per_filter
            self.sample_lines, self.sample_chars = sample_lines, sample_chars

        def _filters_for(self, domain: str, memo: dict):
            if domain not in memo:
                chosen, d = None, domain
                while d and chosen is None:  # the domain itself, then its parent domains
                    chosen = self.per_domain.get(d)
                    d = d.split(".", 1)[1] if "." in d else ""
                memo[domain] = (chosen or self.filters, chosen is not None)
            return memo[domain]

        def _sample(self, key, reason, doc, words, nbytes) -> dict:
            md = doc.metadata
            head = "\n".join(doc.text.splitlines()[: self.sample_lines])[: self.sample_chars]
            if self.redact_heads:  # removed documents never reach the PII step: no personal data in the artifact
                from stages.filter.pii import PIIConfig, redact

                head = redact(head, PIIConfig())[0]
            return {"filter": key, "reason": reason, "id": doc.id, "url": md.get("url"), "domain": md.get("domain"),
                    "language": md.get("language"), "words": words, "bytes": nbytes, "head": head}

        def run(self, data, rank: int = 0, world_size: int = 1):
            heaps: dict[str, list] = {}
            memo: dict = {}
            seq = itertools.count()
            n = self.samples_per_filter
            for doc in data:
                self.stat_update("documents")
                chain, overridden = self._filters_for((doc.metadata.get("domain") or "").lower(), memo)
                if overridden:
                    self.stat_update("domain_overridden")
                for key, f in chain:
                    if f is None:
                        continue
                    t0, before = time.perf_counter(), doc.text
                    keep, reason = get_filter_result(f.filter(doc))
                    self.stat_update(f"{key}/seconds", value=time.perf_counter() - t0)
                    if keep:
                        if doc.text is not before:  # C4 with remove_lines: count the bytes it cut
                            self.stat_update(f"{key}/bytes_cut", value=len(before.encode()) - len(doc.text.encode()))
                        continue
                    reason = reason or "dropped"
                    words, nbytes = len(doc.text.split()), len(doc.text.encode("utf-8"))
                    self.stat_update(f"{key}/dropped", f"{key}/reason/{reason}")
                    self.stat_update(f"{key}/words", value=words)
                    self.stat_update(f"{key}/bytes", value=nbytes)
                    if n > 0:
                        heap = heaps.setdefault(key, [])
                        item = (-sample_key(doc.id), doc.id)
                        if len(heap) < n or item > heap[0][:2]:
                            entry = (*item, next(seq), self._sample(key, reason, doc, words, nbytes))
                            (heapq.heappush if len(heap) < n else heapq.heapreplace)(heap, entry)
                    break
                else:
                    yield doc
            if self.samples_folder is not None and heaps:
                rows = [e[-1] for key in heaps for e in heaps[key]]
                with self.samples_folder.open(f"{rank:05d}.jsonl", "w") as fh:
                    fh.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)

    return FilterChain


def merge_samples(task_files: list[bytes], order: list[str], per_filter: int) -> bytes:
    """The removed-samples artifact (JSONL, gzip with mtime 0) from the tasks' sample files: per filter (in
    chain ``order``) the ``per_filter`` removed documents with the smallest ``sample_key(id)``. The same
    documents and bytes for any number of tasks or workers."""
    import gzip

    by_filter: dict[str, dict[str, dict]] = {}
    for data in task_files:
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                by_filter.setdefault(r["filter"], {})[r["id"]] = r
    out = []
    for key in order:
        rows = sorted(by_filter.get(key, {}).values(), key=lambda r: (sample_key(r["id"]), r["id"]))[:per_filter]
        out.extend(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    return gzip.compress("".join(out).encode("utf-8"), mtime=0)
