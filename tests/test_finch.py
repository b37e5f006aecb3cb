"""FINCH: the question as a probe over the held context, the normalized scores against a hand computation, the
question kept within the budget, the masking oracle of what follows, and its protocol."""

import pytest
import torch

from kvexp.methods import build_method, make_cache
from kvexp.methods.base import Probing
from kvexp.methods.calibration import record_attention_inputs
from kvexp.tasks.generation import GenerationSample, PromptEncoder, run_generation
from tests.conftest import TINY_MODELS, load
from tests.oracle import Visibility, max_logprob_error, oracle_logits


def _ids(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, n), generator=g)


def _finch(model, method, context, question, budget, recorder=None, chunk_size=None, fed=None):
    """FINCH's prefill through a fresh cache, as the generation task drives it; (cache, question logits). `fed`: a
    list that gets, before each feed, every layer's kept positions per head."""
    cache = make_cache(model, method, budget, recorder=recorder)

    def feed(ids):
        if fed is not None:
            fed.append([[layer.positions[0, h].sort().values.tolist() for h in range(layer.kv_heads)]
                        for layer in cache.layers if layer.is_initialized])  # fmt: skip
        return model(ids, past_key_values=cache).logits[:, -1].float()

    def run(ids):
        model(ids, past_key_values=cache)

    probing = Probing(context, 0, torch.zeros(1, 0, dtype=torch.long), None, run, feed, question, chunk_size)
    return cache, method.prefill(cache, probing)


def _reference_scores(model, context, question, normalize):
    """Per layer [Hkv, n]: the question's attention over the context from a plain forward over context +
    question, each query's row times the keys it sees (n + i + 1) if `normalize`, averaged over the question's
    tokens and the group."""
    n, q = context.shape[1], question.shape[1]
    seen = {}

    def record(module, query, key, value):
        seen[module.layer_idx] = (query, key, module.scaling)

    record_attention_inputs(model, torch.cat([context, question], dim=1), record)
    scores = {}
    for i, (query, key, scaling) in seen.items():
        heads, kv = query.shape[1], key.shape[1]
        group = heads // kv
        out = torch.zeros(kv, n)
        for h in range(kv):
            for g in range(group):
                rows = query[0, h * group + g, n:].float() @ key[0, h].float().T * scaling  # [q, n + q]
                causal = torch.arange(n + q)[None, :] > (n + torch.arange(q))[:, None]
                probs = rows.masked_fill(causal, float("-inf")).softmax(-1)
                if normalize:
                    probs = probs * (n + torch.arange(q) + 1)[:, None]
                out[h] += probs[:, :n].mean(0) / group
        scores[i] = out
    return scores


@torch.no_grad()
@pytest.mark.parametrize("normalize", [True, False])
def test_the_context_keeps_what_the_question_attends_to(normalize):
    model, _ = load("tiny_llama")
    context, question = _ids(model, 40), _ids(model, 6, seed=1)
    method = build_method("finch", normalize_scores=normalize)
    cache, _ = _finch(model, method, context, question, 16)
    reference = _reference_scores(model, context, question, normalize)
    for layer in cache.layers:
        assert layer.budget == 16 and layer.length == 16  # 10 context entries + the 6 question tokens
        for h in range(layer.kv_heads):
            kept = layer.positions[0, h].sort().values
            assert kept[-6:].tolist() == list(range(40, 46))  # the question, fed again after the compression
            expected = reference[layer.layer_idx][h].topk(10).indices.sort().values
            assert kept[:-6].tolist() == expected.tolist()


@torch.no_grad()
def test_chunk_by_chunk_each_chunk_is_read_over_what_the_question_kept_of_the_last():
    """eval.prefill_chunk_size=16 over a 40-token context, budget 16, a 6-token question: after the first chunk the
    cache holds the 10 entries of it the question attends to most (as FINCH over that chunk alone); each later
    chunk is fed over the 10 kept, and the cache ends with 10 context entries and the question."""
    model, _ = load("tiny_llama")
    context, question = _ids(model, 40), _ids(model, 6, seed=1)
    fed = []
    cache, _ = _finch(model, build_method("finch"), context, question, 16, chunk_size=16, fed=fed)
    assert len(fed) == 4  # three chunks (16, 16, 8), then the question
    reference = _reference_scores(model, context[:, :16], question, True)
    for i, layer in enumerate(cache.layers):
        for h in range(layer.kv_heads):
            assert fed[1][i][h] == reference[i][h].topk(10).indices.sort().values.tolist()
            assert len(fed[2][i][h]) == 10 and max(fed[2][i][h]) >= 16  # the second chunk too was read
            kept = layer.positions[0, h].sort().values.tolist()
            assert len(kept) == 16 and kept[-6:] == list(range(40, 46))
    whole, _ = _finch(model, build_method("finch"), context, question, 16)
    assert any(  # reading in chunks changes the choice somewhere
        not torch.equal(a.positions.sort().values, b.positions.sort().values)
        for a, b in zip(cache.layers, whole.layers, strict=True)
    )


