"""Cross-architecture check: every codec's kernels and a tiny packed model, on this Python and on
another (an aarch64 one under qemu: tools/arm64_python.sh), compared number for number.

    python3 tools/target_check.py make-fixture DIR          # x86, needs torch + transformers
    python3 tools/target_check.py run DIR x86.npz           # any Python
    tools/arm64_python.sh run tools/target_check.py run DIR arm64.npz
    python3 tools/target_check.py compare x86.npz arm64.npz # exit 1 if any unit differs

`make-fixture` makes a tiny random Llama checkpoint (tests/conftest.py's make_tiny_checkpoint),
packs it once per unit below and encodes small random matrices with every codec configuration,
so both architectures run exactly the same bytes. `run` runs each unit in its own child process
(the same Python, or the command in $EDGERUN_PYTHON / --python): a unit whose kernels abort the
process (LLVM aborts on an ISA intrinsic the target lacks) is reported as that unit's failure and
the others still run. Per unit it records the Linear's matvec / matmul (T = 1, 3, 9) / row outputs
next to what its NumPy reference computes (reference.matvec: the decoded W, times the int8 activations
where the codec's matvec quantizes them; reference.matmul where the codec has one, else float64
products with the decode, for batched matmuls; the decode for rows), the logits of a fixed prompt and 8 greedy
tokens, and whether each matmul equals the Linear's own matvecs to the bit where the Linear
promises it (`matmul_equals_matvec`). `compare` checks, per unit: both runs finished, each run's
kernels match its NumPy decode and keep that promise, the two runs' kernel outputs agree within
float tolerance, their logits within twice the model's
own sensitivity to a float-rounding-sized perturbation (int8 activations turn rounding ties into
whole steps), and the greedy tokens are identical.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# The packs: attention + FFN in the unit's codec, embeddings and head f16 so that each pack runs
# one compressed codec's kernels (the CLI's default for compressed packs, cluster:5 embeddings, is
# what `mixed` covers).
ISOLATE = "embed=f16,head=f16"
UNITS = {
    # unit: (pack recipe: make_recipe keywords, kernel cases)
    "dense": (dict(dtype="f16"), ["dense_f32", "dense_f16", "dense_bf16"]),
    "spqr": (dict(codec="spqr", bits=4, recipe=ISOLATE), ["spqr3", "spqr4"]),
    "cluster4": (dict(codec="cluster", bits=4, recipe=ISOLATE), ["cluster4", "cluster5"]),
    "cluster3": (dict(codec="cluster", bits=3, recipe=ISOLATE), ["cluster3"]),
    "bitstack": (dict(codec="bitstack", recipe=ISOLATE), ["bitstack"]),
    "vq": (dict(codec="vq", bits=3, recipe=ISOLATE), ["vq2", "vq3", "vq4"]),
    # three codecs in one pack; rotated inputs (edgerun/codecs/rotation.py) are a kernel case: this
    # unit packed with --rotate gave arm64 and x86 logits within tolerance (5e-3 of 2e-2) but a
    # different second greedy token, a float-level difference deciding a close call
    "mixed": (dict(recipe="embed=cluster:5,attention=spqr:4,ffn=spqr:3"), ["spqr4_rotated"]),
}
# kernel case -> recipe rule (edgerun.convert.pack.parse_rule: the params a pack would store)
CASES = {"dense_f32": "f32", "dense_f16": "f16", "dense_bf16": "bf16", "spqr3": "spqr:3", "spqr4": "spqr:4",
         "cluster3": "cluster:3", "cluster4": "cluster:4", "cluster5": "cluster:5", "bitstack": "bitstack:4",
         "vq2": "vq:2", "vq3": "vq:3", "vq4": "vq:4", "spqr4_rotated": "spqr:4"}
ROTATED = {"spqr4_rotated"}             # cases stored as W·Tᵀ with their signs (pack --rotate)
SHAPES = [(37, 45), (24, 128)]          # odd sizes (partial groups, tails) and whole groups
TOKENS = (1, 3, 9)                      # matmul: one row, the matvec loop, the batched kernel
ARCH = "llama"                          # biases, llama3 rope scaling, untied head
CALIB_TOKENS = 2048
PROMPT = "Once upon a time, in a land far away, there lived a small robot who loved to read"
GREEDY = 8
CONTEXT = 128
# compare: |a - b| <= tol * max|a| per array. Logits: the larger of LOGITS_RTOL and twice the
# model's own sensitivity (run_model): codecs that quantize activations to int8 turn a float
# rounding difference on a rounding tie into a whole int8 step (measured: the spqr fixture's logits
# move 4e-3 when one norm vector is scaled by 1 + 1e-6, on one machine)
LOGITS_RTOL = 1e-3
KERNEL_RTOL = 1e-4
PERTURB = 1e-6


def log(msg: str) -> None:
    print(f"target_check: {msg}", file=sys.stderr, flush=True)


# --- make-fixture (x86, with the test dependencies) -----------------------------------------------

def make_fixture(directory: Path) -> bool:
    """The checkpoint, the packs (each in a child: packing runs the codec's kernels, which may
    abort on this host too) and the kernel matrices. False if a pack failed (the others are made)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_checkpoint

    from edgerun.codecs import get_codec, rotation
    from edgerun.convert.pack import parse_rule

    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    make_tiny_checkpoint(ARCH, directory / "hf")
    packs = {}
    for unit in UNITS:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "pack-one", str(directory), unit],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                              preexec_fn=_no_core_dumps)
        ok = proc.returncode == 0 and (directory / f"{unit}.ebin").exists()
        packs[unit] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 1)}
        if ok:
            log(f"{unit}: {last_line(proc.stdout)}")
        else:
            packs[unit]["error"] = f"{exit_reason(proc.returncode)}: {last_line(proc.stdout)}"
            log(f"{unit}: packing FAILED ({packs[unit]['error']})")
    rng = np.random.default_rng(1234)
    arrays = {}
    for d, n in SHAPES:
        # correlated inputs with a few heavy channels, as calibration sees them; H = E[x xᵀ]
        M = rng.standard_normal((n, n)) / np.sqrt(n) + np.eye(n)
        S = rng.standard_normal((512, n)) @ M * np.exp(0.5 * rng.standard_normal(n))
        H = S.T @ S / len(S)
        arrays[f"in.{n}.X"] = rng.standard_normal((max(TOKENS), n)).astype(np.float32)
        w = (rng.standard_normal((d, n)) * 0.05).astype(np.float32)
        for case, rule in CASES.items():
            r = parse_rule(rule)
            block = rotation.block_for(n) if case in ROTATED else 1
            if block > 1:                   # as pack --rotate stores it
                signs = rotation.make_signs(n, case)
                Hr = H.copy()
                rotation.rotate_hessian(Hr, signs, block)
                parts = get_codec(r["codec"]).encode(rotation.rotate(w, signs, block), r["params"], hessian=Hr)
                parts[rotation.SIGNS_PART] = signs
            else:
                parts = get_codec(r["codec"]).encode(w, r["params"], hessian=H)
            for part, arr in parts.items():
                arrays[f"{case}.{d}x{n}.{part}"] = arr
    np.savez(directory / "kernels.npz", **arrays)
    (directory / "fixture.json").write_text(json.dumps({
        "units": list(UNITS), "packs": packs, "cases": {c: parse_rule(r) for c, r in CASES.items()},
        "shapes": SHAPES, "prompt": PROMPT}, indent=1))
    log(f"fixture in {directory} ({time.perf_counter() - start:.1f} s)")
    return all(p["ok"] for p in packs.values())


