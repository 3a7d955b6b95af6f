"""Training data: packing, masks, seeded order, per-rank shares and the exact resume position.

Also holds the builders the other train tests share: a small BPE tokenizer trained on the standard
library's own sources, and fused shards of those sources tokenized with it.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from fusion.format import write_shard
from fusion.train.data import IGNORE_INDEX, DataState, FusedBlocks, ShardSource, epoch_order, rank_slots

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ("textwrap.py", "string.py", "fnmatch.py", "glob.py", "shlex.py", "bisect.py", "heapq.py")


# ------------------------------------------------------------------------------------------------
# builders shared with the distributed tests


def corpus_docs() -> list[str]:
    """Paragraphs (blank-line separated) of a few standard-library modules: real text no one here wrote."""
    docs = []
    for name in CORPUS_FILES:
        for para in (STDLIB / name).read_text().split("\n\n"):
            if len(para.strip()) > 40:
                docs.append(para)
    return docs


def train_tokenizer(out_dir: Path, vocab_size: int = 320):
    """A byte-level BPE with an <eos> token, trained on the corpus (about a second), saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_docs(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(out_dir)
    return fast


def fused_arrays(docs_ids: list[list[int]], vocab: int, top_k: int = 4) -> dict[str, np.ndarray]:
    """A fused shard of these token documents. The fused distribution at row t puts 0.55 on the true next
    token and the rest on the three ids after it (a learnable, sparse target); last rows are empty."""
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs_ids])]).astype(np.int64)
    ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs_ids])
    n = len(ids)
    nxt = np.append(ids[1:], 0)
    target_ids = (nxt[:, None] + np.arange(top_k)[None, :]) % vocab
    probs = np.array([0.55, 0.25, 0.15, 0.05][:top_k], dtype=np.float32)
    target_probs = np.broadcast_to(probs / probs.sum(), (n, top_k)).copy()
    last = offsets[1:] - 1
    target_ids[last] = -1
    target_probs[last] = 0.0
    return {
        "doc_index": np.arange(len(docs_ids), dtype=np.int64),
        "doc_offsets": offsets,
        "input_ids": ids.astype(np.uint16),
        "target_ids": target_ids.astype(np.int32),
        "target_probs": target_probs.astype(np.float16),
        "choice": np.zeros(len(docs_ids), np.int8),
    }


def write_corpus_shards(tokenizer, out_dir: Path, n_shards: int = 2, max_tokens: int = 96) -> list[Path]:
    """The corpus tokenized (+ EOS, no BOS, as extraction does), split round-robin into fused shards."""
    docs = [
        [*tokenizer(d, add_special_tokens=False)["input_ids"][: max_tokens - 1], tokenizer.eos_token_id]
        for d in corpus_docs()
    ]
    paths = []
    for s in range(n_shards):
        p = out_dir / f"shard-{s:05d}.safetensors"
        write_shard(p, "fused", fused_arrays(docs[s::n_shards], len(tokenizer)))
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------
# packing and masks, on a hand-made shard


@pytest.fixture()
def tiny_shard(tmp_path: Path) -> Path:
    # three documents of 3, 4 and 1 tokens: ids 10..17; fused width 2
    arrays = {
        "doc_index": np.arange(3, dtype=np.int64),
        "doc_offsets": np.array([0, 3, 7, 8], dtype=np.int64),
        "input_ids": np.arange(10, 18, dtype=np.uint16),
        "target_ids": np.stack([np.arange(100, 108), np.arange(200, 208)], axis=1).astype(np.int32),
        "target_probs": np.tile(np.array([0.75, 0.25], dtype=np.float16), (8, 1)),
        "choice": np.zeros(3, dtype=np.int8),
    }
    p = tmp_path / "shard-00000.safetensors"
    write_shard(p, "fused", arrays)
    return p


def test_blocks_pack_documents_with_next_token_labels_and_fusion_masks(tiny_shard: Path):
    fb = FusedBlocks([ShardSource(tiny_shard)], seq_len=4, seed=0)
    assert fb.n_blocks == 2 and fb.top_k == 2
    b0, b1 = fb.block(0), fb.block(1)
    assert b0["input_ids"].tolist() == [10, 11, 12, 13]
    assert b0["labels"].tolist() == [11, 12, 13, 14]  # the last label comes from the next block's first token
    # documents end at rows 2, 6, 7: those rows predict nothing from the fused target
    assert b0["fusion_mask"].tolist() == [True, True, False, True]
    assert b0["target_ids"][:, 0].tolist() == [100, 101, 102, 103]
    assert b1["input_ids"].tolist() == [14, 15, 16, 17]
    assert b1["labels"].tolist() == [15, 16, 17, IGNORE_INDEX]  # end of the shard: nothing to predict
    assert b1["fusion_mask"].tolist() == [True, True, False, False]
    assert b0["n_tokens"] == 4 and b1["n_tokens"] == 4


