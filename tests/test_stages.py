"""Stage entrypoints on real tokenizers and tiny random-init models, in process: prepare's decisions,
extract -> align -> fuse, skipping, corrupt and missing artifacts, models that will not load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jobs.complete import manifest_key, read_manifest, texts_changed
from jobs.corpus import (
    CUT,
    PIECE,
    CorpusError,
    assign_shards,
    corpus_stamp,
    cut_points,
    heldout_split,
    pack_texts,
    read_documents,
    split_paragraphs,
    split_to_fit,
    unpack_texts,
)
from jobs.plan import Stage, Task
from jobs.settings import Settings
from jobs.spec import Corpus, parse_spec
from jobs.stages import align, extract, fuse, prepare
from jobs.stages.common import StageError, run_task
from jobs.store import open_store
from tests.artifacts import output_file, read_output
from tests.conftest import MISTRAL_URI, SMOLLM2_GGUF, SMOLLM2_URI
from tests.harness.s3 import ENDPOINT

os.environ.setdefault("OMP_NUM_THREADS", "1")

# --------------------------------------------------------------------------------------------------
# prepare's pure decisions


def test_paragraphs_packing_and_shards() -> None:
    assert split_paragraphs("a b\n\n  \n c\nd \n\t\nlast") == ["a b", "c\nd", "last"]
    texts = ["héllo", "", "wörld ✓"]
    blob, offsets = pack_texts(texts)
    assert offsets.tolist() == [0, 6, 6, 16] and blob.dtype == np.uint8
    assert unpack_texts(blob, offsets) == texts
    assert [s.tolist() for s in assign_shards(5, 2)] == [[0, 2, 4], [1, 3]]


def test_heldout_split_is_seeded_and_bounded() -> None:
    train, held = heldout_split(10, 0.2, seed=0)
    assert len(held) == 2 and len(train) == 8
    assert sorted([*train, *held]) == list(range(10))
    again_train, again_held = heldout_split(10, 0.2, seed=0)
    assert held.tolist() == again_held.tolist() and train.tolist() == again_train.tolist()
    assert len(heldout_split(10, 0.01, seed=0)[1]) == 1  # a positive fraction keeps at least one
    assert len(heldout_split(1, 0.5, seed=0)[1]) == 0  # never every document
    assert len(heldout_split(10, 0.0, seed=0)[1]) == 0


def test_cut_points_at_token_starts() -> None:
    offsets = [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7)]
    assert cut_points(offsets, 5, 2) == [3, 6]
    assert cut_points(offsets, 5, 5) == []


def test_read_documents_formats_and_limits(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n\nstill alpha")  # a folder: one document per file
    (folder / "sub" / "b.txt").write_text("beta")
    (folder / "c.md").write_text("gamma")
    (folder / "bin.txt").write_bytes(b"\xff\xfe\x00bad")  # not UTF-8: skipped
    alpha = "alpha\n\nstill alpha"
    assert read_documents(folder, Corpus(uri=str(folder), glob="**/*.txt")) == [alpha, "beta"]
    assert read_documents(folder, Corpus(uri=str(folder), maxDocuments=2)) == [alpha, "gamma"]
    f = tmp_path / "c.txt"
    f.write_text("one\n\ntwo two\n\nthree")
    assert read_documents(f, Corpus(uri=str(f))) == ["one", "two two", "three"]
    assert read_documents(f, Corpus(uri=str(f), maxBytes=10)) == ["one", "two two"]  # 3 + 7 bytes
    j = tmp_path / "c.jsonl"
    j.write_text('{"body": "x y"}\n\n{"body": "z"}\n')
    assert read_documents(j, Corpus(uri=str(j), textField="body")) == ["x y", "z"]
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: no field 'text'; set corpus\.textField"):
        read_documents(j, Corpus(uri=str(j)))
    j.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: not valid JSON"):
        read_documents(j, Corpus(uri=str(j)))
    with pytest.raises(CorpusError, match="does not exist"):
        read_documents(tmp_path / "nope", Corpus(uri="/nope"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="holds no documents"):
        read_documents(empty, Corpus(uri=str(empty)))


def test_parquet_corpus_file_and_folder(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "body": ["first doc", "second doc"]}), folder / "a.parquet")
    pq.write_table(pa.table({"id": [3], "body": ["third doc"]}), folder / "b.parquet")
    body = Corpus(uri="x", textField="body")
    assert read_documents(folder / "a.parquet", body) == ["first doc", "second doc"]
    assert read_documents(folder, body) == ["first doc", "second doc", "third doc"]
    with pytest.raises(CorpusError, match=r"no column 'text' \(has \['id', 'body'\]\); set corpus.textField"):
        read_documents(folder, Corpus(uri="x"))


def test_saved_hugging_face_dataset_corpus(tmp_path: Path) -> None:
    import datasets

    plain = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["alpha", "beta"], "n": [1, 2]}).save_to_disk(str(plain))
    assert read_documents(plain, Corpus(uri="x")) == ["alpha", "beta"]  # format auto-detected: hf-disk
    splits = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["gamma"]}),
            "test": datasets.Dataset.from_dict({"text": ["held"]}),
        }
    ).save_to_disk(str(splits))
    assert read_documents(splits, Corpus(uri="x")) == ["gamma"]  # the train split of a DatasetDict
    no_train = tmp_path / "nt"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(no_train))
    with pytest.raises(CorpusError, match="without a 'train' split"):
        read_documents(no_train, Corpus(uri="x"))


def test_split_to_fit_every_tokenizer(smollm2_tokenizer, mistral_tokenizer, qwen_tokenizer) -> None:
    import inspect

    long = inspect.getdoc(json.dumps)  # ~2 KB of real English and code
    toks = [smollm2_tokenizer, mistral_tokenizer, qwen_tokenizer]
    short = "A short document."
    pieces_long, pieces_short = split_to_fit([long, short], toks, max_length=32)
    assert pieces_short == [short]
    assert len(pieces_long) > 10
    assert "".join(pieces_long) == long  # cut, never rewritten: pieces concatenate to the text
    for tok in toks:
        lengths = [len(ids) + 1 for ids in tok(pieces_long, add_special_tokens=False)["input_ids"]]
        assert max(lengths) <= 32  # EOS included


# --------------------------------------------------------------------------------------------------
# The stages, in process, on a tiny run


TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new list containing all items from the iterable in ascending order.",
    "A custom key function can be supplied to customize the sort order, and the reverse flag can be set "
    "to request the result in descending order. " * 3,
    "def add(a, b):\n    return a + b",
    "Numbers 12345 and symbols: {}, [], ().",
    "Unicode: naïve café, 東京, emoji ✓.",
]


def _spec(tmp_path: Path, **overrides):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT))
    spec = {
        "target": {
            "name": "tgt",
            "tokenizer": SMOLLM2_URI,
            "ggufFile": SMOLLM2_GGUF,
            "randomInit": {"architecture": "llama", "hiddenSize": 32, "numLayers": 1, "numHeads": 2},
        },
        "sources": [
            {
                "name": "mis",
                "tokenizer": MISTRAL_URI,
                "randomInit": {
                    "architecture": "gpt_neox",
                    "hiddenSize": 32,
                    "numLayers": 1,
                    "numHeads": 2,
                    "seed": 5,
                },
            }
        ],
        "corpus": {"uri": str(corpus), "heldoutFraction": 0.2, "seed": 4},
        "extraction": {"maxLength": 32, "topK": 4, "device": "cpu", "dtype": "float32"},
        "training": {"seqLen": 16},
        "store": {"uri": str(tmp_path / "store")},
        **overrides,
    }
    return parse_spec(spec)


def corpus_changed(store, spec) -> bool:
    """Whether prepare must be redone for an edited corpus (jobs.complete.texts_changed)."""
    return texts_changed(store, spec, Task(Stage.prepare)) is not None


def _t(stage: str, model: str | None = None, shard: int | None = None) -> Task:
    return Task(Stage(stage), model=model, shard=shard)


def test_add_bos_reaches_extraction_and_prepare_leaves_room_for_it(tmp_path: Path) -> None:
    from fusion.format import read_shard

    spec = _spec(tmp_path)
    data = spec.model_dump(by_alias=True)
    data["sources"][0]["addBos"] = True  # Mistral's <s> is id 1; the target (SmolLM2) keeps no BOS
    spec = parse_spec(data)
    assert run_task(prepare.run, _t("prepare"), spec, "r") == 0
    for name in ("tgt", "mis"):
        assert run_task(extract.run, _t("extract", name, 0), spec, "r") == 0
    mis = read_shard(output_file(tmp_path / "store", "r", _t("extract", "mis", 0)), "extract")
    tgt = read_shard(output_file(tmp_path / "store", "r", _t("extract", "tgt", 0)), "extract")
    starts = mis["doc_offsets"][:-1]
    assert set(mis["input_ids"][starts].tolist()) == {1}  # every document starts with BOS
    assert int(mis["token_nbytes"][starts].max()) == 0  # BOS stands for no text
    assert 1 not in set(tgt["input_ids"][tgt["doc_offsets"][:-1]].tolist())
    # prepare reserved the BOS: with it, no document exceeds maxLength (32) under Mistral
    assert int(np.diff(mis["doc_offsets"]).max()) <= 32
    # and the source still aligns and fuses onto the target
    assert run_task(align.run, _t("align", "mis", 0), spec, "r") == 0
    assert run_task(fuse.run, _t("fuse", None, 0), spec, "r") == 0


def test_stages_prepare_extract_align_fuse(tmp_path: Path, smollm2_view, mistral_tokenizer) -> None:
    from fusion.format import read_shard, sha256_file

    spec = _spec(tmp_path, alignment={"method": "mined"})  # the paper's path: a vocab map is built
    store = open_store(spec.store, "r", Settings())

    assert run_task(prepare.run, _t("prepare"), spec, "r") == 0
    m = read_manifest(store, "prepare/manifest.json")
    # 6 documents, round(0.2 * 6) = 1 held out (seed 4: document 1); the long document 2 is cut into
    # pieces of <= 31 tokens + EOS, so more than 5 training documents remain.
    assert m["counts"]["documents"] == 6 and m["counts"]["heldout_documents"] == 1
    held = read_shard(output_file(tmp_path / "store", "r", _t("prepare")), "raw")
    assert unpack_texts(held["text"], held["doc_offsets"]) == [TEXT[1]]
    raw = read_shard(
        output_file(tmp_path / "store", "r", _t("prepare"), "prepare/shard-00000.safetensors"), "raw"
    )
    texts = unpack_texts(raw["text"], raw["doc_offsets"])
    # Stable ids (jobs.corpus.piece_ids): a whole document keeps its position, the pieces of the cut one
    # (training document 1: TEXT[2]) are CUT + 1 * PIECE + k, so other documents never renumber.
    n_pieces = len(texts) - 4
    pieces = [CUT + 1 * PIECE + k for k in range(n_pieces)]
    assert raw["doc_index"].tolist() == [0, *pieces, 2, 3, 4] and len(texts) > 5
    for t in texts:
        assert len(mistral_tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 <= 32

    for name in ("tgt", "mis"):
        assert run_task(extract.run, _t("extract", name, 0), spec, "r") == 0
    ext = read_shard(output_file(tmp_path / "store", "r", _t("extract", "tgt", 0)), "extract")
    assert ext["doc_index"].tolist() == raw["doc_index"].tolist()
    assert ext["topk_ids"].shape[1] == 4
    for d, text in enumerate(texts):  # the target's tokens spell exactly the document, then EOS
        ids = ext["input_ids"][ext.doc_slice(d)]
        assert ids[-1] == smollm2_view.eos_id and smollm2_view.decode(ids[:-1]) == text.encode()

    assert run_task(align.run, _t("align", "mis", 0), spec, "r") == 0
    am = read_manifest(store, "align/mis/shard-00000.manifest.json")
    assert am["summary"]["vocab_map"] == "built" and store.exists("align/mis/vocab-map.npz")
    assert run_task(fuse.run, _t("fuse", None, 0), spec, "r") == 0
    fm = read_manifest(store, "fuse/shard-00000.manifest.json")
    # sequence-level MinCE: one pick per document, among the target and the source
    assert sum(fm["summary"]["choice_counts"].values()) == len(texts)
    assert set(fm["summary"]["choice_counts"]) == {"tgt", "mis"}

    # A rerun skips every complete task: the manifests are untouched.
    before = {k: store.get_bytes(k) for k in store.list("") if k.endswith(".json")}
    for task, fn in (
        (_t("prepare"), prepare.run),
        (_t("extract", "tgt", 0), extract.run),
        (_t("align", "mis", 0), align.run),
        (_t("fuse", None, 0), fuse.run),
    ):
        assert run_task(fn, task, spec, "r") == 0
    assert {k: store.get_bytes(k) for k in before} == before

    # A corrupted input (same size, a flipped byte) is detected, not used: the consumer fails naming it,
    # the producer's claim to be complete is dropped, and redoing it gives the identical shard.
    shard = output_file(tmp_path / "store", "r", _t("extract", "mis", 0))
    good_sha = sha256_file(shard)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StageError) as err:
        run_task(align.run, _t("align", "mis", 0), spec, "r", force=True)
    msg = str(err.value)
    assert "extract/mis/shard-00000.safetensors" in msg and "checksum mismatch" in msg
    assert "extract-mis-00000 is marked incomplete" in msg
    assert read_manifest(store, manifest_key(_t("extract", "mis", 0))) is None
    assert run_task(extract.run, _t("extract", "mis", 0), spec, "r") == 0
    assert sha256_file(shard) == good_sha  # a deterministic redo: the same bytes
    assert run_task(align.run, _t("align", "mis", 0), spec, "r", force=True) == 0
    am2 = read_manifest(store, "align/mis/shard-00000.manifest.json")
    assert am2["summary"]["vocab_map"] == "reused"  # the cached map covered every id
    assert am2["outputs"] == am["outputs"]

    # alignment.method exact through the stage: the spec change redoes align (and what follows); exact
    # hands a distribution to every row whose byte boundary coincides (received = the bound), DTW fewer.
    exact = spec.model_copy(update={"alignment": spec.alignment.model_copy(update={"method": "exact"})})
    assert run_task(align.run, _t("align", "mis", 0), exact, "r") == 0
    em = read_manifest(store, "align/mis/shard-00000.manifest.json")
    d_exact, d_mined = em["summary"]["diagnostics"], am2["summary"]["diagnostics"]
    assert em["summary"]["projection"] == "built" and store.exists("align/mis/projection.npz")
    assert d_exact["method"] == "exact" and d_mined["method"] == "mined"
    assert d_exact["positions"] == d_mined["positions"] and d_exact["boundary"] == d_mined["boundary"]
    assert d_exact["received"] == d_exact["boundary"] == d_exact["received_at_boundary"]
    assert d_mined["received"] < d_exact["received"]
    lost = ("lost_at_boundary", "lost_special", "lost_no_boundary", "lost_normalised")
    assert d_exact["received"] + sum(d_exact[k] for k in lost) == d_exact["positions"]
    assert run_task(fuse.run, _t("fuse", None, 0), exact, "r") == 0


def test_missing_input_and_unloadable_model(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    with pytest.raises(Exception, match="needs prepare, which has no manifest"):
        run_task(extract.run, _t("extract", "tgt", 0), spec, "r")
    assert run_task(prepare.run, _t("prepare"), spec, "r") == 0
    bad = _spec(
        tmp_path, sources=[{"name": "mis", "uri": str(tmp_path / "no-such-model"), "tokenizer": MISTRAL_URI}]
    )
    with pytest.raises(StageError) as err:
        run_task(extract.run, _t("extract", "mis", 0), bad, "r")
    msg = str(err.value)
    assert "model mis" in msg and "no-such-model" in msg and "Fix uri/ggufFile/randomInit of model mis" in msg
    assert (
        not (tmp_path / "store" / "r" / "extract" / "mis").exists()
        or read_manifest(open_store(bad.store, "r", Settings()), "extract/mis/shard-00000.manifest.json")
        is None
    )
    bad_tok = _spec(
        tmp_path, sources=[{"name": "mis", "tokenizer": str(tmp_path / "nothing.model"), "randomInit": {}}]
    )
    with pytest.raises(StageError, match=r"model mis: cannot load its tokenizer from .*fix tokenizer of"):
        run_task(extract.run, _t("extract", "mis", 0), bad_tok, "r")


def test_a_model_that_will_not_load_fails_every_stage_that_loads_it_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """extract, train and evaluate load the target by one loader (common.load_spec_model): a bad target
    URI is bad input in each, exit 2 (never retried) with the same message, on stderr and in the
    termination message the operator and the local runner quote."""
    from jobs.cli import stage_main
    from jobs.complete import Output, build_manifest, write_manifest
    from jobs.plan import build_dag
    from jobs.registry import Layout

    broken = tmp_path / "not-a-model"
    broken.mkdir()
    target = {"name": "tgt", "uri": str(broken), "tokenizer": SMOLLM2_URI, "ggufFile": SMOLLM2_GGUF}
    spec = _spec(tmp_path, target=target)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json(by_alias=True, exclude_none=True))
    assert run_task(prepare.run, _t("prepare"), spec, "r") == 0  # tokenizers only: fine
    store = open_store(spec.store, "r", Settings())

    def made(stage: Stage) -> None:
        """The stage's tasks done, as far as their dependants' manifests check (train reads the fused
        shards' manifests before it loads the target; evaluate needs train's manifest)."""
        for task in build_dag(spec):
            if task.stage is stage:
                key = Layout.shard(task) if stage is Stage.fuse else Layout.model_prefix(task.variant) + "x"
                store.put_bytes(key, b"made upstream")
                output = {key: Output(sha256_bytes(b"made upstream"), len(b"made upstream"))}
                write_manifest(
                    store, task, build_manifest(spec, task, outputs=output, inputs={}, started_at=0.0)
                )

    made(Stage.fuse)
    # a rank of its own, so that training starts no launcher (and leaves this process's environment alone)
    for var, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("FUSIONRUN_WORK_DIR", str(tmp_path / "work"))
    said = {}
    for stage, args in {
        "extract": ["--model", "tgt", "--shard", "0"],
        "train": [],
        "evaluate": [],
    }.items():
        termination = tmp_path / f"{stage}.termination"
        monkeypatch.setenv("FUSIONRUN_TERMINATION_LOG", str(termination))
        assert stage_main([stage, *args, "--spec", str(spec_file), "--run", "r"]) == 2, stage
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, (stage, errors)
        message = errors[0].removeprefix("error: ")
        assert termination.read_text() == f"{stage}: {message}"
        said[stage] = message
        if stage == "train":
            made(Stage.train)
    assert said["extract"] == said["train"] == said["evaluate"]
    assert said["train"].startswith(f"model tgt ({broken}) will not load: model '{broken}/{SMOLLM2_GGUF}'")
    assert said["train"].endswith(". Fix uri/ggufFile/randomInit of model tgt in the spec")
    # the model a train task made goes through the same loader, and the same rule
    good = tmp_path / "good.json"
    good.write_text(_spec(tmp_path).model_dump_json(by_alias=True, exclude_none=True))
    assert stage_main(["evaluate", "--spec", str(good), "--run", "r"]) == 2
    where = store.uri_for(Layout.model_prefix("fused"))
    trained = (tmp_path / "evaluate.termination").read_text()
    assert trained.startswith(f"evaluate: trained model fused at {where} will not load: model ")
    assert trained.endswith(". Rerun train --variant fused")


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_report_pieces() -> None:
    from jobs.report import loss_curve, loss_curve_from_log, ordered_models, render_markdown

    nested = {"progress": {"history": [{"step": 1, "loss": 2.5}, {"step": 2, "train_loss": 2}]}}
    assert loss_curve(nested) == [(1, 2.5), (2, 2.0)]
    log = (
        '=== first attempt\n{"event": "step", "step": 1, "loss": 5.0}\n{"event": "step", "step": 2, '
        '"loss": 4.0}\nnot json\n=== resumed\n{"event": "resumed", "step": 1}\n'
        '{"event": "step", "step": 2, "loss": 3.5}\n{"event": "step", "step": 3, "loss": 3.0}\n'
    )
    assert loss_curve_from_log(log) == [(1, 5.0), (2, 3.5), (3, 3.0)]
    # a later attempt of another length (maxSteps edited) is a new training: its curve alone
    relaunched = (
        '{"event": "start", "total_steps": 36}\n{"event": "step", "step": 1, "loss": 5.0}\n'
        '{"event": "step", "step": 36, "loss": 2.0}\n{"event": "start", "total_steps": 20}\n'
        '{"event": "step", "step": 1, "loss": 4.5}\n{"event": "step", "step": 20, "loss": 2.5}\n'
    )
    assert loss_curve_from_log(relaunched) == [(1, 4.5), (20, 2.5)]
    resumed = (
        '{"event": "start", "total_steps": 20}\n{"event": "step", "step": 1, "loss": 4.5}\n'
        '{"event": "start", "total_steps": 20}\n{"event": "step", "step": 2, "loss": 4.0}\n'
    )
    assert loss_curve_from_log(resumed) == [(1, 4.5), (2, 4.0)]  # same length: a resume keeps earlier steps
    fused_log = '{"event": "step", "step": 1, "loss": 2.9, "clm_loss": 3.0, "fusion_loss": 2.0}\n'
    assert loss_curve_from_log(fused_log, "clm_loss") == [(1, 3.0)]  # FuseLLM's CLM term alone
    metrics = {
        "heldout": {"documents": 2, "bytes": 100},
        "models": {
            "source:b": {"bits_per_byte": 4.0, "perplexity": 9.0, "tokens": 5},
            "fused": {"bits_per_byte": 2.0, "perplexity": 3.0, "tokens": 4},
            "target-before": {"bits_per_byte": 3.0, "perplexity": 7.0, "tokens": 4},
        },
        "fused_minus_clm": {"bits_per_byte": -0.0123, "ci95_low": -0.02, "ci95_high": -0.004},
    }
    assert [name for name, _ in ordered_models(metrics)] == ["target (before)", "FuseLLM", "b (source)"]
    data = {
        "metrics": metrics,
        "mince_choices": {"t": 3, "b": 1},
        "tasks": {"prepare": {"state": "complete", "seconds": 1.5}},
    }
    md = render_markdown("r", data, {"bpb": "bpb.png"})
    assert "| FuseLLM | 2.0000 | 3.00 | 4 |" in md and "| t | 3 | 75.0% |" in md
    assert "![bits per byte](bpb.png)" in md
    assert (
        "FuseLLM minus CLM-only: -0.0123 bits per byte (95% paired bootstrap interval over the held-out "
        "documents: -0.0200 to -0.0040; negative favours FuseLLM)." in md
    )


@pytest.mark.s3
def test_prepare_reads_a_corpus_from_s3(s3_server, s3_bucket, tmp_path: Path) -> None:
    """Corpus and store on the same S3 server (the store's endpoint and credentials read the corpus)."""
    from fusion.format import read_shard

    cached = Settings(cache_dir=tmp_path / "cache")

    c = s3_server.client()
    c.put_object(Bucket=s3_bucket, Key="data/corpus.txt", Body="\n\n".join(TEXT).encode())
    c.put_object(Bucket=s3_bucket, Key="data/folder/a.txt", Body=b"file one")
    c.put_object(Bucket=s3_bucket, Key="data/folder/b.txt", Body=b"file two")
    store = {"uri": f"s3://{s3_bucket}/runs", "endpoint": ENDPOINT, "insecure": True}
    for uri, n_docs in ((f"s3://{s3_bucket}/data/corpus.txt", 6), (f"s3://{s3_bucket}/data/folder", 2)):
        spec = _spec(tmp_path, corpus={"uri": uri, "heldoutFraction": 0.0}, store=store)
        assert run_task(prepare.run, _t("prepare"), spec, "r", force=True, settings=cached) == 0
        st = open_store(spec.store, "r", cached)
        m = read_manifest(st, "prepare/manifest.json")
        assert m["counts"]["documents"] == n_docs and m["counts"]["heldout_documents"] == 0
    shard = read_output(st, _t("prepare"), "prepare/shard-00000.safetensors", tmp_path / "s.safetensors")
    raw = read_shard(shard, "raw")
    assert unpack_texts(raw["text"], raw["doc_offsets"]) == ["file one", "file two"]


@pytest.mark.s3
def test_an_s3_corpus_edited_in_place_makes_prepare_stale(s3_server, s3_bucket, tmp_path: Path) -> None:
    """The stamp of an s3:// corpus (keys, sizes, ETags of the objects read) is recorded; an object rewritten
    (even to the same size) or a file added to the folder makes prepare stale, and its rerun reads the new
    objects, not a stale cached copy. Objects the folder's glob leaves out change nothing."""
    from fusion.format import read_shard

    cached = Settings(cache_dir=tmp_path / "cache")
    c = s3_server.client()
    store = {"uri": f"s3://{s3_bucket}/runs", "endpoint": ENDPOINT, "insecure": True}

    def prepared(st, run: str) -> tuple[dict, list[str]]:
        m = read_manifest(st, "prepare/manifest.json")
        local = read_output(
            st, _t("prepare"), "prepare/shard-00000.safetensors", tmp_path / run / "s.safetensors"
        )
        raw = read_shard(local, "raw")
        return m, unpack_texts(raw["text"], raw["doc_offsets"])

    def run_and_check(spec, st, run: str, n_docs: int, texts: list[str]) -> str:
        assert run_task(prepare.run, _t("prepare"), spec, run, settings=cached) == 0
        m, got = prepared(st, run)
        assert m["counts"]["documents"] == n_docs and m["counts"]["train_documents"] == n_docs
        assert got == texts
        stamp = m["summary"]["corpus_stamp"]
        assert stamp == corpus_stamp(spec.corpus, spec.store) and len(stamp) == 64
        assert not corpus_changed(st, spec)
        started = m["started_at"]
        assert run_task(prepare.run, _t("prepare"), spec, run, settings=cached) == 0  # unchanged: skipped
        assert read_manifest(st, "prepare/manifest.json")["started_at"] == started
        return stamp

    # One object.
    c.put_object(Bucket=s3_bucket, Key="data/corpus.txt", Body=b"alpha\n\nbravo")
    spec = _spec(
        tmp_path, corpus={"uri": f"s3://{s3_bucket}/data/corpus.txt", "heldoutFraction": 0.0}, store=store
    )
    st = open_store(spec.store, "one", cached)
    first = run_and_check(spec, st, "one", 2, ["alpha", "bravo"])
    c.put_object(Bucket=s3_bucket, Key="data/corpus.txt", Body=b"ALPHA\n\nBRAVO")  # same size, new ETag
    assert corpus_changed(st, spec)
    second = run_and_check(spec, st, "one", 2, ["ALPHA", "BRAVO"])
    c.put_object(Bucket=s3_bucket, Key="data/corpus.txt", Body=b"alpha\n\nbravo\n\ncharlie")
    assert corpus_changed(st, spec)
    third = run_and_check(spec, st, "one", 3, ["alpha", "bravo", "charlie"])
    assert len({first, second, third}) == 3

    # A folder (prefix), read through the cache, with a glob.
    c.put_object(Bucket=s3_bucket, Key="data/folder/a.txt", Body=b"file one")
    c.put_object(Bucket=s3_bucket, Key="data/folder/b.txt", Body=b"file two")
    c.put_object(Bucket=s3_bucket, Key="data/folder/notes.md", Body=b"not read")
    c.put_object(Bucket=s3_bucket, Key="data/folder2/x.txt", Body=b"another prefix")  # not under folder/
    spec = _spec(
        tmp_path,
        corpus={"uri": f"s3://{s3_bucket}/data/folder", "glob": "**/*.txt", "heldoutFraction": 0.0},
        store=store,
    )
    st = open_store(spec.store, "dir", cached)
    first = run_and_check(spec, st, "dir", 2, ["file one", "file two"])
    c.put_object(Bucket=s3_bucket, Key="data/folder/notes.md", Body=b"edited, still not read")
    c.put_object(Bucket=s3_bucket, Key="data/folder2/x.txt", Body=b"edited elsewhere")
    assert not corpus_changed(st, spec)
    assert corpus_stamp(spec.corpus, spec.store) == first
    c.put_object(Bucket=s3_bucket, Key="data/folder/sub/c.txt", Body=b"file three")  # a file added
    assert corpus_changed(st, spec)
    second = run_and_check(spec, st, "dir", 3, ["file one", "file two", "file three"])
    c.put_object(Bucket=s3_bucket, Key="data/folder/a.txt", Body=b"file ONE")  # same keys and sizes
    assert corpus_changed(st, spec)
    third = run_and_check(spec, st, "dir", 3, ["file ONE", "file two", "file three"])
    c.delete_object(Bucket=s3_bucket, Key="data/folder/b.txt")  # a file removed
    assert corpus_changed(st, spec)
    fourth = run_and_check(spec, st, "dir", 2, ["file ONE", "file three"])
    assert len({first, second, third, fourth}) == 4
    # Each version of the folder has its own cache entry: a changed folder is never served from an old one.
    assert len(list((tmp_path / "cache" / "corpora").glob("*.complete"))) == 4


def test_an_unreachable_s3_corpus_is_a_clear_store_error(tmp_path: Path) -> None:
    from jobs.settings import S3Settings
    from jobs.spec import StoreSpec
    from jobs.store import S3Endpoint, StoreError

    quick = Settings(s3=S3Settings(max_attempts=1, connect_timeout=1))
    down = StoreSpec(uri=str(tmp_path / "store"), endpoint="http://127.0.0.1:9", insecure=True)
    corpus = Corpus(uri="s3://corpora/data/folder")
    with pytest.raises(
        StoreError,
        match=r"^corpus.uri s3://corpora/data/folder: cannot reach S3 endpoint "
        r"http://127.0.0.1:9.*store.endpoint",
    ):
        corpus_stamp(corpus, S3Endpoint.of(down, quick))
    spec = _spec(
        tmp_path,
        corpus={"uri": "s3://corpora/data/folder"},
        store={"uri": str(tmp_path / "store"), "endpoint": "http://127.0.0.1:9", "insecure": True},
    )
    with pytest.raises(StoreError, match="cannot reach S3 endpoint"):
        run_task(prepare.run, _t("prepare"), spec, "r", settings=quick)  # the stamp, before anything is read
    # A local corpus never touches S3: the stamp of the same file, whatever the store says.
    f = tmp_path / "corpus.txt"
    assert corpus_stamp(Corpus(uri=str(f)), down) == corpus_stamp(Corpus(uri=f"file://{f}"), None)


def test_s3_corpus_glob_matches_what_path_glob_finds(tmp_path: Path) -> None:
    """An s3:// folder's objects are filtered by corpus.glob as a local folder's files are."""
    from fusion.uris import glob_match

    names = ["a.txt", "b.md", ".hidden.txt", "sub/c.txt", "sub/deep/d.txt", "sub/deep/e.py", "Sub2/F.TXT"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text("x")
    for pattern in (
        "**/*",
        "*.txt",
        "**/*.txt",
        "sub/*",
        "sub/**/*.py",
        "**/deep/*",
        ".*",
        "*/*.TXT",
        "**/*.[tp][xy]*",
        "**",
        "sub/**",
    ):
        local = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob(pattern) if p.is_file())
        assert sorted(n for n in names if glob_match(n, pattern)) == local, pattern
