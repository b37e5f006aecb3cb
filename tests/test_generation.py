"""The generation runner: prompt construction, both protocols, decoding, scoring and aggregation."""

import copy

import pytest
import torch

from kvexp.tasks.generation import (
    Decoding,
    GenerationResult,
    GenerationSample,
    PromptEncoder,
    _cut,
    _pick,
    aggregate_generation,
    evaluate_generation,
    generate_answer,
    score_prediction,
    sentence_lines,
)
from tests.conftest import load

CONTEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 3
QUESTION = "Where does the fox jump?"


def _sample(**kw) -> GenerationSample:
    return GenerationSample(**{"id": "s", "context": CONTEXT, "question": QUESTION, "answers": ["dog"], **kw})


class Positions:
    """Recorder: per step (calls of layer 0 start one), each layer's live logical positions and the step's size."""

    def __init__(self):
        self.steps: list[dict] = []

    def __call__(self, layer, q: int) -> None:
        if layer.layer_idx == 0:
            self.steps.append({"q": q, "layers": {}})
        live = layer.positions[0][layer.live()[0]]  # [live entries] over all KV heads of batch row 0
        heads = layer.positions.shape[1]
        self.steps[-1]["layers"][layer.layer_idx] = [set(p.tolist()) for p in live.reshape(heads, -1)]


def test_plain_prompt_is_kvpress_layout_with_default_special_tokens():
    _, tok = load("tiny_llama")
    encoder = PromptEncoder(tok)
    prompt = encoder.encode(_sample(answer_prefix="Answer:"))
    assert prompt.context[0].tolist() == tok(CONTEXT).input_ids  # <bos> + bytes: the tokenizer's default
    assert tok.decode(prompt.question[0]) == QUESTION + "\nAnswer:"
    assert prompt.question[0, 0].item() != tok.bos_token_id
    # Without an answer prefix the question is used exactly as given (LongBench builds its whole prompt).
    assert tok.decode(encoder.encode(_sample()).question[0]) == QUESTION
    assert prompt.compressed_tokens("query_agnostic") == prompt.context.shape[1]
    assert prompt.compressed_tokens("query_aware") == prompt.context.shape[1] + prompt.question.shape[1]


def test_chat_template_puts_context_and_question_in_one_user_turn():
    _, tok = load("tiny_llama")
    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    prompt = PromptEncoder(tok, chat_template=True).encode(_sample(answer_prefix="Answer:"))
    assert tok.decode(prompt.context[0]) == "<|user|>" + CONTEXT  # no extra <bos>: the template owns specials
    assert tok.decode(prompt.question[0]) == QUESTION + "<|end|><|assistant|>Answer:"
    with pytest.raises(ValueError, match="eval.chat_template"):
        PromptEncoder(load("tiny_llama")[1], chat_template=True)