def pack_one(directory: Path, unit: str) -> None:
    from edgerun.convert.pack import make_recipe, pack
    kw = dict(UNITS[unit][0])
    summary = pack(directory / "hf", directory / f"{unit}.ebin", recipe=make_recipe(kw.pop("dtype", "f16"), **kw),
                   calib_tokens=CALIB_TOKENS)
    print(summary, flush=True)


def exit_reason(rc: int | None, timeout: float | None = None) -> str:
    if rc is None:
        return f"timed out after {timeout:.0f} s"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


# --- run-one: one unit, in this process -------------------------------------------------------------

def run_kernels(directory: Path, cases: list[str], fixture: dict) -> tuple[dict, dict]:
    from edgerun.codecs import get_codec, rotation
    from edgerun.model import load_tensor
    out, info = {}, {}
    data = np.load(directory / "kernels.npz")
    for case in cases:
        rule = fixture["cases"][case]
        codec = get_codec(rule["codec"])
        for d, n in fixture["shapes"]:
            key = f"{case}.{d}x{n}"
            parts = {k[len(key) + 1:]: data[k] for k in data.files if k.startswith(key + ".")}
            t0 = time.perf_counter()
            signs = parts.pop(rotation.SIGNS_PART, None)
            X = data[f"in.{n}.X"]
            W = codec.decode(parts, rule["params"]).astype(np.float64)
            if signs is None:
                lin = codec.load(parts, rule["params"])
                rot = lambda v: v                                    # noqa: E731
            else:                           # W' = W·Tᵀ stored: the kernels see T x
                block = rotation.block_for(n)
                lin = load_tensor({"codec": rule["codec"], "params": rule["params"], "shape": [d, n],
                                   "rotation": {"block": block}}, {**parts, rotation.SIGNS_PART: signs})
                rot = lambda v: rotation.rotate(np.atleast_2d(v), signs, block).reshape(v.shape)   # noqa: E731
                W = rotation.unrotate(W, signs, block)
            ref = importlib.import_module(f"edgerun.codecs.{rule['codec']}.reference")

            def mv(v):      # what a matvec computes (some codecs quantize the activations)
                return ref.matvec(parts, rule["params"], rot(v)).astype(np.float64)
            got, want = {}, {}
            y = np.full(d, np.nan, np.float32)
            lin.matvec(X[0].copy(), y)
            got["matvec"], want["matvec"] = y, mv(X[0])
            same = {}                       # where the Linear promises matmul == its own matvecs
            if lin.matmul_equals_matvec:
                rows = np.full((max(TOKENS), d), np.nan, np.float32)
                for t in range(len(rows)):
                    lin.matvec(X[t].copy(), rows[t])
            for T in TOKENS:
                Y = np.full((T, d), np.nan, np.float32)
                lin.matmul(X[:T].copy(), Y)
                got[f"matmul{T}"] = Y
                if lin.matmul_equals_matvec:
                    same[f"matmul{T}"] = bool(np.array_equal(Y, rows[:T]))
                if T < lin.matmul_min_t:
                    want[f"matmul{T}"] = np.stack([mv(v) for v in X[:T]])
                elif hasattr(ref, "matmul"):        # a batched kernel that quantizes activations
                    want[f"matmul{T}"] = ref.matmul(parts, rule["params"], rot(X[:T])).astype(np.float64)
                else:
                    want[f"matmul{T}"] = X[:T].astype(np.float64) @ W.T
            for i in (0, d - 1):
                r = np.full(n, np.nan, np.float32)
                lin.row(i, r)
                got[f"row{i}"], want[f"row{i}"] = r, W[i]
            errs = {}
            for what, g in got.items():
                out[f"k.{key}.{what}"] = g
                errs[what] = rel_err(g, want[what])
            info[key] = {"seconds": round(time.perf_counter() - t0, 2), "vs_decode": errs, "equals_matvecs": same}
            log(f"  kernels {key}: {time.perf_counter() - t0:.1f} s, max rel err vs NumPy decode "
                f"{max(errs.values()):.1e}")
    return out, info


