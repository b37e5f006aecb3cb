"""Attention-pattern analysis (the H2O study's): where each layer's heads look, sinks and heavy hitters made visible.

`python -m kvexp.attention_maps --model smollm2_135m --tokens 256 --layers 0,15,29 --out outputs/attention`
reads the first `--tokens` tokens of a local text (WikiText-2 by default), runs the full model once with
eager attention, and writes per layer one figure of every query head's attention map (log scale, causal) and
a `attention_stats.json` with, per layer and head, the attention mass on the sink tokens and on the
heaviest hitters (the keys with the largest accumulated attention, H2O's score) — the two patterns that
StreamingLLM and H2O build on.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from kvexp.data import data_dir
from kvexp.models import load_model_by_name
from kvexp.tracking import atomic_write_json

log = logging.getLogger(__name__)


@torch.no_grad()
def attention_maps(model, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each requested layer's attention probabilities [H, L, L] for the single sequence `ids` [1, L] (eager
    attention, the full causal context: what the uncompressed model attends to)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return {layer: out.attentions[layer][0].float() for layer in layers}


def pattern_stats(attention: torch.Tensor, sink_tokens: int = 4, heavy_hitters: int = 8) -> dict[str, Any]:
    """Per head of one layer's attention [H, L, L]: the mean share of each query's attention on the first
    `sink_tokens` keys, on the `heavy_hitters` keys with the largest accumulated attention (excluding the
    sinks), and on its own and the previous 7 positions (local attention); plus the heavy hitters' positions.
    Means are over the queries that can see more than those keys (position >= sink_tokens + heavy_hitters)."""
    heads, length, _ = attention.shape
    queries = slice(sink_tokens + heavy_hitters, length)
    sink = attention[:, queries, :sink_tokens].sum(-1).mean(-1)
    accumulated = attention.sum(dim=1)  # [H, L]: H2O's score of every key
    accumulated[:, :sink_tokens] = float("-inf")
    hitters = accumulated.topk(min(heavy_hitters, max(length - sink_tokens, 0)), dim=-1).indices  # [H, k]
    rows = attention[:, queries, :]
    heavy = rows.gather(2, hitters[:, None, :].expand(-1, rows.shape[1], -1)).sum(-1).mean(-1)
    local = torch.stack(
        [attention[:, q, max(0, q - 7) : q + 1].sum(-1) for q in range(queries.start, length)], -1
    )
    return {
        "sink_share": sink.tolist(),
        "heavy_hitter_share": heavy.tolist(),
        "local_share": local.mean(-1).tolist(),
        "heavy_hitter_positions": hitters.sort(dim=-1).values.tolist(),
    }


def plot_layer(attention: torch.Tensor, layer: int, path: Path, stats: dict[str, Any]) -> Path:
    """One figure: every head's map (log10 probability; the sinks are the bright left columns, heavy hitters
    the bright vertical lines), titled with its sink and heavy-hitter shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = attention.shape[0]
    cols = min(heads, 3)
    rows = (heads + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    causal = torch.tril(torch.ones(attention.shape[1:], dtype=torch.bool))
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        values = attention[h].clamp_min(1e-6).log10().masked_fill(~causal, float("nan"))
        ax.imshow(values.numpy(), cmap="magma", vmin=-4, vmax=0, interpolation="nearest")
        ax.set_title(
            f"head {h}: sink {stats['sink_share'][h]:.0%}, heavy {stats['heavy_hitter_share'][h]:.0%}",
            fontsize=8,
        )
        ax.set_xlabel("key position", fontsize=7)
        ax.set_ylabel("query position", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"layer {layer}: attention (log10)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_attention_maps(
    model, ids: torch.Tensor, layers: list[int], out_dir: Path, sink_tokens: int = 4, heavy_hitters: int = 8
) -> dict[str, Any]:
    """Figures (`layer_<i>.png`) and `attention_stats.json` for `layers` into out_dir; returns the stats."""
    n = model.config.num_hidden_layers
    outside = [i for i in layers if not -n <= i < n]
    if outside:
        raise ValueError(f"--layers {outside} are not layers of this model (0..{n - 1})")
    layers = sorted({i % n for i in layers})
    maps = attention_maps(model, ids, layers)
    stats = {}
    for layer, attention in maps.items():
        stats[str(layer)] = pattern_stats(attention, sink_tokens, heavy_hitters)
        plot_layer(attention, layer, out_dir / f"layer_{layer}.png", stats[str(layer)])
    atomic_write_json(out_dir / "attention_stats.json", {"tokens": ids.shape[1], "layers": stats})
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model preset, hub id or local dir")
    parser.add_argument("--text-file", help="text to read (default: $KVEXP_DATA_DIR's WikiText-2 test split)")
    parser.add_argument(
        "--tokens", type=int, default=256, help="sequence length (the maps are tokens x tokens)"
    )
    parser.add_argument(
        "--layers", default="0,-1", help="comma-separated layer indices (negative: from the end)"
    )
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--heavy-hitters", type=int, default=8)
    parser.add_argument("--out", default="outputs/attention", help="output folder")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error(f"--tokens must be >= 2, got {args.tokens}")
    if args.text_file:
        text = Path(args.text_file).read_text()
    else:
        root = data_dir()
        if root is None:
            parser.error("no --text-file and $KVEXP_DATA_DIR is unset")
        text = (root / "wikitext2" / "wiki.test.raw").read_text()
    model, tokenizer = load_model_by_name(args.model)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    layers = [int(x) for x in args.layers.split(",")]
    stats = write_attention_maps(model, ids, layers, Path(args.out), args.sink_tokens, args.heavy_hitters)
    for layer, s in stats.items():
        sink = sum(s["sink_share"]) / len(s["sink_share"])
        heavy = sum(s["heavy_hitter_share"]) / len(s["heavy_hitter_share"])
        print(f"layer {layer}: sink share {sink:.1%}, heavy-hitter share {heavy:.1%} (mean over heads)")
    print(f"figures and attention_stats.json in {args.out}")


if __name__ == "__main__":
    main()