def test_a_prompt_too_long_for_the_model_loses_the_middle_of_its_context():
    _, tok = load("tiny_llama")
    sample = _sample(context="A" * 50 + "B" * 100 + "C" * 50, max_new_tokens=10)
    prompt = PromptEncoder(tok, max_context=100).encode(sample)
    q = prompt.question.shape[1]
    room = 100 - q - 10
    assert prompt.context.shape[1] == room
    full = tok(sample.context).input_ids
    assert prompt.context[0].tolist() == full[: room // 2] + full[-(room - room // 2) :]
    with pytest.raises(ValueError, match="do not fit"):
        PromptEncoder(tok, max_context=q + 10).encode(sample)


def test_full_cache_greedy_answer_equals_transformers_generate():
    model, tok = load("tiny_llama")
    prompt = PromptEncoder(tok).encode(_sample(answer_prefix="Answer:"))
    result = generate_answer(model, tok, prompt, "full", None, max_new_tokens=12)
    ids = torch.cat([prompt.context, prompt.question], dim=1)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    reference = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert result.prediction == reference
    assert result.new_tokens == out.shape[1] - ids.shape[1]
    assert result.kv["compression_ratio"] == 0.0
    assert len(result.step_s) == result.new_tokens - 1  # the first token comes from the prefill


@pytest.mark.parametrize("when", ["always", "prefill"])
def test_query_agnostic_never_compresses_the_question(when):
    model, tok = load("tiny_llama")
    prompt = PromptEncoder(tok).encode(_sample(answer_prefix="Answer:"))
    c, q = prompt.context.shape[1], prompt.question.shape[1]
    budget, rec = 40, Positions()
    generate_answer(
        model, tok, prompt, "snapkv", budget, max_new_tokens=6, recorder=rec, when=when, window_size=8
    )
    question = set(range(c, c + q))
    prefill, question_step, decode = rec.steps[0], rec.steps[1], rec.steps[2:]
    assert prefill["q"] == c and question_step["q"] == q and all(s["q"] == 1 for s in decode)
    for layer in question_step["layers"].values():
        for head in layer:
            # The context was compressed to the budget; the question arrives on top of it, whole.
            assert len([p for p in head if p < c]) == budget and question <= head
    for step in decode[:1] if when == "always" else decode:
        for layer in step["layers"].values():
            assert all(question <= head for head in layer)  # every question position, every layer and head
    for k, step in enumerate(decode, 1):
        # always: each decode step compresses back to budget + question; prefill: decode never compresses.
        expected = budget + q + (1 if when == "always" else k)
        assert all(len(head) == expected for layer in step["layers"].values() for head in layer)


def test_query_aware_compresses_question_and_context_together_so_the_caches_differ():
    model, tok = load("tiny_llama")
    prompt = PromptEncoder(tok).encode(_sample(answer_prefix="Answer:"))
    c, q = prompt.context.shape[1], prompt.question.shape[1]
    caches = {}
    for protocol in ("query_agnostic", "query_aware"):
        rec = Positions()
        generate_answer(
            model, tok, prompt, "snapkv", 40, max_new_tokens=2, protocol=protocol, recorder=rec, window_size=8
        )
        caches[protocol] = rec.steps[-1][
            "layers"
        ]  # the first decode step: the cache after the prompt + 1 token
    aware, agnostic = caches["query_aware"], caches["query_agnostic"]
    for layer in aware.values():
        # One prefill of context + question, compressed to 40 (window protected: the question's tail stays).
        assert all(len(head) == 41 and set(range(c + q - 8, c + q + 1)) <= head for head in layer)
    for layer in agnostic.values():
        assert all(len(head) == 40 + q + 1 for head in layer)
    assert aware != agnostic


def test_a_budget_holding_the_whole_prompt_answers_as_the_full_cache():
    model, tok = load("tiny_llama")
    prompt = PromptEncoder(tok).encode(_sample(answer_prefix="Answer:"))
    full = generate_answer(model, tok, prompt, "full", None, max_new_tokens=8)
    for protocol in ("query_agnostic", "query_aware"):
        big = generate_answer(model, tok, prompt, "h2o", 10_000, max_new_tokens=8, protocol=protocol)
        assert big.prediction == full.prediction and big.kv["compression_ratio"] == 0.0


def test_chunked_prefill_compresses_between_chunks_and_lowers_the_peak():
    model, tok = load("tiny_llama")
    prompt = PromptEncoder(tok).encode(_sample())
    c, q = prompt.context.shape[1], prompt.question.shape[1]
    rec = Positions()
    chunked = generate_answer(
        model, tok, prompt, "streaming_llm", 48, max_new_tokens=2, prefill_chunk_size=32, recorder=rec
    )
    chunks = [s["q"] for s in rec.steps[:-2]]  # then the question step and one decode step
    assert chunks == [32] * (c // 32) + [c % 32] and rec.steps[-2]["q"] == q
    # Every chunk meets a cache compressed back to 48: the physical peak is budget + chunk, not the context.
    assert all(len(h) <= 48 + 32 for s in rec.steps[:-2] for layer in s["layers"].values() for h in layer)
    one_shot = generate_answer(model, tok, prompt, "streaming_llm", 48, max_new_tokens=2)
    slot = one_shot.kv["bytes_full"] // one_shot.kv["tokens_seen"]  # bytes of one token in every layer
    assert one_shot.kv_peak_bytes == c * slot  # the whole context, before its compression
    assert chunked.kv_peak_bytes == max(48 + 32, 48 + q) * slot


def test_sampling_is_seeded_and_greedy_ignores_the_seed():
    model, tok = load("tiny_llama")
    prompt = PromptEncoder(tok).encode(_sample())

    def answer(**kw):
        return generate_answer(
            model, tok, prompt, "full", None, max_new_tokens=16, decoding=Decoding(**kw)
        ).prediction

    assert answer(do_sample=True, temperature=2.0, seed=1) == answer(do_sample=True, temperature=2.0, seed=1)
    assert answer(do_sample=True, temperature=2.0, seed=1) != answer(do_sample=True, temperature=2.0, seed=2)
    assert answer(seed=1) == answer(seed=2)


def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(0)
    nucleus = Decoding(do_sample=True, top_p=0.7)  # 0.5 < 0.7 keeps token 1 too; 0.8 >= 0.7 stops there
    draws = {int(_pick(probs.log(), nucleus, gen)) for _ in range(300)}
    assert draws == {0, 1}
    draws = {int(_pick(probs.log(), Decoding(do_sample=True), gen)) for _ in range(300)}
    assert draws == {0, 1, 2, 3}


def test_stop_strings_cut_after_the_leading_whitespace():
    assert _cut("\n 12345.\nNext question", ["\n"]) == ("\n 12345.", True)
    assert _cut(" a b", ["\n"]) == (" a b", False)
    assert _cut("x\n\ny. z\n", ["\n\n", "."]) == ("x", True)


def test_stop_string_ends_generation_early():
    model, tok = load("tiny_llama")
    prompt = PromptEncoder(tok).encode(_sample())
    free = generate_answer(model, tok, prompt, "full", None, max_new_tokens=24)
    assert len(free.prediction) > 2
    stop = free.prediction[2]  # a character the unconstrained answer produces early
    cut = generate_answer(model, tok, prompt, "full", None, max_new_tokens=24, stop=[stop])
    assert stop not in cut.prediction and free.prediction.startswith(cut.prediction)
    assert cut.new_tokens < free.new_tokens


def test_scores_follow_the_sample_metric_family():
    qa = score_prediction(_sample(answers=["the river bank"]), "It jumps near the river bank.")
    assert qa == {
        "accuracy": 1.0,
        "exact_match": 0.0,
        "f1": pytest.approx(2 * (2 / 5) / (2 / 5 + 1)),
    }  # "it jumps near river bank" vs "river bank"
    both = score_prediction(_sample(answers=["1234567", "7654321"], metric="qa_all"), "1234567 and 1111111")
    assert both == {"accuracy": 0.5}
    ref = sentence_lines("The cat sat. It purred!")
    assert ref == "The cat sat.\nIt purred!"
    rouge = score_prediction(_sample(answers=[ref], metric="rouge"), "The cat sat. It purred!")
    assert rouge == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0, "sentence_bleu": 1.0}
    )
    # rougeLsum is summary-level: the prediction's sentences are split onto lines like the reference's.
    swapped = score_prediction(_sample(answers=[ref], metric="rouge"), "It purred! The cat sat.")
    assert swapped["rougeLsum"] == 1.0 and swapped["rougeL"] < 1.0


