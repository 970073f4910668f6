"""edgerun vs llama.cpp: load time, prompt and decode speed, time to first token, peak RSS.

    python tools/bench.py                      # 5 interleaved repetitions, 2 threads, f16 .ebin
    python tools/bench.py --f32 --write        # also an f32 .ebin; update BENCHMARKS.md

Same model on both sides: SmolLM2-135M-Instruct, llama.cpp (llama-cpp-python) on the Q4_1 GGUF,
edgerun on .ebin files packed from that GGUF (so the weights are the dequantized Q4_1 values,
stored as f16 / f32). Same thread count, same 128-token natural-text prompt (cut to exactly
128 tokens by each engine's own tokenizer), greedy, end-of-sequence ignored so both decode
exactly 128 tokens.

Every measurement runs in its own fresh subprocess (this script re-invoked with --worker), so
load time is real and peak RSS is that process's ru_maxrss (read by the parent with wait4; the
parent imports only the standard library, so the fork-before-exec high-water mark is small).
Repetitions are interleaved (edgerun, llama.cpp, edgerun cold, ... per round) to cancel drift.

Per process: the prompt is run twice. Run 1 gives the start-up numbers (process start -> first
token, in-process time to first token); throughput (prompt tok/s, decode tok/s) comes from run
2, after `reset()` / a cleared KV cache, i.e. steady state with nothing reused.
Decode tok/s = (128 - 1) one-token forward passes / their time (token 1 comes from the prefill).

Page cache: by default each model file is read in full right before every repetition (both
files warm, the same for both engines); `--cold-files` instead drops them with
posix_fadvise(DONTNEED) before every repetition.

Numba JIT cache: "warm" edgerun processes use a private NUMBA_CACHE_DIR populated by one
unmeasured run first; "cold" ones get a fresh empty NUMBA_CACHE_DIR each (every kernel compiles).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the reference engine's label: llama.cpp on the GGUF given (Q4_1 for the default model)
REF = "llama.cpp"
# llama.cpp reading the whole file into its own memory: the least RAM it runs in (issue #17)
NO_MMAP = "llama.cpp, no mmap"
DEFAULT_GGUF = Path("/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT_TOKENS = 128
GEN_TOKENS = 128
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# A fixed natural-text prompt, longer than 128 tokens for any tokenizer; each engine cuts its own
# tokenization to exactly PROMPT_TOKENS.
PROMPT_TEXT = (
    "The history of the lighthouse is a story about people who refused to let the sea decide who "
    "came home. Long before electric lamps, keepers climbed narrow stairs every evening to trim the "
    "wicks, polish the glass and wind the clockwork that turned the great lens. On stormy nights they "
    "stayed awake until dawn, listening to the wind and watching for ships that drifted too close to "
    "the rocks. Their logbooks record the weather, the passing vessels, the price of oil and, now and "
    "then, a rescue: a fishing boat pulled off a sandbar, a sailor carried up the cliff path in the "
    "dark. Today most lighthouses run themselves, and the keepers' cottages have become museums, "
    "guest houses or homes for artists. Yet the towers still stand along the coast, white and red "
    "against the grey water, and sailors still count their flashes to know where they are. In this "
    "essay we follow one family of keepers across three generations and ask what their work can "
    "teach us about patience, duty and the quiet courage of ordinary life."
)


# ---------------------------------------------------------------------------------------------
# Workers: run inside a fresh subprocess, print one JSON line.

def _worker_edgerun(args) -> dict:
    t_import = time.perf_counter()
    import edgerun
    import numba
    t_load = time.perf_counter()
    m = edgerun.load(args.model, threads=args.threads, context=args.context)
    if args.bits:                       # a BitStack pack, shrunk to this many bits per weight
        m.resize(weights=int(args.bits * m.config.parameter_count / 8))
    load_s = time.perf_counter() - t_load
    ids = m.tokenizer.encode(PROMPT_TEXT)[:PROMPT_TOKENS]
    m.stop_ids = []                                     # ignore EOS: decode exactly GEN_TOKENS
    runs, first_wall = [], None
    for _ in range(1 if args.first_token_only else 2):
        m.reset()
        out = []
        for tok in m.stream_tokens(ids, max_tokens=1 if args.first_token_only else GEN_TOKENS, temperature=0):
            if first_wall is None:
                first_wall = time.time()
            out.append(int(tok))
        s = m.stats
        runs.append({"prompt_tokens": s.prompt_tokens, "prompt_tps": s.prompt_tps, "ttft": s.first_token_seconds,
                     "decode_steps": s.decode_steps, "decode_tps": s.generate_tps, "generated": out})
    return {"import_s": t_load - t_import, "load_s": load_s, "first_wall": first_wall, "ids": ids, "runs": runs,
            "first_token_only": args.first_token_only, "numba": numba.__version__, "threads": numba.get_num_threads(),
            "bits_per_weight": m.weight_bytes * 8 / m.config.parameter_count}


def _worker_llama(args) -> dict:
    import ctypes

    import numpy as np
    t_import = time.perf_counter()
    import llama_cpp
    t_load = time.perf_counter()
    llm = llama_cpp.Llama(args.model, n_ctx=args.context, n_threads=args.threads, n_threads_batch=args.threads,
                          logits_all=False, verbose=False, use_mmap=not args.no_mmap)
    load_s = time.perf_counter() - t_load
    ids = llm.tokenize(PROMPT_TEXT.encode(), add_bos=False, special=False)[:PROMPT_TOKENS]
    n_vocab = llm.n_vocab()
    runs, first_wall = [], None

    def argmax_last() -> int:
        # logits_all=False: llama.cpp keeps only the last position's logits; greedy = argmax
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_vocab,))))

    for _ in range(2):
        llm.reset()                                   # n_tokens = 0; eval() clears the KV cache after it
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = argmax_last()
        t1 = time.perf_counter()
        if first_wall is None:
            first_wall = time.time()
        out = [tok]
        while len(out) < GEN_TOKENS:                  # no stop tokens: exactly GEN_TOKENS
            llm.eval([tok])
            tok = argmax_last()
            out.append(tok)
        t2 = time.perf_counter()
        runs.append({"prompt_tokens": len(ids), "prompt_tps": len(ids) / (t1 - t0), "ttft": t1 - t0,
                     "decode_steps": GEN_TOKENS - 1, "decode_tps": (GEN_TOKENS - 1) / (t2 - t1), "generated": out})
    return {"import_s": t_load - t_import, "load_s": load_s, "first_wall": first_wall, "ids": ids, "runs": runs,
            "llama_cpp": llama_cpp.__version__}


def _worker_pack(args) -> dict:
    from edgerun.convert.pack import pack
    t0 = time.perf_counter()
    summary = pack(args.model, args.out, dtype=args.dtype)
    return {"seconds": time.perf_counter() - t0, "file_bytes": summary.file_bytes}


# ---------------------------------------------------------------------------------------------
# Parent: standard library only (keeps the children's inherited high-water RSS small).

def spawn(worker: str, model: Path, args, env_extra: dict | None = None, extra=(), retries: int = 1) -> dict:
    """Run one worker process; returns its JSON plus wall time, start->first token, peak RSS (MiB).
    A failed worker is retried once after a pause: the working tree may be mid-edit."""
    for attempt in range(retries + 1):
        try:
            return _spawn_once(worker, model, args, env_extra, extra)
        except RuntimeError as e:
            if attempt == retries:
                raise SystemExit(str(e)) from None
            print(f"{e}\nretrying in 15 s ...", file=sys.stderr)
            time.sleep(15)


def _spawn_once(worker: str, model: Path, args, env_extra, extra) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--model", str(model),
           "--threads", str(args.threads), "--context", str(args.context), *extra]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"worker {worker} failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    res = json.loads(out.decode().strip().splitlines()[-1])
    res["wall_s"] = wall
    res["peak_rss_mib"] = usage.ru_maxrss / 1024          # Linux: KiB
    if res.get("first_wall"):
        res["start_to_first"] = res["first_wall"] - start
    return res


def prepare_files(paths, cold: bool) -> None:
    """Same page-cache state for every engine before each repetition."""
    for p in paths:
        with open(p, "rb") as f:
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while f.read(1 << 24):
                    pass


def ensure_ebin(gguf: Path, dtype: str, out_dir: Path, args) -> tuple[Path, dict | None]:
    """The .ebin packed from `gguf` at `dtype`; packed (and measured) when missing or --repack."""
    path = out_dir / f"{gguf.stem}.{dtype}.ebin"
    if path.exists() and not args.repack:
        return path, None
    res = spawn("pack", gguf, args, extra=["--out", str(path), "--dtype", dtype])
    return path, {"dtype": dtype, "seconds": res["seconds"], "peak_rss_mib": res["peak_rss_mib"],
                  "file_mb": res["file_bytes"] / 1e6}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(results: dict) -> dict:
    """Medians per engine of each metric (cold-JIT processes stop at the first token: no throughput)."""
    table = {}
    for name, reps in results.items():
        if not reps:
            continue
        last = [r["runs"][-1] for r in reps if not r.get("first_token_only")]
        table[name] = {
            "load_s": median([r["load_s"] for r in reps]),
            "prompt_tps": median([x["prompt_tps"] for x in last]),
            "decode_tps": median([x["decode_tps"] for x in last]),
            "prompt_tps_best": max([x["prompt_tps"] for x in last], default=float("nan")),
            "decode_tps_best": max([x["decode_tps"] for x in last], default=float("nan")),
            "ttft": median([r["runs"][0]["ttft"] for r in reps]),
            "start_to_first": median([r["start_to_first"] for r in reps]),
            "peak_rss_mib": median([r["peak_rss_mib"] for r in reps]),
            "n": len(reps),
        }
    return table


def paired_ratios(results: dict) -> list[str]:
    """Per repetition, each edgerun engine's prompt and decode speed over llama.cpp's of the same
    round (run minutes apart, not hours): on a host whose speed drifts, the median of these pairs
    moves less than the ratio of the medians."""
    out = []
    ref = [r["runs"][-1] for r in results.get(REF, [])]
    for name, reps in results.items():
        if name == REF or not reps or any(r.get("first_token_only") for r in reps) or len(reps) != len(ref):
            continue
        for key, what in (("decode_tps", "decode"), ("prompt_tps", "prompt")):
            pairs = [r["runs"][-1][key] / b[key] for r, b in zip(reps, ref) if b[key]]
            if pairs:
                out.append(f"{name} / llama.cpp, {what}, repetition by repetition: "
                           + ", ".join(f"{x:.2f}×" for x in pairs) + f" (median {median(pairs):.2f}×)")
    return out


ROWS = [("load time (s)", "load_s", "{:.2f}", "lower"),
        ("prompt tok/s (128-token prompt)", "prompt_tps", "{:.0f}", "higher"),
        ("decode tok/s (128 tokens)", "decode_tps", "{:.1f}", "higher"),
        ("time to first token, in process (s)", "ttft", "{:.3f}", "lower"),
        ("process start → first token (s)", "start_to_first", "{:.2f}", "lower"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}", "lower"),
        ("prompt tok/s, best repetition", "prompt_tps_best", "{:.0f}", "higher"),
        ("decode tok/s, best repetition", "decode_tps_best", "{:.1f}", "higher")]


def markdown(table: dict, base: str = None) -> str:
    base = base or REF
    names = list(table)
    others = [n for n in names if n != base]
    head = "| metric | " + " | ".join(names) + " | " + " | ".join(f"{n} / llama.cpp" for n in others) + " |"
    lines = [head, "|" + "---|" * (1 + len(names) + len(others))]
    for label, key, fmt, _ in ROWS:
        cells = [fmt.format(table[n][key]) if table[n][key] == table[n][key] else "–" for n in names]
        ratios = [f"{table[n][key] / table[base][key]:.2f}×"
                  if base in table and table[base][key] and table[n][key] == table[n][key] else "–" for n in others]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    git = subprocess.run(["git", "log", "-1", "--oneline"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "edgerun"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "git": git,
            "edgerun_dirty": bool(dirty), "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def check_parity(results: dict) -> list[str]:
    """Both engines must have seen the same prompt length and decoded exactly GEN_TOKENS."""
    notes = []
    for name, reps in results.items():
        for r in reps:
            if r.get("first_token_only"):
                continue
            for run in r["runs"]:
                if run["prompt_tokens"] != PROMPT_TOKENS or len(run["generated"]) != GEN_TOKENS:
                    raise SystemExit(f"{name}: prompt {run['prompt_tokens']} / generated {len(run['generated'])} "
                                     f"tokens, expected {PROMPT_TOKENS} / {GEN_TOKENS}")
    firsts = {n: reps[0] for n, reps in results.items() if reps and not reps[0].get("first_token_only")}
    if REF in firsts:
        ref = firsts[REF]
        for n, r in firsts.items():
            if n == REF:
                continue
            same_prompt = r["ids"] == ref["ids"]
            a, b = r["runs"][-1]["generated"], ref["runs"][-1]["generated"]
            agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            notes.append(f"{n}: prompt token ids {'identical to' if same_prompt else 'DIFFER from'} llama.cpp's; "
                         f"greedy outputs agree for the first {agree} of {GEN_TOKENS} tokens")
    return notes


def run(args) -> None:
    info = machine()                  # the commit the measurement starts at (the tree is shared)
    gguf = Path(args.gguf)
    if not gguf.exists():
        raise SystemExit(f"{gguf}: no such GGUF (pass --gguf)")
    out_dir = Path(args.ebin_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    packs = []
    engines = []                      # (name, worker, model path, numba cache mode)
    for dtype in ([] if args.no_f16 else ["f16"]) + (["f32"] if args.f32 else []):
        path, pk = ensure_ebin(gguf, dtype, out_dir, args)
        if pk:
            packs.append(pk)
            print(f"packed {path}: {pk['seconds']:.1f} s, peak RSS {pk['peak_rss_mib']:.0f} MiB", file=sys.stderr)
        engines.append((f"edgerun {dtype}", "edgerun", path, "warm"))
    extra = {}                            # worker arguments per engine (BitStack: resized to --bits B)
    for spec in args.ebin or []:          # other packs of the same model, e.g. spqr:4=/tmp/q4.ebin
        label, _, path = spec.partition("=")
        path, at, bpw = path.rpartition("@") if "@" in path else (path, "", "")
        if not Path(path).exists():
            raise SystemExit(f"--ebin {spec}: no such file")
        if at:
            extra[f"edgerun {label}"] = ["--bits", bpw]
        engines.append((f"edgerun {label}", "edgerun", Path(path), "warm"))
    engines.append((REF, "llama", gguf, None))
    if args.llama_no_mmap:
        extra[NO_MMAP] = ["--no-mmap"]
        engines.append((NO_MMAP, "llama", gguf, None))
    if not args.no_cold:
        engines.append(("edgerun f16, cold JIT cache", "edgerun", engines[0][2], "cold"))
    files = sorted({str(e[2]) for e in engines})

    warm_cache = Path(tempfile.mkdtemp(prefix="edgerun-bench-numba-"))
    print(f"priming the Numba cache {warm_cache} ...", file=sys.stderr)
    for name, worker, path, mode in engines:
        if mode == "warm":
            spawn(worker, path, args, {"NUMBA_CACHE_DIR": str(warm_cache)}, extra.get(name, []))
    results = {e[0]: [] for e in engines}
    loads = []
    try:
        for rep in range(args.reps):
            for name, worker, path, mode in engines:
                prepare_files(files, args.cold_files)
                env = {}
                if mode == "warm":
                    env["NUMBA_CACHE_DIR"] = str(warm_cache)
                elif mode == "cold":
                    env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgerun-bench-cold-")
                loads.append(os.getloadavg()[0])
                r = spawn(worker, path, args, env, ["--first-token-only"] if mode == "cold" else extra.get(name, []))
                if mode == "cold":
                    shutil.rmtree(env["NUMBA_CACHE_DIR"], ignore_errors=True)
                results[name].append(r)
                last = r["runs"][-1]
                print(f"rep {rep + 1}/{args.reps} {name:28s} load {r['load_s']:.2f} s  prompt {last['prompt_tps']:.0f} "
                      f"tok/s  decode {last['decode_tps']:.1f} tok/s  start->first {r['start_to_first']:.2f} s  "
                      f"load avg {loads[-1]:.1f}  "
                      f"RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    finally:
        shutil.rmtree(warm_cache, ignore_errors=True)
    notes = paired_ratios(results) + check_parity(results)
    for name in (n for n in extra if "--bits" in extra[n]):
        held = results[name][0]["bits_per_weight"]
        notes.append(f"{name}: BitStack resized after loading to {held:.2f} bits/weight (its peak RSS includes "
                     "the full load)")
    table = summarize(results)
    end = machine()
    if end["git"] != info["git"] or end["edgerun_dirty"]:
        info["git_end"] = end["git"]
    ours = next((reps[0] for n, reps in results.items() if n.startswith("edgerun") and reps), None)
    if ours:
        info["numba"] = ours["numba"]
    info["llama_cpp"] = results[REF][0]["llama_cpp"]
    info["loadavg"] = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "?"
    report = render(args, info, table, packs, notes)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "table": table, "packs": packs, "results": results},
                                              indent=1))
    if args.write:
        write_section(Path(args.write), report)
        print(f"updated {args.write}", file=sys.stderr)


def render(args, info, table, packs, notes) -> str:
    cmd = "python tools/bench.py " + " ".join(sys.argv[1:])
    lines = [f"Measured {info['date']} at `{info['git']}`"
             + (" (with uncommitted changes under edgerun/)" if info["edgerun_dirty"] else "")
             + (f"; the tree changed during the run, ending at `{info['git_end']}`" if info.get("git_end") else "") + ".",
             f"Machine: {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}, numba {info.get('numba', '?')}, "
             f"llama-cpp-python {info['llama_cpp']}; 1-minute load average during the runs {info['loadavg']}.",
             f"Command: `{cmd.strip()}` — {args.threads} threads, context {args.context}, "
             f"{args.reps} interleaved repetitions, medians; page cache: "
             + ("dropped with posix_fadvise(DONTNEED) before every repetition." if args.cold_files
                else "both model files read in full before every repetition (warm)."),
             "", markdown(table), ""]
    lines += goals(table)
    lines += [f"- {n}" for n in notes]
    for pk in packs:
        lines.append(f"- pack GGUF → {pk['dtype']} .ebin: {pk['seconds']:.1f} s, peak RSS {pk['peak_rss_mib']:.0f} MiB, "
                     f"file {pk['file_mb']:.0f} MB")
    return "\n".join(lines)


def goals(table: dict) -> list[str]:
    """Issue #2's targets next to the medians."""
    e, base = table.get("edgerun f16"), table.get(REF)
    if not e or not base:
        return []
    ratio = e["decode_tps"] / base["decode_tps"]
    out = [f"- Goal (issue #2) decode ≥ 0.5× llama.cpp Q4_1 with 16-bit weights: {ratio:.2f}× "
           f"({e['decode_tps']:.1f} vs {base['decode_tps']:.1f} tok/s) — {'met' if ratio >= 0.5 else 'NOT met'}.",
           f"- Goal (issue #2) warm start to first token ≤ 2 s: {e['start_to_first']:.2f} s "
           f"(process start, imports, load, 128-token prefill, first token) — "
           f"{'met' if e['start_to_first'] <= 2 else 'NOT met'}."]
    cold = table.get("edgerun f16, cold JIT cache")
    if cold:
        out.append(f"- Cold Numba cache (first run after install): {cold['start_to_first']:.2f} s start to first token.")
    return out


