"""A method object is its hyperparameters: a run's state lives in the cache's scratch space (docs/design.md#who-owns-what).

Two caches made from one method object, stepped in turn, must give exactly what each gives alone, and after a
run the method object must be what a fresh one is after `prepare` (what it learns from the model itself).
"""

import dataclasses

import pytest
import torch

from kvexp.methods import METHODS, build_method, make_cache
from tests.conftest import load
from tests.test_engine import SMALL_PARAMS

# Every compressing method, with the tiny-model settings of the engine tests, except that D2O and DynamicKV keep
# their cross-layer allocation (per-cache state in the cache's scratch).
PARAMS = {**SMALL_PARAMS, "d2o": {"skip_layers": []}, "dynamickv": {"window_size": 4, "kernel_size": 3}}
NAMES = sorted(name for name, cls in METHODS.items() if cls.compresses)
BUDGET, PROMPT, DECODE = 16, 30, 12


def _ids(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, PROMPT + DECODE), generator=g)


@torch.no_grad()  # on a generator: grad mode is off inside each step only, not while it is suspended
def _steps(model, cache, ids):
    """A prefill, then one decode step at a time; yields each forward's logits."""
    yield model(ids[:, :PROMPT], past_key_values=cache).logits
    for t in range(PROMPT, ids.shape[1]):
        yield model(ids[:, t : t + 1], past_key_values=cache).logits


def _same(a, b) -> bool:
    """Equal values, tensors element-wise, nested methods field by field."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and _same(vars(a), vars(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_two_caches_from_one_method_share_nothing(name):
    model, _ = load("tiny_llama")
    params = PARAMS.get(name, {})
    first, second = _ids(model, 1), _ids(model, 2)
    alone = list(_steps(model, make_cache(model, build_method(name, **params), BUDGET), first))

    method = build_method(name, **params)
    a = _steps(model, make_cache(model, method, BUDGET), first)
    b = _steps(model, make_cache(model, method, BUDGET), second)
    interleaved = []
    for step_a, _ in zip(a, b, strict=True):  # a's step, then b's, alternately
        interleaved.append(step_a)
    assert all(torch.equal(x, y) for x, y in zip(alone, interleaved, strict=True))

    fresh = build_method(name, **params)
    make_cache(model, fresh, BUDGET)  # prepare: what a method may learn from the model
    assert _same(vars(method), vars(fresh)), "the method object kept state of the run"


def test_cache_scratch_is_per_owner_and_cleared_by_reset():
    model, _ = load("tiny_llama")
    method = build_method("d2o", skip_layers=[])
    cache = make_cache(model, method, BUDGET)
    list(_steps(model, cache, _ids(model, 1)))
    layer = cache.layers[0]
    assert "threshold" in layer.scratch(method)  # D2O's per-layer EMA threshold
    assert cache.scratch(method)["allocation"].done  # its layer allocation, once per cache
    assert layer.scratch(object()) == {}
    layer.reset()
    assert layer.scratch(method) == {}


@dataclasses.dataclass
class _Shift(METHODS["streaming_llm"]):
    """StreamingLLM whose last layer, at the prefill, moves `moved` entries of budget from layer 0 to itself
    (and asks for `extra` more)."""

    allocates = True
    moved: int = 4
    extra: int = 0

    def allocate(self, layer):
        from kvexp.engine import Reallocation

        last = len(layer.cache.layers) - 1
        if layer.new_tokens == 1:
            return None
        if layer.layer_idx != last:
            return Reallocation(defer=True)
        return Reallocation({0: BUDGET - self.moved, last: BUDGET + self.moved + self.extra}, final=True)


def test_a_reallocation_sets_budgets_compresses_the_layers_that_ran_and_keeps_the_total():
    model, _ = load("tiny_llama")
    cache = make_cache(model, _Shift(sink_tokens=2), BUDGET)
    last = len(cache.layers) - 1
    with torch.no_grad():
        model(_ids(model, 1)[:, :PROMPT], past_key_values=cache)
    # Layer 0 was deferred in its step and compressed when the last layer's plan arrived.
    assert cache.layers[0].length == BUDGET - 4 and cache.layers[last].length == BUDGET + 4
    assert cache.budget_total() == cache.allocated == BUDGET * len(cache.layers)
    assert not any(layer.deferred for layer in cache.layers)

    greedy = make_cache(model, _Shift(sink_tokens=2, extra=1), BUDGET)
    with torch.no_grad(), pytest.raises(RuntimeError, match="raised the budgets' total"):
        model(_ids(model, 1)[:, :PROMPT], past_key_values=greedy)
