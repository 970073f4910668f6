"""The planner (edgerun/plan.py) on its own: tiny synthetic manifests, no file, no kernel."""
from __future__ import annotations

import pytest

from edgerun.cuda import CudaError
from edgerun.errors import BudgetError
from edgerun import plan as planner
from edgerun.plan import (FAULT_AROUND, HEADROOM_BYTES, MAPPED_LOOKUPS, PREFILL_CHUNKS, device_scratch_bytes,
                          kv_bytes, layers_on_device)

MiB = 2**20
RUNTIME = 40 * MiB
CTX = 256


def manifest(L=2, d=256, f=768, V=4000, flash=False, blocks=0, block_bytes=20_000, itemsize=4, tied=False):
    """A manifest with the arrays table a pack writes (only the sizes matter to the plan)."""
    cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=d, intermediate_size=f, num_hidden_layers=L,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=V, max_position_embeddings=4096,
               rms_norm_eps=1e-5, tie_word_embeddings=tied)
    tensors, arrays = {}, {}

    def add(name, shape, parts):
        tensors[name] = {"codec": "dense", "params": {}, "shape": list(shape), "parts": {}}
        for part, n in parts.items():
            array = name if part == "weight" else f"{name}.{part}"
            arrays[array] = {"length": n}
            tensors[name]["parts"][part] = array

    add("model.embed_tokens.weight", (V, d), {"weight": V * d * itemsize})
    if not tied:
        add("lm_head.weight", (V, d), {"weight": V * d * itemsize})
    add("model.norm.weight", (d,), {"weight": 4 * d})
    stacked = []
    for i in range(L):
        pre = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            add(pre + n + ".weight", (d,), {"weight": 4 * d})
        mats = [("self_attn." + p, (d, d)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if not flash:
            mats += [("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)), ("mlp.down_proj", (d, f))]
        for n, shape in mats:
            if blocks:
                add(pre + n + ".weight", shape, {"meta": 1000, **{f"block.{j}": block_bytes for j in range(blocks)}})
                stacked.append(pre + n + ".weight")
            else:
                add(pre + n + ".weight", shape, {"weight": shape[0] * shape[1] * itemsize})
    m = {"config": cfg, "tensors": tensors, "arrays": arrays, "source": {"name": "tiny.gguf"}}
    if blocks:
        m["bitstack"] = {"order": [[n, j] for j in range(blocks) for n in stacked]}
    if flash:
        for i in range(L):
            arrays[f"model.layers.{i}.mlp.bundles"] = {"length": f * 3 * d * 2}
        m["flash"] = {"version": 1, "codec": "dense", "dtype": "f16", "hidden_size": d, "intermediate_size": f,
                      "predictor_rank": 64, "layers": [{} for _ in range(L)]}
    return m


def plan(*args, chunk=PREFILL_CHUNKS[-1], **kwargs):
    """The plan at one prefill chunk (the narrowest unless given): the tests of what fits; the
    choice of the chunk is tested apart (test_prefill_chunk_*)."""
    return planner.plan(*args, chunk=chunk, **kwargs)


def weights_of(m):
    return sum(a["length"] for a in m["arrays"].values())


def test_fits_resident_and_accounts_every_part():
    m = manifest(tied=True)
    p = plan(m, None, CTX, RUNTIME)
    assert p.ffn is None and p.order is None and p.gpu is None and p.mapped == {}
    assert p.weights == weights_of(m)
    assert p.total == RUNTIME + p.weights + p.kv_cache + p.scratch + HEADROOM_BYTES == p.minimum
    assert set(p.parts) >= {"embeddings", "attention", "feed-forward", "norms"}
    assert plan(m, p.total, CTX, RUNTIME).total == p.total          # exactly the minimum fits
    text = "\n".join(p.lines())
    assert "weights: embeddings" in text and "KV cache (f16, context 256)" in text


def test_untied_embedding_rows_stay_in_the_file():
    """An embedding that is only looked up (the head is its own tensor) is mapped, not read: the
    plan counts the pages of the last MAPPED_LOOKUPS rows, not the matrix (model.MappedRows)."""
    m = manifest()
    p = plan(m, None, CTX, RUNTIME)
    assert p.mapped == {"model.embed_tokens.weight": ("weight",)}
    embed = m["arrays"]["model.embed_tokens.weight"]["length"]
    assert p.weights == weights_of(m) - embed and p.mapped_pages == MAPPED_LOOKUPS * FAULT_AROUND
    assert p.total == RUNTIME + p.weights + p.mapped_pages + p.kv_cache + p.scratch + HEADROOM_BYTES
    assert "embedding rows read through a mapping of the file (3.9 MiB there)" in "\n".join(p.lines())
    # a codec without row parts (BitStack's blocks span rows) is read as before
    m["tensors"]["model.embed_tokens.weight"]["codec"] = "bitstack"
    assert plan(m, None, CTX, RUNTIME).mapped == {}


def test_refusal_names_the_minimum_and_a_pack_that_fits():
    m = manifest(itemsize=4)
    need = plan(m, None, CTX, RUNTIME).minimum
    budget = need - weights_of(m) // 2           # f32 weights: a 4-5 bit pack is far smaller
    with pytest.raises(BudgetError) as e:
        plan(m, budget, CTX, RUNTIME)
    msg = str(e.value)
    assert e.value.minimum_bytes == need and f"--ram {-(-need // MiB)}MiB" in msg
    assert "the model needs at least" in msg and "embedding rows (mapped)" in msg and "output head" in msg \
        and "runtime" in msg
    assert "`edgerun pack tiny.gguf -o tiny-spqr4.ebin --codec spqr --bits 4`" in msg


def test_refusal_without_a_pack_that_fits_says_so():
    with pytest.raises(BudgetError, match="use a smaller model or a more compressed pack"):
        plan(manifest(), RUNTIME, CTX, RUNTIME)        # the runtime alone fills it


def test_flash_resident_window_or_refused():
    m = manifest(flash=True, L=4, f=4096)         # 24 MiB of bundles; the least window 15 MiB
    full = plan(m, None, CTX, RUNTIME)
    assert full.ffn.mode == "resident" and plan(m, full.total, CTX, RUNTIME).ffn.mode == "resident"
    least = plan(m, full.minimum, CTX, RUNTIME)
    assert least.ffn.mode == "window" and least.total <= full.minimum
    # one read buffer at the smallest budgets, then two (the next layer's reads overlap this
    # layer's compute: worth more than the window slots the second buffer takes); within each,
    # the window grows with the budget, never past it
    caps = []
    for budget in range(full.minimum, full.total, max(1, (full.total - full.minimum) // 7)):
        p = plan(m, budget, CTX, RUNTIME)
        assert p.total <= budget and p.ffn.mode in ("window", "resident")
        caps.append((p.ffn.prefetch, p.ffn.capacity))
    assert caps == sorted(caps) and 0 < max(c for _, c in caps) < 4096
    assert not caps[0][0] and caps[-1][0]
    assert "window:" in "\n".join(least.lines())


def test_flash_refusal_names_the_part_that_does_not_fit():
    m = manifest(flash=True, L=4, f=4096)
    p = plan(m, None, CTX, RUNTIME)
    resident = p.resident                 # everything but the FFN's bundles and buffers
    # the resident part fits, the streaming buffers do not: the window is blamed
    with pytest.raises(BudgetError, match="the resident part .* fits, but streaming the FFN needs at least"):
        plan(m, p.minimum - 1, CTX, RUNTIME)
    # the resident part alone is over: it is named, with its pieces, not the FFN
    with pytest.raises(BudgetError) as e:
        plan(m, resident - 1, CTX, RUNTIME)
    msg = str(e.value)
    assert "the resident part (all but the streamed FFN) alone needs" in msg
    assert "embedding rows" in msg and "output head" in msg and "attention" in msg and "runtime" in msg
    assert e.value.minimum_bytes == p.minimum


def test_bitstack_longest_prefix_that_fits():
    m = manifest(blocks=4, block_bytes=10_000)
    full = plan(m, None, CTX, RUNTIME)
    order = full.order
    assert full.blocks == order.total == 4 * len(order.stacked)
    assert full.minimum == full.total - (order.total - order.minimum) * 10_000
    for n in (order.minimum, order.minimum + 5, order.total):
        budget = full.total - (order.total - n) * 10_000
        p = plan(m, budget, CTX, RUNTIME)
        assert p.blocks == n and p.total <= budget
        assert plan(m, budget + 9_999, CTX, RUNTIME).blocks == n
    with pytest.raises(BudgetError, match="smallest BitStack size") as e:
        plan(m, full.minimum - 1, CTX, RUNTIME)
    assert e.value.minimum_bytes == full.minimum


def test_context_hint_when_the_kv_cache_is_what_overflows():
    m = manifest()
    short = plan(m, None, 256, RUNTIME)
    with pytest.raises(BudgetError, match=r"lower the context \(-c \d+ fits\)"):
        plan(m, short.total + MiB, 4096, RUNTIME)


def test_cuda_layers_from_the_plan():
    m = manifest(L=4)
    p = plan(m, None, 64, RUNTIME, device="cuda", gpu_layers="all", chunk=8)
    assert (p.gpu.layers, p.gpu.head) == (4, True)
    assert "CUDA: 4 layers + output head" in "\n".join(p.lines())
    one = plan(m, None, 64, RUNTIME, device="cuda", gpu_layers="auto", chunk=8,
               vram=p.gpu.device_bytes - 1)
    assert one.gpu.layers == 4 and not one.gpu.head
    assert plan(m, None, 64, RUNTIME, device="cpu").gpu is None
    with pytest.raises(CudaError, match="flash-layout"):
        plan(manifest(flash=True), None, 64, RUNTIME, device="cuda")


def test_tiny_flash_ffn_least_is_resident():
    # the reader's buffers outweigh a tiny FFN's bundles: the minimum is the resident FFN
    m = manifest(flash=True, f=96)
    p = plan(m, None, CTX, RUNTIME)
    assert p.minimum == p.total and plan(m, p.minimum, CTX, RUNTIME).ffn.mode == "resident"


def test_layers_on_device_fit_vram():
    from edgerun.config import ModelConfig
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=100, max_position_embeddings=64, rms_norm_eps=1e-5))
    fixed, kv = device_scratch_bytes(cfg, 64, 8), kv_bytes(cfg, 64)
    assert layers_on_device(cfg, [1000] * 4, 500, 64, 8, "auto", vram=fixed + 2 * (1000 + kv) + 10) == \
        (2, False, fixed + 2 * (1000 + kv))
    assert layers_on_device(cfg, [1000] * 4, 500, 64, 8, "all") == (4, True, fixed + 4 * (1000 + kv) + 500)
    assert layers_on_device(cfg, [1000] * 4, 500, 64, 8, 3)[:2] == (3, False)
    with pytest.raises(CudaError, match="more than --vram"):
        layers_on_device(cfg, [1000] * 4, 500, 64, 8, "all", vram=100)
    with pytest.raises(CudaError, match="--gpu-layers must be"):
        layers_on_device(cfg, [1000] * 4, 500, 64, 8, "many")
    with pytest.raises(CudaError, match="needs --vram"):
        layers_on_device(cfg, [1000] * 4, 500, 64, 8, "auto")


def test_prefill_chunk_widest_when_it_costs_no_weights():
    m = manifest(tied=True)
    wide, narrow = (plan(m, None, CTX, RUNTIME, chunk=c) for c in PREFILL_CHUNKS)
    assert wide.scratch > narrow.scratch
    assert planner.plan(m, None, CTX, RUNTIME).chunk == PREFILL_CHUNKS[0]
    assert planner.plan(m, wide.total, CTX, RUNTIME).chunk == PREFILL_CHUNKS[0]
    # a budget the wide chunk's scratch does not fit: the narrow one, and the minimum is the narrow one's
    p = planner.plan(m, wide.total - 1, CTX, RUNTIME)
    assert p.chunk == PREFILL_CHUNKS[-1] and p.minimum == narrow.minimum == narrow.total
    assert planner.plan(m, None, CTX, RUNTIME).minimum == narrow.minimum
    with pytest.raises(BudgetError) as e:
        planner.plan(m, narrow.total - 1, CTX, RUNTIME)
    assert e.value.minimum_bytes == narrow.minimum
    assert "prefill 128 tokens a pass" in "\n".join(wide.lines())


def test_prefill_chunk_never_costs_blocks_or_window():
    # BitStack: the budget that loads every block with the narrow chunk keeps them all
    m = manifest(blocks=4, block_bytes=10_000)
    narrow = plan(m, None, CTX, RUNTIME)
    p = planner.plan(m, narrow.total, CTX, RUNTIME)
    assert p.blocks == narrow.blocks == narrow.order.total and p.chunk == PREFILL_CHUNKS[-1]
    # flash: the budget of the narrow chunk's resident FFN keeps it resident
    m = manifest(flash=True, L=4, f=4096)
    narrow = plan(m, None, CTX, RUNTIME)
    p = planner.plan(m, narrow.total, CTX, RUNTIME)
    assert p.ffn.mode == "resident" and p.chunk == PREFILL_CHUNKS[-1]
    assert planner.plan(m, None, CTX, RUNTIME).chunk == PREFILL_CHUNKS[0]
