"""examples/desktop_chat.py under a virtual display (Xvfb), driven like a person with xdotool:
type a message, click Send, click Stop while the prompt is processed, then ask again and let
the reply stream; a screenshot is saved and the app's state file is checked for the reply.
Needs: apt-get install -y xvfb xdotool imagemagick (skipped when missing)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "examples" / "desktop_chat.py"
TOOLS = ("Xvfb", "xdotool", "import")
# a long system prompt makes prompt processing take seconds, so Stop lands in the middle of it
SYSTEM = "You are a helpful assistant. Background notes: " + "Paris is the capital of France. " * 90

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                 reason="needs Xvfb, xdotool and imagemagick (apt-get install -y xvfb xdotool imagemagick)")]


@pytest.fixture
def display():
    pytest.importorskip("tkinter")
    number = next(n for n in range(140, 200) if not Path(f"/tmp/.X{n}-lock").exists())
    xvfb = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        assert xvfb.poll() is None and time.monotonic() < deadline, "Xvfb did not start"
        time.sleep(0.05)
    yield f":{number}"
    xvfb.terminate()
    xvfb.wait(10)


def wait_for(state_file: Path, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    state = {}
    while time.monotonic() < deadline:
        try:
            state = json.loads(state_file.read_text())
            if predicate(state):
                return state
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; last state: {state}")


def test_desktop_chat_like_a_person(display, smollm2_ebin, tmp_path):
    env = {**os.environ, "DISPLAY": display, "EDGERUN_DESKTOP_STATE": str(tmp_path / "state.json")}
    state_file = tmp_path / "state.json"
    app = subprocess.Popen([sys.executable, str(APP), str(smollm2_ebin), "--ram", "1GB", "--system", SYSTEM,
                            "--max-tokens", "40"], env=env, stderr=open(tmp_path / "app.log", "w"))

    def xdo(*args):
        subprocess.run(["xdotool", *map(str, args)], env=env, check=True)

    def click(state, name):
        w = state["widgets"][name]
        xdo("mousemove", w["x"], w["y"], "click", 1)

    try:
        try:
            state = wait_for(state_file, lambda s: s["loaded"], 60, "the model to load")
        except AssertionError:
            raise AssertionError((tmp_path / "app.log").read_text()[-2000:]) from None
        assert state["progress"] == 1.0 and "of" in state["status"]
        # 1. ask, then Stop during prompt processing
        click(state, "entry")
        xdo("type", "--delay", "5", "Hi!")
        click(state, "send")
        state = wait_for(state_file, lambda s: s["replying"], 5, "the reply to start")
        time.sleep(0.3)
        click(state, "stop")
        state = wait_for(state_file, lambda s: len(s["replies"]) == 1, 10, "Stop to end the reply")
        stopped = state["replies"][0]
        assert stopped["finish_reason"] == "cancelled" and stopped["generated_tokens"] == 0, stopped
        assert stopped["stop_latency_ms"] < 250, stopped
        assert "[stopped]" in state["transcript"]
        # 2. ask again and let it answer
        click(state, "entry")
        xdo("type", "--delay", "5", "What is the capital of France?")
        xdo("key", "Return")
        state = wait_for(state_file, lambda s: len(s["replies"]) == 2, 60, "the second reply")
        reply = state["replies"][1]
        assert reply["finish_reason"] in ("stop", "length") and reply["text"].strip(), reply
        assert reply["text"].strip() in state["transcript"]
        assert "What is the capital of France?" in state["transcript"]
        assert "tok/s" in state["status"] and "memory" in state["status"]
        lateness = state["ui_lateness_ms_while_replying"]
        print(f"\nstop latency {stopped['stop_latency_ms']} ms; reply {reply['generated_tokens']} tokens at "
              f"{reply['tokens_per_second']} tok/s; Tk event-loop lateness while replying {lateness}")
        assert lateness["ticks"] > 20 and lateness["median"] < 50
        shot = tmp_path / "desktop_chat.png"
        subprocess.run(["import", "-window", "root", str(shot)], env=env, check=True)
        assert shot.stat().st_size > 5000
        if os.environ.get("EDGERUN_SCREENSHOT"):          # keep a copy to look at
            shutil.copy(shot, os.environ["EDGERUN_SCREENSHOT"])
    finally:
        app.terminate()
        try:
            app.wait(10)
        except subprocess.TimeoutExpired:
            app.kill()