def run_model(path: Path) -> tuple[dict, dict]:
    import edgerun
    t0 = time.perf_counter()
    with edgerun.load(path, context=CONTEXT, threads=1) as m:
        t_load = time.perf_counter() - t0
        ids = m.tokenizer.encode(PROMPT)
        t1 = time.perf_counter()
        logits = m.logits(ids).copy()
        # the model's sensitivity to float rounding: how far its logits move when one layer's
        # input norm is scaled by 1 + PERTURB (then restored)
        sensitivity = 0.0
        for layer in m._transformer.layers:
            norm = layer.input_norm.copy()
            layer.input_norm *= np.float32(1 + PERTURB)
            sensitivity = max(sensitivity, rel_err(m.logits(ids), logits))
            layer.input_norm[:] = norm
        tokens = list(m.stream_tokens(ids, max_tokens=GREEDY, temperature=0))
        t_run = time.perf_counter() - t1
        blocks = m.blocks
    info = {"load_seconds": round(t_load, 2), "run_seconds": round(t_run, 2), "prompt_tokens": len(ids),
            "tokens": [int(t) for t in tokens], "bitstack_blocks": blocks}
    log(f"  model {path.name}: load (kernel compile) {t_load:.1f} s, logits + {len(tokens)} greedy tokens "
        f"{t_run:.1f} s: {tokens}")
    return {"logits": logits.astype(np.float32), "prompt": np.array(ids, np.int64),
            "tokens": np.array(tokens, np.int64), "sensitivity": np.float64(sensitivity)}, info


