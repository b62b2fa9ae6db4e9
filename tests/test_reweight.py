"""reweight: measured mixture (in estimated tokens), sampled to target shares within 1%, epoch cap, temperature,
derived domain keys, deterministic; on real text from three sources."""

import gzip
import json
import re

import numpy as np
import pytest
from conftest import SHARED, load_tiny, real_docs, seed_stage

from stages.core.config import ConfigError
from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage
from stages.reweight import base_id, plan_domain, stable_unit, targets


def mixed_docs(n_news: int = 181, n_shakespeare: int = 200, n_wiki: int = 60) -> list[dict]:
    """Real documents from three domains: news article bodies, Tiny Shakespeare cut at speech breaks into
    ~2 KB documents, and WikiText-2 validation articles."""
    docs = []
    for d in real_docs(n_news):
        d["metadata"]["domain"] = "news"
        docs.append(d)
    speeches = (SHARED / "eval" / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
    buf, i = [], 0
    for sp in speeches:
        if i == n_shakespeare:
            break
        buf.append(sp)
        if sum(map(len, buf)) > 2000:
            docs.append({"text": "\n\n".join(buf), "id": f"shakespeare/{i}",
                         "metadata": {"url": f"https://example.org/tinyshakespeare#{i}", "domain": "shakespeare"}})
            buf, i = [], i + 1
    wiki = (SHARED / "eval" / "wikitext-2" / "valid.txt").read_text()
    for j, art in enumerate(re.split(r"\n(?= = [^=].* = \n)", wiki)[1:n_wiki + 1]):
        title = art.strip().splitlines()[0].strip(" =")
        docs.append({"text": art.strip(), "id": f"wikitext/{j}",
                     "metadata": {"url": f"https://en.wikipedia.org/wiki/{title.replace(' ', '_')}",
                                  "domain": "wikitext"}})
    return docs


def seed_split(root: str, run: str, stage: str, docs: list[dict]) -> dict:
    """Like seed_stage, with the documents spread over two data files (so both tasks have work)."""
    second = "".join(json.dumps(d) + "\n" for d in docs[1::2]).encode()
    return seed_stage(root, run, stage, docs[0::2], extra_files={"data/00001.jsonl.gz": gzip.compress(second, mtime=0)},
                      counts={"documents_in": len(docs), "documents_out": len(docs)})


def read_out(root: str, run: str, stage: str = "reweight") -> list[dict]:
    st = Storage(root).sub(run, stage)
    return [json.loads(line) for rel in st.list("data", suffix=".jsonl.gz")
            for line in gzip.decompress(st.read_bytes(rel)).decode().splitlines()]


FAST = {"run.tasks": 2, "run.workers": 1}


def test_shares_match_target_within_one_percent_and_run_is_deterministic(tmp_path):
    docs = mixed_docs()
    sizes = {"news": 181, "shakespeare": 200, "wikitext": 60}
    assert {d["metadata"]["domain"] for d in docs} == set(sizes) and len(docs) == sum(sizes.values())
    seed_split(str(tmp_path), "a", "filter", docs)
    root = str(tmp_path)
    weights = {"news": 0.5, "wikitext": 3.0}  # shakespeare keeps default_weight 1.0
    cfg = load_tiny(tmp_path, {**FAST, "reweight.weights": weights})
    m = run_stage("reweight", cfg, root, "a")

    nbytes = {dom: sum(len(d["text"].encode()) for d in docs if d["metadata"]["domain"] == dom) for dom in sizes}
    mass = sum(weights.get(dom, 1.0) * b for dom, b in nbytes.items())
    mix = Storage(root).sub("a", "reweight").read_json("mixture.json")
    out = read_out(root, "a")
    out_bytes = sum(len(o["text"].encode()) for o in out)
    for dom, n in sizes.items():
        d = mix["domains"][dom]
        target = weights.get(dom, 1.0) * nbytes[dom] / mass  # P(i) = w_i·|D_i| / Σ w_j·|D_j|, |D| in tokens
        assert d["docs"] == n and d["bytes"] == nbytes[dom] and d["share_target"] == pytest.approx(target, abs=1e-5)
        # the report per domain: documents, bytes, estimated tokens and share, before and after
        assert d["est_tokens"] == round(nbytes[dom] / 4.0) and d["share_before"] == round(nbytes[dom] / sum(nbytes.values()), 6)
        out_dom = [o for o in out if o["metadata"]["domain"] == dom]
        assert d["docs_after"] == len(out_dom) and d["bytes_after"] == sum(len(o["text"].encode()) for o in out_dom)
        assert d["est_tokens_after"] == round(d["bytes_after"] / 4.0)
        assert m["metrics"]["mixture"][dom] == {k: d[k] for k in ("share_before", "share_target", "share_after", "epochs")}
        realised = sum(len(o["text"].encode()) for o in out if o["metadata"]["domain"] == dom) / out_bytes
        assert realised == pytest.approx(d["share_after"], abs=1e-5)
        assert abs(realised - target) < 0.01, (dom, realised, target)  # the 1%
        assert d["epochs"] == pytest.approx(d["bytes_after"] / nbytes[dom], abs=1e-4)
        assert d["epochs"] == pytest.approx(weights.get(dom, 1.0) * sum(nbytes.values()) / mass, rel=0.02)
    assert mix["domains"]["wikitext"]["epochs"] > 1.5 and mix["domains"]["news"]["epochs"] < 0.7
    assert abs(out_bytes - sum(nbytes.values())) < 0.01 * sum(nbytes.values())  # total size stays the input's
    # counts add up; upsampled copies carry distinct ids that point back to their original
    c = m["counts"]
    assert c["documents_in"] == len(docs) and c["documents_out"] == len(out)
    assert c["documents_out"] == c["documents_in"] - c["removed"]["downsampled"] + c["added"]["upsampled"]
    assert c["bytes_out"] == out_bytes
    ids = [o["id"] for o in out]
    assert len(set(ids)) == len(ids)
    copies = [i for i in ids if "#r" in i]
    assert len(copies) == c["added"]["upsampled"] > 30
    assert Storage(root).sub("a", "reweight").list("data") == ["data/00000.jsonl.gz", "data/00001.jsonl.gz"]
    assert all(base_id(i) in set(ids) for i in copies)

    # same input, same seed -> same documents, whatever the task count; another seed -> another sample
    seed_split(root, "b", "filter", docs)
    run_stage("reweight", load_tiny(tmp_path, {"run.tasks": 1, "run.workers": 1, "reweight.weights": weights}), root, "b")
    assert sorted(map(json.dumps, read_out(root, "b"))) == sorted(map(json.dumps, out))
    assert Storage(root).sub("b", "reweight").read_json("mixture.json") == mix
    seed_split(root, "c", "filter", docs)
    run_stage("reweight", load_tiny(tmp_path, {**FAST, "reweight.weights": weights, "run.seed": 99}), root, "c")
    assert sorted(o["id"] for o in read_out(root, "c")) != sorted(ids)


def test_temperature_and_epoch_cap(tmp_path):
    docs = mixed_docs()
    seed_split(str(tmp_path), "t", "filter", docs)
    cfg = load_tiny(tmp_path, {**FAST, "reweight.weights": {}, "reweight.temperature": 3.0, "reweight.max_epochs": 1.2})
    run_stage("reweight", cfg, str(tmp_path), "t")
    mix = Storage(str(tmp_path)).sub("t", "reweight").read_json("mixture.json")
    n = {dom: d["bytes"] for dom, d in mix["domains"].items()}
    raw = {dom: b ** (1 / 3) for dom, b in n.items()}  # p_i ∝ n_i^(1/T)
    for dom, d in mix["domains"].items():
        assert d["share_unconstrained"] == pytest.approx(raw[dom] / sum(raw.values()), abs=1e-5)
        assert d["epochs"] <= 1.2 + 1e-9 and abs(d["share_after"] - d["share_target"]) < 0.01
    small = min(n, key=n.get)  # shakespeare would need 1.5 epochs: capped at 1.2, its excess spread over the others
    assert [dom for dom, d in mix["domains"].items() if d["capped"]] == [small] == ["shakespeare"]
    assert mix["domains"][small]["epochs"] == pytest.approx(1.2, abs=0.01)
    assert mix["domains"][small]["share_target"] < mix["domains"][small]["share_unconstrained"]


def test_targets_water_filling_and_plan_exact():
    p, goal, capped = targets({"a": 100.0, "b": 900.0}, {"a": 9.0, "b": 1.0}, 1.0, 2.0, 1000.0)
    assert p == pytest.approx({"a": 0.5, "b": 0.5}) and capped == {"a"}
    assert goal == pytest.approx({"a": 200.0, "b": 800.0})  # a capped at 2 epochs, b takes the rest
    _, goal, capped = targets({"a": 100.0, "b": 100.0}, {"a": 1.0, "b": 1.0}, 1.0, 1.0, 1000.0)
    assert capped == {"a", "b"} and goal == pytest.approx({"a": 100.0, "b": 100.0})  # all capped: smaller output
    units = np.array([stable_unit("t", i) for i in range(500)])
    sizes = np.array([float(50 + (i * 37) % 400) for i in range(500)])
    for goal_bytes in (0.0, 1234.0, sizes.sum() * 2.37):
        copies, cut = plan_domain(units, sizes, goal_bytes)
        got = copies * sizes.sum() + sizes[units <= cut].sum()
        assert abs(got - goal_bytes) <= sizes.max() / 2  # within half a document of the goal


def test_derived_keys(tmp_path):
    from stages.reweight import Config, domain_of

    assert domain_of({"url": "https://docs.python.org/3/x.html"}, Config(key="registered_domain")) == "python.org"
    assert domain_of({"url": "http://www.bbc.co.uk/news"}, Config(key="registered_domain")) == "bbc.co.uk"
    assert domain_of({}, Config(key="registered_domain")) == "(none)"
    q = Config(key="quality_bucket", quality_edges=[0.5, 0.9])
    assert [domain_of({"quality_score": s}, q) for s in (0.1, 0.5, 0.95)] == ["q-0.5", "q0.5-0.9", "q0.9-"]
    assert domain_of({"language": "en"}, Config(key="language")) == "en"
    assert domain_of({"source": "crawl/a.warc.gz"}, Config(key="source")) == "crawl/a.warc.gz"  # ingest's input file
    # the stage under a derived key: the real documents' URLs grouped by registered domain
    docs = mixed_docs(40, 30, 10)
    seed_stage(str(tmp_path), "k", "filter", docs)
    run_stage("reweight", load_tiny(tmp_path, {**FAST, "reweight.key": "registered_domain"}), str(tmp_path), "k")
    mix = Storage(str(tmp_path)).sub("k", "reweight").read_json("mixture.json")
    assert mix["key"] == "registered_domain" and sum(v["docs"] for v in mix["domains"].values()) == len(docs)
    assert mix["domains"]["wikipedia.org"]["docs"] == 10 and mix["domains"]["example.org"]["docs"] == 30
    assert len(mix["domains"]) > 10 and not any(d.startswith("www.") for d in mix["domains"])  # news sites: eTLD+1
    with pytest.raises(ConfigError, match="quality_edges"):
        load_tiny(tmp_path, {"reweight.quality_edges": [0.5, 0.2]})


def test_zero_weight_drops_domain_and_missing_key_is_its_own_bucket(tmp_path):
    docs = mixed_docs(40, 30, 10)
    for d in docs[:5]:
        del d["metadata"]["domain"]
    seed_stage(str(tmp_path), "r", "filter", docs)
    cfg = load_tiny(tmp_path, {**FAST, "reweight.weights": {"shakespeare": 0, "docs.python.org": 2}})
    m = run_stage("reweight", cfg, str(tmp_path), "r")
    out = read_out(str(tmp_path), "r")
    assert not any(o["metadata"].get("domain") == "shakespeare" for o in out)
    assert m["counts"]["removed"]["downsampled"] >= 30
    mix = Storage(str(tmp_path)).sub("r", "reweight").read_json("mixture.json")
    assert mix["domains"]["(none)"]["docs"] == 5 and mix["domains"]["shakespeare"]["share_after"] == 0
    # a weight for a domain that is absent is reported, not an error
    assert "docs.python.org" in mix["weights_for_absent_domains"]


def test_bad_weights_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match=r"reweight\.weights\.news"):
        load_tiny(tmp_path, {"reweight.weights": {"news": -1}})
    seed_stage(str(tmp_path), "z", "filter", mixed_docs(10, 0, 0))
    cfg = load_tiny(tmp_path, {**FAST, "reweight.weights": {"news": 0}})
    with pytest.raises(StageError, match="weight 0"):
        run_stage("reweight", cfg, str(tmp_path), "z")


