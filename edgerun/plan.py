"""The plan: what a pack needs in memory and where each part runs, decided once before loading.

One pure function, `plan(manifest, budget, context, runtime, ...)`, from what the pack stores (its
manifest: tensors, array sizes, BitStack order, flash layout), the `--ram` budget, the context,
the measured runtime footprint and the device, to a `Plan` (DESIGN §3, issue 17 "One planner"):
- fit first: everything resident when it fits;
- BitStack packs: the longest prefix of the global block order that fits;
- flash-layout packs: the FFN bundles streamed with the largest window that fits;
- CUDA: which layers (and the output head) go on the device.
When nothing fits, `BudgetError` names the part that does not fit (the resident weights or the
streaming window), the minimum `--ram`, and a pack command whose result would fit the budget.
The API only carries the plan out (api.Model).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig
from .errors import BudgetError
from .memory import HEADROOM_BYTES, fmt, mib_ceil

# Tokens a prefill pass runs through each layer at once, widest first. A wider chunk spreads each
# layer's per-call costs (parallel-region starts, quantizing and rotating the chunk's activations,
# the Python between layers) over more tokens: 1.5B cluster:4+rotate, 128-token prompt, 2 threads,
# 172 vs 168 tok/s (BENCHMARKS.md), for ~11 MiB more activation scratch there. `plan` takes the
# wider one only when it costs no weights (BitStack blocks, streaming window, CUDA layers).
PREFILL_CHUNKS = (128, 64)

GROUPS = (("embeddings", "embed_tokens"), ("attention", "self_attn."), ("feed-forward", "mlp."),
          ("output head", "lm_head"), ("norms", "norm"))

# Whole-model bits per weight (every tensor counted) of `edgerun pack --codec C --bits B`, measured
# on SmolLM2-135M (BENCHMARKS.md, quality table): the sizes a refusal's pack suggestion assumes.
PACK_LADDER = (("--codec spqr --bits 4", "spqr4", 4.96), ("--codec spqr --bits 3", "spqr3", 4.60),
               ("--codec cluster --bits 4", "cluster4", 4.57), ("--codec cluster --bits 3", "cluster3", 3.77))


EMBEDDING = "model.embed_tokens.weight"
# A mapped embedding hands its touched pages back every MAPPED_LOOKUPS lookups (model.MappedRows);
# a page fault maps up to FAULT_AROUND bytes of cached file pages around the faulting one (Linux)
MAPPED_LOOKUPS = 32
FAULT_AROUND = 64 << 10


def mapped_parts(manifest: dict, cfg) -> dict[str, tuple]:
    """tensor -> the parts that stay in the file, mapped (model.MappedRows): the token
    embedding's row parts (Codec.row_parts) when the output head is a tensor of its own, so that
    the embedding is only looked up, one row a token (llama.cpp maps its whole file likewise)."""
    from .codecs import codec_class
    entry = manifest["tensors"].get(EMBEDDING)
    if entry is None or cfg.tie_word_embeddings:
        return {}
    rows = tuple(p for p in codec_class(entry["codec"]).row_parts if p in entry["parts"])
    return {EMBEDDING: rows} if rows else {}


def tensor_group(name: str) -> str:
    return next((group for group, key in GROUPS if key in name), "other")


def kv_bytes(cfg, context: int) -> int:
    """Device bytes of one CUDA layer's KV cache (f32 keys and values)."""
    return 2 * 4 * cfg.num_kv_heads * context * cfg.head_dim


def device_scratch_bytes(cfg, context: int, chunk: int) -> int:
    """Device bytes of the CUDA layers' shared activation buffers (cuda/layer.py DeviceRun)."""
    d, f, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    q, kv = H * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return 4 * (chunk * (4 * d + 2 * q + 2 * kv + 2 * f) + chunk * H * context + context * cfg.head_dim)


@dataclass
class GpuPlan:
    layers: int          # the first `layers` layers run on the device
    head: bool           # final norm + output head on the device
    device_bytes: int    # weights (as stored), their KV caches, shared scratch


