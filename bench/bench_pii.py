"""PII redaction (stages/filter/pii.py): precision / recall per kind on real text with planted PII, changes to
the real crawl, and speed beside datatrove's PIIFormatter.

Planted benchmark (bench/pii_data.py, seed 1234): 600 documents, each a real paragraph (extraction-benchmark
article bodies without the 5 that print real contact details, WikiText-2) with 1-3 generated valid values
(kinds in turn) and 1-2 negatives inserted at sentence boundaries. Negatives are real must-not-redact
strings of the crawl in their real line (versions, dates, times, private IPs, host:port, section numbers,
ISBNs, hex hashes, long integers, documentation IPs) or generated near-misses (Luhn-invalid cards, IBANs
with a wrong check, invalid SSNs, 123-456-7890-like numbers, ISBN-13s, documentation / private IPs, token
and PEM placeholders).

Span level: a planted value is found when one replacement of its kind covers all of it and at most 3
characters more (``+``, a bracket); a replacement of another kind over it counts as a miss for the value's
kind and a false positive for the replacing kind. A false positive is a replacement that covers no planted
value. ``recall`` = found / planted, ``precision`` = replacements that found a value / replacements (per
kind). The planted values are also checked to be absent from ``redact``'s output. Negatives: replacements
overlapping one, per category.

Real crawl: every page of the sample crawl (extracted as the tiny profile's ingest does), unmodified: pages
changed, replacements per kind, and a spot-check list (kind, url, context with the value's characters
masked by their class: digits 9, letters a/A).

Speed: ``redact`` with the default config over the crawl pages on one core (docs/s and MB/s), against
datatrove 0.10.1's ``PIIFormatter.format`` (emails and IPv4 only) on the same texts; best of 2 runs each.

Also: formats left out by design (spaced North-American numbers, national numbers without a phone word,
single-digit quads, dotted card groups, lower-case IBANs, undashed SSNs, unlabelled AWS secrets, "at"/"dot"
e-mails), 20 each planted in real text: found 0 of 20 each, as documented; real text beyond the crawl
(article bodies, cc_net JSONL, WARC samples; every replacement printed, masked, for a spot check).

Measured (2 shared cores, 2026-11-30): precision and recall 1.000 for all 7 kinds (≈170 values per kind), 0
of 906 negatives replaced, 0 planted values left in the output; with 1,500 documents per seed over seeds
1-5 (≈430 values per kind each) 7 misses in all (one an over-long replacement that also took the year after
the number) and no other false positive, every one a value glued to a number of the base text ("tel:+1 752
201 1937 77 Squadron", "Card number: 5205 2212 2999 3856 8, 81") or after the word "version". Crawl: 77 of 2,391 pages changed (197 e-mail addresses on 66 pages, 28 public IPs on 13, 16
phone numbers of re.html's phonebook example), each checked by hand to be an address or number of its kind;
datatrove's PIIFormatter changes 168 pages (415 IPv4 replacements: mostly numbered headings "24.2.2.1.",
"Section 9.7.3.5", versions, networks). Other real text: 15 of 275 documents changed (14 e-mail, 5 phone,
24 IP), all real. Speed: 1,700-2,500 docs/s (16-23 MB/s) against datatrove's 730-1,260 docs/s on the same
pages (1.6-3.4x, varying with the load of the shared machine).
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import pii_data  # noqa: E402
from stages.filter.pii import KINDS, PLACEHOLDERS, PIIConfig, find_pii, redact  # noqa: E402

SLACK = 3


def fig(value, unit: str, what: str) -> dict:
    return {"value": value, "unit": unit, "what": what}


def mask(s: str) -> str:
    return "".join("9" if c.isdigit() else "a" if c.islower() else "A" if c.isupper() else c for c in s)


def score(docs: list[dict], cfg: PIIConfig) -> dict:
    planted, found, repl, good = Counter(), Counter(), Counter(), Counter()
    neg_total, neg_hit, leaks, fps = Counter(), Counter(), 0, []
    for d in docs:
        text = d["text"]
        spans = find_pii(text, cfg)
        used = set()
        for ps, pe, kind in d["planted"]:
            planted[kind] += 1
            for i, (s, e, k) in enumerate(spans):
                if s <= ps and pe <= e and (ps - s) + (e - pe) <= SLACK:
                    used.add(i)
                    if k == kind:
                        found[kind] += 1
                        good[k] += 1
                    break
                if s < pe and ps < e:  # overlaps, but not a clean cover: not found; the span is not a FP
                    used.add(i)
        for i, (s, e, k) in enumerate(spans):
            repl[k] += 1
            if i not in used:
                fps.append((k, text[max(0, s - 40):s], text[s:e], text[e:e + 30]))
        for ns, ne, cat in d["negatives"]:
            neg_total[cat] += 1
            if any(s < ne and ns < e for s, e, _ in spans):
                neg_hit[cat] += 1
        out, _ = redact(text, cfg)
        leaks += sum(text[ps:pe] in out for ps, pe, _ in d["planted"] if text[ps:pe] not in PLACEHOLDERS.values())
    per_kind = {k: {"planted": planted[k], "found": found[k], "replacements": repl[k],
                    "recall": found[k] / planted[k] if planted[k] else float("nan"),
                    "precision": good[k] / repl[k] if repl[k] else 1.0} for k in KINDS}
    return {"per_kind": per_kind, "negatives": {c: (neg_total[c], neg_hit[c]) for c in sorted(neg_total)},
            "leaks": leaks, "false_positives": fps}


def gaps(seed: int = 7, n: int = 20) -> dict[str, tuple[str, int, int]]:
    """Formats left out by design (see stages/filter/pii.py), planted in real paragraphs: how many are found
    anyway. {format: (kind, planted, found)}."""
    import random

    rng = random.Random(seed)
    paras = pii_data.base_paragraphs()
    d = lambda k: pii_data._digits(rng, k)  # noqa: E731
    def card_dotted():
        return ".".join(re.findall("....", pii_data._card_digits(rng)[1].ljust(16, "0")[:16]))

    makers = {
        "phone: NANP with spaces, no +1": ("phone", lambda: f"{rng.randint(2, 9)}{d(2)} {rng.randint(2, 9)}{d(2)} {d(4)}"),
        "phone: national, no phone word": ("phone", lambda: f"020 {d(4)} {d(4)}"),
        "ip: all-single-digit IPv4": ("ip", lambda: ".".join(str(rng.randint(1, 9)) for _ in range(4))),
        "credit_card: dotted groups": ("credit_card", card_dotted),
        "iban: lower case": ("iban", lambda: pii_data._iban(rng).lower()),
        "ssn: no dashes": ("ssn", lambda: f"{rng.randint(1, 665):03d}{rng.randint(1, 99):02d}{d(4)}"),
        "secret: unlabelled AWS secret key": ("secret", lambda: "".join(rng.choice(pii_data.B64) for _ in range(40))),
        "email: obfuscated 'at'/'dot'": ("email", lambda: f"{rng.choice(pii_data.FIRST)} at {rng.choice(pii_data.LAST)} dot com"),
    }
    out = {}
    for name, (kind, make) in makers.items():
        found = 0
        for _ in range(n):
            v, base = make(), rng.choice(paras)
            text = f"{base} Reference: {v} (noted). {base}"
            s = len(base) + 12
            found += any(a <= s and s + len(v) <= b and k == kind for a, b, k in find_pii(text, PIIConfig()))
        out[name] = (kind, n, found)
    return out


def crawl_changes(pages: list[dict], cfg: PIIConfig) -> dict:
    changed, per_kind, docs_kind, spot = 0, Counter(), Counter(), []
    for p in pages:
        spans = find_pii(p["text"], cfg)
        if spans:
            changed += 1
        for k in {k for _, _, k in spans}:
            docs_kind[k] += 1
        for s, e, k in spans:
            per_kind[k] += 1
            t = p["text"]
            spot.append((k, p["url"], t[max(0, s - 30):s].replace("\n", "⏎"), mask(t[s:e]),
                         t[e:e + 20].replace("\n", "⏎")))
    return {"pages": len(pages), "changed": changed, "replacements": per_kind, "pages_by_kind": docs_kind,
            "spot": spot}


def other_real_text() -> list[dict]:
    """Real text beyond the crawl, unmodified: extraction-benchmark article bodies, the cc_net JSONL documents
    and the HTML pages of the small WARC samples (dolma's English pages, Common Crawl's mostly Chinese
    pages, IANA), extracted with Kiln's default extractor."""
    import gzip
    import json

    from warcio.archiveiterator import ArchiveIterator

    from stages.ingest.extract import ExtractConfig, extract_text

    gt = json.loads((pii_data.SHARED / "extraction-benchmark" / "ground-truth.json").read_text())
    docs = [{"url": "extraction-benchmark/" + k[:12], "text": v.get("articleBody") or ""}
            for k, v in sorted(gt.items())]
    for f in sorted((pii_data.SHARED / "jsonl").glob("*.jsonl.gz")):
        with gzip.open(f, "rt") as fh:
            docs += [{"url": "jsonl/" + f.name, "text": json.loads(line)["text"]} for line in fh]
    for name in ("sample-0000.warc.gz", "sample-0001.warc.gz", "warcfile.warc.gz", "iana.warc.gz"):
        with open(pii_data.SHARED / "warc" / name, "rb") as fh:
            for rec in ArchiveIterator(fh):
                if rec.rec_type == "response":
                    html = rec.content_stream().read().decode("utf-8", "replace")
                    docs.append({"url": f"warc/{name}", "text": extract_text(html, ExtractConfig())[1]})
    return [d for d in docs if d["text"]]


