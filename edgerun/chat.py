"""The interactive chat REPL behind `edgerun chat`.

Works on a terminal (readline editing, Ctrl+C stops a reply, twice quits) and on piped input
(each line, or each triple-quoted block, is one user message).
"""
from __future__ import annotations

import signal
import sys
import time

from .errors import EdgerunError

HELP = """commands:
  /help          this list
  /clear         start a new conversation (keeps the system prompt)
  /regen         answer the last message again
  /exit, /bye    quit (also Ctrl+D)
  \"\"\"            start or end a multi-line message; a line ending in \\ continues too
Ctrl+C stops a reply; pressing it twice in a row quits."""


def reply_cap(model, fallback: int) -> int:
    """The model's own per-reply token cap (`max_new_tokens` in its generation defaults, which the
    default model sets), else `fallback`."""
    defaults = getattr(model, "generation_defaults", None)
    cap = defaults.get("max_new_tokens") if isinstance(defaults, dict) else None
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else fallback


class ChatSession:
    def __init__(self, model, system=None, max_tokens=1024, sampling=None, stats=None,
                 stdin=None, stdout=None):
        self.m = model
        self.system = system
        self.max_tokens = max_tokens
        self.sampling = sampling or {}
        self.stats = stats or (lambda: None)
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.interactive = self.stdin.isatty()
        self.last_interrupt = 0.0
        self.quit_requested = False
        self.messages = []
        self.clear()

    def clear(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    # --- input ------------------------------------------------------------------------
    def _readline(self, prompt):
        if self.interactive:
            return input(prompt)
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def read_message(self):
        """One user message: a line, `\\`-continued lines, or a triple-quoted block."""
        line = self._readline(">>> ")
        if line.strip().startswith('"""'):
            rest = line.strip()[3:]
            lines = [rest] if rest else []
            while True:
                nxt = self._readline("... ")
                if nxt.rstrip().endswith('"""'):
                    lines.append(nxt.rstrip()[:-3])
                    return "\n".join(lines)
                lines.append(nxt)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = self._readline("... ")
        lines.append(line)
        return "\n".join(lines)

    # --- loop -----------------------------------------------------------------------------
    def run(self):
        if self.interactive:
            self.out.write("Chatting. /help for commands, /bye to quit.\n")
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        while True:
            try:
                text = self.read_message()
            except EOFError:
                if self.interactive:
                    self.out.write("\n")
                return
            except KeyboardInterrupt:
                if self._second_interrupt():
                    self.out.write("\n")
                    return
                self.out.write("\n(press Ctrl+C again or type /bye to quit)\n")
                continue
            command = text.strip()
            if not command:
                continue
            if command in ("/exit", "/bye", "/quit"):
                return
            if command == "/help":
                self.out.write(HELP + "\n")
                continue
            if command == "/clear":
                self.clear()
                self.out.write("(conversation cleared)\n")
                continue
            if command == "/regen":
                if self.messages and self.messages[-1]["role"] == "assistant":
                    self.messages.pop()
                if not self.messages or self.messages[-1]["role"] != "user":
                    self.out.write("(nothing to regenerate)\n")
                    continue
            elif command.startswith("/"):
                self.out.write(f"unknown command {command.split()[0]}; /help lists them\n")
                continue
            else:
                self.messages.append({"role": "user", "content": text})
            if self.reply() == "quit":
                return

    def _second_interrupt(self) -> bool:
        """Record a Ctrl+C; True when it follows another within two seconds."""
        now, before = time.monotonic(), self.last_interrupt
        self.last_interrupt = now
        return now - before < 2.0

    def follow_free_memory(self):
        """BitStack models under --ram auto: shed blocks when free memory dropped, load more when
        it grew (between replies; the conversation is kept)."""
        if not getattr(self.m, "ram_auto", False) or self.m.blocks is None:
            return
        before = self.m.weight_bytes
        try:
            after = self.m.resize(ram="auto")
        except EdgerunError as e:       # e.g. the file became unreadable: say so, keep chatting
            sys.stderr.write(f"(memory is short: {e})\n")
            return
        if after != before:
            loaded, total = self.m.blocks
            verb = "grew" if after > before else "shrank"
            sys.stderr.write(f"(free memory changed: model {verb} to {after / 2**20:.0f} MiB of weights, "
                             f"{loaded}/{total} blocks)\n")

    def reply(self):
        """Stream the assistant's answer; Ctrl+C cancels it (the partial answer is kept)."""
        def on_interrupt(*_):
            self.quit_requested = self._second_interrupt()
            self.m.cancel()

        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, on_interrupt)
        pieces = []
        try:
            for piece in self.m.chat(self.messages, stream=True, max_tokens=self.max_tokens, **self.sampling):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        finally:
            signal.signal(signal.SIGINT, previous)
        self.out.write("\n")
        if self.m.stats.finish_reason == "cancelled":
            self.out.write("(stopped)\n")
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
        self.stats()
        self.follow_free_memory()
        return "quit" if self.quit_requested else None
