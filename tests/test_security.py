"""Security: credentials only from the environment / the AWS chain (never configs, never in logs or artifacts),
no output path derived from crawled content, no unpickling of arbitrary objects from checkpoints or artifacts.

Where output names come from (grep of stages/ and flows/ for write_bytes / write_json / put_file /
output_filename / datafolder / os.path.join): constants (manifest.json, tokenizer.model, removed_samples.jsonl.gz,
mixture.json, stats.json, ...), the task rank (datatrove ``${rank}.jsonl.gz``, ``{rank:05d}``), step numbers
(``checkpoints/step_{step:06d}``), stage names, and the run id / dedup snapshot / evaluate checkpoint names from
the profile or the command line. No name is built from a URL, a record id, a document's text or metadata
(``metadata.source`` is an input file's base name, stored as data only).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import pickle
import re
import secrets
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest

from conftest import CRAWL, ROOT, SHARED, load_tiny
from stages.core.config import ConfigError, kiln_model
from stages.core.runner import StageError, run_stage
from stages.core.storage import Storage
from test_bad_input import JSONL, RECORDS, body, gz, response

SECRET_NAME = re.compile(r"secret|passw|credential|access_key|session_token|api_key|private_key|^aws_", re.I)


# ---------------------------------------------------------------------------------------------------------
# credentials

def _fields(model, prefix=""):
    """Every (dotted key, annotation) of a pydantic model, nested models included."""
    from pydantic import BaseModel

    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key
        for arg in (f.annotation, *getattr(f.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _fields(arg, key + ".")
            for sub in getattr(arg, "__args__", ()):  # list[Model], dict[str, Model]
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    yield from _fields(sub, key + ".")


def test_config_schema_has_no_secret_fields_and_refuses_them():
    """No profile key can hold a credential; S3 clients get only endpoint/retry options from Kiln (credentials:
    botocore's chain: environment, shared files, instance roles)."""
    from stages.core.storage import _s3_options

    assert not {"key", "secret", "token", "anon", "profile"} & set(_s3_options())
    assert not {"aws_access_key_id", "aws_secret_access_key"} & set(_s3_options().get("client_kwargs", {}))
    keys = list(_fields(kiln_model()))
    assert len(keys) > 150 and "evaluate.sets.name" in keys and "ingest.common_crawl.base_url" in keys
    # filter.pii.secrets: a switch (bool) for redacting secrets found in documents, not a secret
    assert [k for k in keys if SECRET_NAME.search(k.rsplit(".", 1)[-1])] == ["filter.pii.secrets"]
    assert kiln_model().model_fields["filter"].annotation.model_fields["pii"].annotation.model_fields[
        "secrets"].annotation is bool
    value = "kiln-" + secrets.token_hex(16)
    for key in ("run.aws_secret_access_key", "ingest.aws_access_key_id", "run.storage_options",
                "ingest.common_crawl.secret"):
        over = {"ingest.common_crawl": {"crawl": "CC-MAIN-2024-22", "secret": value}} if "common_crawl" in key else \
            {key: value}
        with pytest.raises(ConfigError, match=r"unknown key") as e:
            load_tiny(None, over)
        assert value not in str(e.value)  # the refused value is not echoed


def test_shipped_files_hold_no_credentials():
    """configs/, prefect.yaml, docker/ and the Makefile: no AWS key ids, secret keys, private keys or tokens."""
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*\S|-----BEGIN [A-Z ]*"
                         r"PRIVATE KEY|ghp_[0-9A-Za-z]{30}|xox[bp]-|secret_key\s*[:=]\s*['\"]?\w{12}", re.I)
    files = [*ROOT.glob("configs/*"), ROOT / "prefect.yaml", ROOT / "Makefile", *ROOT.glob("docker/**/*")]
    files = [f for f in files if f.is_file()]
    assert len(files) >= 5
    hits = [(f.name, m.group(0)) for f in files for m in pattern.finditer(f.read_text(errors="replace"))]
    assert [h for h in hits if h[0] != "compose.yaml"] == []
    # docker/compose.yaml: only the throwaway MinIO container's own root login, handed to Kiln's containers as
    # environment variables (Kiln reads the AWS chain); no other credential
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    minio = re.search(r"MINIO_ROOT_PASSWORD: (\S+)", compose).group(1)
    assert re.findall(r"AWS_SECRET_ACCESS_KEY: (\S+)", compose) == [minio] and "minio:9000" in compose


