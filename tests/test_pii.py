"""PII redaction (stages/filter/pii.py) on real text: each kind planted in real articles gets its placeholder,
real must-not-redact strings stay, real crawl pages change exactly where real PII is, the block counts."""

from __future__ import annotations

import re

import pytest

from conftest import CRAWL, load_tiny, real_docs
from stages.filter.pii import KINDS, PLACEHOLDERS, PIIConfig, find_pii, pii_block, pii_counts, redact

PEM = ("-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(
    "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi3kZf0hGZcyb8KsT1xWJ0aQ5e" + c for c in "ABCDEFGH")
    + "\nq2W4x9==\n-----END RSA PRIVATE KEY-----")
# (kind, value, sentence it goes in): valid values (Luhn, mod-97, SSA rules, ITU codes, global addresses)
PLANTED = [
    ("email", "jane.roe+news@posteo.de", "Write to {v} for a copy."),
    ("email", "o.okafor@cs.stanford.edu", "From: O. Okafor <{v}>"),
    ("phone", "+44 20 7946 0958", "Call {v} for tickets."),
    ("phone", "(555) 123-4567", "The office number is {v}."),
    ("phone", "+1-202-555-0173", "Fax: {v}"),
    ("phone", "0049 30 1234567", "Berlin office: {v}."),
    ("phone", "020 7946 0958", "Tel: {v}"),
    ("ip", "93.184.216.34", "The request came from {v}."),
    ("ip", "2a02:1810:4d02:9f00::1", "Login from {v} at midnight."),
    ("ip", "203.0.114.5", "See http://{v}/admin for the panel."),
    ("credit_card", "4111 1111 1111 1111", "Card number: {v}"),
    ("credit_card", "5555-5555-5555-4444", "He paid with card {v} on Friday."),
    ("credit_card", "378282246310005", "Amex {v}."),
    ("iban", "DE89 3704 0044 0532 0130 00", "Transfer the fee to IBAN {v}."),
    ("iban", "GB82WEST12345698765432", "Account: {v}"),
    ("iban", "FR14 2004 1010 0505 0001 3M02 606", "Bank details: {v} (BIC BNPAFRPP)."),
    ("ssn", "123-45-6789", "His social security number is {v}."),
    ("secret", "AKIAIOSFODNN7EXAMPLE", "aws_access_key_id = {v}"),
    ("secret", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_access_key = {v}"),
    ("secret", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "Authorization: Bearer {v}"),
    ("secret", "ghp_" + "a1B2c3D4e5" * 3 + "F6g7h8", "GITHUB_TOKEN={v}"),
    ("secret", PEM, "\n{v}\n"),
]
# must stay: versions, dates, times, ISBNs, ports, private / loopback / documentation IPs, hashes, ids, and
# near-misses: Luhn-invalid card, IBAN with a wrong check, SSNs with area 000 / 666 / 9xx, a 1xx area code
UNTOUCHED = ["Python 3.11.2", "release 1.4.14", "on 2023-01-05 at 12:30:45", "ISBN 978-0-596-52068-7",
             "ISBN 9780596520687", "listening on port 5432", "localhost:8000", "192.168.0.1", "10.0.0.1",
             "127.0.0.1:8000", "192.0.2.30", "2001:db8::1", "fe80::1", "a[1::2]", "Section 9.7.3.5",
             "sha1 3f786850e387550fdab836ed7e6dc881de23001b", "id 9223372036854775807", "0.7071067811865476",
             "card 4111 1111 1111 1112", "IBAN DE89 3704 0044 0532 0130 01", "SSN 000-12-3456", "SSN 666-12-3456",
             "SSN 912-34-5678", "part 123-456-7890", "part 006-224-6729", "Authorization: Bearer <token>", "novas==3.1.1.3",
             "-----BEGIN PRIVATE KEY-----\n... (private key in base64 encoding) ...\n-----END PRIVATE KEY-----"]


def plant(base: str, items: list[tuple[str, str, str]]) -> str:
    """``base`` with each sentence inserted after a real sentence end (in order)."""
    cuts = [m.end() for m in re.finditer(r"[.!?] ", base)]
    out, pos = [], 0
    for i, (_, v, tpl) in enumerate(items):
        at = cuts[i % len(cuts)] if cuts else len(base)
        at = max(at, pos)
        out += [base[pos:at], tpl.replace("{v}", v), " "]
        pos = at
    return "".join(out + [base[pos:]])


@pytest.fixture(scope="module")
def articles() -> list[str]:
    return [d["text"] for d in real_docs(181) if "@" not in d["text"] and len(d["text"]) > 1500][:40]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_planted_in_real_text_gets_its_placeholder(articles, kind):
    items = [p for p in PLANTED if p[0] == kind]
    for i, art in enumerate(articles[:10]):
        text = plant(art, items)
        assert redact(art, PIIConfig())[0] == art  # the real article alone has nothing to redact
        out, counts = redact(text, PIIConfig())
        assert counts == {k: (len(items) if k == kind else 0) for k in KINDS}, (i, counts)
        for _, v, _ in items:
            assert v not in out
        assert out.count(PLACEHOLDERS[kind]) == len(items)
        # only the values changed: the redacted text is the planted text with each value replaced
        expected = text
        for _, v, _ in items:
            expected = expected.replace(v, PLACEHOLDERS[kind], 1)
        assert out == expected


def test_label_stays_only_the_secret_goes():
    out, _ = redact("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
                    "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjg", PIIConfig())
    assert out == "aws_secret_access_key = <SECRET>\nAuthorization: Bearer <SECRET>"


def test_pem_blocks_encrypted_and_truncated(articles):
    enc = PEM.replace("-----\n", "-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\n", 1)
    out, counts = redact(f"Key:\n{enc}\nDone.", PIIConfig())
    assert out == "Key:\n<SECRET>\nDone." and counts["secret"] == 1
    cut = PEM.rsplit("\n", 2)[0]  # no END line: the prose after the key stays
    text = f"{cut}\n{articles[0]}"
    assert redact(text, PIIConfig())[0] == f"<SECRET>\n{articles[0]}"


def test_must_not_redact_strings_stay_in_real_text(articles):
    for art in articles[:10]:
        text = plant(art, [("", v, "{v}") for v in UNTOUCHED])
        assert redact(text, PIIConfig()) == (text, dict.fromkeys(KINDS, 0))
    for v in UNTOUCHED:
        assert find_pii(v, PIIConfig()) == [], v


def test_switches_and_private_ips():
    text = "Mail a@b.org, call +44 20 7946 0958 from 93.184.216.34 or 192.168.0.1."
    assert redact(text, PIIConfig(enabled=False)) == (text, dict.fromkeys(KINDS, 0))
    out, counts = redact(text, PIIConfig(phones=False, emails=False))
    assert out == "Mail a@b.org, call +44 20 7946 0958 from <IP_ADDRESS> or 192.168.0.1."
    out, counts = redact(text, PIIConfig(only_public_ips=False))
    assert out == "Mail <EMAIL>, call <PHONE> from <IP_ADDRESS> or <IP_ADDRESS>."
    assert counts == {**dict.fromkeys(KINDS, 0), "email": 1, "phone": 1, "ip": 2}


# ---------------------------------------------------------------------------------------------------------
# real crawl pages, extracted as the tiny profile's ingest does

VENV = "https://docs.python.org/3.11/tutorial/venv.html"
SOCKET = "https://docs.python.org/3.11/library/socket.html"
SSL = "https://docs.python.org/3.11/library/ssl.html"
ADMIN = "https://docs.djangoproject.com/en/3.2/ref/django-admin.html"
COLLATION = "https://www.postgresql.org/docs/15/collation.html"
NET_TYPES = "https://www.postgresql.org/docs/15/datatype-net-types.html"
MATCHING = "https://www.postgresql.org/docs/15/functions-matching.html"


@pytest.fixture(scope="module")
def crawl_pages() -> dict[str, str]:
    from test_extract import warc_pages

    from stages.ingest.extract import extract_text

    html = warc_pages(CRAWL / "docs.python.org-0001.warc.gz", {VENV, SOCKET, SSL})
    html |= warc_pages(CRAWL / "docs.djangoproject.com-0000.warc.gz", {ADMIN})
    html |= warc_pages(CRAWL / "www.postgresql.org-0000.warc.gz", {COLLATION, NET_TYPES, MATCHING})
    cfg = load_tiny(None).ingest.extract
    out = {u: extract_text(h, cfg)[1] for u, h in html.items()}
    assert len(out) == 7 and all(out.values())
    return out


def changes(text: str) -> list[tuple[str, str]]:
    return [(k, text[s:e]) for s, e, k in find_pii(text, PIIConfig())]


def test_real_pages_full_of_numbers_stay(crawl_pages):
    """PostgreSQL pages of section numbers (24.2.2.1. headings, "see Section 9.7.3.5"), inet/cidr tables
    (192.168.100.128/25, 2001:4f8:3:ba::/64, ::ffff:1.2.3.0/120) and MAC addresses: nothing to redact."""
    for url in (COLLATION, NET_TYPES, MATCHING):
        text = crawl_pages[url]
        assert redact(text, PIIConfig())[0] == text, url
    assert "24.2.2.1.\xa0Standard Collations" in crawl_pages[COLLATION]
    assert re.search(r"Section\s9\.7\.3\.5", crawl_pages[MATCHING]) and "08:00:2b:01:02:03" in crawl_pages[NET_TYPES]


def test_real_pages_change_only_where_real_pii_is(crawl_pages):
    venv = crawl_pages[VENV]  # package versions stay; the README author's address goes
    assert changes(venv) == [("email", "me@kennethreitz.com")]
    out = redact(venv, PIIConfig())[0]
    assert "novas==3.1.1.3" in out and "numpy (1.9.2)" in out and "<EMAIL>" in out
    sock = crawl_pages[SOCKET]  # public example addresses go; IPv6 outside 2000::/3 stays
    assert changes(sock) == [("ip", "100.50.200.5"), ("ip", "2606:2800:220:1:248:1893:25c8:1946"),
                             ("ip", "93.184.216.34"), ("ip", "100.50.200.5"), ("ip", "123.45.67.89"),
                             ("ip", "123.45.67.89"), ("ip", "7.10.0.5")]
    out = redact(sock, PIIConfig())[0]
    assert "'5aef:2b::8'" in out and "'7.10.0.5'" not in out
    ssl = crawl_pages[SSL]  # the PEM layout example has no key in it
    assert changes(ssl) == [("email", "hostmaster@eff.org"), ("email", "ops@myserver.mygroup.myorganization.com")]
    assert "-----BEGIN RSA PRIVATE KEY-----\n... (private key in base64 encoding) ..." in redact(ssl, PIIConfig())[0]
    admin = crawl_pages[ADMIN]  # testserver 1.2.3.4:7000 and 127.0.0.1:8000 stay, a global IPv6 goes
    assert changes(admin) == [("ip", "200a::1"), ("email", "foo@example.com"), ("email", "bar@example.com")]
    out = redact(admin, PIIConfig())[0]
    assert "--addrport 1.2.3.4:7000" in out and "of 127.0.0.1:8000" in out and "[<IP_ADDRESS>]:8000" in out


# ---------------------------------------------------------------------------------------------------------
# the datatrove block

def test_block_counts_kinds_and_documents_never_values(articles):
    import dill
    from datatrove.data import Document

    docs = [Document(text=plant(articles[i], PLANTED[i::5]), id=f"planted-{i}") for i in range(5)]
    docs += [Document(text=a, id=f"real-{i}") for i, a in enumerate(articles[5:15])]
    block = dill.loads(dill.dumps(pii_block(PIIConfig())))  # workers receive it pickled
    out = {d.id: d.text for d in block.run(iter([Document(text=d.text, id=d.id) for d in docs]))}
    stats = {k: getattr(v, "total", v) for k, v in block.stats.stats.items()}
    assert len(out) == len(docs)
    assert all(out[f"real-{i}"] == articles[5 + i] for i in range(10))
    counts = pii_counts(stats)
    assert set(counts) == {"documents", *KINDS}
    assert counts["documents"] == 5
    assert {k: counts[k] for k in KINDS} == {k: sum(p[0] == k for p in PLANTED) for k in KINDS}
    dumped = repr(stats) + repr(counts)
    assert not any(v in dumped or v in " ".join(out.values()) for _, v, _ in PLANTED)
    assert pii_counts({}) == {"documents": 0, **dict.fromkeys(KINDS, 0)}
