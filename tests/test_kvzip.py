"""KVzip: the engine's probe pass (entries attended then dropped), the reconstruction scores against a hand
computation, the global allocation, the masking oracle after the compression, and where the method is refused."""

import math

import pytest
import torch

from kvexp.engine import sliding_layers
from kvexp.methods import build_method, make_cache
from kvexp.methods.base import Probing
from kvexp.methods.calibration import record_attention_inputs
from kvexp.methods.hidden_state import recording_attention_inputs
from kvexp.methods.kvzip import FIRST_PROMPT, NEXT_PROMPT, largest_remainder
from kvexp.tasks.generation import Decoding, GenerationSample, PromptEncoder, generate_answer, run_generation
from tests.conftest import TINY_MODELS, load
from tests.oracle import Visibility, max_logprob_error, oracle_logits

TOL = 1e-4


def _ids(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, n), generator=g)


def _probing(model, cache, ids, closing, encode, log=None):
    def run(probe):
        if log is not None:
            log.append(probe)
        model(probe, past_key_values=cache)

    return Probing(ids=ids, opening=0, closing=closing, encode=encode, run=run)


def _fixed_encoder(model):
    """Text -> ids without a tokenizer: a fixed id sequence per prompt (its length from the text)."""
    table = {FIRST_PROMPT: _ids(model, 5, seed=11), NEXT_PROMPT: _ids(model, 7, seed=12)}
    return table.__getitem__


@torch.no_grad()
def test_a_probe_is_attended_then_dropped():
    model, _ = load("tiny_llama")
    ids, probe = _ids(model, 30), _ids(model, 9, seed=1)
    held = make_cache(model, build_method("kvzip"), 10)
    model(ids, past_key_values=held)
    assert held.holding and held.physical_lengths() == [30, 30]  # held whole until the probes ran
    cache = make_cache(model, build_method("knorm"), 100)  # any cache runs probes; this one holds all 30
    model(ids, past_key_values=cache)
    before = [(layer.keys.clone(), layer.values.clone(), layer.positions.clone()) for layer in cache.layers]
    with cache.probe():
        probed = model(probe, past_key_values=cache).logits
    # The probe saw the whole prompt: the plain model over prompt + probe gives the same logits.
    plain = model(torch.cat([ids, probe], dim=1)).logits[:, -9:]
    assert (probed - plain).abs().max() < 1e-4
    for layer, (k, v, p) in zip(cache.layers, before, strict=True):
        assert layer.length == 30 and layer.seen == 30
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v) and torch.equal(layer.positions, p)
    assert cache.get_seq_length() == 30