def _forms(secret: str) -> list[bytes]:
    """The secret as it could leak: raw, URL-encoded, JSON-escaped, and base64 at each of the 3 alignments."""
    raw = secret.encode()
    out = {raw, urllib.parse.quote(secret, safe="").encode(), urllib.parse.quote(secret).encode(),
           urllib.parse.quote_plus(secret).encode(),
           json.dumps(secret).encode()[1:-1]}
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw)
        out.add(enc[4:-4] if shift else enc[:-4])  # the middle, which does not depend on neighbouring bytes
        out.add(base64.urlsafe_b64encode(b"\0" * shift + raw)[4:-4])
    return sorted(out)


def test_s3_run_leaks_no_credentials(tmp_path, s3_bucket):
    """ingest -> normalize -> dedup -> report against moto_server (input and artifacts in S3), each stage a `kiln`
    process whose environment holds a distinctive random key id and secret (AWS's charset: / and + included).
    Nothing of the run holds them in any form: every object in the bucket (manifests, data, datatrove logs and
    stats, dedup index, report), the local scratch (TMPDIR), and the captured stdout/stderr."""
    key_id = "AKIA" + secrets.token_hex(8).upper()
    secret = secrets.token_urlsafe(24)[:20] + "/k+" + secrets.token_hex(8)
    bucket = Storage(s3_bucket)
    bucket.put_file(str(CRAWL / "docs.python.org-0002.warc.gz"), "crawl/a.warc.gz")
    bucket.put_file(str(SHARED / "warc" / "cc.warc.gz"), "crawl/b.warc.gz")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "TMPDIR": str(scratch),
           "KILN_STORAGE": f"{s3_bucket}/artifacts"}
    sets = ["--set", f"ingest.inputs=['{s3_bucket}/crawl/']", "--set", "run.workers=2", "--set", "run.tasks=2"]
    captured = []
    for cmd in (["stage", "ingest"], ["stage", "normalize"], ["stage", "dedup"], ["report"]):
        r = subprocess.run([sys.executable, "-m", "flows.cli", *cmd, "--run-id", "sec", *sets], env=env, cwd=ROOT,
                           capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        captured += [r.stdout, r.stderr]
    objects = {rel: bucket.read_bytes(rel) for rel in bucket.list("", suffix="") if not rel.startswith("crawl/")}
    stored = {rel for rel in objects}
    assert {"artifacts/sec/ingest/manifest.json", "artifacts/sec/dedup/manifest.json"} <= stored
    assert any(r.startswith("artifacts/sec/ingest/logs/") for r in stored)  # datatrove logs and stats
    assert any("report" in r for r in stored) and any(r.startswith("artifacts/index/") for r in stored)
    manifest = json.loads(objects["artifacts/sec/ingest/manifest.json"])
    assert manifest["counts"]["html_pages"] == 10  # the run really read the bucket with these credentials
    local = {str(p): p.read_bytes() for p in scratch.rglob("*") if p.is_file()}
    for wrap in (lambda b: b, lambda b: base64.b64encode(b"x" + b), lambda b: base64.b64encode(b"xy" + b),
                 lambda b: urllib.parse.quote(b"k=" + b).encode()):  # the scan finds each form (control)
        assert any(form in wrap(secret.encode()) for form in _forms(secret))
    blobs = {**objects, **local, **{f"captured[{i}]": b for i, b in enumerate(captured)}}
    for label, data in blobs.items():
        if label.endswith(".gz"):
            data = gzip.decompress(data)
        for form in [*_forms(secret), key_id.encode()]:
            assert form not in data, (label, form)


# ---------------------------------------------------------------------------------------------------------
# paths from crawled content

def test_crawled_urls_and_ids_never_become_paths(tmp_path, monkeypatch):
    """WARC records and JSONL rows whose URLs / ids are `../` chains, absolute paths, NUL bytes and 5,000-character
    names go through ingest -> normalize -> dedup: every file written is under the storage folder with a name
    from Kiln's own vocabulary, nothing appears beside it or in the working directory, and the crafted strings
    come out as data (ids, metadata.url) unchanged."""
    tag = uuid.uuid4().hex[:8]
    escape = f"/tmp/kiln-pwn-{tag}"
    names = [f"../../../../..{escape}", escape, f"x/../../{tag}/\x00/evil", "../" * 40 + "x" * 5000]
    urls = [f"https://x.test/../../../..{escape}", f"https://x.test/{escape}", f"https://x.test/../{tag}/\x00/evil",
            "https://x.test/" + "../" * 40 + "x" * 5000]
    not_http = [escape, f"file://{escape}/index.html"]  # warcio reads no HTTP headers: counted non_response
    records = [response(body(i + 1), uri=u) for i, u in enumerate(urls + not_http)]
    for i, name in enumerate(names):  # the record ids: the crafted names as they are
        old = re.search(rb"WARC-Record-ID: <[^>]+>", records[i]).group(0)
        records[i] = records[i].replace(old, b"WARC-Record-ID: " + name.encode())
    work = tmp_path / "a" / "b"
    (work / "in").mkdir(parents=True)
    (work / "cwd").mkdir()
    (work / "in" / "crafted.warc.gz").write_bytes(gz([RECORDS[0], *records]))
    rows = [{"text": json.loads(line)["text"], "id": n, "url": n, "source": n, "metadata": {"path": n}}
            for line, n in zip(gzip.decompress(JSONL.read_bytes()).splitlines(), names + not_http)]
    (work / "in" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = sorted(p for p in tmp_path.rglob("*"))
    monkeypatch.chdir(work / "cwd")
    cfg = load_tiny(None, {"ingest.inputs": [str(work / "in")], "run.workers": 1, "run.tasks": 2,
                           "normalize.language_id": False})
    store = work / "st"
    for stage in ("ingest", "normalize", "dedup"):
        run_stage(stage, cfg, str(store), "run1")
    new = sorted(set(tmp_path.rglob("*")) - set(before))
    outside = [p for p in new if store not in p.parents and p != store]
    assert outside == []  # nothing beside the storage folder, nothing in the working directory
    assert not Path(escape).exists() and not list(Path("/tmp").glob(f"*{tag}*"))
    allowed = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
    bad = [p for p in new if not allowed.match(p.name) or p.name in (".", "..")]
    assert bad == [], bad[:3]
    docs = [json.loads(line) for f in (store / "run1" / "ingest" / "data").glob("*.jsonl.gz")
            for line in gzip.decompress(f.read_bytes()).splitlines()]
    by_source = {}
    for d in docs:
        by_source.setdefault(d["metadata"]["source"], []).append(d)
    assert sorted(d["id"] for d in by_source["crafted.warc.gz"]) == sorted(names)  # ids are data, pages kept
    assert sorted(d["metadata"]["url"] for d in by_source["crafted.warc.gz"]) == sorted(urls)
    assert sorted(d["id"] for d in by_source["rows.jsonl"]) == sorted(names + not_http)
    assert json.loads((store / "run1" / "ingest" / "manifest.json").read_text())["counts"]["removed"][
        "non_response"] == 1 + len(not_http)


# ---------------------------------------------------------------------------------------------------------
# no unpickling of arbitrary objects

UNSAFE_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "cloudpickle.load",
                "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads", "yaml.load", "yaml.unsafe_load",
                "yaml.full_load", "torch.serialization.load"}


def unsafe_loads(source: str) -> list[str]:
    """Calls in ``source`` that can run code from the bytes they load, by the syntax tree (import aliases
    resolved): torch.load without ``weights_only=True``, np.load with ``allow_pickle`` other than False, and the
    pickle family, yaml.load, marshal. A class that derives pickle.Unpickler and overrides ``find_class``
    (the restricted DCP metadata reader) is the allowed way to unpickle."""
    import ast

    tree, alias = ast.parse(source), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:  # import numpy as np -> np: numpy; import os.path -> os: os
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            alias |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}

    def dotted(e) -> str:
        if isinstance(e, ast.Name):
            return alias.get(e.id, e.id)
        if isinstance(e, ast.Attribute):
            return f"{dotted(e.value)}.{e.attr}"
        return "?"

    def kw(call, name):
        return next((k.value for k in call.keywords if k.arg == name), None)

    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(dotted(b) == "pickle.Unpickler" for b in node.bases):
            if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                hits.append(f"class {node.name}(pickle.Unpickler) without find_class")
        if not isinstance(node, ast.Call):
            continue
        name, line = dotted(node.func), f"line {node.lineno}"
        if name == "torch.load":
            w = kw(node, "weights_only")
            if not (isinstance(w, ast.Constant) and w.value is True):
                hits.append(f"{line}: torch.load without weights_only=True")
        elif name == "numpy.load":
            p = kw(node, "allow_pickle")
            if p is not None and not (isinstance(p, ast.Constant) and p.value is False):
                hits.append(f"{line}: numpy.load(allow_pickle=...)")
        elif name in UNSAFE_CALLS:
            hits.append(f"{line}: {name}")
    return hits