def run_one(directory: Path, unit: str, out: Path) -> None:
    from edgerun import kernels
    kernels.set_threads(1)
    fixture = json.loads((directory / "fixture.json").read_text())
    arrays, info = {}, {}
    t0 = time.perf_counter()
    k_arrays, info["kernels"] = run_kernels(directory, UNITS[unit][1], fixture)
    info["kernel_seconds"] = round(time.perf_counter() - t0, 2)
    arrays.update(k_arrays)
    pack = fixture["packs"][unit]
    if not pack["ok"]:
        raise SystemExit(f"no {unit}.ebin: packing it failed on the fixture's host ({pack['error']})")
    m_arrays, info["model"] = run_model(directory / f"{unit}.ebin")
    arrays.update({f"m.{k}": v for k, v in m_arrays.items()})
    np.savez(out, info=np.array(json.dumps(info)), **arrays)


# --- run: every unit in its own child ---------------------------------------------------------------

def machine() -> dict:
    from importlib.metadata import version

    from llvmlite import binding         # not numba: importing it takes ~10 s under qemu
    return {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": version("numba"), "llvmlite": version("llvmlite"),
            "cpu_name": os.environ.get("NUMBA_CPU_NAME") or binding.get_host_cpu_name()}


def run(directory: Path, out: Path, units: list[str], python: list[str], timeout: float | None) -> bool:
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    info = {"host": machine(), "python_cmd": python, "units": {}}
    arrays = {}
    log(f"{info['host']['machine']} python {info['host']['python']}, numba {info['host']['numba']}, "
        f"cpu {info['host']['cpu_name']}: units {', '.join(units)}")
    with tempfile.TemporaryDirectory() as tmp:
        for unit in units:
            part = Path(tmp) / f"{unit}.npz"
            cmd = python + [str(Path(__file__).resolve()), "run-one", str(directory), unit, str(part)]
            t0 = time.perf_counter()
            log(f"{unit}: running")
            try:
                proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      errors="replace", timeout=timeout, preexec_fn=_no_core_dumps)
                rc, output = proc.returncode, proc.stdout
            except subprocess.TimeoutExpired as e:
                output = e.stdout or ""
                rc, output = None, output.decode(errors="replace") if isinstance(output, bytes) else output
            seconds = round(time.perf_counter() - t0, 1)
            sys.stderr.write("".join(f"    {line}\n" for line in output.splitlines()[-40:]))
            entry = {"seconds": seconds, "returncode": rc}
            if rc == 0 and part.exists():
                with np.load(part) as data:
                    entry.update(status="ok", **json.loads(str(data["info"])))
                    arrays.update({f"{unit}.{k}": data[k] for k in data.files if k != "info"})
            else:
                entry.update(status="failed", error=exit_reason(rc, timeout), output_tail=output[-3000:])
            info["units"][unit] = entry
            log(f"{unit}: {entry['status']}" + (f" ({entry['error']})" if entry["status"] != "ok" else "")
                + f" in {seconds} s")
    np.savez(out, info=np.array(json.dumps(info)), **arrays)
    log(f"wrote {out}")
    return all(u["status"] == "ok" for u in info["units"].values())


# --- compare ---------------------------------------------------------------------------------------

def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
    return float(np.abs(a - b).max(initial=0.0)) / scale