def datatrove_changes(pages: list[dict]) -> dict:
    """What datatrove's PIIFormatter changes on the same crawl pages: pages, IPv4 replacements (its regex and
    public-IP validator), and how many of those are dotted numbers Kiln leaves (sections, versions)."""
    from functools import partial

    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.formatters.pii import public_ip_validator

    dt = PIIFormatter()
    valid = partial(public_ip_validator, public_only=True)
    changed = ips = 0
    for p in pages:
        changed += dt.format(p["text"]) != p["text"]
        ips += sum(valid(m.group(0)) for m in dt.ip_replacer.regex.finditer(p["text"]))
    return {"changed": changed, "ips": ips}


def speed(texts: list[str]) -> dict:
    from datatrove.pipeline.formatters import PIIFormatter

    cfg, dt = PIIConfig(), PIIFormatter()
    mb = sum(len(t.encode()) for t in texts) / 1e6
    best = {}
    for name, fn in (("kiln", lambda t: redact(t, cfg)), ("datatrove", dt.format)):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            for t in texts:
                fn(t)
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return {"docs": len(texts), "mb": mb, **best}


def run() -> dict:
    cfg = PIIConfig()
    pages = pii_data.crawl_texts()
    docs = pii_data.build(600, seed=1234, texts=[p["text"] for p in pages])
    sc = score(docs, cfg)
    cc = crawl_changes(pages, cfg)
    sp = speed([p["text"] for p in pages])

    print(f"planted benchmark: {len(docs)} real paragraphs, {sum(len(d['planted']) for d in docs)} planted values, "
          f"{sum(len(d['negatives']) for d in docs)} negatives")
    print(f"{'kind':<12} {'planted':>7} {'found':>6} {'replaced':>8} {'precision':>9} {'recall':>7}")
    for k, r in sc["per_kind"].items():
        print(f"{k:<12} {r['planted']:>7} {r['found']:>6} {r['replacements']:>8} {r['precision']:>9.3f} {r['recall']:>7.3f}")
    print("negatives (category: inserted / replaced):",
          ", ".join(f"{c} {n}/{h}" for c, (n, h) in sc["negatives"].items()))
    print(f"planted values still in the redacted text: {sc['leaks']}")
    for k, pre, val, post in sc["false_positives"][:20]:
        print(f"  FP {k}: …{pre!r} [{mask(val)}] {post!r}…")
    print(f"real crawl: {cc['changed']} of {cc['pages']} pages changed; replacements {dict(cc['replacements'])}; "
          f"pages by kind {dict(cc['pages_by_kind'])}")
    for k, url, pre, val, post in cc["spot"]:
        if k != "email":
            print(f"  {k:<6} {url.split('://')[1][:60]:<60} …{pre}[{val}]{post}…")
    dtc = datatrove_changes(pages)
    print(f"datatrove PIIFormatter on the same pages: {dtc['changed']} pages changed, {dtc['ips']} IPv4 replacements "
          f"(Kiln: {cc['replacements']['ip']} IPv4+IPv6; the rest: numbered headings '24.2.2.1.', 'see Section 9.7.3.5', "
          f"versions, /24 networks)")
    other = crawl_changes(other_real_text(), cfg)
    print(f"other real text (article bodies, cc_net JSONL, WARC samples): {other['changed']} of {other['pages']} "
          f"documents changed; replacements {dict(other['replacements'])}")
    for k, url, pre, val, post in other["spot"]:
        print(f"  {k:<6} {url:<40} …{pre}[{val}]{post}…")
    print("formats left out by design (planted in real text, found):",
          "; ".join(f"{name} {f}/{n}" for name, (_, n, f) in gaps().items()))
    kiln_dps, dt_dps = sp["docs"] / sp["kiln"], sp["docs"] / sp["datatrove"]
    print(f"speed on {sp['docs']} crawl pages ({sp['mb']:.1f} MB), one core: kiln {kiln_dps:,.0f} docs/s "
          f"({sp['mb'] / sp['kiln']:.1f} MB/s, 7 kinds), datatrove PIIFormatter {dt_dps:,.0f} docs/s (emails + IPv4)")

    out = {}
    for k, r in sc["per_kind"].items():
        out[f"pii.{k}.precision"] = fig(round(r["precision"], 4), "ratio", f"PII {k}: precision on planted real text")
        out[f"pii.{k}.recall"] = fig(round(r["recall"], 4), "ratio", f"PII {k}: recall on planted real text")
    out["pii.negatives_replaced"] = fig(sum(h for _, h in sc["negatives"].values()), "strings",
                                        f"PII: must-not-redact strings replaced (of {sum(n for n, _ in sc['negatives'].values())})")
    out["pii.other_real_docs_changed"] = fig(other["changed"], "docs",
                                             f"PII: other real documents changed (of {other['pages']})")
    out["pii.datatrove_crawl_pages_changed"] = fig(dtc["changed"], "pages",
                                                   "PII: sample-crawl pages datatrove's PIIFormatter changes")
    out["pii.crawl_pages_changed"] = fig(cc["changed"], "pages", f"PII: sample-crawl pages changed (of {cc['pages']})")
    for k in KINDS:
        out[f"pii.crawl.{k}"] = fig(cc["replacements"][k], "replacements", f"PII: {k} replacements in the sample crawl")
    out["pii.docs_per_s"] = fig(round(kiln_dps), "docs/s", "PII redaction, 7 kinds, crawl pages, one core")
    out["pii.datatrove_docs_per_s"] = fig(round(dt_dps), "docs/s", "datatrove PIIFormatter (emails, IPv4), same pages")
    return out


if __name__ == "__main__":
    run()
