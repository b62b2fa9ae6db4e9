"""Main-text extraction: quality on the article-extraction benchmark, speed on the sample crawl.

Quality: the 181 pages of ../shared/data/extraction-benchmark (scrapinghub/article-extraction-benchmark),
scored as that benchmark's ``evaluate.py`` does (github.com/scrapinghub/article-extraction-benchmark,
evaluate.py: ``_tokenize``, ``_ngrams``, ``string_shingle_matching``, ``precision_score``, ``recall_score``,
``metrics_from_tp_fp_fns``), followed here line for line:
- tokens are ``re.findall(r"\\w+", text)`` (Unicode), compared as 4-token shingles (a text shorter than 4
  tokens is one shorter shingle, an empty one none), with multiplicity (Counter);
- per page, TP/FP/FN are the shingle count overlaps, normalised to sum 1 so long pages weigh no more;
- precision is the mean over pages with TP+FP > 0, recall the mean over pages with TP+FN > 0 (1 when
  FP = FN = 0, 0 when TP = FP = 0 / TP = FN = 0); F1 is the harmonic mean of those two means (not a mean of
  per-page F1s). The ± printed is its bootstrap standard deviation (1000 resamples, fixed seed here).
A missing or failed extraction counts as empty text (evaluate.py's ``.get('articleBody', '')``).

Speed: single process, extractors called in-process through ``stages.ingest.extract.extract_text`` (the exact
code path of the ingest block, cap and fallback included) on the benchmark pages and on the HTML pages of
the sample crawl (../shared/data/crawl, read straight from the WARCs). ``f1_per_s`` = benchmark F1 x crawl
pages/s: quality-weighted throughput on the workload we run. Options come from configs/tiny.yaml.
Set KILN_BENCH_CRAWL_EVERY=n to time trafilatura on every n-th crawl page only (default 1: all pages).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
BENCH = SHARED / "extraction-benchmark"
CRAWL = SHARED / "crawl"

# ---------------------------------------------------------------------------------------------------------
# scoring, as in article-extraction-benchmark/evaluate.py

_TOKEN_RE = re.compile(r"\w+", re.UNICODE | re.MULTILINE | re.IGNORECASE | re.DOTALL)


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text or "")


def shingles(text: str, n: int = 4) -> Counter:
    tokens = tokenize(text)
    return Counter(tuple(tokens[i:i + n]) for i in range(max(1, len(tokens) - n + 1)) if tokens[i:i + n])


def tp_fp_fn(true: str, pred: str) -> tuple[float, float, float]:
    """Shingle overlap of one page, normalised to sum 1 (evaluate.py's ``string_shingle_matching``)."""
    t, p = shingles(true), shingles(pred)
    tp = fp = fn = 0.0
    for key in set(t) | set(p):
        tc, pc = t.get(key, 0), p.get(key, 0)
        tp += min(tc, pc)
        fp += max(0, pc - tc)
        fn += max(0, tc - pc)
    s = tp + fp + fn
    return (tp / s, fp / s, fn / s) if s > 0 else (tp, fp, fn)


def _precision(tp, fp, fn):
    return 1.0 if fp == fn == 0 else 0.0 if tp == fp == 0 else tp / (tp + fp)


def _recall(tp, fp, fn):
    return 1.0 if fp == fn == 0 else 0.0 if tp == fn == 0 else tp / (tp + fn)


def metrics(rows: list[tuple[float, float, float]]) -> dict[str, float]:
    precision = statistics.mean(_precision(*r) for r in rows if r[0] + r[1] > 0)
    recall = statistics.mean(_recall(*r) for r in rows if r[0] + r[2] > 0)
    return {"f1": 2 * precision * recall / (precision + recall), "precision": precision, "recall": recall}


def evaluate(ground_truth: dict, predicted: dict[str, str], n_bootstrap: int = 1000) -> dict[str, float]:
    rows = [tp_fp_fn(ground_truth[k].get("articleBody", ""), predicted.get(k, "")) for k in ground_truth]
    out = metrics(rows)
    rng = random.Random(0)
    f1s = [metrics([rows[rng.randrange(len(rows))] for _ in rows])["f1"] for _ in range(n_bootstrap)]
    return out | {"f1_std": statistics.stdev(f1s)}


# ---------------------------------------------------------------------------------------------------------
# inputs

def benchmark_pages() -> tuple[dict, dict[str, str]]:
    """(ground truth, {key: html}) of the extraction benchmark (pages are UTF-8, as its own runners read them)."""
    gt = json.loads((BENCH / "ground-truth.json").read_text(encoding="utf8"))
    html = {p.name.split(".")[0]: gzip.open(p, "rt", encoding="utf8").read()
            for p in sorted((BENCH / "html").glob("*.html.gz"))}
    return gt, {k: html[k] for k in gt}


def crawl_pages() -> list[tuple[str, str]]:
    """(url, html) of every HTTP 200 HTML response of the sample crawl, in file order."""
    from warcio.archiveiterator import ArchiveIterator

    pages = []
    for path in sorted(CRAWL.glob("*.warc.gz")):
        with open(path, "rb") as fh:
            for rec in ArchiveIterator(fh):
                if rec.rec_type != "response" or rec.http_headers is None:
                    continue
                if rec.http_headers.get_statuscode() != "200" or "html" not in (
                        rec.http_headers.get_header("Content-Type") or ""):
                    continue
                pages.append((rec.rec_headers.get_header("WARC-Target-URI"),
                              rec.content_stream().read().decode("utf-8", "replace")))
    return pages


def extractor_configs() -> dict:
    """{name: ExtractConfig}: the tiny profile's ingest.extract with each extractor."""
    from stages.core.config import load_config

    base = load_config(REPO / "configs" / "tiny.yaml").ingest.extract
    return {name: base.model_copy(update={"extractor": name}) for name in ("trafilatura", "resiliparse")}


def timed(pages: list[str], cfg) -> tuple[list[str], Counter, float]:
    from stages.ingest.extract import extract_text

    outcomes, texts = Counter(), []
    t0 = time.perf_counter()
    for html in pages:
        outcome, text = extract_text(html, cfg)
        outcomes[outcome] += 1
        texts.append(text)
    return texts, outcomes, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------

def run() -> dict:
    from stages.ingest.extract import over_cap

    gt, bench_html = benchmark_pages()
    crawl = crawl_pages()
    every = max(1, int(os.environ.get("KILN_BENCH_CRAWL_EVERY", "1")))
    crawl_html = [h for _, h in crawl]
    crawl_mb = sum(len(h.encode()) for h in crawl_html) / 1e6
    cfgs = extractor_configs()
    figures: dict = {}
    for name, cfg in cfgs.items():
        texts, _, secs = timed(list(bench_html.values()), cfg)
        m = evaluate(gt, dict(zip(bench_html, texts)))
        sample = crawl_html[::every] if name == "trafilatura" else crawl_html
        ctexts, outcomes, csecs = timed(sample, cfg)
        mb = sum(len(h.encode()) for h in sample) / 1e6
        text_mb = sum(len(t.encode()) for t in ctexts) / 1e6
        pps = len(sample) / csecs
        print(f"{name:<12} F1={m['f1']:.3f} ± {m['f1_std']:.3f}  precision={m['precision']:.3f}  "
              f"recall={m['recall']:.3f}  benchmark {len(bench_html) / secs:.1f} pages/s  "
              f"crawl {pps:.1f} pages/s {mb / csecs:.2f} MB/s ({len(sample)} pages, {dict(outcomes)}, "
              f"{text_mb:.1f} MB of text)", flush=True)
        what = f"{name}, tiny profile options"
        figures |= {
            f"extract.{name}.f1": {"value": round(m["f1"], 4), "unit": "", "what": f"{what}: F1, article benchmark"},
            f"extract.{name}.precision": {"value": round(m["precision"], 4), "unit": "",
                                          "what": f"{what}: precision, article benchmark"},
            f"extract.{name}.recall": {"value": round(m["recall"], 4), "unit": "",
                                       "what": f"{what}: recall, article benchmark"},
            f"extract.{name}.bench_pages_per_s": {"value": round(len(bench_html) / secs, 1), "unit": "pages/s",
                                                  "what": f"{what}: article benchmark, 1 process"},
            f"extract.{name}.crawl_pages_per_s": {"value": round(pps, 1), "unit": "pages/s",
                                                  "what": f"{what}: sample crawl HTML, 1 process"},
            f"extract.{name}.crawl_mb_per_s": {"value": round(mb / csecs, 2), "unit": "MB/s",
                                               "what": f"{what}: sample crawl HTML, 1 process"},
            f"extract.{name}.crawl_empty": {"value": outcomes["extract_empty"], "unit": "pages",
                                            "what": f"{what}: sample crawl pages without main text (of {len(sample)})"},
            f"extract.{name}.crawl_text_mb": {"value": round(text_mb, 2), "unit": "MB",
                                              "what": f"{what}: main text from the sample crawl ({mb:.0f} MB HTML)"},
            f"extract.{name}.f1_per_s": {"value": round(m["f1"] * pps, 1), "unit": "F1 x pages/s",
                                         "what": f"{what}: benchmark F1 x crawl pages/s"},
        }
    cap = cfgs["trafilatura"]
    n_over = sum(over_cap(h, cap) for h in crawl_html)
    print(f"cap (max_html_bytes={cap.max_html_bytes:,}, max_tags={cap.max_tags:,}): {n_over} of {len(crawl_html)} "
          f"crawl pages ({crawl_mb:.1f} MB) go to resiliparse instead of trafilatura", flush=True)
    figures["extract.cap.crawl_pages_over"] = {
        "value": n_over, "unit": "pages", "what": f"sample crawl pages over the trafilatura cap (of {len(crawl_html)})"}
    return figures


if __name__ == "__main__":
    for k, v in run().items():
        print(k, v["value"], v["unit"])
