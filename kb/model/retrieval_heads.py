"""The query heads whose attention finds what a question asks about (retrieval heads), per model.

Attention retrieval (kb/engine/selection.py) scores a corpus's chunks with the attention of a
question's queries. Averaged over every head of a layer the signal is diluted: most heads attend
by position or syntax, a few copy (their query finds the earlier occurrence of the question's own
phrase). Those few, found by `bench/selection_probe.py --rank-heads` on corpora that are not the
grid's (planted facts and key-value pairs, seed 2), are listed here best first; docs/QUALITY.md
has the measurement. A model missing here scores with every head of KB_SELECTION_LAYERS.
"""

from __future__ import annotations

from pathlib import Path

Heads = tuple[tuple[int, int], ...]  # (layer, query head), best first

RETRIEVAL_HEADS: dict[str, Heads] = {
    # ranked on needle_docs and kv_docs at 24K tokens, seed 2 (window 9); the best 8
    "SmolLM2-135M-Instruct": (
        (5, 6),
        (18, 6),
        (17, 4),
        (2, 4),
        (17, 3),
        (18, 7),
        (17, 5),
        (8, 0),
    ),
}


def parse_heads(text: str) -> Heads:
    """'17.4,18.6' -> ((17, 4), (18, 6)); raises ValueError on a malformed entry."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        layer, dot, head = item.partition(".")
        if not dot or not layer.isdigit() or not head.isdigit():
            raise ValueError(f"a selection head is LAYER.HEAD (e.g. 17.4), not {item!r}")
        out.append((int(layer), int(head)))
    return tuple(out)


def retrieval_heads(setting: str, model: str, num_layers: int, num_heads: int) -> Heads:
    """The heads that score for KB_SELECTION_HEADS `setting` ("auto": the table's entry for
    `model`, a name or checkpoint folder; "" or "all": none, every head of the layers; else a
    LAYER.HEAD list), those outside the model's shape left out."""
    if setting.strip().lower() == "auto":
        heads = RETRIEVAL_HEADS.get(Path(model).name, ())
    elif setting.strip().lower() in ("", "all"):
        heads = ()
    else:
        heads = parse_heads(setting)
    return tuple((li, h) for li, h in heads if 0 <= li < num_layers and 0 <= h < num_heads)
