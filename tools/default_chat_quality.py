"""Does the default chat answer plain questions? 8 seeds x 5 questions through the Python API.

    python3 tools/default_chat_quality.py [MODEL.ebin] [--seeds 8] [--ram 1GB]

MODEL defaults to the default model as `edgerun chat` uses it (packed into the cache once).
Each reply uses the model's own default sampling (its `generation` defaults: temperature, top-p,
...) and its reply cap (`max_new_tokens`, else 1024, the `edgerun chat` fallback), as
`edgerun chat` does. A reply counts as sensible when it contains the expected word
(case-insensitive, whole word) and ended by itself (finish reason "stop") before the cap.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import edgerun

QUESTIONS = [
    ("What is the capital of France?", r"paris"),
    ("How many days are there in a week?", r"seven|7"),
    ("What color is the sky on a clear day?", r"blue"),
    ("What is 2 + 2?", r"four|4"),
    ("Which planet is known as the Red Planet?", r"mars"),
]
CHAT_FALLBACK_CAP = 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--ram", default="1GB")
    args = ap.parse_args()
    if args.model:
        path = Path(args.model)
    else:
        from edgerun.default_model import default_ebin
        path = default_ebin(log=print)
    with edgerun.load(path, ram=args.ram) as m:
        defaults = m.generation_defaults if isinstance(m.generation_defaults, dict) else {}
        cap = defaults.get("max_new_tokens") or CHAT_FALLBACK_CAP
        print(f"{path.name}: generation defaults {defaults}, reply cap {cap}")
        sensible, lengths, capped = 0, [], 0
        start = time.perf_counter()
        for question, expected in QUESTIONS:
            row = []
            for seed in range(args.seeds):
                reply = m.chat([{"role": "user", "content": question}], max_tokens=cap, seed=seed)
                stats = m.stats
                hit = re.search(rf"\b(?:{expected})\b", reply, re.IGNORECASE) is not None
                ended = stats.finish_reason == "stop"
                sensible += hit and ended
                capped += not ended
                lengths.append(stats.generated_tokens)
                row.append("ok" if hit and ended else ("cap" if not ended else "--"))
                print(f"  seed {seed} {question!r}: {stats.generated_tokens} tokens, {stats.finish_reason}, "
                      f"{'keyword' if hit else 'no keyword'}: {reply[:90]!r}")
            print(f"{question!r}: {' '.join(row)}")
        total = len(QUESTIONS) * args.seeds
        print(f"sensible answers: {sensible} of {total}; replies that hit the {cap}-token cap: {capped}; "
              f"reply tokens median {statistics.median(lengths):.0f}, max {max(lengths)}; "
              f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
