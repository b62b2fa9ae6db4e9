"""kiln plan: Chinchilla numbers by hand, the profile's model counted exactly, and a run's dataset against them."""

import math

import pytest
from conftest import TINY, load_tiny, seed_files

from flows.cli import main
from stages.train.plan import chinchilla, human, profile_params


def test_chinchilla_by_hand():
    p = chinchilla(params=1e9)  # D = 20 N, C = 6 N D
    assert p == {"compute": 6 * 1e9 * 2e10, "params": 1e9, "tokens": 2e10}
    c = chinchilla(compute=1.2e20)  # N = sqrt(C / 120) = 1e9
    assert c["params"] == pytest.approx(1e9) and c["tokens"] == pytest.approx(2e10)
    assert 6 * c["params"] * c["tokens"] == pytest.approx(1.2e20)
    for bad in ({}, {"compute": 1.0, "params": 1.0}, {"compute": 0.0}, {"params": -5.0}):
        with pytest.raises(ValueError):
            chinchilla(**bad)


def test_profile_params_match_the_real_model():
    import torch

    from stages.train.model import GPT, GPTConfig

    cfg = load_tiny(None).train.model.model_dump()
    torch.manual_seed(0)
    real = sum(p.numel() for p in GPT(GPTConfig.from_dict({**cfg, "vocab_size": 1000})).parameters())
    assert profile_params(cfg, 1000) == real
    assert profile_params(cfg, 2000) - real == 1000 * cfg["d_model"]  # one tied embedding row per token


def test_cli_against_a_runs_shards(tmp_path, capsys):
    storage = str(tmp_path)
    seed_files(storage, "p", "tokenizer", {"tokenizer.model": b"x"}, metrics={"vocab_size": 1000})
    seed_files(storage, "p", "shard", {"index.json": b"{}"}, counts={"tokens_train": 2_000_000})
    assert main(["plan", "--params", "1e6", "--config", str(TINY), "--storage", storage, "--run-id", "p"]) == 0
    out = capsys.readouterr().out
    assert "N = 1M (1,000,000)" in out and "D = 20M (20,000,000)" in out and "C = 1.200e+14 FLOPs" in out
    assert "2,000,000 training tokens" in out and "10.00% of D" in out and "10.0 epochs" in out
    n = profile_params(load_tiny(None).train.model.model_dump(), 1000)
    assert f"{human(n)} parameters (vocabulary 1,000)" in out
    # no --params / --compute: the profile's model is the target; no shards yet: said so
    assert main(["plan", "--config", str(TINY), "--storage", str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert f"D = {human(20 * profile_params(load_tiny(None).train.model.model_dump(), 4096))}" in out
    assert "no shard manifest" in out
    assert main(["plan", "--compute", "0", "--config", str(TINY), "--storage", storage]) == 2
    assert math.isclose(chinchilla(compute=1e18)["params"], math.sqrt(1e18 / 120))
