"""Perplexity vs stored bits: edgerun packs against llama.cpp's own quant types (issues #3, #4).

    python tools/quant_compare.py --chunks 16 --out tools/QUALITY.md
    python tools/quant_compare.py --edgerun f16 spqr:3 cluster:4 --llamacpp Q4_K_M Q3_K_S --chunks 8

Same weights on both sides: SmolLM2-135M-Instruct's only public weights are Q4_1, so "full
precision" is the dequantized Q4_1. edgerun packs are made from that GGUF with `edgerun pack`;
llama.cpp's types are made the way `llama-quantize` makes them, with `llama_model_quantize`
(default parameters, no importance matrix) from an F32 GGUF holding the dequantized values.

Same protocol and the same token ids on both sides: edgerun/evaluate.py (non-overlapping windows
of --ctx tokens, no BOS for this tokenizer, the second half of each window scored), the windows cut
once with edgerun's tokenizer and fed as ids to both engines (the script checks that llama.cpp's
tokenizer gives the same ids for the whole text). Bits per weight are what each file stores:
every array of an .ebin tensor (codes, scales, zeros, codebooks, outliers, row pointers), every
GGUF tensor's bytes (K-quant types fall back to other blocks on SmolLM2's 576-wide rows; the
block types found are listed). Δ vs the edgerun f16 pack comes with the standard error of the
paired per-token NLL difference (same tokens), which is much smaller than each NLL's own.

Work files (packs, GGUFs, per-token NLLs) go to --workdir and are reused when present (--force
rebuilds); a variant whose codec is not available in this build is skipped with a message.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llamacpp_ref  # noqa: E402

DEFAULT_GGUF = Path("/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_TEXT = ROOT / "tools" / "data" / "wikitext2_heldout.txt"
DEFAULT_EDGERUN = ["f32", "f16", "spqr:3", "spqr:4", "cluster:3", "cluster:4",
                   "recipe:embed=cluster:8,attention=spqr:4,ffn=spqr:3"]
DEFAULT_LLAMACPP = ["F32", "Q8_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K"]
BASELINE = "edgerun f16"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- edgerun packs ---------------------------------------------------------------------------
def pack_args(spec: str) -> list[str]:
    """`edgerun pack` options of a variant: f16 | f32 | bf16 | CODEC[:BITS] | recipe:GROUP=RULE,... |
    bpw:BITS, each optionally +rotate (`--rotate`)"""
    spec, plus, extra = spec.partition("+")
    extra = ["--" + extra] if plus else []
    if spec in ("f16", "f32", "bf16"):
        return ["--dtype", spec] + extra
    if spec.startswith("recipe:"):
        return ["--recipe", spec[len("recipe:"):]] + extra
    if spec.startswith("bpw:"):
        return ["--bpw", spec[len("bpw:"):]] + extra
    codec, _, bits = spec.partition(":")
    return ["--codec", codec] + (["--bits", bits] if bits else []) + extra


def spec_filename(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_") + ".ebin"


def make_pack(spec: str, gguf: Path, workdir: Path, force: bool) -> dict | None:
    """Pack (or reuse) one edgerun variant; None (with a message) when it cannot be made."""
    out = workdir / spec_filename(spec)
    meta_path = out.with_suffix(".pack.json")
    cmd = [sys.executable, "-m", "edgerun", "pack", str(gguf), "-o", str(out)] + pack_args(spec)
    if out.exists() and meta_path.exists() and not force:
        return json.loads(meta_path.read_text())
    log(f"[edgerun {spec}] packing: {shlex.join(cmd[1:])}")
    start = time.perf_counter()
    pack_log = out.with_suffix(".pack.log")          # the pack's progress, to follow a long pack
    with open(pack_log, "w") as err:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err).returncode
    seconds = time.perf_counter() - start
    lines = [ln for ln in re.split(r"[\r\n]", pack_log.read_text(errors="replace")) if ln.strip()]
    if rc != 0:
        log(f"[edgerun {spec}] skipped: pack failed after {seconds:.0f} s: {(lines or ['(no message)'])[-1]}")
        return None
    summary = [ln for ln in lines if ln.startswith("wrote ")]
    meta = {"path": str(out), "pack_seconds": round(seconds, 1), "command": "edgerun " + shlex.join(cmd[3:]),
            "summary": summary[-1] if summary else ""}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def ebin_bits(path: Path) -> dict:
    """Stored bits per weight of an .ebin: every array of every tensor, over all tensors and 2-D."""
    from edgerun.ebin import EbinFile
    with EbinFile(path) as f:
        all_bytes = all_n = mat_bytes = mat_n = 0
        for entry in f.manifest["tensors"].values():
            n = math.prod(entry["shape"])
            nbytes = sum(f.arrays[a].length for a in entry["parts"].values())
            all_bytes, all_n = all_bytes + nbytes, all_n + n
            if len(entry["shape"]) == 2:
                mat_bytes, mat_n = mat_bytes + nbytes, mat_n + n
    return {"bpw_all": all_bytes * 8 / all_n, "bpw_2d": mat_bytes * 8 / mat_n, "params": all_n,
            "file_size": path.stat().st_size}


# --- llama.cpp types -------------------------------------------------------------------------
def make_gguf(type_name: str, f32: Path, workdir: Path, force: bool, threads: int) -> dict | None:
    """F32 is the dequantized GGUF itself; any other type is quantized from it (or reused)."""
    name = type_name.upper()
    if name == "F32":
        return {"path": str(f32), "pack_seconds": None, "command": "(dequantized source GGUF)"}
    out = workdir / f"llamacpp-{name}.gguf"
    meta_path = out.with_suffix(".quant.json")
    if out.exists() and meta_path.exists() and not force:
        return json.loads(meta_path.read_text())
    log(f"[llama.cpp {name}] llama_model_quantize")
    start = time.perf_counter()
    try:
        llamacpp_ref.quantize(f32, out, name, threads=threads)
    except (ValueError, RuntimeError) as e:
        log(f"[llama.cpp {name}] skipped: {e}")
        return None
    meta = {"path": str(out), "pack_seconds": round(time.perf_counter() - start, 1),
            "command": f"llama_model_quantize(F32 GGUF, {name}, default params)"}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


# --- evaluation ------------------------------------------------------------------------------
def window_cache(workdir: Path, label: str, model_path: Path):
    """Per-window NLL files of one model, keyed by the model file (size, mtime) and the window's ids,
    so a run with more --chunks evaluates only the new windows and an interrupted run resumes."""
    st = model_path.stat()
    model_tag = f"{model_path}|{st.st_size}|{st.st_mtime_ns}"
    folder = workdir / "nll" / re.sub(r"[^A-Za-z0-9]+", "_", label)

    def path(window: np.ndarray) -> Path:
        return folder / (hashlib.sha1(model_tag.encode() + window.tobytes()).hexdigest()[:20] + ".npy")
    return path


def per_token_nll(make_fn, token_windows: np.ndarray, label: str, cache) -> np.ndarray:
    """edgerun.evaluate.window_nll over every window, concatenated (the protocol's scored tokens);
    the model is opened (`make_fn()`) only when some window is not cached."""
    from edgerun.evaluate import window_nll
    out, fn, start = [], None, time.perf_counter()
    try:
        for i, w in enumerate(token_windows):
            path = cache(w)
            if path.exists():
                out.append(np.load(path))
                continue
            fn = fn or make_fn()
            out.append(window_nll(fn(w.tolist()), w))
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, out[-1])
            log(f"[{label}] window {i + 1}/{len(token_windows)} ({time.perf_counter() - start:.0f} s)")
    finally:
        if fn is not None:
            fn.close()
    return np.concatenate(out)


class _EdgerunFn:
    """edgerun's Model.logits with a close(), opened lazily by per_token_nll."""

    def __init__(self, path: Path, ctx: int, threads: int):
        from edgerun.api import load
        self.model = load(path, context=ctx, threads=threads)

    def __call__(self, ids):
        return self.model.logits(ids)

    def close(self):
        self.model.close()


def tokenization_check(gguf_path: Path, text: str, edgerun_ids: list[int]) -> str:
    """Does llama.cpp's tokenizer give edgerun's ids for the whole held-out text?"""
    fn = llamacpp_ref.llamacpp_logits_fn(gguf_path, 64, 1)
    try:
        theirs = fn.tokenize(text)
    finally:
        fn.close()
    if theirs == edgerun_ids:
        return f"llama.cpp's tokenizer gives the same {len(theirs)} ids as edgerun's for the whole text"
    first = next((i for i, (a, b) in enumerate(zip(theirs, edgerun_ids)) if a != b), min(len(theirs), len(edgerun_ids)))
    return (f"TOKENIZATION DIFFERS: llama.cpp {len(theirs)} ids, edgerun {len(edgerun_ids)}, first difference at "
            f"{first} (both engines are still fed edgerun's ids)")


# --- report ----------------------------------------------------------------------------------
def fmt_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def table(rows: list[dict]) -> list[str]:
    base = next((r for r in rows if r["label"] == BASELINE), None)
    out = ["| engine | type | bits/weight (all) | bits/weight (2-D) | file size | perplexity | Δ vs edgerun f16 | "
           "pack time | stored 2-D blocks |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: -r["bpw_all"]):
        ppl = math.exp(r["nll"].mean())
        if base is None or r is base:
            delta = "—" if r is base else "n/a"
        else:
            diff = r["nll"] - base["nll"]        # paired: same scored tokens
            d_ppl = ppl / math.exp(base["nll"].mean()) - 1
            delta = f"{d_ppl:+.2%} (ΔNLL {diff.mean():+.4f} ± {diff.std() / math.sqrt(len(diff)):.4f})"
        pack = f"{r['pack_seconds']:.0f} s" if r.get("pack_seconds") is not None else "—"
        out.append(f"| {r['engine']} | {r['type']} | {r['bpw_all']:.3f} | {r['bpw_2d']:.3f} | {fmt_size(r['file_size'])} "
                   f"| {ppl:.3f} | {delta} | {pack} | {r.get('blocks', '')} |")
    return out


def report(rows, args, notes, windows_shape, command) -> str:
    n, ctx = windows_shape
    lines = ["## Quality", "",
             "Perplexity against stored bits per weight: edgerun packs and llama.cpp's own quant types of "
             "SmolLM2-135M-Instruct, made from the same weights (the dequantized Q4_1 GGUF, its only public "
             "weights) and scored on the same token ids.", "",
             f"Protocol (edgerun/evaluate.py, llama.cpp's `perplexity` protocol): `{Path(args.text).name}` "
             f"(held-out, disjoint from the calibration text) tokenized once without special tokens, the first "
             f"{n} non-overlapping windows of {ctx} tokens (no BOS: this tokenizer adds none), each window from "
             f"an empty cache, the second half scored: {n * (ctx // 2 - 1)} scored tokens per model. "
             f"Bits/weight = bytes stored × 8 / parameters ({rows[0]['params'] / 1e6:.1f} M, tied embeddings "
             "counted once on both sides); \"2-D\" counts only the matrices (embedding included). Δ is relative "
             "perplexity vs the edgerun f16 pack; in parentheses the mean per-token NLL difference ± its "
             "standard error (paired over the same tokens). Rows are sorted by bits.", "",
             "```", command, "```", ""]
    lines += table(rows)
    lines += [""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="source GGUF (default: %(default)s)")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="held-out text (default: %(default)s)")
    p.add_argument("--edgerun", nargs="*", default=DEFAULT_EDGERUN, metavar="SPEC",
                   help="edgerun variants: f32 | f16 | bf16 | CODEC:BITS (spqr:3, cluster:4, bitstack) | "
                        "recipe:GROUP=RULE,... | bpw:BITS, each with an optional +rotate (pack --rotate) "
                        "(default: %(default)s)")
    p.add_argument("--llamacpp", nargs="*", default=DEFAULT_LLAMACPP, metavar="TYPE",
                   help="llama.cpp types (llama_ftype names; F32 is the dequantized GGUF itself) "
                        "(default: %(default)s)")
    p.add_argument("--ctx", type=int, default=512, help="window length (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=None, help="first N windows only (default: all)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/edgerun-quality"),
                   help="packs, GGUFs and cached NLLs (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="re-pack / re-quantize / re-evaluate everything")
    p.add_argument("--out", type=Path, default=None, help="write the markdown section to this file")
    args = p.parse_args(argv)

    from edgerun.api import tokenizer_from_manifest
    from edgerun.ebin import EbinFile
    from edgerun.evaluate import windows

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.force:
        for f in (args.workdir / "nll").glob("*/*.npy"):
            f.unlink()
    text = args.text.read_text(encoding="utf-8")
    specs = list(dict.fromkeys(["f16"] + list(args.edgerun)))     # the f16 pack is the baseline
    started = time.perf_counter()

    # make everything first, so a failing codec is reported before the long evaluation
    packs = {s: m for s in specs if (m := make_pack(s, args.gguf, args.workdir, args.force))}
    f32 = args.workdir / "llamacpp-F32.gguf"
    if args.llamacpp and (args.force or not f32.exists()):
        log("[llama.cpp] writing the dequantized F32 GGUF")
        llamacpp_ref.dequantized_f32_gguf(args.gguf, f32)
    ggufs = {t.upper(): m for t in args.llamacpp if (m := make_gguf(t, f32, args.workdir, args.force, args.threads))}

    # the windows, cut once with edgerun's tokenizer (the f16 pack's = the GGUF's vocabulary)
    with EbinFile(packs["f16"]["path"]) as f:
        tok = tokenizer_from_manifest(f.manifest)
    token_windows = windows(tok, text, args.ctx, args.chunks)
    notes = []
    if ggufs:
        notes.append(tokenization_check(args.gguf, text, tok.encode(text, add_special_tokens=False)))

    rows = []
    for spec, meta in packs.items():
        path, label = Path(meta["path"]), f"edgerun {spec}"
        with EbinFile(path) as f:                 # every pack must cut the text into the same ids
            if not np.array_equal(windows(tokenizer_from_manifest(f.manifest), text, args.ctx, args.chunks),
                                  token_windows):
                log(f"[{label}] skipped: its tokenizer gives different windows")
                continue
        nll = per_token_nll(lambda: _EdgerunFn(path, args.ctx, args.threads), token_windows, label,
                            window_cache(args.workdir, label, path))
        rows.append({"engine": "edgerun", "type": spec, "label": label, "nll": nll,
                     "pack_seconds": meta["pack_seconds"], **ebin_bits(path)})
        log(f"[{label}] perplexity {math.exp(nll.mean()):.4f}")
    for name, meta in ggufs.items():
        path, label = Path(meta["path"]), f"llama.cpp {name}"
        nll = per_token_nll(lambda: llamacpp_ref.llamacpp_logits_fn(path, args.ctx, args.threads), token_windows,
                            label, window_cache(args.workdir, label, path))
        info = llamacpp_ref.stored_bits_per_weight(path)
        rows.append({"engine": "llama.cpp", "type": name, "label": label, "nll": nll,
                     "pack_seconds": meta["pack_seconds"], "blocks": llamacpp_ref.block_types_text(info), **info})
        log(f"[{label}] perplexity {math.exp(nll.mean()):.4f}")

    by = {r["label"]: r for r in rows}
    if "edgerun f32" in by and "llama.cpp F32" in by:
        a, b = math.exp(by["edgerun f32"]["nll"].mean()), math.exp(by["llama.cpp F32"]["nll"].mean())
        notes.append(f"Same-weights check: edgerun's f32 pack {a:.4f} vs llama.cpp's F32 GGUF {b:.4f} "
                     f"({b / a - 1:+.3%}); both hold the dequantized Q4_1 values in f32.")
    import gguf
    src_type = gguf.LlamaFileType(gguf.GGUFReader(args.gguf).fields["general.file_type"].contents()).name
    src_type = src_type.replace("MOSTLY_", "")
    if src_type in ggufs:                 # the F32 GGUF must hold the source's values, layout included
        same, total = llamacpp_ref.identical_tensors(args.gguf, Path(ggufs[src_type]["path"]))
        notes.append(f"Round trip: llama.cpp {src_type} quantized from the F32 GGUF is byte-identical to the source "
                     f"GGUF in {same} of {total} tensors (so the row is the original file).")
        if f"llama.cpp {src_type}" in by and "llama.cpp F32" in by:
            q, f = (math.exp(by[f"llama.cpp {n}"]["nll"].mean()) for n in (src_type, "F32"))
            notes.append(f"Same values, different compute: llama.cpp {src_type} {q:.4f} vs its own F32 {f:.4f} "
                         f"({q / f - 1:+.2%}) although the weights are identical; llama.cpp quantizes the "
                         "activations (to Q8_0/Q8_1 blocks) for quantized dot products.")
    digests = {}                           # fallbacks can make two type names store the same tensors
    for name, meta in ggufs.items():
        digests.setdefault(llamacpp_ref.tensor_digest(Path(meta["path"])), []).append(name)
    for same in digests.values():
        if len(same) > 1:
            notes.append(f"llama.cpp {' and '.join(same)} store byte-identical tensors on this model (fallbacks).")
    notes.append("llama.cpp types are named by their ftype, but K-quants need rows that are multiples of 256 and "
                 "SmolLM2's are 576 wide except ffn_down (1536), so most matrices fall back (Q2_K/Q3_K → Q4_0, "
                 "Q4_K → Q5_0, ...; the token embedding, tied with the output, takes the output's type, Q8_0 or "
                 "Q6_K fallback): compare at the bits stored, not at the name. Stored blocks: share of 2-D weights.")
    for spec in specs:
        if spec not in packs:
            notes.append(f"edgerun {spec}: skipped (could not be packed in this build when this ran).")
    for spec, meta in packs.items():
        if meta.get("summary"):
            notes.append(f"edgerun {spec}: `{meta['command']}` → {meta['summary']}")
    total = time.perf_counter() - started
    notes.append(f"Evaluation on {args.threads} threads; this run took {total / 60:.1f} min "
                 f"(packs, GGUFs and per-window NLLs reused from {args.workdir} when present). "
                 f"llama-cpp-python {__import__('llama_cpp').__version__}.")

    command = "python tools/quant_compare.py " + shlex.join(
        ["--edgerun", *specs, "--llamacpp", *ggufs, "--ctx", str(args.ctx)]
        + (["--chunks", str(args.chunks)] if args.chunks else []) + ["--threads", str(args.threads)]
        + (["--out", str(args.out)] if args.out else []))
    md = report(rows, args, notes, token_windows.shape, command)
    print(md)
    if args.out:
        args.out.write_text(md, encoding="utf-8")
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
