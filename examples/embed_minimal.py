"""Embedding edgerun in an app: load with progress, stream a chat reply, cancel, close.

    python examples/embed_minimal.py [MODEL.ebin]     (default: SmolLM2-135M-Instruct)
"""
import sys
import threading

import edgerun
from edgerun.cli import resolve_model       # the default model, fetched and packed once

path = resolve_model(sys.argv[1] if len(sys.argv) > 1 else None)

# Load within a 1 GB budget; on_progress gets 0..1 (return False to abort: raises edgerun.Cancelled).
with edgerun.load(path, ram="1GB", on_progress=lambda f: print(f"\rloading {f:4.0%}", end="")) as m:
    print()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for piece in m.chat(messages, stream=True, max_tokens=64, temperature=0):
        print(piece, end="", flush=True)
    print(f"\n[{m.stats.generated_tokens} tokens at {m.stats.generate_tps:.1f} tok/s]")

    # Cancel: set a token from any thread (a Stop button); the reply ends within one layer's work.
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    story = m.chat([{"role": "user", "content": "Tell me a long story."}], stream=True, max_tokens=500, cancel=stop)
    for piece in story:
        print(piece, end="", flush=True)
    print(f"\n[{m.stats.finish_reason} after {m.stats.generated_tokens} tokens]")
# leaving the `with` block closed the model: its memory is back with the OS