def test_last_block_is_padded_and_masked(tiny_shard: Path):
    fb = FusedBlocks([ShardSource(tiny_shard)], seq_len=3, seed=0)
    assert fb.n_blocks == 3
    b2 = fb.block(2)  # rows 6, 7 and one pad
    assert b2["input_ids"].tolist() == [16, 17, 0]
    assert b2["labels"].tolist() == [17, IGNORE_INDEX, IGNORE_INDEX]
    assert b2["fusion_mask"].tolist() == [False, False, False]
    assert b2["target_ids"][2].tolist() == [-1, -1] and b2["target_probs"][2].tolist() == [0.0, 0.0]
    assert b2["n_tokens"] == 2


def test_clm_variant_reads_no_targets(tiny_shard: Path):
    fb = FusedBlocks([ShardSource(tiny_shard)], seq_len=4, seed=0, with_targets=False)
    batch, _ = fb.next_batch(DataState(), world_size=1, rank=0, micro_batch=2)
    assert batch.target_ids is None and batch.input_ids.shape == (2, 4) and batch.n_tokens == 8


def test_wrong_checksum_is_refused_naming_the_file(tiny_shard: Path):
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: checksum mismatch"):
        FusedBlocks([ShardSource(tiny_shard, sha256="0" * 64)], seq_len=4, seed=0)


# ------------------------------------------------------------------------------------------------
# order, shares, resume


def test_epoch_order_is_a_seeded_permutation_visiting_shards_whole():
    counts = [3, 2, 4]
    o = epoch_order(counts, seed=7, epoch=0)
    assert sorted(o.tolist()) == list(range(9))
    assert np.array_equal(o, epoch_order(counts, seed=7, epoch=0))  # deterministic
    assert not np.array_equal(o, epoch_order(counts, seed=7, epoch=1))  # reshuffled each epoch
    shard_of = np.searchsorted(np.array([3, 5, 9]), o, side="right")
    # each shard's blocks are contiguous in the order: the shard index changes exactly twice
    assert int(np.count_nonzero(np.diff(shard_of))) == 2


def test_ranks_take_disjoint_slices_and_wrap_into_the_next_epoch():
    s = DataState(epoch=0, index=8)
    a, after = rank_slots(s, n_blocks=10, world_size=2, rank=0, micro_batch=2)
    b, _ = rank_slots(s, n_blocks=10, world_size=2, rank=1, micro_batch=2)
    assert a == [(0, 8), (0, 9)]
    assert b == [(1, 0), (1, 1)]
    assert after == DataState(epoch=1, index=2)


def test_resume_from_saved_position_sees_every_block_once(tmp_path: Path):
    """Consume 5 micro steps, 'restart' from the saved state with a new reader, consume the rest: the blocks
    are exactly those of an uninterrupted run, none twice within an epoch, none skipped."""
    tok = train_tokenizer(tmp_path / "tok")
    paths = write_corpus_shards(tok, tmp_path, n_shards=2)
    srcs = [ShardSource(p) for p in paths]

    def run(fb: FusedBlocks, state: DataState, n: int) -> tuple[list[int], DataState]:
        seen = []
        for _ in range(n):
            for rank in range(2):
                batch, after = fb.next_batch(state, 2, rank, 3)
                seen += batch.block_ids.tolist()
            state = after
        return seen, state

    n_blocks = FusedBlocks(srcs, 256, seed=3).n_blocks
    steps = (n_blocks * 3 // 2) // 6  # one and a half epochs
    full, _ = run(FusedBlocks(srcs, 256, seed=3), DataState(), steps)
    first, saved = run(FusedBlocks(srcs, 256, seed=3), DataState(), 5)
    saved = DataState.from_json(saved.to_json())  # through the checkpoint's JSON
    rest, _ = run(FusedBlocks(srcs, 256, seed=3), saved, steps - 5)
    assert first + rest == full
    assert sorted(full[:n_blocks]) == list(range(n_blocks))  # one pass: every block exactly once
    assert full[n_blocks:] != full[: len(full) - n_blocks]  # the second epoch is reshuffled
