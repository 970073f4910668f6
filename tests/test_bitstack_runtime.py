"""BitStack end to end: a pack whose blocks are stored in global order, loading the longest
prefix that fits, resizing in place (math unchanged after shrinking and growing back)."""
from __future__ import annotations

import numpy as np
import pytest

import edgerun
from edgerun.bitstack_runtime import BlockOrder
from edgerun.convert.pack import make_recipe, pack
from edgerun.ebin import EbinFile


@pytest.fixture(scope="module")
def stacked(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bitstack") / "tiny-bs.ebin"
    pack(tiny_dir("qwen2"), out, recipe=make_recipe("f16", "bitstack", 6), calib_tokens=512)
    return out


def test_blocks_are_stored_in_global_order(stacked):
    with EbinFile(stacked) as f:
        man = f.manifest
        order = [(n, i) for n, i in man["bitstack"]["order"]]
        offsets = [f.arrays[man["tensors"][n]["parts"][f"block.{i}"]].offset for n, i in order]
    assert offsets == sorted(offsets)                     # a size is a prefix of the file
    levels = [i for _, i in order]
    assert levels == sorted(levels)                       # level by level: no matrix two blocks ahead
    curve = man["bitstack"]["curve"]
    assert len(curve) == 6 and all(a[0] < b[0] for a, b in zip(curve, curve[1:]))


def test_resize_shrinks_grows_and_keeps_the_math(stacked):
    ids = list(range(7, 50))
    with edgerun.load(stacked) as m:
        loaded, total = m.blocks
        assert loaded == total
        full_bytes, full = m.weight_bytes, m.logits(ids)
        half = m.resize(weights=full_bytes // 2)
        assert half <= full_bytes // 2 and m.blocks[0] < total
        shrunk = m.logits(ids)
        assert np.abs(shrunk - full).max() > 1e-3          # fewer blocks: a different (coarser) model
        assert m.resize(weights=10 * full_bytes) == full_bytes
        np.testing.assert_array_equal(m.logits(ids), full)  # grown back: exactly the same model
        with EbinFile(stacked) as f:
            order = BlockOrder(f.manifest, f.arrays)
        with pytest.raises(edgerun.BudgetError, match="smallest BitStack size"):
            m.resize(weights=order.weight_bytes(order.minimum) - 1)


def test_prefix_sizing(stacked):
    with EbinFile(stacked) as f:
        order = BlockOrder(f.manifest, f.arrays)
    for n in (order.minimum, order.minimum + 10, order.total):
        assert order.prefix_for(order.weight_bytes(n)) == n
        assert order.prefix_for(order.weight_bytes(n) + 1) == n if n == order.total else True
        counts = order.counts(n)
        assert sum(counts.values()) == n and max(counts.values()) - min(counts.values()) <= 1
    assert order.prefix_for(order.weight_bytes(order.minimum + 10) - 1) == order.minimum + 9


def test_budget_too_small_names_the_minimum(stacked):
    with pytest.raises(edgerun.BudgetError, match="smallest BitStack size") as e:
        edgerun.load(stacked, ram="100MB")
    assert e.value.minimum_bytes > 100e6