def write_section(path: Path, report: str) -> None:
    """Replace the text between the bench markers in `path` (appended when absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{report}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=str(DEFAULT_GGUF), help="the Q4_1 GGUF (default: %(default)s)")
    p.add_argument("--ebin-dir", default=str(Path.home() / ".cache" / "edgerun" / "bench"),
                   help="where the packed .ebin files are kept (default: %(default)s)")
    p.add_argument("--repack", action="store_true", help="pack the .ebin files again (and report pack time / RSS)")
    p.add_argument("--f32", action="store_true", help="also benchmark an f32 .ebin")
    p.add_argument("--ebin", action="append", metavar="LABEL=PATH[@BITS]",
                   help="also benchmark this .ebin of the same model (repeatable), e.g. spqr:4=q4.ebin; "
                        "@BITS resizes a BitStack pack to BITS bits/weight after loading (its peak RSS "
                        "then includes the full load), e.g. bitstack=bs.ebin@5.14")
    p.add_argument("-t", "--threads", type=int, default=2, help="threads for both engines (default: %(default)s)")
    p.add_argument("-c", "--context", type=int, default=2048, help="context length for both (default: %(default)s)")
    p.add_argument("-r", "--reps", type=int, default=5, help="interleaved repetitions (default: %(default)s)")
    p.add_argument("--no-f16", action="store_true",
                   help="skip the f16 .ebin (a large model: only the --ebin packs against llama.cpp)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-Numba-cache edgerun runs")
    p.add_argument("--llama-no-mmap", action="store_true",
                   help="also run llama.cpp with use_mmap=False (its smallest peak RSS: no mapped file beside its copy)")
    p.add_argument("--cold-files", action="store_true",
                   help="drop the model files from the page cache before each repetition instead of reading them")
    p.add_argument("--write", metavar="MD", nargs="?", const=str(ROOT / "BENCHMARKS.md"),
                   help="replace the results section of this markdown file (default: BENCHMARKS.md)")
    p.add_argument("--json", metavar="FILE", help="also dump every raw measurement as JSON")
    # internal: worker mode
    p.add_argument("--worker", choices=["edgerun", "llama", "pack"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--first-token-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-mmap", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bits", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        fn = {"edgerun": _worker_edgerun, "llama": _worker_llama, "pack": _worker_pack}[args.worker]
        print(json.dumps(fn(args)))
    else:
        run(args)


if __name__ == "__main__":
    main()
