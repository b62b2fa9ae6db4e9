"""Training batches from Kiln token shards (stages/core/tokens.py), read through Storage (local or S3).

The shards are cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs + shifted targets;
windows never cross a shard boundary). Every epoch visits the windows in a permutation fixed by
(seed, epoch), so batch ``step`` is a pure function of (seed, step): any rank can compute its part of
any step without coordination, and a resumed run gets exactly the batches it would have seen.
Global batch ``step`` holds windows ``order[step*B : (step+1)*B]``; rank r takes the r-th contiguous
slice of it, cut into micro-batches. A 1-rank and an N-rank run therefore see the same global batch.

Curriculum (``shard.order: curriculum``): the shard stage writes the train shards of phase k under
``tokens/train/pKK/`` (lowest quality first), so the sorted shard list is grouped by phase and
``WindowDataset.phases`` holds the windows per phase. ``BatchSampler(..., phases=ds.phases)`` then orders
every epoch phase after phase, each phase's windows in a permutation fixed by (seed, epoch, phase): still a
pure function of (seed, step). Batches at a boundary mix the end of one phase and the start of the next;
every epoch runs the phases again from the first. Without ``phases`` (or with one phase) the order is the
shuffled one above, unchanged.
"""

from __future__ import annotations

import re

import numpy as np

from stages.core.tokens import HEADER_BYTES, TokenShard


class ShardError(ValueError):
    """A token shard is missing, unreadable or inconsistent; the message names the file."""


def open_shards(storage, rels: list[str], vocab_size: int | None = None,
                sha256: dict[str, str] | None = None) -> list[TokenShard]:
    """Open and check shards: header, file size against the header, vocabulary, the .idx beside it (magic, and its
    size against the shard's document count), and (``sha256``: {rel: hex digest} from the shard manifest) the
    checksum of the shard and its index. With checksums the checksum is compared first, so a damaged file (cut,
    grown, or one bit changed) is always reported as a checksum mismatch, saying also whether its size disagrees
    with its header (truncated); without, the size checks still catch a cut file."""
    if not rels:
        raise ShardError(f"no token shards found in {storage.url()}")
    shards = []
    for rel in rels:
        url, idx = storage.url(rel), rel[:-4] + ".idx"
        if not storage.exists(rel):
            raise ShardError(f"{url}: token shard missing")
        try:
            sh, bad = TokenShard(storage, rel), None
        except Exception as e:  # noqa: BLE001 - any failure to parse is a bad shard
            sh, bad = None, e
        size = storage.size(rel)
        want = None if sh is None else HEADER_BYTES + sh.n_tokens * sh.dtype.itemsize
        if sha256 and rel in sha256 and storage.sha256(rel) != sha256[rel]:
            why = ("corrupt or changed since the shard stage wrote it" if want in (None, size) else
                   f"{'truncated' if size < want else 'longer than its header says'}: {size} bytes, its header "
                   f"says {want}")
            raise ShardError(f"{url}: sha256 differs from the shard manifest's ({why})")
        if sh is None:
            raise ShardError(f"{url}: unreadable token shard ({bad})")
        if size != want:
            raise ShardError(f"{url}: size {size} bytes, header says {want} (truncated or corrupt)")
        if vocab_size is not None and sh.header["vocab_size"] != vocab_size:
            raise ShardError(f"{url}: vocabulary {sh.header['vocab_size']} != tokenizer's {vocab_size}")
        if not storage.exists(idx):
            raise ShardError(f"{storage.url(idx)}: document index missing")
        if sha256 and idx in sha256 and storage.sha256(idx) != sha256[idx]:
            raise ShardError(f"{storage.url(idx)}: sha256 differs from the shard manifest's (corrupt or changed "
                             "since the shard stage wrote it)")
        try:
            sh.check_index()
        except ValueError as e:
            raise ShardError(f"{storage.url(idx)}: {e}") from None
        shards.append(sh)
    return shards


def training_data(spec: dict) -> tuple[WindowDataset, BatchSampler]:
    """The dataset and batch sampler every rank builds from the train stage's spec (``stages.train._spec``):
    the spec's train shards in their listed order, windows of ``seq_len + 1``, the curriculum phases of the shard
    paths. Kept here so tests can check the data order of a train run without starting torchrun."""
    from stages.core.storage import Storage

    shards = open_shards(Storage(spec["shards_uri"]), spec["train_shards"], spec["model"]["vocab_size"])
    ds = WindowDataset(shards, spec["model"]["seq_len"] + 1)
    return ds, BatchSampler(len(ds), spec["train"]["global_batch"], spec["seed"], phases=ds.phases)


