"""--ram is a promise: when the plan says the model fits, the measured peak RSS of the whole
process stays within the budget. Measured in fresh processes on the real model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

RUN = r"""
import json, sys
import edgerun
from edgerun.errors import BudgetError
from edgerun.memory import peak_rss
path, ram, context = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    m = edgerun.load(path, ram=ram, context=context)
except BudgetError as e:
    print(json.dumps({"minimum": e.minimum_bytes})); sys.exit(0)
ids = m.tokenizer.encode("The history of Paris, the capital of France, " * 20)[:300]
n = sum(1 for _ in m.stream_tokens(ids, max_tokens=64, temperature=0.8, seed=1))
m.logits(ids[:8])           # (the logits of many positions are the caller's own array, not in the plan)
print(json.dumps({"peak": peak_rss(), "budget": m.budget,
                  "planned": m.plan.total, "generated": n}))
"""


def run(path, ram, context):
    r = subprocess.run([sys.executable, "-c", RUN, str(path), str(ram), str(context)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("context", [512, 2048])
def test_peak_rss_within_the_minimum_budget(smollm2_ebin, context):
    # the first probe may compile kernels into the on-disk cache (more RSS than loading them later)
    minimum = max(run(smollm2_ebin, "1MB", context)["minimum"] for _ in range(2))
    assert minimum > 256 * 2**20                          # at least the f16 weights
    # the tightest budget the plan accepts (the runtime's measured part varies by ~0.1 MiB between runs)
    result = run(smollm2_ebin, f"{minimum + 2**20}B", context)
    assert result["generated"] > 0
    assert result["peak"] <= result["budget"], (
        f"peak RSS {result['peak'] / 2**20:.1f} MiB exceeded the budget {result['budget'] / 2**20:.1f} MiB")