@dataclass
class Plan:
    context: int
    chunk: int                   # prefill tokens per pass (PREFILL_CHUNKS)
    budget: int | None
    runtime: int                 # measured RSS before any weight is loaded
    parts: dict                  # resident weights by group, bytes (BitStack blocks and FFN bundles apart)
    kv_cache: int
    scratch: int
    kv_dtype: str = "f16"
    order: object = None         # BitStack: the pack's BlockOrder ...
    blocks: int = 0              # ... and how many of its blocks are loaded
    ffn: object = None           # flash layout: streaming.StreamingPlan (resident or streamed)
    stream_args: dict = field(default_factory=dict)   # what built `ffn` (streaming.attach takes them again)
    gpu: GpuPlan | None = None   # CUDA offload
    mapped: dict = field(default_factory=dict)   # tensor -> parts left in the file (mapped_parts) ...
    mapped_bytes: int = 0                        # ... and their size there
    minimum: int = 0             # the least --ram any plan of this pack needs at this context

    @property
    def stack_bytes(self) -> int:
        return int(self.order.prefix_bytes[self.blocks]) if self.order is not None else 0

    @property
    def ffn_bytes(self) -> int:
        return self.ffn.total_bytes if self.ffn is not None else 0

    @property
    def weights(self) -> int:
        return sum(self.parts.values()) + self.stack_bytes + self.ffn_bytes

    @property
    def mapped_pages(self) -> int:
        """RSS of the mapped parts: the pages of the last MAPPED_LOOKUPS rows, each part's
        fault-around at most."""
        return MAPPED_LOOKUPS * FAULT_AROUND * sum(len(parts) for parts in self.mapped.values())

    @property
    def resident(self) -> int:
        """Everything but the FFN's streaming buffers: runtime, fixed weights, KV cache, scratch."""
        return (self.runtime + sum(self.parts.values()) + self.mapped_pages + self.stack_bytes + self.kv_cache
                + self.scratch + HEADROOM_BYTES)

    @property
    def total(self) -> int:
        return self.resident + self.ffn_bytes

    @property
    def streams(self) -> bool:
        return self.ffn is not None and self.ffn.mode != "resident"

    def lines(self) -> list[str]:
        rows = [("runtime (measured: interpreter, libraries, JIT code, tokenizer)", self.runtime)]
        rows += [(f"weights: {g}", n) for g, n in self.parts.items() if n]
        if self.mapped:
            rows.append((f"embedding rows read through a mapping of the file ({fmt(self.mapped_bytes)} there)",
                         self.mapped_pages))
        if self.order is not None:
            rows.append((f"weights: BitStack blocks ({self.blocks} of {self.order.total})", self.stack_bytes))
        if self.ffn is not None:
            what = "resident" if self.ffn.mode == "resident" else f"streamed ({self.ffn.mode})"
            rows.append((f"weights: feed-forward bundles, {what}", self.ffn_bytes))
        rows += [(f"KV cache ({self.kv_dtype}, context {self.context})", self.kv_cache),
                 (f"scratch buffers (prefill {self.chunk} tokens a pass)", self.scratch),
                 ("headroom (heap growth)", HEADROOM_BYTES)]
        out = [f"  {name:<66} {fmt(n):>12}" for name, n in rows]
        if self.ffn is not None:
            out += ["  " + line for line in self.ffn.lines()]
        out.append(f"  {'total':<66} {fmt(self.total):>12}")
        out.append(f"  {'budget (--ram)':<66} {'unlimited' if self.budget is None else fmt(self.budget):>12}")
        if self.gpu is not None:
            out.append(f"  CUDA: {self.gpu.layers} layers{' + output head' if self.gpu.head else ''} on the device, "
                       f"{fmt(self.gpu.device_bytes)} of device memory")
        return out


def array_bytes(manifest: dict) -> dict[str, int]:
    return {name: int(a["length"]) for name, a in manifest["arrays"].items()}


def plan(manifest: dict, budget: int | None, context: int, runtime: int, *, chunk: int | None = None,
         **placement) -> Plan:
    """The plan for `manifest` (an .ebin's, with its "arrays" table) within `budget` bytes (None:
    unlimited) at `context` tokens; `runtime` is the process's measured RSS before loading weights.
    `chunk`: the prefill tokens per pass; None picks the widest of PREFILL_CHUNKS that loads the
    same weights as the narrowest (the minimum, and any refusal, are the narrowest's).
    `placement`: kv_dtype, and the flash-layout packs' stream/criterion/threads
    (streaming.plan_streaming); `device` the resolved device (cpu | cuda), `gpu_layers`/`vram` its
    placement (cuda only; `vram` the device bytes to fill for gpu_layers "auto"). Raises
    BudgetError (or CudaError) when nothing fits."""
    from .cuda import CudaError

    def loads(q: Plan):
        return q.weights, q.gpu and (q.gpu.layers, q.gpu.head)

    chunks = (chunk,) if chunk else PREFILL_CHUNKS
    least = plan_at(manifest, budget, context, runtime, chunks[-1], **placement)
    for wider in chunks[:-1]:
        try:
            p = plan_at(manifest, budget, context, runtime, wider, **placement)
        except (BudgetError, CudaError):
            continue
        if loads(p) == loads(least):
            p.minimum = least.minimum
            return p
    return least


