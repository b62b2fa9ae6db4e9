"""Profiles: every shipped profile validates; bad ones fail with one line naming the file and key."""

import subprocess
import sys
from pathlib import Path

import pytest

from stages.core.config import ConfigError, load_config, resolve_path, storage_uri

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_profiles_validate(profile):
    cfg = load_config(profile)
    assert cfg.run.tasks >= 1
    assert resolve_path(cfg, "x") == str(profile.parent / "x")


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_named(tmp_path):
    p = _write(tmp_path, "run:\n  seed: 1\ntrain:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: unknown key 'train.learning_rat'"


def test_wrong_type_is_named(tmp_path):
    p = _write(tmp_path, "run:\n  tasks: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: run.tasks: ") and "'many'" in msg and "\n" not in msg


def test_unknown_section_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(_write(tmp_path, "trian: {}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "run: [\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_storage_precedence(tmp_path, monkeypatch):
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    monkeypatch.delenv("KILN_STORAGE", raising=False)
    assert storage_uri(cfg) == str(ROOT / "artifacts")
    monkeypatch.setenv("KILN_STORAGE", "s3://b/p")
    assert storage_uri(cfg) == "s3://b/p"
    assert storage_uri(cfg, "s3://other/x") == "s3://other/x"


def test_cli_reports_bad_config_in_one_line(tmp_path):
    p = _write(tmp_path, "dedup:\n  nope: 1\n")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "ingest", "--config", str(p),
                        "--storage", str(tmp_path / "a")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip() == f"kiln: config error: {p}: unknown key 'dedup.nope'"


def test_cli_says_which_stage_to_run_first(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "dedup", "--storage", str(tmp_path / "a")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert "needs the output of 'normalize'" in r.stderr and "run `kiln stage normalize` first" in r.stderr
    assert "Traceback" not in r.stderr
