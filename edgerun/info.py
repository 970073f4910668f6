"""`edgerun info`: what an .ebin holds and what it needs to run."""
from __future__ import annotations

from collections import defaultdict

from . import isa
from .config import ModelConfig
from .ebin import EbinFile
from .memory import fmt, mib_ceil

GROUPS = (("embeddings", "embed_tokens"), ("attention", "self_attn."), ("feed-forward", "mlp."),
          ("output head", "lm_head"), ("norms", "norm"))


def tensor_group(name: str) -> str:
    return next((group for group, key in GROUPS if key in name), "other")


def describe(path, context=None) -> str:
    from .api import DEFAULT_CONTEXT, plan_memory, stop_ids, tokenizer_from_manifest
    with EbinFile(path) as f:
        man = f.manifest
        cfg = ModelConfig.from_dict(man["config"])
        context = context or min(DEFAULT_CONTEXT, cfg.max_position_embeddings)
        sizes, params, codecs = defaultdict(int), defaultdict(int), defaultdict(set)
        for name, t in man["tensors"].items():
            g = tensor_group(name)
            sizes[g] += sum(f.arrays[a].length for a in t["parts"].values())
            n = 1
            for s in t["shape"]:
                n *= s
            params[g] += n
            codecs[g].add(t["codec"] + ("/" + t["params"]["dtype"] if "dtype" in t["params"] else ""))
        tokenizer = tokenizer_from_manifest(man)        # held while measuring, as a loaded model holds it
        plan = plan_memory(f, cfg, context, None)
        stop_text = ", ".join(f"{i} {tokenizer.id_to_token(i)}" for i in stop_ids(tokenizer))
        del tokenizer
        tok = man["tokenizer"]
        lines = [
            f"file          {path} ({f.file_size / 1e6:.1f} MB, format v{f.version})",
            f"source        {man.get('source', {}).get('description', '?')}",
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
            from .bitstack_runtime import BlockOrder
            order = BlockOrder(man, f.arrays)
            plan.weights = order.weight_bytes(order.minimum)
            lines.append(f"BitStack      {order.total} blocks in global order; weights from "
                         f"{fmt(order.weight_bytes(order.minimum))} (one block per matrix) to "
                         f"{fmt(order.weight_bytes(order.total))}; size/quality (calibration perplexity):")
            for size, ppl in stack.get("curve") or []:
                lines.append(f"  {fmt(size):>12}  {ppl:10.2f}")
        if man.get("flash"):
            # the FFN bundles are not in `tensors`: the minimum adds the smallest streaming plan,
            # as loading adds its streaming plan to the memory plan
            from . import streaming
            least = streaming.minimum_plan(man, cfg)
            resident = streaming.plan_streaming(man, cfg, 1 << 62, "resident", criterion="off")
            plan.weights += least.total_bytes
            resident_from = plan.total - least.total_bytes + resident.total_bytes
            lines.append(f"feed-forward  {least.layers} layers x {least.neurons} neurons, "
                         f"{fmt(least.layers * least.neurons * least.bundle_bytes)} of {least.dtype} bundles "
                         f"(--layout flash): resident from --ram {mib_ceil(resident_from)}, else streamed; "
                         "the least streaming needs (in the weights below):")
            lines += least.lines()
        lines.append(f"memory at context {context} (minimum --ram {mib_ceil(plan.total)}):")
        lines += plan.lines()[:-1]
        return "\n".join(lines)