def test_no_unsafe_loader_in_stages_or_flows():
    """torch.load only with weights_only=True; no pickle/dill/joblib/marshal loads, no np.load(allow_pickle=True)
    (np.load's default refuses pickled arrays), no yaml.load (configs: yaml.safe_load) — checked on the syntax tree
    of every module, with controls that the checker sees what a text search would miss."""
    controls = {
        "import torch\na = torch.load(p)\nb = torch.load(q, weights_only=True)\n": 1,  # one safe, one not
        "import torch\ntorch.load(p, weights_only=False)  # weights_only=True\n": 1,
        "from torch import load\nload(p)\n": 1,
        "import pickle as pk\npk.Unpickler(f).load()\n": 1,
        "import numpy as np\nnp.load(f, allow_pickle = True)\n": 1,
        "import yaml\nyaml.load(s)\nyaml.safe_load(s)\n": 1,
        "import pickle\nclass R(pickle.Unpickler):\n    pass\n": 1,
        "import pickle\nclass R(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise Exception\n": 0,
        "import numpy as np, torch\nnp.load(f)\nnp.load(f, allow_pickle=False)\ntorch.load(f, weights_only=True)\n": 0,
    }
    for src, n in controls.items():
        assert len(unsafe_loads(src)) == n, (src, unsafe_loads(src))
    sources = [*ROOT.glob("stages/**/*.py"), *ROOT.glob("flows/**/*.py")]
    assert len(sources) > 30
    hits = {str(p.relative_to(ROOT)): h for p in sources if (h := unsafe_loads(p.read_text()))}
    assert hits == {}
    assert "torch.load(io.BytesIO(storage.read_bytes(f\"{rel_dir}/{MODEL_FILE}\")), weights_only=True" in \
        (ROOT / "stages" / "train" / "checkpoint.py").read_text()