def _result(i: int, scores: dict, steps=(0.01,)) -> GenerationResult:
    kv = {"tokens_seen": 100, "tokens_kept": 50, "bytes_full": 1000, "bytes_kept": 500}
    return GenerationResult(str(i), "p", 90, 10, 1 + len(steps), 0.5, list(steps), kv, 500, 50, scores)


def test_aggregate_means_per_group_and_grid():
    samples = [
        _sample(id=str(i), meta={"length": n, "depth": d})
        for i, (n, d) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1)])
    ]
    acc = [1.0, 0.0, 1.0, 1.0]
    results = [_result(i, {"accuracy": a, "exact_match": 0.0, "f1": a / 2}) for i, a in enumerate(acc)]
    agg = aggregate_generation(samples, results, ["length", "depth"])
    m = agg["metrics"]
    assert m["samples"] == 4 and m["qa"] == {"accuracy": 0.75, "exact_match": 0.0, "f1": 0.375}
    assert m["by"]["length"]["1"]["qa"]["accuracy"] == 0.5 and m["by"]["length"]["2"]["qa"]["accuracy"] == 1.0
    assert m["by"]["depth"]["0"]["qa"]["accuracy"] == 1.0 and m["by"]["depth"]["1"]["qa"]["accuracy"] == 0.5
    assert m["by"]["length/depth"]["1/1"]["qa"]["accuracy"] == 0.0
    assert agg["objective"] == 0.75
    assert agg["kv_cache"]["compression_ratio"] == 0.5 and agg["kv_cache"]["tokens_kept_mean"] == 50
    assert agg["timing"]["ttft_s"] == 0.5 and agg["timing"]["tpot_ms"] == pytest.approx(10.0)
    assert agg["timing"]["throughput_tok_s"] == pytest.approx(2 / 0.51)


def test_evaluate_generation_python_api():
    model, tok = load("tiny_qwen2")
    samples = [_sample(id="a", answers=["x"]), _sample(id="b", context=CONTEXT[::-1], answers=["y"])]
    out = evaluate_generation(model, tok, samples, "knorm", keep_ratio=0.5, max_new_tokens=4)
    assert [r.id for r in out["results"]] == ["a", "b"]
    assert [r.budget for r in out["results"]] == [(len(CONTEXT) + 1) // 2] * 2  # half the context (+<bos>)
    assert out["metrics"]["samples"] == 2 and set(out["metrics"]["qa"]) == {"accuracy", "exact_match", "f1"}
    with pytest.raises(ValueError, match="either budget or keep_ratio"):
        evaluate_generation(model, tok, samples, "knorm", 10, keep_ratio=0.5)
