"""`edgerun info`: what an .ebin holds and what it needs to run."""
from __future__ import annotations

from collections import defaultdict

from . import isa
from .ebin import EbinFile
from .memory import fmt, mib_ceil
from .plan import plan as make_plan, tensor_group


def _source(source) -> str:
    """The manifest's free-form "source": a description object (what pack writes) or text."""
    if isinstance(source, dict):
        source = source.get("description", "?")
    return str(source)[:200] if source is not None else "?"


def describe(path, context=None) -> str:
    from .api import DEFAULT_CONTEXT, measure_runtime, stop_ids, tokenizer_from_manifest
    from .validate import check_model
    with EbinFile(path) as f:
        man = f.manifest
        cfg = check_model(f)
        context = context or min(DEFAULT_CONTEXT, cfg.max_position_embeddings)
        sizes, params, codecs = defaultdict(int), defaultdict(int), defaultdict(set)
        for name, t in man["tensors"].items():
            g = tensor_group(name)
            sizes[g] += sum(f.arrays[a].length for a in t["parts"].values())
            n = 1
            for s in t["shape"]:
                n *= s
            params[g] += n
            codecs[g].add(t["codec"] + ("/" + t["params"]["dtype"] if "dtype" in t["params"] else "")
                          + (", inputs rotated" if "rotation" in t else ""))
        tokenizer = tokenizer_from_manifest(man)        # held while measuring, as a loaded model holds it
        plan = make_plan(man, None, context, measure_runtime(f))      # everything resident
        stop_text = ", ".join(f"{i} {tokenizer.id_to_token(i)}" for i in stop_ids(tokenizer))
        del tokenizer
        tok = man["tokenizer"]
        lines = [
            f"file          {path} ({f.file_size / 1e6:.1f} MB, format v{f.version})",
            f"source        {_source(man.get('source'))}",
            f"architecture  {cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"ffn {cfg.intermediate_size}, heads {cfg.num_heads} (kv {cfg.num_kv_heads}, dim {cfg.head_dim}), "
            f"vocab {cfg.vocab_size}",
            f"parameters    {cfg.parameter_count / 1e6:.1f}M"
            + (" (embeddings tied to the output head)" if cfg.tie_word_embeddings else ""),
            f"context       trained {cfg.max_position_embeddings}; rope theta {cfg.rope_theta:g}"
            + (f", scaling {cfg.rope_scaling}" if cfg.rope_scaling else ""),
            "weights:",
        ]
        for g in sizes:
            lines.append(f"  {g:<13} {params[g] / 1e6:8.2f}M params {fmt(sizes[g]):>12}  "
                         f"{sizes[g] * 8 / params[g]:5.2f} bits/weight  {', '.join(sorted(codecs[g]))}")
        total_p, total_b = sum(params.values()), sum(sizes.values())
        lines.append(f"  {'total':<13} {total_p / 1e6:8.2f}M params {fmt(total_b):>12}  "
                     f"{total_b * 8 / total_p:5.2f} bits/weight")
        lines.append(f"kernels       {isa.target().describe()}")
        template = tok.get("chat_template")
        lines.append(f"chat template {'yes (' + str(len(template)) + ' chars)' if template else 'none'}")
        lines.append(f"stop tokens   {stop_text}; BOS {tok.get('bos_token_id')}"
                     f" (added: {tok.get('add_bos_token')})")
        stack = man.get("bitstack")
        if stack:
            order = plan.order
            lines.append(f"BitStack      {order.total} blocks in global order; weights from "
                         f"{fmt(order.weight_bytes(order.minimum))} (one block per matrix) to "
                         f"{fmt(order.weight_bytes(order.total))}; size/quality (calibration perplexity):")
            for size, ppl in stack.get("curve") or []:
                lines.append(f"  {fmt(size):>12}  {ppl:10.2f}")
        if man.get("flash"):
            from . import streaming
            least = streaming.minimum_plan(man, cfg)
            lines.append(f"feed-forward  {least.layers} layers x {least.neurons} neurons, "
                         f"{fmt(least.layers * least.neurons * least.bundle_bytes)} of {least.dtype} bundles "
                         f"(--layout flash): resident from --ram {mib_ceil(plan.total)}, else streamed; "
                         "the least streaming needs:")
            lines += least.lines()
        lines.append(f"memory at context {context}, everything resident (minimum --ram {mib_ceil(plan.minimum)}):")
        lines += plan.lines()[:-1]
        return "\n".join(lines)