def plan_at(manifest: dict, budget: int | None, context: int, runtime: int, chunk: int, *,
            kv_dtype: str = "f16", stream: str = "auto", criterion: str = "off", threads: int = 2,
            device: str = "cpu", gpu_layers="all", vram: int | None = None) -> Plan:
    """`plan` at one prefill chunk."""
    from .bitstack_runtime import BlockOrder
    from .model import RunState
    cfg = ModelConfig.from_dict(manifest["config"])
    sizes = array_bytes(manifest)
    order = BlockOrder(manifest) if manifest.get("bitstack") else None
    mapped = mapped_parts(manifest, cfg)
    in_file = {manifest["tensors"][t]["parts"][part] for t, ps in mapped.items() for part in ps}
    skip = in_file | (set() if order is None else order.block_arrays)
    parts: dict[str, int] = {}
    for name, entry in manifest["tensors"].items():
        n = sum(sizes[a] for a in entry["parts"].values() if a not in skip)
        parts[tensor_group(name)] = parts.get(tensor_group(name), 0) + n
    scratch, kv = RunState.nbytes(cfg, context, chunk, kv_dtype)
    p = Plan(context, chunk, budget, runtime, parts, kv, scratch, kv_dtype, order=order, mapped=mapped,
             mapped_bytes=sum(sizes[a] for a in in_file),
             blocks=order.minimum if order else 0,      # the least first: what must fit
             stream_args=dict(mode=stream or "auto", criterion=criterion or "off", threads=threads))
    least_ffn = 0
    if manifest.get("flash"):
        from . import streaming
        # the least the FFN can run in: its smallest window, or all bundles resident when that is
        # less (a tiny model: the reader's buffers outweigh its bundles)
        resident_ffn = streaming.plan_streaming(manifest, cfg, 1 << 62, "resident").total_bytes
        least_ffn = resident_ffn if p.stream_args["mode"] == "resident" else min(
            resident_ffn, streaming.minimum_plan(manifest, cfg, p.stream_args["criterion"], threads).total_bytes)
    p.minimum = p.resident + least_ffn
    if budget is not None and p.minimum > budget:
        raise refusal(p, manifest, cfg, least_ffn)
    if order is not None:
        p.blocks = order.total if budget is None else order.prefix_for(
            budget - (p.resident - order.weight_bytes(p.blocks)) - least_ffn)
    if manifest.get("flash"):
        p.ffn = streaming.plan_streaming(manifest, cfg, (1 << 62) if budget is None else budget - p.resident,
                                         **p.stream_args)
    if device == "cuda":
        p.gpu = gpu_placement(cfg, manifest, sizes, p, context, chunk, gpu_layers, vram)
    return p


def gpu_placement(cfg, manifest: dict, sizes: dict, p: Plan, context: int, chunk: int, gpu_layers,
                  vram: int | None) -> GpuPlan:
    """Which layers and whether the head go on the CUDA device (their weights as stored)."""
    from .cuda import CudaError
    if p.ffn is not None:
        raise CudaError("CUDA offload of flash-layout packs (feed-forward from the file) is not supported: "
                        "use --device cpu")
    tensors = manifest["tensors"]
    size = lambda e: sum(sizes[a] for a in e["parts"].values())  # noqa: E731
    layer_bytes = [sum(size(e) for k, e in tensors.items() if k.startswith(f"model.layers.{i}."))
                   for i in range(cfg.num_layers)]
    head = tensors.get("lm_head.weight") or tensors["model.embed_tokens.weight"]
    head_bytes = size(tensors["model.norm.weight"]) + size(head)
    return GpuPlan(*layers_on_device(cfg, layer_bytes, head_bytes, context, chunk, gpu_layers, vram))


def parse_gpu_layers(value, num_layers: int):
    """"all" | "auto" | int-like -> "all" | "auto" | int in 0..num_layers (CudaError otherwise)."""
    from .cuda import CudaError
    if value is None:
        return 0
    if isinstance(value, str) and value.lower() in ("all", "auto"):
        return value.lower()
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise CudaError(f"--gpu-layers must be all, auto or a number of layers, got {value!r}") from None
    if not 0 <= n:
        raise CudaError(f"--gpu-layers must be >= 0, got {n}")
    return min(n, num_layers)


