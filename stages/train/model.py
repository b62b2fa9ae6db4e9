"""A compact GPT decoder (nanoGPT-style): token embedding, RoPE, RMSNorm, SwiGLU MLP, causal SDPA, optional
QK-norm, embedding tied to the output head (optional). Pure model code: no distribution, no I/O.

Training loss: the output head and cross-entropy are fused and chunked (``LinearCrossEntropy``): the full
(B·T, V) logits are never materialised in fp32, and their gradient is formed chunk by chunk in forward.
Measured on this CPU (2 threads, bf16 autocast, B·T 2048, d 256, V 8192): head + loss forward and backward
178 ms plain vs 103 ms fused in 256-row chunks (512: 111, 2048: 155); the matmuls alone are ~60 ms. Same
training: 200 steps of the tiny model on the demo shards give identical losses in fp32 (to 3 decimals at every
20-step mean); in bf16 the two paths round differently and the trajectories part (last 20 steps: seed 1234
plain 5.83 / fused 5.93, seed 99 plain 5.96 / fused 5.91), with step-0 gradients equally close to fp32's.

Shapes: B batch, T sequence, C d_model, H heads, D head dim (C = H * D), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: float = 8 / 3  # SwiGLU hidden = ffn_mult * d_model, rounded up to a multiple of 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm on queries and keys per head (before RoPE): steadier attention logits
    tie_embeddings: bool = True  # output head shares the token embedding

    @property
    def ffn_hidden(self) -> int:
        return 32 * math.ceil(self.ffn_mult * self.d_model / 32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, D/2) for rotary position embeddings."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, H, T, D) by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[: x.size(-2)], sin[: x.size(-2)]  # (T, D/2), broadcast over B, H
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


CE_CHUNK = 256  # rows of logits per chunk in LinearCrossEntropy (fastest of 256/512/1024/2048 here)


class LinearCrossEntropy(torch.autograd.Function):
    """mean over targets != -100 of cross_entropy(h @ w.T, y), for h (N, C), w (V, C), y (N,).

    Chunks of ``chunk`` rows: logits in the compute dtype (bf16 under autocast), softmax in fp32, and the
    gradients of h and w (softmax − one-hot, over the valid count) computed right away, so only one chunk of
    logits is alive at a time. One exp per logit serves both the log-sum-exp and the softmax (logsumexp then
    exp(logits − lse) took two): compiled step 3–6% less CPU time on the bench shape (1 thread, A/B
    interleaved; a single matmul for the head's gradient from all chunks instead was 14% slower). Same numbers as the plain path in fp32 (tests/test_model.py)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int = CE_CHUNK) -> torch.Tensor:
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        with torch.autocast(h.device.type, enabled=False):
            hc_all, wc = h.to(dt), w.to(dt)
            valid = y != -100
            n = valid.sum().clamp(min=1)
            yy = y.clamp(min=0)
            gh = torch.empty(h.shape, dtype=dt, device=h.device)
            gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.size(0), chunk):
                hc, yc, vc = hc_all[s: s + chunk], yy[s: s + chunk], valid[s: s + chunk]
                logits = (hc @ wc.T).float()  # (n, V)
                m = logits.amax(-1, keepdim=True)  # (n, 1)
                e = (logits - m).exp()  # (n, V): the one exp per logit, shared by the loss and its gradient
                z = e.sum(-1, keepdim=True)  # (n, 1)
                lse = (m + z.log()).squeeze(1)  # (n,)
                total += ((lse - logits.gather(1, yc[:, None]).squeeze(1)) * vc).sum()
                onehot = torch.arange(logits.size(1), device=h.device) == yc[:, None]  # (n, V), fused, no scatter
                g = (e / z - onehot.float()).mul((vc / n).unsqueeze(1)).to(dt)  # d loss/d logits = softmax − one-hot
                gh[s: s + chunk] = g @ wc
                gw += (g.T @ hc).float()
        ctx.save_for_backward(gh.to(h.dtype), gw.to(w.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gh, gw = ctx.saved_tensors
        return gh * grad_out, gw * grad_out, None, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_blocks: int = 1) -> torch.Tensor:
    """Causal scaled dot-product attention of q, k, v (B, H, T, D) -> (B, H, T, D).

    ``q_blocks`` = 1: ``F.scaled_dot_product_attention(is_causal=True)`` (flash kernels skip masked blocks
    themselves). ``q_blocks`` > 1, for compiled CPU training (parallel.compile_model sets 2), where inductor
    fuses plain matmuls + softmax best: attention written out (QK^T, mask, softmax in fp32, PV) with the queries in
    that many row blocks, block i attending only to the keys up to its own end, so the fully masked upper-right
    blocks of the T x T scores are never computed (2 blocks: 25% fewer attention FLOPs). Measured on the bench
    shape (T 256, 4 layers, compiled step, bf16, 1 thread, CPU time, interleaved A/B): SDPA math in 2 blocks
    3.0-3.7% less per step than one causal SDPA call; written out in 2 blocks another 2.5-8% less (no
    ``_safe_softmax``, no float mask); 4 blocks no better than 2."""
    T = q.size(-2)
    if q_blocks <= 1 or T < 2 * q_blocks:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    b, scale = -(-T // q_blocks), 1.0 / math.sqrt(q.size(-1))  # rows per block
    ys = []
    for s in range(0, T, b):
        e = min(s + b, T)
        att = (q[:, :, s:e] @ k[:, :, :e].transpose(-2, -1)).float() * scale  # (B, H, e-s, e)
        mask = torch.ones(e - s, e, dtype=torch.bool, device=q.device).tril(s)  # query s+r sees keys <= s+r
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        ys.append(att.to(v.dtype) @ v[:, :, :e])  # (B, H, e-s, D)
    return torch.cat(ys, dim=2)


class Attention(nn.Module):
    q_blocks = 1  # causal_attention's query blocks; set from outside for the kernel in use (parallel.compile_model)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        hd = cfg.d_model // cfg.n_heads
        self.q_norm = nn.RMSNorm(hd, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hd, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        y = causal_attention(q, k, v, self.q_blocks)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # 2 x (B, T, F)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """idx (B, T) token ids -> logits (B, T, V); with targets (B, T) also the cross-entropy
        (ignore_index -100; reduction "none" gives per-token losses (B, T)). Training (targets, mean, grad
        enabled) returns (None, loss) from the fused head + loss: no logits."""
        assert idx.size(1) <= self.cfg.seq_len, f"sequence of {idx.size(1)} > context {self.cfg.seq_len}"
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        x = self.norm(x)
        if targets is not None and reduction == "mean" and torch.is_grad_enabled():  # training: fused head + loss
            return None, LinearCrossEntropy.apply(x.flatten(0, 1), self.head.weight, targets.flatten())
        logits = self.head(x)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction=reduction)
        return logits, loss.view_as(targets) if reduction == "none" else loss

    def num_params(self) -> int:
        """Parameters counted once (a tied head is the embedding)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6 * matmul params + attention (PaLM appendix B)."""
        c = self.cfg
        matmul = self.num_params() - sum(p.numel() for n, p in self.named_parameters() if "norm" in n)
        return 6 * matmul + 12 * c.n_layers * c.d_model * c.seq_len