class _Payload:
    """Unpickling this creates a folder: the marker that code from the file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _malicious_checkpoint(folder: Path, marker: Path) -> None:
    import torch

    from stages.train.model import GPTConfig

    folder.mkdir(parents=True)
    torch.save({"embed.weight": torch.zeros(2, 2), "evil": _Payload(str(marker))}, folder / "model.pt")
    cfg = GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, seq_len=16)
    (folder / "model_config.json").write_text(json.dumps({"model": cfg.to_dict()}))


def test_malicious_pickle_in_a_checkpoint_is_refused(tmp_path):
    """A model.pt that would run code when unpickled: load_model (weights_only) refuses it, evaluate's loader
    turns that into one StageError naming the checkpoint, and the payload never runs."""
    import torch

    from stages.evaluate import _load
    from stages.train.checkpoint import load_model

    marker = tmp_path / "pwned"
    _malicious_checkpoint(tmp_path / "ckpt" / "final", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(Storage(str(tmp_path / "ckpt")), "final")
    with pytest.raises(StageError, match=r"^evaluate: checkpoint .*ckpt/final is not a plain state dict; refused to "
                                         r"unpickle it"):
        _load(str(tmp_path / "ckpt" / "final"), Storage(str(tmp_path / "train")), 64)
    assert not marker.exists()
    torch.load(tmp_path / "ckpt" / "final" / "model.pt", weights_only=False)  # the file really is a payload
    assert marker.is_dir()


def _tiny_training(tmp_path):
    import torch

    from stages.train.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, seq_len=16))
    return model, torch.optim.AdamW(model.parameters())


def test_malicious_training_state_is_refused(tmp_path):
    """A state folder whose .metadata would run code when unpickled (DCP's FileSystemReader: plain pickle.load):
    load_state's restricted reader refuses it with an error naming the file and the global it wanted, and the
    payload never runs; the same bytes through DCP's own reader do run it (the file really is a payload)."""
    import types

    import torch.distributed.checkpoint as dcp

    from stages.train.checkpoint import MARKER, STATE_DIR, load_state, step_dir

    marker = tmp_path / "pwned"
    out = Storage(str(tmp_path / "train"))
    out.write_bytes(f"{step_dir(5)}/{STATE_DIR}/.metadata", pickle.dumps(_Payload(str(marker))))
    out.write_json(f"{step_dir(5)}/{MARKER}", {"step": 5})
    model, opt = _tiny_training(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match=r"^training state .*/load_000005_rank0/\.metadata refers to "
                                                     r"os\.makedirs, not a torch\.distributed\.checkpoint metadata "
                                                     r"type: refused to unpickle it$"):
        load_state(out, 5, model, opt, types.SimpleNamespace(rank=0, world=1), str(tmp_path / "staging"))
    assert not marker.exists()
    with pytest.raises(BaseException):  # noqa: B017 - DCP's own reader runs it (then fails: not Metadata)
        dcp.FileSystemReader(str(tmp_path / "train" / step_dir(5) / STATE_DIR)).read_metadata()
    assert marker.is_dir()


def test_malicious_item_in_a_training_state_is_refused(tmp_path):
    """Valid metadata, but a non-tensor item (the optimizer's lr) is a pickled payload: DCP's DefaultLoadPlanner
    reads such items with torch.load(weights_only=False); load_state's planner loads them weights_only and the
    payload never runs. Positive control: DCP's default planner on the same folder runs it."""
    import types

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from stages.train.checkpoint import MARKER, STATE_DIR, load_state, step_dir

    marker = tmp_path / "pwned"
    model, opt = _tiny_training(tmp_path)
    msd, osd = get_state_dict(model, opt)
    osd["param_groups"][0]["lr"] = _Payload(str(marker))
    folder = tmp_path / "train" / step_dir(5) / STATE_DIR
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    assert not marker.exists()
    out = Storage(str(tmp_path / "train"))
    out.write_json(f"{step_dir(5)}/{MARKER}", {"step": 5})
    model, opt = _tiny_training(tmp_path)
    with pytest.raises(BaseException, match="Weights only load failed"):  # noqa: B017 - DCP's CheckpointException
        load_state(out, 5, model, opt, types.SimpleNamespace(rank=0, world=1), str(tmp_path / "staging"))
    assert not marker.exists()
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    assert marker.is_dir()