def layers_on_device(cfg, layer_bytes: list[int], head_bytes: int, context: int, chunk: int,
                     gpu_layers="all", vram: int | None = None) -> tuple[int, bool, int]:
    """How much to offload: (n first layers, head on the device, device bytes).

    `layer_bytes[i]`: stored bytes of layer i's weights (uploaded as they are); each offloaded
    layer also holds its KV cache (f32) on the device; the shared scratch is allocated once.
    "all" offloads every layer and the head; N the first N layers (the head too when N is all of
    them); "auto" the most layers that fit `vram`, head last."""
    from .cuda import CudaError
    L = cfg.num_layers
    g = parse_gpu_layers(gpu_layers, L)
    fixed = device_scratch_bytes(cfg, context, chunk)
    per = [b + kv_bytes(cfg, context) for b in layer_bytes]
    if g == "auto":
        if vram is None:
            raise CudaError("--gpu-layers auto needs --vram (the simulator reports no device memory)")
        n, used = 0, fixed
        while n < L and used + per[n] <= vram:
            used += per[n]
            n += 1
        head = n == L and used + head_bytes <= vram
        if n == 0:
            raise CudaError(f"--vram {vram} B holds no layer: one needs {fixed + per[0]} B on the device")
        return n, head, used + (head_bytes if head else 0)
    n = L if g == "all" else g
    head = n == L
    total = (fixed + sum(per[:n]) + (head_bytes if head else 0)) if n else 0
    if vram is not None and total > vram:
        raise CudaError(f"{n} GPU layers need {total} B on the device, more than --vram {vram} B; "
                        "use fewer --gpu-layers or --gpu-layers auto")
    return n, head, total


# --------------------------------------------------------------------------------- refusals

def refusal(p: Plan, manifest: dict, cfg, least_ffn: int) -> BudgetError:
    """The BudgetError for a budget below `p.minimum` (`p` at its smallest: BitStack's minimum
    prefix): what does not fit (the resident part, or the FFN's streaming buffers), the minimum
    --ram, and what would fit (a shorter context, a pack command)."""
    B, need, resident = p.budget, p.minimum, p.resident
    if least_ffn and resident <= B:
        detail = (f"the resident part ({fmt(resident)}) fits, but streaming the FFN needs at least {fmt(least_ffn)}: "
                  f"the window's buffers are {mib_ceil(need - B)} short")
    else:
        items = [(g, n) for g, n in p.parts.items() if n]
        if p.mapped:
            items.append(("embedding rows (mapped)", p.mapped_pages))
        if p.order is not None:
            items.append(("BitStack blocks", p.stack_bytes))
        items += [("runtime", p.runtime), ("KV cache", p.kv_cache), ("scratch and headroom", p.scratch + HEADROOM_BYTES)]
        subject = (f"the smallest BitStack size (one block per matrix) needs {fmt(resident)}" if p.order is not None
                   else f"the resident part (all but the streamed FFN) alone needs {fmt(resident)}" if least_ffn
                   else "all of it resident")
        detail = f"{subject}: " + ", ".join(f"{g} {fmt(n)}" for g, n in items)
    hints = []
    per_position = p.kv_cache // max(p.context, 1)
    fit_ctx = (B - (need - p.kv_cache)) // per_position if per_position else 0
    if fit_ctx >= 256:
        hints.append(f"lower the context (-c {fit_ctx} fits)")
    hints.append(pack_suggestion(manifest, cfg, B - (p.runtime + p.kv_cache + p.scratch + HEADROOM_BYTES))
                 or "use a smaller model or a more compressed pack")
    return BudgetError(f"the model needs at least {fmt(need)} (--ram {mib_ceil(need)}) at context {p.context}, "
                       f"but --ram is {fmt(B)}; {detail}. Raise --ram or " + " or ".join(hints) + ".\n"
                       + "\n".join(p.lines()), minimum_bytes=need)


def pack_suggestion(manifest: dict, cfg, weight_budget: int) -> str:
    """`edgerun pack ...` of the pack's source with the least compression whose weights (estimated
    from PACK_LADDER's measured bits per weight) fit `weight_budget`; "" when none does."""
    stored = sum(int(a["length"]) for a in manifest["arrays"].values())
    source = manifest.get("source")
    src = (source.get("name") if isinstance(source, dict) else None) or "SOURCE"
    stem = src.rsplit(".", 1)[0] if src.endswith(".gguf") else src
    for args, tag, bits in PACK_LADDER:
        est = int(cfg.parameter_count * bits / 8)
        if est < stored and est <= weight_budget:
            return f"repack it smaller: `edgerun pack {src} -o {stem}-{tag}.ebin {args}` (about {fmt(est)} of weights)"
    return ""