def shard_phase(rel: str) -> int:
    """Curriculum phase of a token shard from its path (``tokens/train/p02/00000.bin`` -> 2); 0 without one."""
    m = re.search(r"(?:^|/)p(\d+)/[^/]+$", rel)
    return int(m.group(1)) if m else 0


class WindowDataset:
    """Non-overlapping windows of ``window`` tokens over a list of shards. ``phases``: windows per curriculum
    phase, in order (one entry without a curriculum); the shards must come grouped by phase, lowest first."""

    def __init__(self, shards: list[TokenShard], window: int, preload_bytes: int = 512 << 20):
        self.shards, self.window = shards, window
        counts = [sh.n_tokens // window for sh in shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # window index -> shard
        self.n_windows = int(self.starts[-1])
        self.n_tokens = self.n_windows * window
        phase = [shard_phase(sh.rel) for sh in shards]
        if phase != sorted(phase):
            raise ShardError(f"token shards are not in curriculum phase order: {[sh.rel for sh in shards]}")
        self.shard_phase = np.asarray(phase, dtype=np.int64)
        self.phases = [sum(c for c, p in zip(counts, phase) if p == k) for k in sorted(set(phase))]
        total = sum(sh.n_tokens * sh.dtype.itemsize for sh in shards)
        # small corpora are read once; large ones by one range read per window
        self.cache = None
        if total <= preload_bytes:
            self.cache = [self._checked(sh, sh.read_all()) for sh in shards]

    def __len__(self) -> int:
        return self.n_windows

    def phase(self, idx) -> np.ndarray:
        """Curriculum phase of window indices (the phase of the shard each lies in)."""
        return self.shard_phase[np.searchsorted(self.starts, np.asarray(idx), side="right") - 1]

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        off = (i - int(self.starts[s])) * self.window
        if self.cache is not None:
            return self.cache[s][off: off + self.window]
        return self._checked(self.shards[s], self.shards[s].read(off, self.window))

    @staticmethod
    def _checked(sh: TokenShard, tokens: np.ndarray) -> np.ndarray:
        if tokens.size and int(tokens.max()) >= sh.header["vocab_size"]:
            raise ShardError(f"{sh.storage.url(sh.rel)}: token id {int(tokens.max())} outside the vocabulary of "
                             f"{sh.header['vocab_size']} (corrupt shard)")
        return tokens


class BatchSampler:
    """Deterministic global batches of window indices, split per rank and micro-batch. ``phases``: windows per
    curriculum phase (``WindowDataset.phases``): each epoch visits them in order, shuffled within each."""

    def __init__(self, n_windows: int, global_batch: int, seed: int, phases: list[int] | None = None):
        if n_windows < global_batch:
            raise ShardError(f"only {n_windows} training windows, fewer than one global batch of {global_batch}")
        if phases is not None and sum(phases) != n_windows:
            raise ShardError(f"curriculum phases hold {sum(phases)} windows, the dataset {n_windows}")
        self.n, self.B, self.seed = n_windows, global_batch, seed
        self.phases = [int(p) for p in phases] if phases else [n_windows]
        self.per_epoch = n_windows // global_batch  # a ragged tail of each epoch's order is skipped
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The window order of one epoch: a permutation by (seed, epoch), or phase after phase, each permuted by
        (seed, epoch, phase)."""
        if len(self.phases) == 1:
            return np.random.default_rng([self.seed, epoch]).permutation(self.n)
        starts = np.concatenate([[0], np.cumsum(self.phases)[:-1]])
        return np.concatenate([s + np.random.default_rng([self.seed, epoch, k]).permutation(n)
                               for k, (s, n) in enumerate(zip(starts, self.phases))])

    def global_batch(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.order(epoch)
        return self._order[k * self.B: (k + 1) * self.B]

    def rank_batch(self, step: int, rank: int, world: int) -> np.ndarray:
        per_rank = self.B // world
        return self.global_batch(step)[rank * per_rank: (rank + 1) * per_rank]


def micro_batches(ds: WindowDataset, idx: np.ndarray, micro: int):
    """Yield (x, y) int64 tensors of shape (micro, window - 1) for the window indices ``idx``."""
    import torch  # here, so the stage process can check shards without importing torch

    for j in range(0, len(idx), micro):
        w = torch.from_numpy(np.stack([ds[int(i)] for i in idx[j: j + micro]]))  # (b, T+1)
        yield w[:, :-1], w[:, 1:]
