"""filter on real documents: each filter removes the page it should with its own reason, removals add up and are
sampled deterministically, per-domain thresholds, languages of a real Common Crawl WARC, PII is redacted."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from conftest import SHARED, load_tiny, real_docs, seed_stage
from stages.core.config import ConfigError
from stages.core.runner import StageError, run_stage
from stages.filter.pii import KINDS, PIIConfig, find_pii
from test_normalize import stage_docs

# tasks run in this process (no worker start-up cost); the quality classifier only where a test names it
FAST = {"run.workers": 1, "filter.quality.enabled": False}
FILTERS = ("language", "url", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")
ONLY = {f"filter.{k}.enabled": False for k in FILTERS}  # all filters off: switch one back on
WARC = SHARED / "warc" / "warcfile.warc.gz"


@pytest.fixture(scope="module")
def docs():
    d = real_docs(181)
    para = max(d[0]["text"].split("\n"), key=len)
    spam = dict(d[0], id="repeated-paragraph", text="\n\n".join([para] * 12))  # a real paragraph, 12 times
    return d + [spam]


def by_prefix(docs, prefix):
    return next(d for d in docs if d["id"].startswith(prefix))


def samples(storage, run_id="run1") -> list[dict]:
    from stages.core.storage import Storage

    data = Storage(str(storage)).sub(run_id, "filter").read_bytes("removed_samples.jsonl.gz")
    return [json.loads(line) for line in gzip.decompress(data).decode().splitlines()]


@pytest.fixture(scope="module")
def cc_pages(tmp_path_factory):
    """ingest + normalize of a real Common Crawl WARC (16 pages from 15 hosts)."""
    store = tmp_path_factory.mktemp("cc")
    cfg = load_tiny(None, {**FAST, "ingest.inputs": [str(WARC)]})
    for stage in ("ingest", "normalize"):
        run_stage(stage, cfg, str(store), "cc")
    return store, stage_docs(str(store), "normalize", run_id="cc")


@pytest.fixture(scope="module")
def python_pages(tmp_path_factory):
    """ingest + normalize of a real docs.python.org WARC of the sample crawl ("What's New" pages)."""
    store = tmp_path_factory.mktemp("py")
    cfg = load_tiny(None, {**FAST, "ingest.inputs": [str(SHARED / "crawl" / "docs.python.org-0002.warc.gz")]})
    for stage in ("ingest", "normalize"):
        run_stage(stage, cfg, str(store), "py")
    return stage_docs(str(store), "normalize", run_id="py")


# Language truth per page of warcfile.warc.gz, read from the pages themselves: Chinese gambling/porn/company
# pages, a Russian fire-safety company, an English page of a Chinese trading company, two German cycling
# statistics pages (one a database error plus German field names), a Dutch gardener.
CC_LANGUAGES = {
    "http://003338.cn/l41/481397.html": "zh", "http://01spb.ru/company/": "ru",
    "http://035.psb556.com/24/i/u_1090813/article.html": "zh", "http://037426.cn/": "en",
    "http://041696.com/15477/list_6_4.html": "zh", "http://044545.com/topic/20200207/015849.html": "zh",
    "http://0513mt.com/index.php/art/detail/id/8884.html": "zh", "http://05925.net/index.php/vod/type/id/53.html": "zh",
    "http://06.live-radsport.ch/fahrerstatistik_801/Anthony_Ravard.html": "de",
    "http://06.live-radsport.ch/tippspiel/stats_140_petzi.html": "de",
    "http://0615235.com/02mjqjo%7Bibotij2.btq?odmbtt=106&tdmbtt=121": "zh",
    "http://0755krk.com/76104/list_4_1.html": "zh",
    "http://0760.jxtdw.com/area/sanxiang/": "zh", "http://077678u.info/erxiaoshujinguang/list_6_2.html": "zh",
    "http://0900-hovenier.nl/gelderland/oosterbeek/": "nl", "http://096355.com/video/11073.html?11073-0-2": "zh",
}


def test_languages_of_a_common_crawl_warc(cc_pages, tmp_path):
    store, pages = cc_pages
    assert {d["metadata"]["url"]: d["metadata"]["language"] for d in pages} == CC_LANGUAGES
    # keep zh + de at FineWeb's threshold: exactly the zh/de pages scoring >= 0.65 survive
    seed_stage(str(tmp_path), "run1", "dedup", pages)
    cfg = load_tiny(tmp_path, {**FAST, **ONLY, "filter.language.enabled": True, "filter.pii.enabled": False,
                               "filter.language.languages": ["zh", "de"]})
    m = run_stage("filter", cfg, str(tmp_path), "run1")
    want = {d["id"] for d in pages if d["metadata"]["language"] in ("zh", "de")
            and d["metadata"]["language_score"] >= 0.65}
    low = [d for d in pages if d["metadata"]["language"] == "zh" and d["metadata"]["language_score"] < 0.65]
    assert {d["id"] for d in stage_docs(str(tmp_path), "filter")} == want and len(want) == 11 and len(low) == 2
    assert m["metrics"]["reasons"]["language"] == {"lang_en": 1, "lang_nl": 1, "lang_ru": 1, "low_score": 2}
    # without normalize's tags the filter identifies the language itself: same decisions
    untagged = [dict(d, metadata={k: v for k, v in d["metadata"].items() if not k.startswith("language")})
                for d in pages]
    seed_stage(str(tmp_path), "run2", "dedup", untagged)
    m2 = run_stage("filter", cfg, str(tmp_path), "run2")
    assert {d["id"] for d in stage_docs(str(tmp_path), "filter", run_id="run2")} == want
    assert m2["metrics"]["reasons"] == m["metrics"]["reasons"]


def _one_filter(tmp_path, key, seeded, extra=None):
    """Run the stage on ``seeded`` with only filter ``key``, at its web defaults (FineWeb's settings)."""
    seed_stage(str(tmp_path), "run1", "dedup", seeded)
    cfg = load_tiny(tmp_path, {**FAST, "filter": {}, **ONLY, f"filter.{key}.enabled": True, "filter.pii.enabled": False,
                               **(extra or {})})
    return run_stage("filter", cfg, str(tmp_path), "run1")


# (filter, page it removes, its reason, why): real article bodies of the extraction benchmark
REMOVES = [
    ("gopher_repetition", "e7d77f18", "dup_para_frac", "bgr.com deals: 'Buy Now' x10, 'Available from Amazon' x9"),
    ("gopher_quality", "7ab16ade", "gopher_too_many_end_ellipsis", "wsj.com paywall teaser cut with '...'"),
    ("c4_quality", "34a73285", "too_few_sentences", "linknaija.com photo post: 4 sentences and 'See more photos:'"),
    ("fineweb_quality", "5fbc7ccb", "char_dup_ratio", "zdnet.com gadget list: 'See it now: Amazon' x7"),
    ("language", "ff0f958a", "lang_ru", "vse-diety.com: a Russian diet article"),
]
KEEPS = "04a6711c"  # nytimes.com opinion column: prose every filter keeps


@pytest.mark.parametrize("key,drop,reason,why", REMOVES, ids=[r[0] for r in REMOVES])
def test_each_filter_removes_a_real_page_with_its_reason(tmp_path, docs, key, drop, reason, why):
    bad, good = by_prefix(docs, drop), by_prefix(docs, KEEPS)
    m = _one_filter(tmp_path, key, [bad, good])
    assert m["counts"]["removed"] == {key: 1} and m["metrics"]["reasons"][key] == {reason: 1}
    assert [d["id"] for d in stage_docs(str(tmp_path), "filter")] == [good["id"]]
    (s,) = samples(tmp_path)  # the user sees why: url, the filter's reason, the first lines
    assert (s["id"], s["url"], s["filter"], s["reason"]) == (bad["id"], bad["metadata"]["url"], key, reason)
    assert s["head"] and bad["text"].startswith(s["head"].split("\n")[0])


def test_gopher_quality_removes_code_heavy_docs_page(tmp_path, python_pages):
    """What the issue reports: Gopher's 80%-alphabetic-words rule removes code-heavy documentation."""
    by_url = {d["metadata"]["url"].rsplit("/", 1)[1]: d for d in python_pages}
    m = _one_filter(tmp_path, "gopher_quality", [by_url["3.7.html"], by_url["3.4.html"]])
    assert m["metrics"]["reasons"]["gopher_quality"] == {"gopher_below_alpha_threshold": 1}
    kept = [d["metadata"]["url"] for d in stage_docs(str(tmp_path), "filter")]
    assert kept == [by_url["3.4.html"]["metadata"]["url"]]


def test_url_filter_blocklists_ship_offline(tmp_path, docs, cc_pages):
    import itertools

    from stages.filter.heuristics import integrated_url_lists, url_lists_folder

    lists = integrated_url_lists()  # from the datatrove wheel, no network
    assert len(lists["domains"]) == 4_558_940 and len(lists["banned_words"]) > 100  # no two domains share a hash
    with open(f"{url_lists_folder()}/domains") as f:
        head = [line.strip() for line in itertools.islice(f, 2000) if not line.startswith("#")]
    assert all(d in lists["domains"] for d in head)  # listed domains are found ...
    hosts = {d["metadata"]["domain"] for d in docs} | {d["metadata"]["domain"] for d in cc_pages[1]}
    assert not any(h in lists["domains"] for h in hosts)  # ... the news, docs and CC hosts are not listed
    blocked_domain = head[0]  # a real entry of the shipped domain list
    good = by_prefix(docs, KEEPS)
    bad = dict(good, id="listed", metadata={**good["metadata"], "url": f"https://{blocked_domain}/news/1.html"})
    word = dict(good, id="word", text="Write to jane.roe@nytimes.com or 93.184.216.34\n" + good["text"],
                metadata={**good["metadata"], "url": f"https://www.example.org/{min(lists['banned_words'])}/1.html"})
    # a crawl's own spam host: the CC porn page that the shipped lists miss, added with url.extra_domains
    spam = next(d for d in cc_pages[1] if d["metadata"]["domain"] == "0513mt.com")
    m = _one_filter(tmp_path, "url", [bad, word, spam, good], {"filter.url.extra_domains": ["0513mt.com"]})
    assert m["counts"]["removed"] == {"url": 3}
    assert m["metrics"]["reasons"]["url"] == {"domain": 2, "hard_blacklisted": 1}
    assert [d["id"] for d in stage_docs(str(tmp_path), "filter")] == [good["id"]]
    head = next(r["head"] for r in samples(tmp_path) if r["id"] == "word")  # no addresses in the artifact
    assert head.startswith("Write to <EMAIL> or <IP_ADDRESS>\n") and "jane.roe" not in head


def test_removals_add_up_and_survivors_pass(tmp_path, docs):
    from datatrove.data import Document

    from stages.filter import Config, build_filters

    seed_stage(str(tmp_path), "run1", "dedup", docs)
    cfg = load_tiny(tmp_path, FAST)
    m = run_stage("filter", cfg, str(tmp_path), "run1")
    c = m["counts"]
    assert list(c["removed"]) == list(FILTERS)
    assert c["documents_in"] == len(docs) == c["documents_out"] + sum(c["removed"].values())
    assert 0 < c["documents_out"] < len(docs) and c["removed"]["gopher_repetition"] >= 1
    assert c["removed"]["language"] >= 10  # the benchmark has pt/ru/de/ko/ja/it/id articles
    assert c["removed_reasons"] == m["metrics"]["reasons"]
    for k, n in c["removed"].items():  # reasons add up to the removals of each filter
        assert sum(c["removed_reasons"][k].values()) == n
    out = stage_docs(str(tmp_path), "filter")
    kept = {d["id"] for d in out}
    assert "repeated-paragraph" not in kept
    gone = [d for d in docs if d["id"] not in kept]
    assert sum(c["removed_bytes"].values()) == sum(len(d["text"].encode()) for d in gone)
    assert sum(c["removed_words"].values()) == sum(len(d["text"].split()) for d in gone)
    assert c["removed_tokens_est"] == {k: round(v / 4) for k, v in c["removed_bytes"].items()}
    by_id = {d["id"]: d for d in docs}
    filters = build_filters(Config.model_validate(cfg.filter.model_dump()))
    for d in out:  # every survivor passes every configured filter again; C4 did not cut lines from it
        if not find_pii(by_id[d["id"]]["text"], PIIConfig()):
            assert d["text"] == by_id[d["id"]]["text"]
        for key, f in filters:
            res = f.filter(Document(text=by_id[d["id"]]["text"], id=d["id"], metadata=dict(d["metadata"])))
            assert (res if isinstance(res, bool) else res[0]), (key, d["id"])


def test_removed_samples_do_not_depend_on_tasks_or_workers(tmp_path, docs):
    """Split over 3 input files; 1 task, 3 tasks and 2 worker processes give the same artifact bytes."""
    parts = [docs[i::3] for i in range(3)]
    extra = {f"data/0000{i}.jsonl.gz": gzip.compress("".join(json.dumps(d) + "\n" for d in p).encode(), mtime=0)
             for i, p in enumerate(parts[1:], 1)}
    seed_stage(str(tmp_path), "run1", "dedup", parts[0], extra_files=extra)
    n = 3
    base = {"filter.url.enabled": False, "filter.samples_per_filter": n,  # no 4.6 s blocklist load per worker
            "filter.quality.enabled": False}
    artifacts = {}
    for tasks, workers in ((1, 1), (3, 1), (2, 2)):
        m = run_stage("filter", load_tiny(tmp_path, {**base, "run.tasks": tasks, "run.workers": workers}),
                      str(tmp_path), "run1", force=True)
        artifacts[(tasks, workers)] = (tmp_path / "run1" / "filter" / "removed_samples.jsonl.gz").read_bytes()
        assert "removed_samples.jsonl.gz" in {o["path"] for o in m["outputs"]}
        assert not (tmp_path / "run1" / "filter" / "removed_samples_tasks").exists()
    assert len(set(artifacts.values())) == 1
    from stages.filter.heuristics import sample_key

    rows = samples(tmp_path)
    kept = {d["id"] for d in stage_docs(str(tmp_path), "filter")}
    removed = {k: v for k, v in m["counts"]["removed"].items() if v}
    assert [r["filter"] for r in rows] == [k for k in removed for _ in range(min(n, removed[k]))]
    for k in removed:  # the n removed documents with the smallest hash(id) of each filter
        ids = [r["id"] for r in rows if r["filter"] == k]
        assert ids == sorted(ids, key=sample_key) and not set(ids) & kept
    assert all(r["reason"] in m["metrics"]["reasons"][r["filter"]] and r["url"] and r["head"] for r in rows)
    gone_smallest = sorted((d["id"] for d in docs if d["id"] not in kept), key=sample_key)[0]
    assert gone_smallest in {r["id"] for r in rows}


def test_per_domain_overrides_change_only_that_domain(tmp_path, docs, python_pages):
    pages = python_pages + [d for d in docs if d["id"].startswith(("04a6711c", "e7d77f18", "7ab16ade", "5fbc7ccb"))]
    seed_stage(str(tmp_path), "run1", "dedup", pages)
    storage = str(tmp_path)
    base = {**FAST, "filter": {}, "filter.url.enabled": False}  # web defaults
    plain = run_stage("filter", load_tiny(tmp_path, base), storage, "run1")
    kept_plain = {d["id"] for d in stage_docs(storage, "filter")}
    loose = {"docs.python.org": {"gopher_quality": {"max_non_alpha_words_ratio": 0.6},
                                 "c4_quality": {"filter_curly_bracket": False},
                                 "fineweb_quality": {"char_duplicates_ratio": 0.1}}}
    tuned = run_stage("filter", load_tiny(tmp_path, {**base, "filter.per_domain": loose}), storage, "run1")
    kept_tuned = {d["id"] for d in stage_docs(storage, "filter")}
    python_ids = {d["id"] for d in python_pages}
    assert kept_plain - kept_tuned == set()
    assert kept_tuned - kept_plain and (kept_tuned - kept_plain) <= python_ids  # only docs.python.org pages gained
    assert kept_plain - python_ids == kept_tuned - python_ids  # the other domains: identical decisions
    assert tuned["counts"]["domain_overridden"] == len(python_pages) and plain["counts"]["domain_overridden"] == 0
    # a subdomain entry applies to its hosts only; unknown filters / settings are rejected like any config key
    with pytest.raises(ConfigError, match="unknown filter 'gopher'"):
        load_tiny(tmp_path, {"filter.per_domain": {"docs.python.org": {"gopher": {"x": 1}}}})
    with pytest.raises(ConfigError, match="max_non_alpha"):
        load_tiny(tmp_path, {"filter.per_domain": {"docs.python.org": {"gopher_quality": {"max_non_alpha": 0.6}}}})


def test_one_word_split_per_document_and_datatrove_decisions(docs, python_pages):
    """The chain splits each document into words once for all filters, and decides exactly as datatrove's
    filters do when each runs alone with its own tokenizer (no shared cache)."""
    from datatrove.data import Document

    from stages.filter import Config, build_filters
    from stages.filter.heuristics import _chain_cls, fast_word_tokenizer, shared_word_tokenizer

    tok = shared_word_tokenizer("regex")
    calls = []
    real_split = tok.inner.word_tokenize
    tok.inner.word_tokenize = lambda text: calls.append(text) or real_split(text)
    cfg = Config(url={"enabled": False}, language={"enabled": False})
    pages = docs[:60] + python_pages
    chain = _chain_cls()(build_filters(cfg, tokenizer=tok), samples_folder=None)
    kept = [d.id for d in chain.run(Document(text=d["text"], id=d["id"], metadata=dict(d["metadata"])) for d in pages)]
    reached = chain.stats["gopher_repetition/seconds"].n
    assert len(calls) == len(set(calls)) and 0 < len(calls) <= reached  # one split per document at most
    from stages.filter.heuristics import build_heuristic

    separate = [build_heuristic(k, getattr(cfg, k), fast_word_tokenizer()) for k, _ in build_filters(cfg)]
    alone = [d["id"] for d in pages  # each filter with its own tokenizer: nothing shared
             if all((lambda r: r if isinstance(r, bool) else r[0])(f.filter(Document(text=d["text"], id=d["id"])))
                    for f in separate)]
    assert kept == alone and 0 < len(kept) < len(pages)


def test_switching_a_filter_off(tmp_path, docs):
    seed_stage(str(tmp_path), "run1", "dedup", docs)
    storage = str(tmp_path)
    on = run_stage("filter", load_tiny(tmp_path, FAST), storage, "run1")["counts"]
    off = run_stage("filter", load_tiny(tmp_path, {**FAST, "filter.gopher_quality.enabled": False}),
                    storage, "run1")["counts"]
    assert "gopher_quality" in on["removed"] and "gopher_quality" not in off["removed"]
    assert off["documents_out"] >= on["documents_out"]
    assert off["documents_in"] == off["documents_out"] + sum(off["removed"].values())


def test_emails_and_public_ips_redacted(tmp_path, docs):
    email = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
    real = [d for d in docs if email.search(d["text"])]
    assert len(real) == 4  # real articles that print contact addresses
    with_ip = dict(docs[10], id="with-ips", text=docs[10]["text"] + "\nServer 93.184.216.34 (LAN 192.168.1.20).")
    seed_stage(str(tmp_path), "run1", "dedup", real + [with_ip])
    m = run_stage("filter", load_tiny(tmp_path, {**FAST, **ONLY}), str(tmp_path), "run1")
    assert m["counts"]["removed"] == {} and m["counts"]["documents_out"] == len(real) + 1
    red = m["counts"]["redacted"]
    n_emails = sum(len(email.findall(d["text"])) for d in real)
    assert red["documents"] == len(real) + 1 and red["email"] == n_emails and red["ip"] == 1
    assert set(red) == {"documents", *KINDS}
    out = {d["id"]: d["text"] for d in stage_docs(str(tmp_path), "filter")}
    for d in real:
        addresses = email.findall(d["text"])
        assert addresses and not any(a in out[d["id"]] for a in addresses)
        assert out[d["id"]].count("<EMAIL>") == len(addresses)
    assert "93.184.216.34" not in out["with-ips"] and "<IP_ADDRESS>" in out["with-ips"]
    assert "192.168.1.20" in out["with-ips"]  # private: not personal data


def test_too_few_survivors_names_the_filter(tmp_path, docs):
    seed_stage(str(tmp_path), "run1", "dedup", docs[:40])
    cfg = load_tiny(tmp_path, {**FAST, "filter.min_documents_out": 10_000})
    with pytest.raises(StageError, match=r"filter kept \d+ of 40 documents .*loosen filter\.\w+"):
        run_stage("filter", cfg, str(tmp_path), "run1")


def test_normalize_dedup_filter_on_s3(s3_bucket, docs):
    """The three stages read and write datatrove JSONL in S3 (moto_server); the exact copy is removed."""
    store = s3_bucket + "/artifacts"
    seed_stage(store, "run1", "ingest", docs[:30] + [dict(docs[5], id="copy")])
    cfg = load_tiny(None, FAST)
    counts = {s: run_stage(s, cfg, store, "run1")["counts"] for s in ("normalize", "dedup", "filter")}
    assert counts["normalize"]["documents_out"] == 31
    assert counts["dedup"]["removed"]["exact"] == 1 and counts["dedup"]["documents_out"] == 30
    f = counts["filter"]
    assert f["documents_in"] == 30 == f["documents_out"] + sum(f["removed"].values())
    out = stage_docs(store, "filter")
    assert len(out) == f["documents_out"] > 0 and "copy" not in {d["id"] for d in out}
    rows = samples(store)  # the samples artifact is written to S3 too
    assert len(rows) == min(sum(f["removed"].values()), 20 * len([v for v in f["removed"].values() if v]))


def test_bytes_add_up_with_c4_line_removal(tmp_path, docs):
    """C4 with remove_lines cuts lines from the documents it keeps: bytes in = out + removed + cut."""
    seed_stage(str(tmp_path), "run1", "dedup", docs)
    m = run_stage("filter", load_tiny(tmp_path, {**FAST, "filter.c4_quality.remove_lines": True,
                                                 "filter.pii.enabled": False}), str(tmp_path), "run1")
    c, cut = m["counts"], m["metrics"]["bytes_cut"]
    assert set(cut) == {"c4_quality"} and cut["c4_quality"] > 0
    bytes_in = sum(len(d["text"].encode()) for d in docs)
    assert bytes_in == c["bytes_out"] + sum(c["removed_bytes"].values()) + cut["c4_quality"]


def test_quality_run_outputs_are_byte_identical_across_runs(tmp_path, docs, python_pages):
    """The filter with the quality classifier on, twice on the same real documents (the benchmark articles, which
    are the classifier's positives, and docs.python.org pages, its negatives): every output (data,
    removed samples, quality/model.bin, quality/report.json) has the same bytes; the report holds no wall-clock
    time, the fastText training and scoring seconds are the manifest's metrics.quality_seconds."""
    over = {"run.workers": 1, "filter.url.enabled": False, "filter.quality.enabled": True,
            "filter.quality.keep": "top_percent", "filter.quality.top_percent": 50}
    ms = {}
    for run_id in ("a", "b"):
        seed_stage(str(tmp_path), run_id, "dedup", [*docs, *python_pages])
        ms[run_id] = run_stage("filter", load_tiny(tmp_path, over), str(tmp_path), run_id)
    outs = [[(o["path"], o["bytes"], o["sha256"]) for o in ms[r]["outputs"]] for r in ("a", "b")]
    assert outs[0] == outs[1] and {"quality/report.json", "quality/model.bin"} <= {p for p, _, _ in outs[0]}
    assert ms["a"]["counts"]["removed"]["quality"] > 0

    def keys(obj):
        return [x for k, v in obj.items() for x in (k, *keys(v))] if isinstance(obj, dict) else []

    report = json.loads((tmp_path / "a" / "filter" / "quality" / "report.json").read_text())
    assert "training" in report and not [k for k in keys(report) if "second" in k]
    assert all(ms[r]["metrics"]["quality_seconds"]["train"] > 0 and ms[r]["metrics"]["quality_seconds"]["score"] > 0
               for r in ms)