@torch.no_grad()
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_masking_oracle_chunk_by_chunk(chunk_size):
    model, _ = load("tiny_llama")
    ids = _ids(model, 40)
    vis = Visibility(1, model.config.num_key_value_heads, 40)
    cache, first = _finch(model, build_method("finch"), ids[:, :30], ids[:, 30:34], 12, vis, chunk_size)
    logits = [model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1].float() for t in range(34, 39)]
    ours = torch.stack([first, *logits], dim=1)
    assert max_logprob_error(ours, oracle_logits(model, ids, vis)[:, 33:39], ids[:, 34:40]) < 1e-4


@torch.no_grad()
def test_chunks_keep_equal_shares():
    model, _ = load("tiny_llama")
    context, question = _ids(model, 40), _ids(model, 4, seed=1)
    cache, _ = _finch(
        model, build_method("finch", chunk_length=10), context, question, 24
    )  # 20 of 40: 5 each
    for layer in cache.layers:
        positions = layer.positions[0]
        for chunk in range(4):
            in_chunk = (positions >= 10 * chunk) & (positions < 10 * chunk + 10)
            assert in_chunk.sum(-1).tolist() == [5] * layer.kv_heads


@torch.no_grad()
@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_masking_oracle_of_the_question_and_the_answer(model_name):
    model, _ = load(model_name)
    ids = _ids(model, 40)  # context 30, question 4, then 6 decoded tokens
    kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    vis = Visibility(1, kv, 40)
    cache, first = _finch(model, build_method("finch"), ids[:, :30], ids[:, 30:34], 12, recorder=vis)
    logits = [model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1].float() for t in range(34, 39)]
    ref = oracle_logits(model, ids, vis)
    ours = torch.stack([first, *logits], dim=1)  # the question's last position and each decode step
    assert max_logprob_error(ours, ref[:, 33:39], ids[:, 34:40]) < 1e-4
    assert all(layer.length <= 12 for layer in cache.layers)


def _sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "while", "red", "dogs", "ran", "far", "away", "from"]
    text = " ".join(vocab[i] for i in torch.randint(0, len(vocab), (80,), generator=g).tolist())
    return GenerationSample(f"s{seed}", text, "Where did the dogs run?", ["away"], max_new_tokens=4)


@torch.no_grad()
def test_generation_under_the_query_aware_protocol_holds_the_budget():
    model, tok = load("tiny_llama")
    samples = [_sample(i) for i in range(2)]
    prompts = [PromptEncoder(tok).encode(s) for s in samples]
    results = run_generation(model, tok, samples, prompts, "finch", lambda n: 40, protocol="query_aware")
    for result, prompt in zip(results, prompts, strict=True):
        assert (
            result.kv["tokens_kept"] == 40
        )  # the budget, the question inside it (when=always while decoding)
        assert (
            result.kv["tokens_seen"]
            == prompt.context.shape[1] + prompt.question.shape[1] + result.new_tokens - 1
        )
    with pytest.raises(ValueError, match="eval.protocol=query_aware"):
        run_generation(model, tok, samples, prompts, "finch", lambda n: 40)
    with pytest.raises(ValueError, match="leaves no room for the context"):
        run_generation(model, tok, samples, prompts, "finch", lambda n: 3, protocol="query_aware")


def test_the_config_asks_for_the_query_aware_protocol_before_the_model_loads():
    from kvexp.config import validate
    from tests.test_config import _compose

    validate(_compose("method=finch", "dataset=passkey", "eval.protocol=query_aware"))
    with pytest.raises(ValueError, match="set eval.protocol=query_aware"):
        validate(_compose("method=finch", "dataset=passkey"))


def test_validation():
    with pytest.raises(ValueError, match="method.chunk_length must be null or >= 1"):
        build_method("finch", chunk_length=0).validate(64)
