"""Model and optimisation options in-process (no torchrun): QK-norm, untied embeddings, the WSD schedule by
hand, activation checkpointing giving the same loss and gradients; all learning on real token windows."""

import math

import pytest
import torch
import torch.nn.functional as F

from stages.train import parallel
from stages.train.model import GPT, GPTConfig
from stages.train.worker import build_optimizer, lr_at

SHAKESPEARE = __import__("conftest").SHARED / "eval" / "tinyshakespeare" / "input.txt"


def batches(seq_len: int = 32, n: int = 8) -> torch.Tensor:
    """Byte-level windows of real text (vocabulary 256): (n, seq_len + 1)."""
    raw = torch.tensor(list(SHAKESPEARE.read_bytes()[: n * (seq_len + 1) * 4]), dtype=torch.long)
    return raw[: n * (seq_len + 1)].view(n, seq_len + 1)


def small(**kw) -> GPTConfig:
    return GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layers=2, n_heads=4, **kw)


@pytest.mark.parametrize("opts", [{}, {"qk_norm": True}, {"tie_embeddings": False}])
def test_variants_learn_real_text(opts):
    torch.manual_seed(0)
    model = GPT(small(**opts))
    base = GPT(small())
    n_extra = model.num_params() - base.num_params()
    if opts.get("qk_norm"):
        assert n_extra == 2 * 2 * 16  # two RMSNorm(head_dim=16) per layer
    if opts.get("tie_embeddings") is False:
        assert n_extra == 256 * 64 and model.head.weight is not model.embed.weight
    x = batches()
    opt = build_optimizer(model, {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1})
    losses = []
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0 and losses[-1] < losses[0] - 1.5  # ln(256) = 5.5 at the start


def test_wsd_and_cosine_schedules_by_hand():
    t = {"lr": 1.0, "warmup_steps": 10, "steps": 100, "min_lr_ratio": 0.1, "schedule": "wsd", "decay_fraction": 0.2}
    assert [lr_at(s, t) for s in (0, 9)] == [0.1, 1.0]
    assert all(lr_at(s, t) == 1.0 for s in range(10, 80))  # stable
    assert lr_at(80, t) == pytest.approx(1 - 0.9 * 1 / 20) and lr_at(99, t) == pytest.approx(0.1)
    assert all(lr_at(s, t) > lr_at(s + 1, t) for s in range(80, 99))
    c = {**t, "schedule": "cosine"}
    assert lr_at(10, c) == 1.0 and lr_at(55, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(100, c) == pytest.approx(0.1)


def test_activation_checkpointing_same_loss_and_grads():
    x = batches()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = GPT(small(qk_norm=True))
        if ckpt:
            parallel.checkpoint_activations(model)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        grads.append((loss.item(), {k: v.grad.clone() for k, v in model.named_parameters()},
                      set(model.state_dict())))
    (l0, g0, k0), (l1, g1, k1) = grads
    assert l0 == l1 and k0 == k1  # same loss; checkpoint state dict keys unchanged
    for name in g0:  # parameter names carry the wrapper's prefix; the gradients are the same
        match = [v for k, v in g1.items() if k.replace("._checkpoint_wrapped_module", "") == name]
        assert len(match) == 1 and torch.allclose(g0[name], match[0], atol=1e-6), name


def test_fused_head_and_loss_equal_the_plain_path():
    """Training's fused, chunked head + cross-entropy gives the plain path's loss and gradients (fp32: to rounding;
    bf16 autocast: close), ignoring -100 targets, with a batch that is not a multiple of the chunk."""
    x = batches(n=12)  # 12 x 32 = 384 rows: one full 256-row chunk and a partial one
    y = x[:, 1:].clone()
    y[0, :7] = -100
    for dtype in ("fp32", "bf16"):
        results = []
        for fused in (True, False):
            torch.manual_seed(0)
            model = GPT(small(qk_norm=True))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                if fused:
                    logits, loss = model(x[:, :-1], y)
                    assert logits is None
                else:
                    logits, _ = model(x[:, :-1])
                    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                                             ignore_index=-100)
            loss.backward()
            results.append((loss.item(), {k: p.grad for k, p in model.named_parameters()}))
        (lf, gf), (lp, gp) = results
        tol = 1e-5 if dtype == "fp32" else 2e-2
        assert lf == pytest.approx(lp, rel=tol), dtype
        for k in gp:
            scale = gp[k].abs().max().item()
            assert (gf[k] - gp[k]).abs().max().item() <= tol * max(scale, 1e-3), (dtype, k)
    with torch.no_grad():  # evaluation keeps the plain path (logits and per-token losses)
        logits, nll = GPT(small())(x[:, :-1], y, reduction="none")
        assert logits.shape == (12, 32, 256) and nll.shape == (12, 32)


@pytest.mark.parametrize("T,blocks", [(256, 2), (64, 4), (37, 2), (5, 3), (3, 2)])
def test_causal_attention_in_query_blocks_equals_causal_sdpa(T, blocks):
    """Query blocks (compiled CPU training: parallel.compile_model sets 2) give causal attention's numbers, also
    when T does not divide and when T is too short to split."""
    from stages.train.model import causal_attention

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 16, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v, blocks), want, rtol=1e-5, atol=1e-6)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch.testing.assert_close(causal_attention(q, k, v, blocks), want, rtol=1e-5, atol=1e-6)


def test_causal_attention_in_query_blocks_in_bf16_is_as_close_to_fp32_as_sdpa():
    from stages.train.model import causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, generator=g) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    err_blocks = (causal_attention(qb, kb, vb, 2).float() - exact).abs().max()
    err_sdpa = (F.scaled_dot_product_attention(qb, kb, vb, is_causal=True).float() - exact).abs().max()
    assert err_blocks <= 2 * err_sdpa + 1e-3, (err_blocks, err_sdpa)
