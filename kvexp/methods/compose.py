from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvexp.methods.base import Method, build_method, register
from kvexp.methods.scoring import head_caps, rank_within_groups

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer


def chain_scores(
    stage_scores: list[torch.Tensor],
    keep_ratios: list[float],
    positions: torch.Tensor,
    live: torch.Tensor,
    caps: torch.Tensor,
) -> torch.Tensor:
    """The chain's selection as scores for one top-k ([B, Hkv, n]; dead slots -inf).

    Stage i < last, per KV head, keeps the top `min(n_i, max(cap, int(keep_ratios[i] n_i)))` of its `n_i` candidates
    by its scores (ties by position, the engine's order); the first stage's candidates are the live slots, each
    next stage's the survivors of the one before; `caps` [B, Hkv] is what each head keeps in the end. An entry
    scores `level (n + 1) + r`: `level` the stages it survived, `r` (< n) higher for a better entry by the last
    stage's scores among the live slots. So the top `cap` are the last stage's best among the last candidates."""
    n = positions.shape[-1]
    whole = torch.zeros_like(positions)  # one group: rank within the head
    candidate, level = live, torch.zeros_like(positions)
    for scores, keep in zip(stage_scores[:-1], keep_ratios, strict=True):
        count = candidate.sum(dim=-1)  # [B, Hkv]
        stay = torch.minimum(count, torch.maximum(caps, (count.double() * keep).long()))
        rank = rank_within_groups(scores, positions, whole, candidate)  # 0 = best candidate
        candidate = candidate & (rank < stay[..., None])
        level = level + candidate.long()
    last = stage_scores[-1]
    order = n - 1 - rank_within_groups(last, positions, whole, live)  # n - 1: the last stage's best
    composed = (level * (n + 1) + order).float()
    return composed.masked_fill(~live, float("-inf"))


