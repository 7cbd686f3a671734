"""How often the demo model's answers loop, under each repetition / frequency penalty.

A corpus of real documentation (the standard library's module docs for json, argparse,
logging, collections, csv and datetime: the same text on every machine) is ingested as the
service does, and a handful of questions a user would ask about it are answered at the served
answer length (KB_MAX_TOKENS, 256), greedy, as the web app and the CLI ask them. An answer
*loops* when it runs to the token limit repeating itself: some run of 8 tokens occurs three
times or more in it. Each penalty setting answers the same questions over the same corpus.

    python bench/loops.py [--threads 1] [--penalties 1.0,1.05,1.1,1.2] [--frequency 0,0.3]
        [--dry-multipliers 0.8,1.0 --dry-base 1.75 --dry-allowed-length 2 --dry-frequency 0.3]

The repetition and frequency rows run without DRY; the DRY rows (one per multiplier) at the
given base, allowed length and frequency penalty. Writes bench/results/loops.json (rows of
other settings already there are kept) and prints a table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name  # noqa: E402

QUESTIONS = (
    "What does json.dumps do, and which arguments control the output's formatting?",
    "How do I add an optional command-line flag with argparse?",
    "Summarize what the logging module provides.",
    "Which container types does the collections module offer?",
    "How do I read a CSV file row by row?",
    "What is the difference between a naive and an aware datetime object?",
    "List the steps to configure logging to write to a file.",
    "Explain what a namedtuple is and give an example.",
)
MODULES = ("json", "argparse", "logging", "collections", "csv", "datetime")


def corpus_text() -> dict[str, str]:
    import importlib

    return {m: inspect.getdoc(importlib.import_module(m)) or m for m in MODULES}


def loops(ids: list[int], n: int = 8, times: int = 3) -> bool:
    """Whether some run of `n` tokens occurs `times` times or more."""
    grams = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def answer_all(kb, name: str, sampling) -> list[dict]:
    answers = [kb.ask(name, q, sampling) for q in QUESTIONS]
    handles = [a.handle for a in answers]
    while any(h.result is None for h in handles):
        if not kb.engine.step():
            raise RuntimeError("the engine has no work but requests are unfinished")
        for h in handles:
            h.drain()
    out = []
    for q, h in zip(QUESTIONS, handles):
        ids = list(h.seq.output_ids)
        looped = h.result.reason == "length" and loops(ids)
        out.append(
            {
                "question": q,
                "reason": h.result.reason,
                "tokens": h.result.completion_tokens,
                "loops": looped,
                "answer": h.result.text,
            }
        )
    return out


SETTING = ("repetition_penalty", "frequency_penalty", "dry_multiplier", "dry_base")


def setting(row: dict) -> tuple:
    """A row's penalty setting (rows from before DRY have none: multiplier 0)."""
    return tuple(row.get(k) or 0.0 for k in SETTING) + (row.get("dry_allowed_length") or 0,)


def kept_rows(path: Path, rows: list[dict]) -> list[dict]:
    """The rows already in `path` whose setting was not measured again, then `rows`."""
    try:
        old = json.loads(path.read_text()).get("rows", [])
    except (OSError, ValueError):
        old = []
    new = {setting(r) for r in rows}
    return [r for r in old if setting(r) not in new] + rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--penalties", default="1.0,1.05,1.1,1.2", help="repetition penalties")
    p.add_argument("--frequency", default="0", help="frequency penalties (each with penalty 1)")
    p.add_argument("--dry-multipliers", default="", help="DRY multipliers (one row each)")
    p.add_argument("--dry-base", type=float, default=1.75, help="the DRY rows' base")
    p.add_argument("--dry-allowed-length", type=int, default=2, help="the DRY rows' allowed length")
    p.add_argument(
        "--dry-frequency", type=float, default=0.3, help="the DRY rows' frequency penalty"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="default: the service's")
    p.add_argument("-v", "--verbose", action="store_true", help="print every answer's start")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "loops.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    models = Path(os.environ.get("KB_MODELS_DIR", Path.home() / ".cache" / "kb-moska" / "models"))
    home = Path(tempfile.mkdtemp(prefix="kb-loops-"))
    kb = KnowledgeBase(Settings(home=home / "home", models_dir=models))
    cases = [(float(x), 0.0, 0.0) for x in args.penalties.split(",") if x]
    cases += [(1.0, float(x), 0.0) for x in args.frequency.split(",") if x and float(x)]
    cases += [(1.0, args.dry_frequency, float(x)) for x in args.dry_multipliers.split(",") if x]
    rows = []
    try:
        files = []
        for m, text in corpus_text().items():
            f = home / f"{m}.txt"
            f.write_text(text)
            files.append(f)
        kb.create_corpus("docs")
        results = kb.ingest("docs", files)
        tokens = sum(r.tokens for r in results)
        base = kb.default_sampling()
        if args.max_tokens:
            base = replace(base, max_tokens=args.max_tokens)
        for rep, freq, dry in cases:
            t0 = time.perf_counter()
            sampling = replace(
                base,
                repetition_penalty=rep,
                frequency_penalty=freq,
                dry_multiplier=dry,
                dry_base=args.dry_base,
                dry_allowed_length=args.dry_allowed_length,
            )
            answers = answer_all(kb, "docs", sampling)
            row = {
                "repetition_penalty": rep,
                "frequency_penalty": freq,
                "dry_multiplier": dry,
                "dry_base": args.dry_base if dry else None,
                "dry_allowed_length": args.dry_allowed_length if dry else None,
                "questions": len(answers),
                "looping": sum(a["loops"] for a in answers),
                "to_limit": sum(a["reason"] == "length" for a in answers),
                "mean_tokens": round(sum(a["tokens"] for a in answers) / len(answers), 1),
                "wall_s": round(time.perf_counter() - t0, 1),
                "answers": answers,
            }
            rows.append(row)
            drys = f" dry {dry}/{args.dry_base}/{args.dry_allowed_length}" if dry else ""
            print(
                f"repetition {rep:<5} frequency {freq:<4}{drys}: {row['looping']} of {len(answers)} "
                f"loop, {row['to_limit']} reach the limit, {row['mean_tokens']} tokens on average "
                f"({row['wall_s']} s)",
                flush=True,
            )
            if args.verbose:
                for a in answers:
                    print(f"    [{'L' if a['loops'] else ' '}] {a['answer'][:100]!r}", flush=True)
        out = {
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "threads": args.threads,
            "model": kb.settings.model,
            "max_tokens": base.max_tokens,
            "corpus": {"documents": list(MODULES), "tokens": tokens},
            "loop_rule": "finish reason 'length' and some run of 8 output tokens occurs >= 3 times",
            "rows": kept_rows(Path(args.out), rows),
        }
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    finally:
        kb.close()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