def _reference_scores(model, ids, probes, targets, sinks, plus=False):
    """The authors' chunked scores, recomputed from a plain forward over prompt + each probe: per layer, the max
    over the probe's queries and the group of a softmax over [sinks, the chunk, the probe's own keys (causal)].
    `plus` (KVzip+): each weight of query t (head h) on entry j divided by ||hidden_t|| and multiplied by
    ||v_j W_o,h|| (o_proj's columns of head h) before the max."""
    n = ids.shape[1]
    layers = model.config.num_hidden_layers
    scores = [torch.full((model.config.num_key_value_heads, n), math.inf) for _ in range(layers)]
    for probe, (start, end) in zip(probes, targets, strict=True):
        seen = {}

        def record(module, query, key, value, seen=seen):
            seen[module.layer_idx] = (query, key, value, module)

        with recording_attention_inputs(model) as hidden:
            record_attention_inputs(model, torch.cat([ids, probe], dim=1), record)
        q_len = probe.shape[1]
        for i, (query, key, value, module) in seen.items():
            scaling = module.scaling
            cols = list(range(sinks)) + list(range(start, end)) + list(range(n, n + q_len))
            heads, kv = query.shape[1], key.shape[1]
            for h in range(kv):
                best = torch.zeros(end - start)
                for g in range(heads // kv):
                    qh = query[0, h * (heads // kv) + g, n:].float()  # [q, D]
                    logits = qh @ key[0, h, cols].float().T * scaling
                    own = torch.arange(q_len)
                    blocked = torch.zeros_like(logits, dtype=torch.bool)
                    blocked[:, sinks + end - start :] = own[None, :] > own[:, None]
                    probs = logits.masked_fill(blocked, -math.inf).softmax(-1)[:, sinks : sinks + end - start]
                    if plus:
                        head = h * (heads // kv) + g
                        dim = qh.shape[-1]
                        w = module.o_proj.weight[:, head * dim : (head + 1) * dim].float()  # [hidden, D]
                        out = (value[0, h, start:end].float() @ w.T).norm(dim=-1)  # [chunk]
                        probs = probs / hidden[i][0, n:].float().norm(dim=-1)[:, None] * out[None, :]
                    best = torch.maximum(best, probs.amax(0))
                scores[i][h, start:end] = best
    return scores


@torch.no_grad()
@pytest.mark.parametrize("chunk_size,plus", [(40, False), (15, False), (15, True)])
def test_scores_are_the_max_attention_of_the_reconstruction(chunk_size, plus):
    model, _ = load("tiny_llama")
    ids, closing = _ids(model, 44), _ids(model, 3, seed=5)
    encode = _fixed_encoder(model)
    method = build_method(
        "kvzip", chunk_size=chunk_size, n_sink=4, prev_postfix_size=3, allocation="uniform", plus=plus
    )
    cache = make_cache(model, method, 44)  # the budget keeps everything: the scores stay to compare
    model(ids, past_key_values=cache)
    probes = []
    method.probe(cache, _probing(model, cache, ids, closing, encode, probes))
    # The probes as the paper builds them: repeat prompt (+ the previous chunk's tail), closing, the chunk.
    bounds = list(range(4, 44, chunk_size)) + [44]
    targets = list(zip(bounds[:-1], bounds[1:], strict=True))
    assert len(probes) == len(targets)
    for i, (probe, (start, end)) in enumerate(zip(probes, targets, strict=True)):
        head = (
            encode(FIRST_PROMPT) if i == 0 else torch.cat([encode(NEXT_PROMPT), ids[:, start - 3 : start]], 1)
        )
        assert torch.equal(probe, torch.cat([head, closing, ids[:, start:end]], dim=1))
    expected = _reference_scores(model, ids, probes, targets, sinks=4, plus=plus)
    for layer, ref in zip(cache.layers, expected, strict=True):
        order = layer.positions[0, 0].argsort()
        got = layer.state("kvzip")[0][:, order]
        assert torch.isinf(got[:, :4]).all()  # sinks
        assert torch.allclose(got[:, 4:], ref[:, 4:], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_global_allocation_keeps_the_best_scores_of_the_whole_cache():
    model, _ = load("tiny_llama")
    ids = _ids(model, 60)
    method = build_method("kvzip", chunk_size=25)
    cache = make_cache(model, method, 16)
    model(ids, past_key_values=cache)
    scored = {}

    def run(probe):
        model(probe, past_key_values=cache)
        scored.update({layer.layer_idx: layer.state("kvzip")[0].clone() for layer in cache.layers})

    method.probe(cache, Probing(ids, 0, _ids(model, 2), _fixed_encoder(model), run))
    heads = cache.layers[0].kv_heads
    assert sum(layer.budget for layer in cache.layers) == 2 * 16  # the total stays
    # Each layer's share of the global top 2 x 16 x heads, rounded to whole entries per head.
    everything = torch.cat([scored[i].flatten() for i in range(2)])
    best = everything.topk(2 * 16 * heads).indices
    taken = [int(((best >= i * heads * 60) & (best < (i + 1) * heads * 60)).sum()) for i in range(2)]
    assert [layer.budget for layer in cache.layers] == largest_remainder(
        [t / heads for t in taken], 32, [60, 60]
    )
    for layer in cache.layers:
        # The layer keeps exactly its best budget x heads entries, its heads sharing them by score.
        live = layer.live()[0]
        assert int(live.sum()) == layer.budget * heads
        kept_scores = layer.state("kvzip")[0][live]
        dropped = scored[layer.layer_idx].flatten().sort(descending=True).values[layer.budget * heads :]
        assert kept_scores.min() >= dropped.max()
    assert cache.physical_lengths() == [int(layer.live()[0].sum(-1).max()) for layer in cache.layers]


def test_largest_remainder_keeps_the_total_within_caps():
    assert largest_remainder([2.5, 1.5, 4.0], 8, [10, 10, 10]) == [3, 1, 4]  # equal remainders: the first
    assert largest_remainder([2.6, 1.2, 4.2], 8, [10, 10, 10]) == [3, 1, 4]
    assert largest_remainder([5.9, 0.1], 6, [5, 10]) == [5, 1]


def _tokens_after_probes(model, allocation, budget, decode):
    """Prompt (30 tokens, in chunks of 7), KVzip's probes and compression, then `decode` tokens one at a time;
    logits and visibility of the real sequence (the probes never reach the recorder)."""
    ids = _ids(model, 30 + decode)
    kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    vis = Visibility(1, kv, ids.shape[1])
    method = build_method("kvzip", chunk_size=11, allocation=allocation)
    cache = make_cache(model, method, budget, recorder=vis)
    logits = [model(ids[:, s : min(s + 7, 30)], past_key_values=cache).logits for s in range(0, 30, 7)]
    method.probe(cache, _probing(model, cache, ids[:, :30], _ids(model, 2, seed=3), _fixed_encoder(model)))
    logits += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(30, 30 + decode)]
    return ids, torch.cat(logits, dim=1).float(), vis, cache


@torch.no_grad()
@pytest.mark.parametrize("model_name", TINY_MODELS)
@pytest.mark.parametrize("allocation", ["global", "layer", "uniform"])
def test_masking_oracle_after_the_probes(model_name, allocation):
    model, _ = load(model_name)
    ids, logits, vis, cache = _tokens_after_probes(model, allocation, 12, decode=6)
    ref = oracle_logits(model, ids, vis)
    assert max_logprob_error(logits[:, :-1], ref[:, :-1], ids[:, 1:]) < TOL
    local = sliding_layers(model)
    compressed = [layer for layer, slides in zip(cache.layers, local, strict=True) if not slides]
    assert sum(layer.budget for layer in compressed) == 12 * len(compressed)
    for layer in compressed:  # budget held after every decode step (when=always)
        assert int(layer.live()[0].sum()) == layer.budget * layer.kv_heads


def _sample(words=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "red",
        "dogs",
        "ran",
        "far",
        "away",
        "from",
        "home",
        "at",
        "night",
    ]
    text = " ".join(vocab[i] for i in torch.randint(0, len(vocab), (words,), generator=g).tolist())
    return GenerationSample(f"s{seed}", text, "Where did the dogs run?", ["away"], max_new_tokens=4)


@torch.no_grad()
def test_generation_runs_the_probes_and_reports_the_kept_cache():
    model, tok = load("tiny_llama")
    samples = [_sample(seed=i) for i in range(2)]
    prompts = [PromptEncoder(tok).encode(s) for s in samples]
    results = run_generation(model, tok, samples, prompts, build_method("kvzip", chunk_size=64), lambda n: 24)
    for result, prompt in zip(results, prompts, strict=True):
        kv = result.kv
        # budget 24 per layer on average (global shares), the question's tokens admitted on top, nothing decoded
        # beyond the budget (when=always).
        assert kv["tokens_kept"] == pytest.approx(24 + prompt.question.shape[1])
        assert kv["tokens_seen"] == prompt.context.shape[1] + prompt.question.shape[1] + result.new_tokens - 1
    with pytest.raises(ValueError, match="eval.batch_size=1"):
        run_generation(model, tok, samples, prompts, "kvzip", lambda n: 24, batch_size=2)


@torch.no_grad()
def test_the_query_aware_protocol_and_beam_search_probe_the_whole_prompt():
    model, tok = load("tiny_llama")
    sample = _sample(seed=3)
    prompt = PromptEncoder(tok).encode(sample)
    aware = run_generation(model, tok, [sample], [prompt], "kvzip", lambda n: 24, protocol="query_aware")[0]
    assert aware.kv["tokens_kept"] == pytest.approx(24)  # the question was compressed with the context
    beams = generate_answer(model, tok, prompt, "kvzip", 24, max_new_tokens=3, decoding=Decoding(num_beams=2))
    greedy = generate_answer(model, tok, prompt, "kvzip", 24, max_new_tokens=3)
    assert beams.kv["tokens_kept"] == greedy.kv["tokens_kept"] == pytest.approx(24 + prompt.question.shape[1])


def test_chat_template_parts_frame_the_repeat_prompt(smollm2):
    _, tok = smollm2
    encoder = PromptEncoder(tok, chat_template=True)
    prompt = encoder.encode(_sample(words=20))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "@@"}], add_generation_prompt=True, tokenize=False
    )
    opening, closing = text.split("@@")
    # The context opens with the template's opening (system prompt, user header), the question ends with its
    # closing (end of turn, assistant header): KVzip's sinks and the frame of its repeat prompt.
    assert tok.decode(prompt.context[0, : prompt.opening]) == opening
    assert tok.decode(prompt.closing[0]) == closing
    assert torch.equal(prompt.question[0, -prompt.closing.shape[1] :], prompt.closing[0])
    assert PromptEncoder(tok).template_parts() == (0, None)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"chunk_size": 0}, "method.chunk_size"),
        ({"n_sink": -1}, "method.n_sink"),
        ({"prev_postfix_size": -1}, "method.prev_postfix_size"),
        ({"allocation": "head"}, "method.allocation must be one of global, layer, uniform"),
    ],
)
def test_validation(params, match):
    with pytest.raises(ValueError, match=match):
        build_method("kvzip", **params).validate(64)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("adakv", {"scorer": "kvzip"}, "method.scorer must be one of"),
        ("compose", {"methods": [{"name": "kvzip"}]}, "scores with probes"),
        ("prefill_decoding", {"prefill": {"name": "kvzip"}}, "runs probes"),
        ("kivi", {"evict": {"name": "kvzip"}}, "runs probes"),
    ],
)
def test_methods_that_cannot_run_its_probes_refuse_it(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_method(name, **params)


def test_a_task_without_a_prompt_refuses_it_before_the_model_loads():
    from kvexp.config import validate
    from tests.test_config import _compose

    validate(_compose("method=kvzip", "dataset=passkey"))
    with pytest.raises(ValueError, match="dataset.task=perplexity cannot use it"):
        validate(_compose("method=kvzip"))
    with pytest.raises(ValueError, match="eval.batch_size=2"):
        validate(_compose("method=kvzip", "dataset=passkey", "eval.batch_size=2"))


def test_a_wrapper_refuses_a_scorer_set_to_probe():
    with pytest.raises(ValueError, match="runs probes after the prompt, which a wrapper cannot run"):
        build_method("adakv", scorer="kvcompose", scorer_params={"queries": "repeat"})
    build_method("adakv", scorer="kvcompose", scorer_params={"queries": "own"})
