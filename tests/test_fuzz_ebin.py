"""Files from elsewhere (issue #16): a seeded corpus of corrupted and crafted .ebin files
(tools/fuzz_ebin.py: truncations, byte flips, overwrites, crafted manifests and data with
recomputed checksums, config vs shape mismatches, deep nesting, a FIFO, ...) against what
`edgerun verify`, `info` and `generate` run. Every outcome must be a clean EdgerunError or, for a
harmless mutation, a normal run. Most cases run in-process (the functions the CLI calls); a
sample runs through the real CLI to check exit codes, one-line messages, no traceback and no
death by signal. A last test runs the forward pass with Numba's bounds checking on."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import fuzz_ebin as fz  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    bases = fz.make_bases(work, log=lambda s: None)
    cases = fz.load_cases(bases, seed=0)
    # cluster / BitStack kernels that do not compile for this CPU abort the process (kernel
    # portability is separate work): their cases then run only `verify`, which runs no kernel
    runnable = {kind: fz.codec_runs(kind) for kind in bases}
    return work, bases, cases, runnable


def test_corpus_is_large_and_varied(corpus):
    _, bases, cases, _ = corpus
    assert len(cases) >= 200
    names = " ".join(c.name for c in cases)
    for kind in ("truncate", "flip-header", "flip-manifest", "flip-data", "flip-padding", "overwrite",
                 "config-num_attention_heads-0", "config-hidden_size-0", "config-vocab_size-10",
                 "config-hidden_size-1099511627776", "arrays-negative-offset", "manifest-nested-10000",
                 "nan-", "special-fifo", "flash-", "spqr-perm", "cluster-meta", "bitstack-order", "rotated-signs"):
        assert kind in names, kind
    assert len({c.name for c in cases}) == len(cases)
    assert sum(c.expect == fz.OK for c in cases) >= 20           # harmless mutations run normally


def test_every_case_in_process(corpus):
    """verify / info / generate on every case: an EdgerunError with a one-line message where the
    case is corrupt, a normal run where it is harmless; any other exception fails the test."""
    work, bases, cases, runnable = corpus
    files = work / "inprocess"
    files.mkdir()
    runs = [c for c in cases if c.build != "fifo"]      # a FIFO goes through the CLI below (a hang would stall here)
    results = fz.run_corpus(runs, bases, files, fz.run_inprocess, log=lambda s: None, runnable=runnable)
    bad = [f"{c.name} {cmd}: {outcome}: {msg[:200]}" for c, cmd, _, outcome, msg in results
           if outcome not in ("ok", "clean error")]
    assert not bad, "\n".join(bad)
    assert len(results) >= 600 or not all(runnable.values())


SAMPLE = ["special-fifo", "special-directory", "truncate-4097", "config-num_attention_heads-0",
          "config-hidden_size-0", "config-vocab_size-10", "config-vocab10-consistent", "nan-final-norm",
          "flip-padding-0", "flip-data-0-model.layers.1.self_attn.k_proj.weight", "manifest-nested-10000",
          "spqr-perm-out-of-range"]


def test_sample_through_the_cli(corpus):
    """The real `python -m edgerun`: exit code by expectation, a single `error:` line on stderr,
    no traceback, never killed by a signal, never hanging (the FIFO)."""
    work, bases, cases, runnable = corpus
    files = work / "cli"
    files.mkdir()
    by_name = {c.name: c for c in cases}
    tasks = []
    for name in SAMPLE:
        c = by_name[name]
        path = c.write(bases, files)
        for cmd in fz.COMMANDS if runnable.get(c.base, True) else ("verify",):
            tasks.append((c, cmd, path))

    def run(task):
        c, cmd, path = task
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        try:
            r = subprocess.run([sys.executable, "-m", "edgerun", *fz.cli_args(cmd, path)], capture_output=True,
                               text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"{c.name} {cmd}: hangs"
        want = c.expect[cmd]
        if r.returncode < 0:
            return f"{c.name} {cmd}: killed by signal {-r.returncode}"
        if "Traceback" in r.stderr:
            return f"{c.name} {cmd}: traceback\n{r.stderr[-2000:]}"
        if r.returncode == 0:
            return None if want != "error" else f"{c.name} {cmd}: exit 0 on a corrupted file"
        # ours: "error: <file>: ..." and exit 1; click's argument check (a directory): "Error: ..." and 2
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith(("error: ", "Error: "))]
        if want == "ok":
            return f"{c.name} {cmd}: false alarm: {r.stderr[-300:]}"
        if r.returncode not in (1, 2) or len(errors) != 1:
            return f"{c.name} {cmd}: exit {r.returncode}, expected one 'error:' line: {r.stderr[-500:]}"
        return None

    with ThreadPoolExecutor(2) as pool:
        problems = [p for p in pool.map(run, tasks) if p]
    assert not problems, "\n".join(problems)


BOUNDSCHECK = textwrap.dedent("""
    import sys
    import numpy as np
    import edgerun
    from edgerun import kernels
    try:                                 # the check is really on: a too-short w is caught
        kernels.rmsnorm_rows(np.ones((2, 8), np.float32), np.ones(4, np.float32), 1e-5, np.empty((2, 8), np.float32))
    except IndexError:
        print("boundscheck on")
    for path in sys.argv[1:]:
        with edgerun.load(path, context=128, stream="resident" if "flash" in path else None) as m:
            ids = np.random.default_rng(0).integers(0, m.config.vocab_size, 100).tolist()
            m.logits(ids)                                   # prefill: 64-token chunk + 36
            text = m.generate("Once upon a time", max_tokens=8, temperature=0.7, seed=1)
            print(path, "ok", len(text))
""")


def test_forward_in_bounds_with_numba_boundscheck(corpus, tmp_path):
    """The forward pass on valid tiny packs (dense f16, flash layout, SpQR when it runs here)
    with every Numba kernel compiled with bounds checks: an out-of-bounds index would raise."""
    _, bases, _, runnable = corpus
    paths = [str(bases[k]) for k in ("f16", "flash", "spqr") if runnable.get(k)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_BOUNDSCHECK": "1",
           "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    r = subprocess.run([sys.executable, "-c", BOUNDSCHECK, *paths], capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "boundscheck on" in r.stdout and r.stdout.count(" ok ") == len(paths)


@pytest.mark.parametrize("mode", ["resident", "window", "layer", "naive"])
def test_flash_bundles_are_checked_in_every_mode(corpus, tmp_path, mode):
    """Streamed FFN bundles have no per-bundle checksum: each layer's bundle array is checked once
    at load (after the resident read, or in one sequential pass when it streams)."""
    import edgerun
    from edgerun.errors import FormatError
    _, bases, _, _ = corpus
    base = fz.Ebin(bases["flash"].read_bytes())
    name = base.manifest["flash"]["layers"][1]["bundles"]
    bad = tmp_path / "bad.ebin"
    bad.write_bytes(fz.flip(base.arrays[name]["offset"] + 5000, 0x08)(base))
    with pytest.raises(FormatError, match=f"corrupted.*{name}|{name}' is corrupted"):
        edgerun.load(bad, context=64, stream=mode)
    with edgerun.load(bases["flash"], context=64, stream=mode) as m:
        assert m.stream_plan.mode == mode
        assert m.generate("Once upon a time", max_tokens=3, temperature=0)