def lid_label(docs: list[dict]) -> list[dict]:
    """``metadata.language`` / ``language_score`` as normalize sets them: lid.176's top-1 label (offline)."""
    from datatrove.data import Document

    from stages.core.lid import local_ft176

    lid = local_ft176(k=1)
    for d in docs:
        (lang, score), _ = lid.predict(Document(text=d["text"], id=d["id"]))
        d["metadata"].update(language=lang, language_score=round(min(float(score), 1.0), 4))
    return docs


def by_language(docs: list[dict]) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = {}
    for d in docs:
        c = out.setdefault(d["metadata"].get("language", "(none)"), [0, 0])
        c[0] += 1
        c[1] += len(d["text"].encode())
    return {k: tuple(v) for k, v in out.items()}


def test_language_mix_before_and_after_counts_every_copy(tmp_path):
    """The language mix in mixture.json and the manifest: before = the input's documents and bytes per lid.176
    label, after = what was written (reweighting copies included), over two worker processes; shares sum to 1;
    mixture.json is byte-identical from one task."""
    docs = lid_label(mixed_docs(181, 60, 20))  # news bodies in 8 languages; Shakespeare and WikiText English
    for d in [d for d in docs if d["metadata"]["domain"] == "shakespeare"][:5]:
        del d["metadata"]["language"]  # no label: the (none) bucket
    before = by_language(docs)
    assert len(before) >= 5 and before["en"][0] > len(docs) // 2 and before["(none)"][0] == 5
    root = str(tmp_path)
    seed_split(root, "l", "filter", docs)
    weights = {"news": 3.0, "shakespeare": 0.5}  # languages other than English come only with the news
    m = run_stage("reweight", load_tiny(tmp_path, {"run.tasks": 2, "run.workers": 2, "reweight.weights": weights}),
                  root, "l")
    st = Storage(root).sub("l", "reweight")
    langs = st.read_json("mixture.json")["languages"]
    out = read_out(root, "l")
    after = by_language(out)
    assert set(langs) == set(before) >= set(after)
    for lang, v in langs.items():
        assert (v["docs_before"], v["bytes_before"]) == before[lang], lang
        assert (v["docs_after"], v["bytes_after"]) == after.get(lang, (0, 0)), lang
        assert v["est_tokens_before"] == round(v["bytes_before"] / 4.0)
        assert v["est_tokens_after"] == round(v["bytes_after"] / 4.0)
        assert v["share_before"] == round(before[lang][1] / sum(b for _, b in before.values()), 6)
        assert v["share_after"] == round(after.get(lang, (0, 0))[1] / sum(b for _, b in after.values()), 6)
    for k in ("share_before", "share_after"):
        assert sum(v[k] for v in langs.values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(v["docs_after"] for v in langs.values()) == len(out) == m["counts"]["documents_out"]
    foreign = [o for o in out if o["metadata"].get("language") not in ("en", None)]
    assert any("#r" in o["id"] for o in foreign)  # upsampled news: copies counted in their language
    assert sum(v["share_after"] for k, v in langs.items() if k not in ("en", "(none)")) > \
           1.5 * sum(v["share_before"] for k, v in langs.items() if k not in ("en", "(none)"))
    assert m["metrics"]["languages"] == {lang: {k: v[k] for k in ("docs_before", "docs_after", "share_before",
                                                                  "share_after")} for lang, v in langs.items()}
    seed_split(root, "l1", "filter", docs)
    run_stage("reweight", load_tiny(tmp_path, {"run.tasks": 1, "run.workers": 1, "reweight.weights": weights}),
              root, "l1")
    assert Storage(root).sub("l1", "reweight").read_bytes("mixture.json") == st.read_bytes("mixture.json")
