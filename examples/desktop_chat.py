"""A desktop chat window on edgerun (Tkinter, in the standard library).

    python examples/desktop_chat.py [MODEL.ebin] [--ram 1GB] [--system "You are ..."]

The model loads in a background thread behind a progress bar; replies stream into the window
from a worker thread; Stop cancels at once (during prompt processing too) through a cancel
token; the Tk event loop never waits on the model, so the window stays responsive. The status
line shows tokens/s and the process's memory against --ram.

Threads never touch Tk widgets: workers put events on a queue that the UI polls every 20 ms.
Test hook: with EDGERUN_DESKTOP_STATE=path set, the app writes its state (transcript, status,
widget positions, UI-loop lateness) to that JSON file on every change.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time
import tkinter as tk
from tkinter import ttk

import psutil

import edgerun
from edgerun.memory import fmt, parse_size

POLL_MS = 20
TICK_MS = 5           # a timer that measures how late the event loop runs it (responsiveness)


class ChatApp:
    def __init__(self, root, model_path, ram, system=None, max_tokens=512):
        self.root, self.ram, self.max_tokens = root, ram, max_tokens
        self.model = None
        self.messages = [{"role": "system", "content": system}] if system else []
        self.events: queue.Queue = queue.Queue()
        self.cancel_token: threading.Event | None = None
        self.reply = None             # {"text", "tokens", "start"} while a reply streams
        self.lateness: list[float] = []
        self.busy_lateness: list[float] = []
        self.log: list[dict] = []     # finished replies: text, finish reason, tokens/s, stop latency
        self.state_file = os.environ.get("EDGERUN_DESKTOP_STATE")
        self._build()
        threading.Thread(target=self._load, args=(model_path,), daemon=True).start()
        self.root.after(POLL_MS, self._poll)
        self._tick_due = time.perf_counter() + TICK_MS / 1000
        self.root.after(TICK_MS, self._tick)

    # --- widgets -------------------------------------------------------------------------
    def _build(self):
        self.root.title("edgerun chat")
        self.root.geometry("720x480")
        self.transcript = tk.Text(self.root, wrap="word", state="disabled", font=("DejaVu Sans", 12))
        self.transcript.tag_configure("user", foreground="#1f4e96", font=("DejaVu Sans", 12, "bold"))
        self.transcript.tag_configure("note", foreground="#888888")
        bottom = ttk.Frame(self.root)
        self.entry = ttk.Entry(bottom, font=("DejaVu Sans", 12))
        self.send = ttk.Button(bottom, text="Send", command=self.on_send, state="disabled")
        self.stop = ttk.Button(bottom, text="Stop", command=self.on_stop, state="disabled")
        self.progress = ttk.Progressbar(self.root, maximum=1.0, mode="determinate")
        self.status = ttk.Label(self.root, text="loading the model ...", anchor="w")
        self.entry.bind("<Return>", lambda e: self.on_send())
        self.entry.pack(side="left", fill="x", expand=True, padx=(0, 4))
        self.send.pack(side="left")
        self.stop.pack(side="left", padx=(4, 0))
        self.status.pack(side="bottom", fill="x", padx=6)
        self.progress.pack(side="bottom", fill="x", padx=6, pady=2)
        bottom.pack(side="bottom", fill="x", padx=6, pady=4)
        self.transcript.pack(side="top", fill="both", expand=True, padx=6, pady=6)
        self.entry.focus_set()

    def _append(self, text, tag=None):
        self.transcript.configure(state="normal")
        self.transcript.insert("end", text, tag)
        self.transcript.configure(state="disabled")
        self.transcript.see("end")

    # --- worker threads (never touch Tk) -----------------------------------------------------
    def _load(self, path):
        try:
            m = edgerun.load(path, ram=self.ram, on_progress=lambda f: self.events.put(("progress", f)))
            self.events.put(("loaded", m))
        except edgerun.EdgerunError as e:
            self.events.put(("error", str(e)))

    def _generate(self, messages, token):
        try:
            for piece in self.model.chat(messages, stream=True, max_tokens=self.max_tokens, cancel=token):
                self.events.put(("piece", piece))
            self.events.put(("done", self.model.stats))
        except edgerun.EdgerunError as e:
            self.events.put(("error", str(e)))
            self.events.put(("done", None))

    # --- UI thread -------------------------------------------------------------------------------
    def on_send(self):
        text = self.entry.get().strip()
        if not text or self.model is None or self.reply is not None:
            return
        self.entry.delete(0, "end")
        self.messages.append({"role": "user", "content": text})
        self._append(f"You: {text}\n", "user")
        self._append("Assistant: ")
        self.reply = {"text": "", "tokens": 0, "start": time.perf_counter(), "stopped_at": None}
        self.cancel_token = threading.Event()
        self.send.configure(state="disabled")
        self.stop.configure(state="normal")
        self.status.configure(text="reading the prompt ...")
        threading.Thread(target=self._generate, args=(list(self.messages), self.cancel_token), daemon=True).start()
        self._save()

    def on_stop(self):
        if self.cancel_token is not None and self.reply is not None:
            self.reply["stopped_at"] = time.perf_counter()
            self.cancel_token.set()            # the model stops within one layer's work

    def _poll(self):
        changed = False
        try:
            while True:
                kind, value = self.events.get_nowait()
                changed = True
                getattr(self, "_on_" + kind)(value)
        except queue.Empty:
            pass
        if changed:
            self._save()
        self.root.after(POLL_MS, self._poll)

    def _on_progress(self, f):
        self.progress["value"] = f
        self.status.configure(text=f"loading the model ... {f * 100:.0f}%")

    def _on_loaded(self, m):
        self.model = m
        self.progress["value"] = 1.0
        self.send.configure(state="normal")
        self.status.configure(text=f"ready: {m.path.name}, {self._memory()}")

    def _on_error(self, message):
        self._append(f"[error: {message}]\n", "note")
        self.status.configure(text=f"error: {message}")

    def _on_piece(self, piece):
        r = self.reply
        r["text"] += piece
        r["tokens"] += 1
        self._append(piece)
        tps = r["tokens"] / max(time.perf_counter() - r["start"], 1e-6)
        self.status.configure(text=f"{tps:.1f} tok/s | {self._memory()}")

    def _on_done(self, stats):
        r, self.reply = self.reply, None
        now = time.perf_counter()
        stopped = stats is not None and stats.finish_reason == "cancelled"
        self._append(" [stopped]\n\n" if stopped else "\n\n", "note" if stopped else None)
        self.messages.append({"role": "assistant", "content": r["text"].strip()})
        entry = {"text": r["text"], "finish_reason": stats.finish_reason if stats else "error"}
        if stats is not None:
            entry.update(prompt_tokens=stats.prompt_tokens, generated_tokens=stats.generated_tokens,
                         tokens_per_second=round(stats.generate_tps, 1))
            self.status.configure(text=f"{'stopped' if stopped else 'done'}: {stats.generated_tokens} tokens at "
                                       f"{stats.generate_tps:.1f} tok/s | {self._memory()}")
        if r["stopped_at"] is not None:
            entry["stop_latency_ms"] = round((now - r["stopped_at"]) * 1e3, 1)
        self.log.append(entry)
        self.send.configure(state="normal")
        self.stop.configure(state="disabled")

    def _memory(self):
        rss = psutil.Process().memory_info().rss
        budget = self.model.budget if self.model is not None else None
        return f"memory {fmt(rss)} of {fmt(budget)} (--ram {self.ram})" if budget else f"memory {fmt(rss)}"

    def _tick(self):
        now = time.perf_counter()
        late = max(0.0, now - self._tick_due)
        (self.busy_lateness if self.reply is not None else self.lateness).append(late)
        self._tick_due = now + TICK_MS / 1000
        self.root.after(TICK_MS, self._tick)

    # --- test hook ------------------------------------------------------------------------------
    def _save(self):
        if not self.state_file:
            return
        self.root.update_idletasks()

        def where(w):
            return {"x": w.winfo_rootx() + w.winfo_width() // 2, "y": w.winfo_rooty() + w.winfo_height() // 2}

        busy = sorted(self.busy_lateness)
        state = {"loaded": self.model is not None, "replying": self.reply is not None,
                 "transcript": self.transcript.get("1.0", "end-1c"), "status": self.status.cget("text"),
                 "replies": self.log, "progress": float(self.progress["value"]),
                 "widgets": {"entry": where(self.entry), "send": where(self.send), "stop": where(self.stop)},
                 "ui_lateness_ms_while_replying": {
                     "ticks": len(busy), "median": round(busy[len(busy) // 2] * 1e3, 2) if busy else None,
                     "p99": round(busy[int(len(busy) * 0.99)] * 1e3, 2) if busy else None,
                     "max": round(busy[-1] * 1e3, 2) if busy else None}}
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_file)

    def close(self):
        if self.cancel_token is not None:
            self.cancel_token.set()
        if self.model is not None:
            self.model.close()
        self.root.destroy()


def main():
    ap = argparse.ArgumentParser(description="edgerun desktop chat")
    ap.add_argument("model", nargs="?", help="an .ebin (default: SmolLM2-135M-Instruct, packed once)")
    ap.add_argument("--ram", default="1GB", help="memory budget, e.g. 1GB (default 1GB)")
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--max-tokens", type=int, default=512)
    args = ap.parse_args()
    parse_size(args.ram)                         # a bad --ram fails here, before the window opens
    from edgerun.cli import resolve_model
    path = resolve_model(args.model)
    root = tk.Tk()
    app = ChatApp(root, path, args.ram, system=args.system, max_tokens=args.max_tokens)
    root.protocol("WM_DELETE_WINDOW", app.close)
    root.mainloop()


if __name__ == "__main__":
    main()
