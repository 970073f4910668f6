"""BitStack under real memory pressure: while `edgerun chat --ram auto` runs, another process
takes most of the machine's free memory; between replies the model sheds blocks (its RSS falls),
and when that memory is released it loads them back (its RSS grows again)."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import psutil
import pytest

from conftest import make_tiny_checkpoint

HOG = r"""
import sys, numpy as np
hog = np.ones(int(sys.argv[1]) // 8)      # touches every page
print("ready", flush=True)
sys.stdin.read()
"""


def wait_for(stream, pattern, timeout=120):
    """Read lines from `stream` until one matches; returns the lines read."""
    lines, end = [], time.time() + timeout
    while time.time() < end:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no line matching {pattern!r} in {lines}")


@pytest.mark.slow
def test_model_follows_free_memory(tmp_path):
    import edgerun.api as api
    from edgerun.convert.pack import make_recipe, pack
    config = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4)
    src = make_tiny_checkpoint("llama", tmp_path / "medium", config=config)
    model = tmp_path / "medium-bs.ebin"
    pack(src, model, recipe=make_recipe("f16", "bitstack", 8), calib_tokens=512)

    chat = subprocess.Popen([sys.executable, "-m", "edgerun", "chat", str(model), "--temp", "0", "-n", "4"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    hog = None
    try:
        def turn():
            chat.stdin.write("Tell me something.\n")
            chat.stdin.flush()
            lines = wait_for(chat.stderr, r"^\[prompt")
            time.sleep(0.5)               # the resize happens right after the stats line
            return lines, psutil.Process(chat.pid).memory_info().rss

        wait_for(chat.stderr, r"^loaded")
        _, rss_full = turn()
        vm = psutil.virtual_memory()
        headroom = max(api.AUTO_HEADROOM_MIN, int(vm.total * api.AUTO_HEADROOM_FRACTION))
        # take the free memory down to the headroom less all of the model's weights (and a margin
        # for the rest of the machine freeing memory meanwhile): to stay within it the chat must
        # shed its blocks down to the smallest size
        from edgerun.bitstack_runtime import BlockOrder
        from edgerun.ebin import EbinFile
        with EbinFile(model) as f:
            order = BlockOrder(f.manifest, f.arrays)
        take = vm.available - headroom + order.weight_bytes(order.total) + 256 * 2**20
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(take)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        assert hog.stdout.readline().strip() == "ready"
        turn()                                              # the reply after which it notices
        lines, rss_small = turn()
        assert any("shrank" in line for line in lines), lines
        hog.stdin.close()
        hog.wait(timeout=60)
        hog = None
        time.sleep(1.0)
        lines, _ = turn()                                   # the reply after which it notices
        more, rss_back = turn()
        grown = [line for line in lines + more if "grew" in line]
        print(f"RSS full {rss_full / 2**20:.1f} MiB, under pressure {rss_small / 2**20:.1f} MiB, "
              f"after release {rss_back / 2**20:.1f} MiB")
        assert rss_small < rss_full - 12 * 2**20, (rss_full, rss_small)
        assert rss_back > rss_small + 12 * 2**20, (rss_small, rss_back)
        assert grown, "the model did not grow back"
    finally:
        if hog is not None:
            hog.kill()
        chat.stdin.close()
        chat.wait(timeout=60)
