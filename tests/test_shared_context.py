"""fusion.shared_context: multiple-choice requests that share a context give HFLM's own log-likelihoods from
one pass over that context, for each architecture the project loads."""

from __future__ import annotations

import copy

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from fusion.models import ARCHITECTURES, load_model
from fusion.shared_context import SharedContextLM, batches, context_groups

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}
MAX_LENGTH = 64


def test_batches_stay_within_the_token_budget() -> None:
    def group(ctx_len: int, *cont_lens: int) -> list:
        return [(("", ""), [1] * ctx_len, [2] * n) for n in cont_lens]

    reqs = group(10, 1, 3) + group(30, 2, 2) + group(20, 5, 1)
    groups = [[0, 1], [2, 3], [4, 5]]
    # Longest context first: 30 ([2, 3]), 20, 10. The first two cost two contexts of 30 and four
    # continuations of 5 - 1 tokens = 76 tokens: over 70, they are split (then 2 x 20 + 4 x 4 = 56 fit); at
    # 76 they share a batch, and the third needs 3 x 30 + 6 x 4 = 114.
    assert batches(groups, reqs, 70) == [[[2, 3]], [[4, 5], [0, 1]]]
    assert batches(groups, reqs, 76) == [[[2, 3], [4, 5]], [[0, 1]]]
    assert batches(groups, reqs, 114) == [[[2, 3], [4, 5], [0, 1]]]
    assert batches(groups, reqs, 1) == [[[2, 3]], [[4, 5]], [[0, 1]]]  # a group alone, whatever its size


def test_context_groups_by_hand() -> None:
    r = [
        (("a", "x"), [1, 2], [3]),
        (("b", "y"), [4], [5]),  # its context is nobody else's: HFLM's path
        (("a", "z"), [1, 2], [6, 7]),
        (("", "w"), [], [8]),  # no context tokens: HFLM's path (it prepends its own prefix token)
        (("c", "q"), [9] * 60, [1] * 5),  # over the length: HFLM's path (it truncates on the left)
        (("c", "r"), [9] * 60, [1] * 4),  # exactly the length: shared
        (("a", "v"), [1, 2], [3, 3, 3]),
    ]
    groups, alone = context_groups(r, MAX_LENGTH)
    assert groups == [[0, 2, 6]]
    assert alone == [1, 3, 4, 5]  # [5] is shareable but alone once [4] is out (it is over the length)


def _model(arch: str, vocab: int):
    ri = {"architecture": arch, **TINY, "seed": 3}
    return load_model(None, random_init=ri, vocab_size=vocab, device="cpu", dtype="float32", eos_token_id=2)


def _requests(tok) -> list:
    def req(ctx: str, cont: str):
        enc = tok.encode
        return ((ctx, cont), enc(ctx, add_special_tokens=False), enc(cont, add_special_tokens=False))

    question = "def parse_header(line):\n    '''Split a header line into its name and value.'''\n"
    return [
        req(question, " parse_header"),
        req(question, " split_name_and_value_of_a_line"),
        req(question, " read"),
        req(question, " x"),
        req("The capital of France is", " Paris"),  # alone
        req("The capital of France is a", " city"),  # another context
        req("The capital of France is a", " river that runs through it"),
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_log_likelihoods_are_hflms_and_each_context_runs_once(arch: str, mistral_tokenizer) -> None:
    tok = copy.deepcopy(mistral_tokenizer)
    model = _model(arch, len(tok))
    requests = _requests(tok)
    kw = {"max_length": MAX_LENGTH, "batch_size": 4}
    shared = SharedContextLM(pretrained=model, tokenizer=copy.deepcopy(tok), **kw)
    plain = HFLM(pretrained=model, tokenizer=copy.deepcopy(tok), **kw)

    tokens_run = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: tokens_run.append(i[0].numel()))
    try:
        got = shared._loglikelihood_tokens(requests)
        shared_tokens = sum(tokens_run)
    finally:
        hook.remove()
    want = plain._loglikelihood_tokens(requests)
    assert [g for _, g in got] == [g for _, g in want]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in want], abs=1e-4)

    # One batch: both shared contexts, padded to the longer, once; then every choice but its last token,
    # padded to the longest; the lone request through HFLM's path (context + continuation but its last token).
    q, lone, c = requests[0], requests[4], requests[5]
    contexts = 2 * max(len(q[1]), len(c[1]))
    choices = 6 * (max(len(r[2]) for r in requests[:4] + requests[5:]) - 1)
    assert shared_tokens == contexts + choices + len(lone[1]) + len(lone[2]) - 1
    assert torch.is_inference_mode_enabled() is False  # the scoring left no global mode behind


def test_a_task_scores_the_same_through_the_stage_wrapper(mistral_tokenizer) -> None:
    """wrap_model (what the evaluate stage scores with) is the shared-context LM."""
    from fusion.benchmarks import wrap_model

    tok = copy.deepcopy(mistral_tokenizer)
    lm = wrap_model(_model("llama", len(tok)), tok, None, MAX_LENGTH, 4)
    assert isinstance(lm, SharedContextLM)