def compare(a_path: Path, b_path: Path) -> dict[str, tuple[bool, str]]:
    """{unit: (ok, one-line report)} for every unit either file ran."""
    A, B = np.load(a_path), np.load(b_path)
    ia, ib = json.loads(str(A["info"])), json.loads(str(B["info"]))
    names = (ia["host"]["machine"], ib["host"]["machine"])
    if names[0] == names[1]:
        names = (a_path.stem, b_path.stem)
    results = {}
    for unit in list(dict.fromkeys([*ia["units"], *ib["units"]])):
        ua, ub = ia["units"].get(unit), ib["units"].get(unit)
        problems = []
        for name, u in zip(names, (ua, ub)):
            if u is None:
                problems.append(f"{name}: not run")
            elif u["status"] != "ok":
                problems.append(f"{name}: {u['error']}: " + last_line(u.get("output_tail", "")))
            else:
                worst = max((e for k in u["kernels"].values() for e in k["vs_decode"].values()), default=0.0)
                if worst > KERNEL_RTOL:
                    problems.append(f"{name}: kernels differ from its NumPy decode by {worst:.1e}")
                # Linear.matmul_equals_matvec: a prompt gives each token what a decode would
                broken = sorted(f"{k}.{m}" for k, ka in u["kernels"].items()
                                for m, eq in ka.get("equals_matvecs", {}).items() if not eq)
                if broken:
                    problems.append(f"{name}: matmul differs from its own matvecs: {broken[:4]}")
        if problems:
            results[unit] = (False, "; ".join(problems))
            continue
        keys = sorted(k for k in A.files if k.startswith(unit + "."))
        missing = sorted(set(keys) ^ {k for k in B.files if k.startswith(unit + ".")})
        if missing:
            results[unit] = (False, f"arrays in one run only: {missing[:4]}")
            continue
        kernel_err = max((rel_err(B[k], A[k]) for k in keys if ".k." in k), default=0.0)
        logit_err = rel_err(B[f"{unit}.m.logits"], A[f"{unit}.m.logits"])
        logit_tol = max(LOGITS_RTOL, 2 * max(float(A[f"{unit}.m.sensitivity"]), float(B[f"{unit}.m.sensitivity"])))
        ta, tb = A[f"{unit}.m.tokens"].tolist(), B[f"{unit}.m.tokens"].tolist()
        same_prompt = np.array_equal(A[f"{unit}.m.prompt"], B[f"{unit}.m.prompt"])
        ok = kernel_err <= KERNEL_RTOL and logit_err <= logit_tol and ta == tb and same_prompt
        nk = sum(".k." in k for k in keys)
        report = (f"kernels ({nk} outputs) max rel diff {kernel_err:.1e} (tol {KERNEL_RTOL:.0e}), "
                  f"logits {logit_err:.1e} (tol {logit_tol:.0e}: 2x a 1e-6 perturbation's effect, at least "
                  f"{LOGITS_RTOL:.0e}), greedy tokens "
                  + ("identical" if ta == tb else f"differ: {ta} vs {tb}")
                  + ("" if same_prompt else ", prompt ids differ")
                  + f"; {names[1]} {ub['seconds']} s, {names[0]} {ua['seconds']} s")
        results[unit] = (ok, report)
    return results


def last_line(text: str) -> str:
    """What went wrong, from a child's output: the last error line (LLVM's, an exception's, a
    SystemExit message) rather than qemu's "uncaught target signal", and the x86 intrinsic LLVM
    could not lower, if any."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("qemu:")]
    errors = [ln for ln in lines if re.search(r"error|exception|no \S+\.ebin", ln, re.I)]
    line = (errors or lines or [""])[-1]
    intrinsic = re.search(r"llvm\.x86\.[\w.]+", text)
    return (line[:300] + (f" [{intrinsic.group(0)}]" if intrinsic else "")).strip()


def _no_core_dumps():
    """Children that abort (LLVM) leave no core files (qemu writes its own into the cwd)."""
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def print_compare(results: dict) -> bool:
    width = max(map(len, results), default=4)
    for unit, (ok, report) in results.items():
        print(f"{unit:<{width}}  {'PASS' if ok else 'FAIL'}  {report}")
    return all(ok for ok, _ in results.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-fixture", help="tiny checkpoint, one pack per unit, encoded kernel matrices")
    p.add_argument("dir", type=Path)
    p = sub.add_parser("pack-one")
    p.add_argument("dir", type=Path)
    p.add_argument("unit", choices=list(UNITS))
    p = sub.add_parser("run", help="run every unit (each in a child process) and write OUT.npz")
    p.add_argument("dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--units", default=",".join(UNITS), help="comma-separated subset of: " + ", ".join(UNITS))
    p.add_argument("--python", default=os.environ.get("EDGERUN_PYTHON"),
                   help="command that runs the children (default: $EDGERUN_PYTHON, else this Python)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per unit")
    p = sub.add_parser("run-one")
    p.add_argument("dir", type=Path)
    p.add_argument("unit", choices=list(UNITS))
    p.add_argument("out", type=Path)
    p = sub.add_parser("compare", help="compare two runs per unit; exit 1 if any fails")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "make-fixture":
        return 0 if make_fixture(args.dir) else 1
    elif args.cmd == "pack-one":
        pack_one(args.dir, args.unit)
    elif args.cmd == "run-one":
        run_one(args.dir, args.unit, args.out)
    elif args.cmd == "run":
        units = [u for u in args.units.split(",") if u]
        unknown = set(units) - set(UNITS)
        if unknown:
            ap.error(f"unknown units {sorted(unknown)}; known: {', '.join(UNITS)}")
        python = shlex.split(args.python) if args.python else [sys.executable]
        return 0 if run(args.dir, args.out, units, python, args.timeout) else 1
    elif args.cmd == "compare":
        return 0 if print_compare(compare(args.a, args.b)) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
