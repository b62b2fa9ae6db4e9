"""Labelled PII benchmark data for bench/bench_pii.py and the tests: real text with generated PII planted at
known positions, plus real must-not-redact strings harvested from the sample crawl and generated near-misses.

- ``crawl_texts()``: the sample crawl's pages extracted as the tiny profile's ingest does (resiliparse;
  cached in bench/_work/pii/crawl.jsonl.gz, ~10 s to rebuild).
- ``base_paragraphs()``: real paragraphs (≥ 200 characters) of the extraction benchmark's article bodies and
  WikiText-2. The article bodies listed in ``REAL_PII_ARTICLES`` print real contact details (4 e-mail
  addresses, 2 phone numbers, checked by hand: every one is found and nothing else is); they are left out
  of the planted benchmark so that each replacement there is either a planted value or a false positive.
- ``generate(kind, rng)``: a valid value of a kind (Luhn-valid cards of 5 brands, mod-97-valid IBANs of 10
  countries, SSNs by the SSA rules, phones in 16 international / national formats, public IPv4 and global
  unicast IPv6, e-mail addresses, AWS key ids / labelled secret keys, PEM private-key blocks, bearer
  tokens and JWTs, GitHub tokens) with the sentence template it goes in.
- ``near_misses(rng)``: generated values that must stay: Luhn-invalid card numbers, IBANs with a wrong
  check, SSNs with area 000/666/9xx, group 00 or serial 0000, 123-456-7890-like numbers, valid ISBN-13s,
  documentation-range IPs, token placeholders, a PEM block without a key.
- ``harvest_negatives(texts)``: real strings of the crawl that must stay, each with its real line: version
  strings, dates, times, private IPs, host:port, section numbers, ISBNs, hex hashes, long integers,
  documentation IPs.
- ``build(n_docs, seed)``: documents ``{"text", "planted": [(start, end, kind)], "negatives": [(start, end,
  category)]}``.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import random
import re
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
SHARED = (REPO.parent / "shared" / "data").resolve()
CACHE = HERE / "_work" / "pii" / "crawl.jsonl.gz"

REAL_PII_ARTICLES = {  # extraction-benchmark ids whose bodies print real contact details (see docstring)
    "0ec95c7261d122f304728e90c983450ef1ce1e0b423546835c397d50aaf0d0f2",
    "30b771a40a4e96156d398716c877deef54b05d091770d2717c98e4c6b670010c",
    "9da36ae4714bfccc72374c6c146e9d1cd3cca39e2110bd67ccdbcc806f4cf139",
    "ac3c035520461017a7c5b248d8e39ef063cad4c0c7d7b7ecd68aff8f15099485",
    "d48aeb9cf2f2ff15769a57513249b4a6a669159f3e50b335e741d4206a824e88",
}


def crawl_texts() -> list[dict]:
    """[{"url", "text"}] for every page of ../shared/data/crawl with main text (cached)."""
    if not CACHE.exists():
        from warcio.archiveiterator import ArchiveIterator

        from stages.core.config import load_config
        from stages.ingest.extract import extract_text

        cfg = load_config(REPO / "configs" / "tiny.yaml").ingest.extract
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_suffix(".tmp")
        with gzip.open(tmp, "wt") as out:
            for f in sorted((SHARED / "crawl").glob("*.warc.gz")):
                with open(f, "rb") as fh:
                    for rec in ArchiveIterator(fh):
                        if rec.rec_type != "response":
                            continue
                        html = rec.content_stream().read().decode("utf-8", "replace")
                        _, text = extract_text(html, cfg)
                        if text:
                            out.write(json.dumps({"url": rec.rec_headers.get_header("WARC-Target-URI"),
                                                  "text": text}) + "\n")
        tmp.rename(CACHE)
    with gzip.open(CACHE, "rt") as f:
        return [json.loads(line) for line in f]


_QUAD = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")


_V6ISH = re.compile(r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}")


def _public_ip(text: str) -> bool:
    """A public IPv4, or an IPv6 in global unicast 2000::/3 (the e-mail / IP rule of the harvest)."""
    for m in (*_QUAD.finditer(text), *_V6ISH.finditer(text)):
        try:
            ip = ipaddress.ip_address(m.group(0))
        except ValueError:
            continue
        if ip.is_global and (ip.version == 4 or ip in ipaddress.ip_network("2000::/3")):
            return True
    return False


def base_paragraphs(min_chars: int = 200) -> list[str]:
    gt = json.loads((SHARED / "extraction-benchmark" / "ground-truth.json").read_text())
    paras = []
    for key, val in sorted(gt.items()):
        if key in REAL_PII_ARTICLES:
            continue
        paras += [p.strip() for p in (val.get("articleBody") or "").split("\n") if len(p.strip()) >= min_chars]
    # crawl paragraphs: code and numbers next to the planted values; those with an '@', a public IP address or a
    # phone-like ddd-ddd-dddd (real PII of the crawl, see bench_pii's crawl list) are left out
    phone_like = re.compile(r"\d{3}[.-]\d{3}[.-]\d{4}|\+\d")
    for page in crawl_texts()[::7]:
        paras += [p.strip() for p in page["text"].split("\n\n") if 200 <= len(p.strip()) <= 3000 and "@" not in p
                  and not phone_like.search(p) and not _public_ip(p)]
    wiki = (SHARED / "eval" / "wikitext-2" / "valid.txt").read_text()
    paras += [p.strip() for p in wiki.split("\n") if len(p.strip()) >= min_chars and not p.strip().startswith("=")]
    return paras


# ---------------------------------------------------------------------------------------------------------
# generators of valid values: (value, template with {v})

FIRST = ["anna", "james", "li", "maria", "oluwaseun", "sven", "priya", "jose", "fatima", "kenji", "olga", "tom"]
LAST = ["smith", "mueller", "wang", "garcia", "okafor", "lindqvist", "sharma", "silva", "haddad", "tanaka"]
DOMAINS = ["gmail.com", "yahoo.co.uk", "mail.ru", "uni-heidelberg.de", "outlook.com", "acme-corp.com",
           "posteo.de", "cs.stanford.edu", "orange.fr", "company.co.jp", "proton.me", "web.de"]
TEMPLATES = {
    "email": ["Send comments to {v}.", "Contact: {v}", "You can reach the author at {v} or by post.",
              "Questions ({v}) are welcome.", "From: Jane Roe <{v}>", "mailto:{v}", "'{v}',"],
    "phone": ["Call {v} for tickets.", "Phone: {v}", "For reservations, dial {v}.", "The office number is {v}.",
              "Fax ({v}); closed on Sundays.", "tel:{v}", "[{v}]", "Numbers: {v}, 911 and 112."],
    "ip": ["The request came from {v}.", "Server address: {v}", "Login from {v} at midnight.",
           "The attacker used {v} and another host.", "ip={v};", "(from {v})", "http://{v}/admin", "'{v}',"],
    "credit_card": ["Card number: {v}", "He paid with card {v} on Friday.", "Charge {v} exp 04/27.",
                    "card={v};", "({v})", "Cards: {v}, and another."],
    "iban": ["Please transfer the fee to IBAN {v}.", "Account: {v}", "Bank details: {v} (BIC DEUTDEFF).",
             "IBAN:{v}", "({v})"],
    "ssn": ["SSN: {v}", "His social security number is {v}.", "Social Security No. {v} was on the form.",
            "ssn={v};", "({v})"],
}
BARE_OK = {"email", "ip", "credit_card", "iban", "ssn"}  # recognisable without a cue word


def _digits(rng, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def luhn_complete(partial: str) -> str:
    for d in "0123456789":
        s = partial + d
        total = 0
        for i, ch in enumerate(reversed(s)):
            x = int(ch) * (2 if i % 2 else 1)
            total += x - 9 if x > 9 else x
        if total % 10 == 0:
            return s
    raise AssertionError


def _card_digits(rng) -> tuple[str, str]:
    brand = rng.choice(["visa", "visa", "mc", "mc2", "amex", "discover", "jcb"])
    if brand == "visa":
        body = "4" + _digits(rng, 14)
    elif brand == "mc":
        body = str(rng.randint(51, 55)) + _digits(rng, 13)
    elif brand == "mc2":
        body = str(rng.randint(2221, 2720)) + _digits(rng, 11)
    elif brand == "amex":
        body = rng.choice(["34", "37"]) + _digits(rng, 12)
    elif brand == "discover":
        body = "6011" + _digits(rng, 11)
    else:
        body = str(rng.randint(3528, 3589)) + _digits(rng, 11)
    return brand, luhn_complete(body)


def _format_card(digits: str, rng) -> str:
    sep = rng.choice(["", " ", "-"])
    if len(digits) == 15:
        return sep.join([digits[:4], digits[4:10], digits[10:]]) if sep else digits
    return sep.join(digits[i:i + 4] for i in range(0, len(digits), 4))


IBAN_FORMATS = {  # country: BBAN as (kind, count) runs; 'n' digits, 'a' upper-case letters, 'c' alphanumeric
    "DE": [("n", 18)], "GB": [("a", 4), ("n", 14)], "FR": [("n", 10), ("c", 11), ("n", 2)],
    "ES": [("n", 20)], "IT": [("a", 1), ("n", 10), ("c", 12)], "NL": [("a", 4), ("n", 10)],
    "CH": [("n", 5), ("c", 12)], "BE": [("n", 12)], "AT": [("n", 16)], "PL": [("n", 24)],
}


def iban_check(country: str, bban: str) -> str:
    num = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{98 - num % 97:02d}"


def _iban(rng, valid: bool = True) -> str:
    country = rng.choice(sorted(IBAN_FORMATS))
    pools = {"n": string.digits, "a": string.ascii_uppercase, "c": string.digits + string.ascii_uppercase}
    bban = "".join(rng.choice(pools[k]) for k, n in IBAN_FORMATS[country] for _ in range(n))
    check = iban_check(country, bban)
    if not valid:
        check = f"{(int(check) + rng.randint(1, 96)) % 97:02d}"
        if check in ("00", "01"):
            check = "50"
    compact = country + check + bban
    return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4)) if rng.random() < 0.6 else compact


def _phone(rng) -> str:
    d = lambda n: _digits(rng, n)  # noqa: E731
    nxx = lambda: str(rng.randint(2, 9)) + d(2)  # noqa: E731
    return rng.choice([
        lambda: f"+44 20 {d(4)} {d(4)}", lambda: f"+44 7{d(3)} {d(6)}", lambda: f"+1-{nxx()}-{nxx()}-{d(4)}",
        lambda: f"+1 ({nxx()}) {nxx()}-{d(4)}", lambda: f"({nxx()}) {d(3)}-{d(4)}", lambda: f"{nxx()}-{nxx()}-{d(4)}",
        lambda: f"{nxx()}.{nxx()}.{d(4)}", lambda: f"0049 30 {rng.randint(1, 9)}{d(6)}",
        lambda: f"+49 (0)30 {rng.randint(1, 9)}{d(7)}", lambda: f"+33 {rng.randint(1, 9)} {d(2)} {d(2)} {d(2)} {d(2)}",
        lambda: f"+91 {rng.randint(7, 9)}{d(4)} {d(5)}", lambda: f"+81 3-{d(4)}-{d(4)}", lambda: f"+61 2 {d(4)} {d(4)}",
        lambda: f"+39 06 {d(4)} {d(4)}", lambda: f"+7 495 {d(3)}-{d(2)}-{d(2)}", lambda: f"+55 11 9{d(4)}-{d(4)}",
        lambda: f"+44 (0) 20 {d(4)} {d(4)}", lambda: f"+1 {nxx()} {nxx()} {d(4)}", lambda: f"+353 1 {d(3)} {d(4)}",
        lambda: f"+86 138 {d(4)} {d(4)}", lambda: f"+27 21 {d(3)} {d(4)}", lambda: f"+14155{d(6)}",
        lambda: f"1-800-{nxx()}-{d(4)}", lambda: f"+31 (0)20 {d(3)} {d(4)}",
    ])()


def _ipv4(rng) -> str:
    while True:
        ip = ipaddress.IPv4Address(rng.getrandbits(32))
        if ip.is_global and not ip.is_multicast:  # public unicast: a host, not a group
            return str(ip)


def _ipv6(rng) -> str:
    while True:
        ip = ipaddress.IPv6Address((1 << 125) | rng.getrandbits(125))  # 2000::/3, global unicast
        if rng.random() < 0.5:  # many real addresses have zero runs: ...::1 style
            ip = ipaddress.IPv6Address(int(ip) & ~((1 << 64) - 1) | rng.randint(1, 0xffff))
        if ip.is_global:
            return ip.compressed if rng.random() < 0.7 else ip.exploded


B32 = string.ascii_uppercase + "234567"
B64 = string.ascii_letters + string.digits + "+/"
ALNUM = string.ascii_letters + string.digits


def _secret(rng) -> tuple[str, str]:
    kind = rng.choice(["aws_id", "aws_secret", "pem", "bearer", "jwt", "github"])
    if kind == "aws_id":
        v = rng.choice(["AKIA", "ASIA"]) + "".join(rng.choice(B32) for _ in range(16))
        return v, rng.choice(["aws_access_key_id = {v}", "The key {v} was leaked.", "export AWS_ACCESS_KEY_ID={v}"])
    if kind == "aws_secret":
        v = "".join(rng.choice(B64) for _ in range(40))
        return v, rng.choice(["aws_secret_access_key = {v}", "AWS_SECRET_ACCESS_KEY={v}", "secret_access_key: \"{v}\""])
    if kind == "pem":
        label = rng.choice(["RSA ", "EC ", "OPENSSH ", "ENCRYPTED ", ""])
        lines = ["".join(rng.choice(B64) for _ in range(64)) for _ in range(rng.randint(4, 12))]
        body = "\n".join(lines) + "\n" + "".join(rng.choice(B64) for _ in range(rng.randint(8, 60))) + "=="
        return f"-----BEGIN {label}PRIVATE KEY-----\n{body}\n-----END {label}PRIVATE KEY-----", "\n{v}\n"
    if kind == "bearer":
        v = "".join(rng.choice(ALNUM + "-._") for _ in range(rng.randint(24, 64)))
        if not (any(c.isdigit() for c in v) and any(c.isalpha() for c in v)):
            v += "7a"
        return v, rng.choice(["Authorization: Bearer {v}", "curl -H 'Authorization: Bearer {v}' https://api.example.com/"])
    if kind == "jwt":
        part = lambda n: "".join(rng.choice(ALNUM + "-_") for _ in range(n))  # noqa: E731
        return "eyJ" + part(30) + ".eyJ" + part(60) + "." + part(43), "Authorization: Bearer {v}"
    return rng.choice(["ghp_", "gho_", "ghs_"]) + "".join(rng.choice(ALNUM) for _ in range(36)), \
        rng.choice(["GITHUB_TOKEN={v}", "token: {v}", "Use {v} to push."])


def generate(kind: str, rng: random.Random) -> tuple[str, str]:
    """(valid value, template containing {v}) for ``kind``."""
    if kind == "secret":
        return _secret(rng)
    if kind == "email":
        f, last = rng.choice(FIRST), rng.choice(LAST)
        local = rng.choice([f"{f}.{last}", f"{f[0]}{last}{rng.randint(1, 99)}", f"{f}_{last}+news", f"{last}"])
        v = f"{local}@{rng.choice(DOMAINS)}"
    elif kind == "phone":
        v = _phone(rng)
        if rng.random() < 0.15:
            return f"020 {_digits(rng, 4)} {_digits(rng, 4)}", rng.choice(["Tel: {v}", "Phone: {v}", "call us on {v}."])
    elif kind == "ip":
        v = _ipv4(rng) if rng.random() < 0.6 else _ipv6(rng)
    elif kind == "credit_card":
        v = _format_card(_card_digits(rng)[1], rng)
    elif kind == "iban":
        v = _iban(rng)
    elif kind == "ssn":
        while True:
            area = rng.randint(1, 899)
            if area != 666:
                break
        v = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    else:
        raise ValueError(kind)
    if kind in BARE_OK and rng.random() < 0.25:
        return v, " {v} "
    return v, rng.choice(TEMPLATES[kind])


# ---------------------------------------------------------------------------------------------------------
# negatives

def isbn13(rng) -> str:
    body = rng.choice(["978", "979"]) + _digits(rng, 9)
    check = (10 - sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(body)) % 10) % 10
    s = body + str(check)
    return f"{s[:3]}-{s[3]}-{s[4:7]}-{s[7:12]}-{s[12]}" if rng.random() < 0.5 else s


def near_misses(rng: random.Random) -> tuple[str, str, str]:
    """(category, value, template) of a generated value that must stay."""
    cat = rng.choice(["luhn_invalid", "iban_invalid", "ssn_invalid", "nanp_invalid", "isbn13", "doc_ip",
                      "private_ip", "token_placeholder", "pem_placeholder"])
    if cat == "luhn_invalid":
        _, good = _card_digits(rng)
        bad = good[:-1] + str((int(good[-1]) + rng.randint(1, 9)) % 10)
        return cat, _format_card(bad, rng), rng.choice(["Card number: {v}", "Reference {v} was logged."])
    if cat == "iban_invalid":
        return cat, _iban(rng, valid=False), "Please transfer the fee to IBAN {v}."
    if cat == "ssn_invalid":
        v = rng.choice([f"000-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}",
                        f"666-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}",
                        f"9{_digits(rng, 2)}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}",
                        f"{rng.randint(1, 665):03d}-00-{rng.randint(1, 9999):04d}",
                        f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-0000"])
        return cat, v, "SSN: {v}"
    if cat == "nanp_invalid":
        return cat, f"{rng.randint(0, 1)}{_digits(rng, 2)}-{_digits(rng, 3)}-{_digits(rng, 4)}", "Part number {v} is out of stock."
    if cat == "isbn13":
        return cat, isbn13(rng), "ISBN {v}"
    if cat == "doc_ip":
        v = rng.choice([f"192.0.2.{rng.randint(1, 254)}", f"198.51.100.{rng.randint(1, 254)}",
                        f"203.0.113.{rng.randint(1, 254)}", f"2001:db8::{rng.randint(1, 0xffff):x}"])
        return cat, v, "Server address: {v}"
    if cat == "private_ip":
        v = rng.choice([f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}", f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                        f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}", "127.0.0.1",
                        f"fe80::{rng.randint(1, 0xffff):x}", f"fd00::{rng.randint(1, 0xffff):x}"])
        return cat, v, rng.choice(["Server address: {v}", "connect to {v}:5432", "ping {v}"])
    if cat == "token_placeholder":
        return cat, rng.choice(["Authorization: Bearer <token>", "Authorization: Bearer YOUR_ACCESS_TOKEN",
                                "Bearer $TOKEN", "aws_secret_access_key = <your secret key>"]), "{v}"
    return cat, "-----BEGIN PRIVATE KEY-----\n... (private key in base64 encoding) ...\n-----END PRIVATE KEY-----", "\n{v}\n"


HARVEST = {
    "version": r"(?:[Vv]ersion|Python|PostgreSQL|Django|release)\s+v?\d+\.\d+\.\d+(?:\.\d+)?\b",
    "date": r"\b\d{4}-\d\d-\d\d\b",
    "time": r"\b\d\d:\d\d:\d\d\b",
    "private_ip": r"\b(?:192\.168|10\.\d+|127\.0|172\.(?:1[6-9]|2\d|3[01]))\.\d+\.\d+\b",
    "port": r"\b(?:localhost|127\.0\.0\.1|0\.0\.0\.0|[a-z]+\.example\.com):\d{2,5}\b",
    "section": r"Section \d+\.\d+\.\d+(?:\.\d+)?",
    "isbn": r"ISBN[- ]?[\d-]{10,17}",
    "hash": r"\b[0-9a-f]{32,64}\b",
    "long_int": r"(?<![\d.])\d{13,19}(?![\d.])",
    "doc_ip": r"\b192\.0\.2\.\d+\b|\b2001:db8::[\w:]*",
}


def harvest_negatives(texts: list[str], per_category: int = 60, seed: int = 0) -> list[tuple[str, str, int, int]]:
    """(category, line, start, end) of real must-not-redact strings of the crawl, in their real line (≤ 300
    characters; lines with an '@' or a public IP address left out: e-mail and public IP addresses are PII by
    definition). Up to ``per_category`` distinct values per category, chosen with ``seed``."""
    rng = random.Random(seed)
    out = []

    for cat, pat in HARVEST.items():
        rx, seen, found = re.compile(pat), set(), []
        for t in texts:
            for line in t.split("\n"):
                if len(line) > 300 or "@" in line or _public_ip(line):
                    continue
                for m in rx.finditer(line):
                    if m.group(0) not in seen:
                        seen.add(m.group(0))
                        found.append((cat, line, *m.span()))
        rng.shuffle(found)
        out += found[:per_category]
    return out


# ---------------------------------------------------------------------------------------------------------

def build(n_docs: int = 600, seed: int = 1234, texts: list[str] | None = None) -> list[dict]:
    """Documents of real paragraphs with 1-3 planted values (kinds in turn) and 1-2 negatives (harvested or
    generated) inserted at sentence boundaries. Deterministic for a seed."""
    from stages.filter.pii import KINDS

    rng = random.Random(seed)
    paras = base_paragraphs()
    harvested = harvest_negatives(texts if texts is not None else [d["text"] for d in crawl_texts()], seed=seed)
    docs, k = [], 0
    for _ in range(n_docs):
        base = rng.choice(paras)
        cuts = sorted({0, len(base), *(m.end() for m in re.finditer(r"[.!?] ", base))})
        spaces = [m.end() for m in re.finditer(r" ", base)]
        cuts = sorted(set(cuts) | set(rng.sample(spaces, min(5, len(spaces)))))  # also between two words
        inserts = []  # (kind or None, category, prefix, value, suffix)
        for _ in range(rng.randint(1, 3)):
            kind = KINDS[k % len(KINDS)]
            k += 1
            v, tpl = generate(kind, rng)
            pre, post = tpl.split("{v}")
            inserts.append((kind, kind, pre, v, post))
        for _ in range(rng.randint(1, 2)):
            if rng.random() < 0.5:
                cat, line, s, e = rng.choice(harvested)
                inserts.append((None, cat, "\n" + line[:s], line[s:e], line[e:] + "\n"))
            else:
                cat, v, tpl = near_misses(rng)
                pre, post = tpl.split("{v}")
                inserts.append((None, cat, pre, v, post))
        positions = sorted(rng.choice(cuts) for _ in inserts)
        rng.shuffle(inserts)
        parts, planted, negatives, pos, length = [], [], [], 0, 0
        for at, (kind, cat, pre, v, post) in zip(positions, inserts):
            chunk = base[pos:at]
            parts.append(chunk)
            length += len(chunk)
            pos = at
            sep = "" if at == 0 or base[at - 1] in " \n" else " "
            pre = sep + pre
            start = length + len(pre)
            (planted if kind else negatives).append((start, start + len(v), kind or cat))
            piece = pre + v + post + ("" if post.endswith((" ", "\n")) else " ")
            parts.append(piece)
            length += len(piece)
        parts.append(base[pos:])
        docs.append({"text": "".join(parts), "planted": planted, "negatives": negatives})
    return docs
