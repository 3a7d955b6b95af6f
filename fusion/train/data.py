"""Training data: fused shards packed into blocks, a seeded order, a per-rank share and an exact position.

Packing. Within a shard the documents are one token stream (each document already ends with EOS). Block b
of a shard holds stream positions [b * L, b * L + L) (L = seq_len); the shard's last block is padded. For
row t of a block (stream position p):
  input    token p
  label    token p + 1 (next token; -100 past the end of the shard). The CLM label of a document's last
           token (EOS) is the next document's first token, as in the reference's packing.
  fusion   the fused target of row p is the distribution of token p + 1 *within its document*, so the last
           row of every document (and padding) is masked out of the fusion loss.

Order. Epoch e visits the shards in a seeded permutation and the blocks of each shard in a seeded
permutation, so a rank reads one shard at a time (row ranges straight from the memory map, see
`Shard.rows`). The global sequence of blocks is cut into groups of world_size * micro_batch_size; rank r
takes the r-th slice of each group. The position (epoch, index into that epoch's order) is the whole data
state: saved with each checkpoint, it makes a restart continue exactly where the run stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion.format import Shard, read_shard

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DataState:
    epoch: int = 0
    index: int = 0  # blocks of this epoch's order already consumed (by all ranks together)

    def to_json(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @staticmethod
    def from_json(d: dict) -> DataState:
        return DataState(int(d["epoch"]), int(d["index"]))


@dataclass(frozen=True)
class ShardSource:
    path: Path
    sha256: str | None = None  # from the fuse stage's manifest; checked when the shard is opened


@dataclass
class Batch:
    input_ids: np.ndarray  # int64 [B, L]
    labels: np.ndarray  # int64 [B, L], IGNORE_INDEX where nothing is predicted
    fusion_mask: np.ndarray  # bool [B, L]
    target_ids: np.ndarray | None  # int64 [B, L, K], -1 where empty (None for the CLM-only variant)
    target_probs: np.ndarray | None  # float32 [B, L, K]
    block_ids: np.ndarray  # int64 [B] global block ids (for logs and the exact-resume test)
    n_tokens: int  # real (unpadded) input tokens

    def torch(self, device) -> dict:
        import torch

        out = {
            "input_ids": torch.from_numpy(self.input_ids).to(device),
            "labels": torch.from_numpy(self.labels).to(device),
            "fusion_mask": torch.from_numpy(self.fusion_mask).to(device),
        }
        if self.target_ids is not None:
            out["target_ids"] = torch.from_numpy(self.target_ids).to(device)
            out["target_probs"] = torch.from_numpy(self.target_probs).to(device)
        return out


def blocks_in(n_tokens: int, seq_len: int) -> int:
    return math.ceil(n_tokens / seq_len)


def epoch_order(block_counts: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """Global block ids of one epoch in visiting order: shards shuffled, then blocks within each shard."""
    counts = np.asarray(block_counts, dtype=np.int64)
    bases = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    shard_perm = np.random.default_rng([seed, epoch]).permutation(len(counts))
    parts = [
        bases[s] + np.random.default_rng([seed, epoch, int(s)]).permutation(int(counts[s]))
        for s in shard_perm
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def rank_slots(
    state: DataState, n_blocks: int, world_size: int, rank: int, micro_batch: int
) -> tuple[list[tuple[int, int]], DataState]:
    """The (epoch, order index) of this rank's blocks in the next micro step, and the state after it."""
    group = world_size * micro_batch
    slots = []
    for j in range(group):
        g = state.index + j
        epoch, idx = state.epoch + g // n_blocks, g % n_blocks
        if rank * micro_batch <= j < (rank + 1) * micro_batch:
            slots.append((epoch, idx))
    g_end = state.index + group
    return slots, DataState(state.epoch + g_end // n_blocks, g_end % n_blocks)


class FusedBlocks:
    """Reads packed training blocks out of fused shards, one shard held open at a time."""

    def __init__(
        self,
        shards: Sequence[ShardSource],
        seq_len: int,
        seed: int,
        with_targets: bool = True,
        pad_id: int = 0,
    ):
        if not shards:
            raise ValueError("no fused shards to train on: the fuse stage produced none")
        self.shards, self.seq_len, self.seed = list(shards), seq_len, seed
        self.with_targets, self.pad_id = with_targets, pad_id
        self.n_tokens = []
        self.top_k = None
        for src in self.shards:
            sh = read_shard(src.path, kind="fused", sha256=src.sha256)
            self.n_tokens.append(sh.n_tokens)
            k = int(sh.rows("target_ids", 0, 1).shape[1])
            if self.top_k not in (None, k):
                raise ValueError(f"{src.path}: fused width {k} differs from other shards' {self.top_k}")
            self.top_k = k
        self.block_counts = [blocks_in(n, seq_len) for n in self.n_tokens]
        self.bases = np.concatenate([[0], np.cumsum(self.block_counts)]).astype(np.int64)
        self.n_blocks = int(self.bases[-1])
        if self.n_blocks == 0:
            raise ValueError("the fused shards hold no tokens: check the fuse stage's output")
        self._orders: dict[int, np.ndarray] = {}
        self._open: tuple[int, Shard, np.ndarray] | None = None  # shard index, shard, doc ends

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.block_counts, self.seed, epoch)}  # keep one epoch
        return self._orders[epoch]

    def _shard(self, s: int) -> tuple[Shard, np.ndarray]:
        if self._open is None or self._open[0] != s:
            sh = read_shard(self.shards[s].path, kind="fused")  # checksum was checked in __init__
            ends = np.asarray(sh["doc_offsets"][1:], dtype=np.int64) - 1  # last row of each document
            self._open = (s, sh, ends)
        return self._open[1], self._open[2]

    def block(self, gid: int) -> dict[str, np.ndarray]:
        """One packed block by global id (see the module docstring for what each row holds)."""
        s = int(np.searchsorted(self.bases, gid, side="right") - 1)
        sh, doc_last = self._shard(s)
        L, n = self.seq_len, self.n_tokens[s]
        start = (gid - int(self.bases[s])) * L
        stop = min(start + L, n)
        real = stop - start
        ids = sh.rows("input_ids", start, stop + 1).astype(np.int64)  # one extra row: the last label
        input_ids = np.full(L, self.pad_id, dtype=np.int64)
        input_ids[:real] = ids[:real]
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        labels[: len(ids) - 1] = ids[1:]
        pos = np.arange(start, stop, dtype=np.int64)
        fusion_mask = np.zeros(L, dtype=bool)
        # doc_last is sorted: a row is a document's last iff it equals the nearest end at or after it.
        k = np.searchsorted(doc_last, pos)
        fusion_mask[:real] = doc_last[np.minimum(k, len(doc_last) - 1)] != pos
        out = {"input_ids": input_ids, "labels": labels, "fusion_mask": fusion_mask, "n_tokens": real}
        if self.with_targets:
            K = self.top_k
            tids = np.full((L, K), -1, dtype=np.int64)
            tprobs = np.zeros((L, K), dtype=np.float32)
            tids[:real] = sh.rows("target_ids", start, stop)
            tprobs[:real] = sh.rows("target_probs", start, stop)
            out["target_ids"], out["target_probs"] = tids, tprobs
        return out

    def next_batch(
        self, state: DataState, world_size: int, rank: int, micro_batch: int
    ) -> tuple[Batch, DataState]:
        """This rank's micro-batch at `state`, and the state after the whole group (all ranks) is consumed."""
        slots, after = rank_slots(state, self.n_blocks, world_size, rank, micro_batch)
        gids = [int(self.order(e)[i]) for e, i in slots]
        blocks = [self.block(g) for g in gids]
        stack = {k: np.stack([b[k] for b in blocks]) for k in blocks[0] if k != "n_tokens"}
        batch = Batch(
            stack["input_ids"],
            stack["labels"],
            stack["fusion_mask"],
            stack.get("target_ids"),
            stack.get("target_probs"),
            np.asarray(gids, dtype=np.int64),
            int(sum(b["n_tokens"] for b in blocks)),
        )
        return batch, after