@register
@dataclass
class Compose(Method):
    """ComposedPress (kvpress): a chain of methods, each choosing among what the one before kept.

    `methods` is a list of method nodes (`{name: snapkv, window_size: 16}`), each a registered method that
    compresses. At a compression, per KV head, every stage scores the layer as it does alone; the first stage keeps
    `keep_ratios[0]` of the live entries (`int(keep_ratio x n)`, never fewer than the head finally keeps), the
    second chooses among those by its own scores and keeps `keep_ratios[1]` of them, and so on; the last stage
    keeps the budget (the engine's one top-k over `chain_scores`). Once a prompt is compressed, that is kvpress's
    chain: each press prunes the output of the one before by its own ratio, the last one's ratio being the budget
    (kvexp's budget is the final size; `budget.keep_ratio` is the product of kvpress's keep fractions). At a
    decoding step (one entry over the budget) an intermediate stage keeps all but the budget's entries only if
    its ratio lets it: with `int(keep_ratio (budget + 1)) <= budget` the first stage alone picks the evicted entry.

    Every stage observes every step (its statistics include what earlier stages removed, as they do alone) and
    keeps its own per-slot state (two stages with the same state name are refused) and its own remembered query
    window (`layer.query_window` is swapped per stage). The layer budgets and the final size are the last stage's
    (`layer_budgets`, `target_size`); per-head budgets come from the cache. Refused stages: merging methods, those
    that allocate across layers, and those with per-head counts of their own (AdaKV, ChunkKV, ...): kvpress refuses
    AdaKVPress in ComposedPress too. A merge around the chain is `method=merging method.scorer=compose`.

    Deviations from kvpress: kvpress's presses score only what the press before kept (a later press never sees the
    pruned entries' keys); kvexp scores the whole layer once per stage and ranks within the candidates, which is
    the same for scorers that score each entry alone (key norms, accumulated attention) and differs for those that
    normalize over the entries (KeyDiff's mean key, a softmax over the window's keys). kvpress compresses the
    prompt once; here every compression runs the chain. A storage method is not a stage: kvpress's SnapKV + ThinK
    chain is `method=think method.evict={name:snapkv}`.
    """

    name = "compose"
    description = "a chain of methods, each choosing among what the one before kept (kvpress ComposedPress)"
    methods: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "snapkv"}, {"name": "knorm"}])
    keep_ratios: list[float] = field(default_factory=lambda: [0.5])
    row_budgets = True  # when every stage keeps a budget per row (`__post_init__`)
    _stages: list[Method] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.methods, list | tuple) or not self.methods:
            raise ValueError(f"method.methods must be a non-empty list of method nodes, got {self.methods!r}")
        self._stages = [self._build(i, node) for i, node in enumerate(self.methods)]
        owners: dict[str, str] = {}
        for stage in self._stages:
            for state in stage.state_names:
                if state in owners:
                    raise ValueError(
                        f"method.methods: {owners[state]} and {stage.name} both keep the per-slot state {state!r}; "
                        "a chain can hold one of them"
                    )
                owners[state] = stage.name
        # Instance values of the ClassVars the engine reads: the union of the stages'.
        self.observes = any(stage.observes for stage in self._stages)
        self.reads_step_attention = any(stage.reads_step_attention for stage in self._stages)
        self.batches = all(stage.batches for stage in self._stages)
        # Every stage keeps each row's own share (`chain_scores`' caps are the rows' budgets).
        self.row_budgets = all(stage.row_budgets for stage in self._stages)
        self.state_names = tuple(owners)
        # Each stage's remembered query window, per batch row (it follows beam reorders).
        self.row_scratch = tuple(
            f"{part}{i}" for i in range(len(self._stages)) for part in ("queries", "query_positions")
        )

    def _build(self, i: int, node: Any) -> Method:
        node = dict(node) if isinstance(node, dict) else node
        if not isinstance(node, dict) or "name" not in node:
            raise ValueError(
                f"method.methods[{i}] must be a method node ({{name: snapkv, ...}}), got {node!r}"
            )
        try:
            stage = build_method(**node)
        except ValueError as err:
            raise ValueError(f"method.methods[{i}]: {err}") from err
        why = (
            "does not compress"
            if not stage.compresses
            else "merges entries"
            if stage.merges
            else "allocates budgets across layers"
            if stage.allocates
            else "scores with probes after the prompt"
            if stage.probes
            else "sets per-head counts of its own"
            if type(stage).head_counts is not Method.head_counts
            else None
        )
        if why is not None:
            raise ValueError(
                f"method.methods[{i}]={stage.name} {why}, which a chain cannot run; its stages are eviction "
                "methods that score the layer's entries, within the layer's budget"
            )
        return stage

    def parts(self) -> tuple[Method, ...]:
        return tuple(self._stages)

    def validate(self, budget: int | None) -> None:
        if len(self.keep_ratios) != len(self._stages) - 1:
            raise ValueError(
                f"method.keep_ratios needs one ratio per stage but the last ({len(self._stages) - 1}), got "
                f"{list(self.keep_ratios)}"
            )
        if not all(isinstance(r, int | float) and 0.0 < r <= 1.0 for r in self.keep_ratios):
            raise ValueError(f"method.keep_ratios must be in (0, 1], got {list(self.keep_ratios)}")
        for i, stage in enumerate(self._stages):
            try:
                stage.validate(budget)
            except ValueError as err:
                raise ValueError(f"method.methods[{i}] ({stage.name}): {err}") from err

    def check_model(self, num_layers: int, kv_heads: int) -> None:
        for i, stage in enumerate(self._stages):
            try:
                stage.check_model(num_layers, kv_heads)
            except ValueError as err:
                raise ValueError(f"method.methods[{i}] ({stage.name}): {err}") from err

    def prepare(self, model: PreTrainedModel) -> None:
        for stage in self._stages:
            stage.prepare(model)

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        return self._stages[-1].layer_budgets(budgets)

    def target_size(self, layer: CompressedLayer) -> int:
        return self._stages[-1].target_size(layer)

    def initial_state(self, name: str) -> float:
        owner = next(stage for stage in self._stages if name in stage.state_names)
        return owner.initial_state(name)

    @contextlib.contextmanager
    def _window(self, layer: CompressedLayer, i: int) -> Iterator[None]:
        """Stage i's own remembered queries in `layer.query_window` while it runs (the layer's one window
        otherwise holds every stage's queries), the layer's own restored after."""
        scratch, outer = layer.scratch(self), layer.query_window
        queries = scratch.get(f"queries{i}")
        layer.query_window = None if queries is None else (queries, scratch[f"query_positions{i}"])
        try:
            yield
        finally:
            window = layer.query_window
            scratch[f"queries{i}"], scratch[f"query_positions{i}"] = (
                (None, None) if window is None else window
            )
            layer.query_window = outer

    def observe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        for i, stage in enumerate(self._stages):
            if stage.observes:
                with self._window(layer, i):
                    stage.observe(layer, query)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        live = layer.live()
        stage_scores = []
        for i, stage in enumerate(self._stages):
            with self._window(layer, i):
                scores = stage.score(layer)
            scores = getattr(scores, "scores", scores)  # a Selection's scores (no stage merges)
            stage_scores.append(scores.float().masked_fill(~live, float("-inf")))
        caps = head_caps(layer, self.target_size(layer))
        return chain_scores(stage_scores, list(self.keep_ratios), layer.positions, live, caps)

    def statistics(self, layers: list[CompressedLayer]) -> dict[str, Any]:
        stats = {}
        for i, stage in enumerate(self._stages):
            own = stage.statistics(layers)
            if own:
                stats[f"{i}:{stage.name}"] = own
        return stats
