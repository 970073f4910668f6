"""`pack --bpw/--size` (edgerun/convert/budget.py): every codec's sizes are exact before encoding,
the chooser meets the target and never exceeds it, and impossible or conflicting requests are
clear errors."""
from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CORPUS
from edgerun.cli import main
from edgerun.codecs import all_codecs
from edgerun.config import ModelConfig
from edgerun.convert.budget import (Option, TargetTooSmall, auto_recipe, choose, group_options, recipe_size)
from edgerun.convert.pack import open_source, pack
from edgerun.errors import EdgerunError

CALIB = CORPUS * 30


def _meta_cfg(src):
    with open_source(src) as s:
        return s.meta, ModelConfig.from_dict(s.meta.config)


def _manifest_offset(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(64)
    _, _, _, off, length, _, _ = struct.unpack_from("<8sIIQQII", head)
    return off, length


def _rules():
    """Every codec's candidates and registry example params that have an exact size."""
    for name, cls in all_codecs().items():
        for params in dict.fromkeys(map(repr, [*cls.candidates(), *cls.example_params])):
            params = eval(params)
            if cls.part_nbytes((8, 64), params) is not None:
                yield pytest.param({"codec": name, "params": params}, id=f"{name}-{params}")


@pytest.mark.parametrize("rule", list(_rules()))
def test_recipe_size_is_exact_for_every_codec(rule, tiny_dir, tmp_path):
    src = tiny_dir("llama")                      # untied: embed and head are separate tensors
    meta, cfg = _meta_cfg(src)
    stacked = all_codecs()[rule["codec"]].stacked
    f16 = {"codec": "dense", "params": {"dtype": "f16"}}
    recipe = {"embed": f16 if stacked else rule, "head": f16 if stacked else rule, "attention": rule,
              "ffn": rule, "vectors": {"codec": "dense", "params": {"dtype": "f32"}}}
    summary = pack(src, tmp_path / "m.ebin", recipe=recipe, calib_text=CALIB, calib_tokens=512)
    size = recipe_size(recipe, cfg, meta)
    assert dict(size.group_bytes) == summary.group_bytes        # every part, to the byte
    offset, length = _manifest_offset(tmp_path / "m.ebin")
    assert offset == size.data_bytes                            # header + arrays padded to 4096
    assert summary.file_bytes == offset + length <= size.file_bound


def test_codecs_with_value_dependent_sizes_are_not_candidates():
    for cls in all_codecs().values():
        for params in cls.candidates():
            assert cls.part_nbytes((48, 96), params) is not None
    from edgerun.codecs import codec_class
    assert codec_class("spqr").part_nbytes((48, 96), {"bits": 3}) is None        # outliers above τ


def _options(rng, groups=3, n=6):
    out = {}
    for g in range(groups):
        sizes = np.sort(rng.integers(100, 1000, n))
        losses = np.sort(rng.random(n))[::-1]
        out[f"g{g}"] = [Option({"codec": "dense", "params": {"dtype": "f16"}}, int(s), int(s), loss=float(v))
                        for s, v in zip(sizes, losses)]
    return out


def test_choose_is_the_exact_optimum_under_the_budget(monkeypatch):
    """On synthetic options: the least summed loss of every combination that fits, never over."""
    import edgerun.convert.budget as budget
    rng = np.random.default_rng(0)
    monkeypatch.setattr(budget, "recipe_size", lambda recipe, cfg, meta=None: budget.RecipeSize())
    monkeypatch.setattr(budget, "_fixed_bytes", lambda cfg, meta, by: 0)
    monkeypatch.setattr(budget, "_recipe", lambda combo: {g: o.rule for g, o in combo.items()})
    for trial in range(20):
        options = _options(rng)
        budget_bytes = int(rng.integers(300, 3000))
        feasible = [c for c in itertools.product(*options.values()) if sum(o.weight_bytes for o in c) <= budget_bytes]
        if not feasible:
            with pytest.raises(TargetTooSmall):
                choose(options, None, budget_bytes, by="file")
            continue
        best = min(sum(o.loss for o in c) for c in feasible)
        ch = choose(options, None, budget_bytes)
        assert sum(o.weight_bytes for o in ch.options.values()) <= budget_bytes
        assert ch.loss == pytest.approx(best)
        # the options left unmeasured are exactly those in no combination that fits
        kept = budget.feasible(options, None, budget_bytes)
        in_some_fit = {g: {id(c[i]) for c in feasible} for i, g in enumerate(options)}
        assert {g: {id(o) for o in kept[g]} for g in options} == in_some_fit
        assert choose(kept, None, budget_bytes).loss == pytest.approx(best)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bpw_pack_meets_the_target(arch, tiny_dir, tmp_path):
    src = tiny_dir(arch)
    meta, cfg = _meta_cfg(src)
    logs = []
    losses = []
    for bpw in (3.5, 5.0):
        ch = auto_recipe(src, bpw=bpw, calib_text=CALIB, log=logs.append)
        summary = pack(src, tmp_path / f"{bpw}.ebin", recipe=ch.recipe, calib_text=CALIB, calib_tokens=512)
        assert summary.weight_bytes == ch.size.weight_bytes                  # the plan is what was written
        assert summary.bits_per_weight <= bpw
        assert summary.weight_bytes * 8 / cfg.parameter_count <= bpw
        losses.append(ch.loss)
        # the next option up in any group would have overshot (the budget is used, not wasted)
        assert summary.bits_per_weight > bpw - 1.5
    assert losses[1] <= losses[0]
    assert any(line.startswith("chose ") for line in logs)
    assert any("bits/weight over all" in line for line in logs)


def test_size_target_bounds_the_file(tiny_dir, tmp_path):
    src = tiny_dir("qwen2")
    target = 480_000
    ch = auto_recipe(src, size=target, calib_text=CALIB, log=lambda s: None)
    assert ch.size.file_bound <= target
    summary = pack(src, tmp_path / "s.ebin", recipe=ch.recipe, calib_text=CALIB, calib_tokens=512)
    assert summary.file_bytes <= target


def test_target_below_the_smallest_pack_names_the_minimum(tiny_dir):
    src = tiny_dir("llama")
    with pytest.raises(TargetTooSmall, match=r"--bpw 1\.000 is below the smallest pack of this model: [0-9.]+ bits/weight"):
        auto_recipe(src, bpw=1.0, calib_text=CALIB, log=lambda s: None)
    with pytest.raises(TargetTooSmall, match=r"below the smallest pack of this model: [0-9.]+ MB"):
        auto_recipe(src, size=10_000, calib_text=CALIB, log=lambda s: None)


def test_cli_bpw_conflicts_and_errors(tiny_dir, tmp_path):
    src = str(tiny_dir("llama"))
    out = str(tmp_path / "x.ebin")
    runner = CliRunner()
    for extra in (["--codec", "cluster"], ["--bits", "3"], ["--recipe", "ffn=cluster:3"], ["--size", "1MB"]):
        r = runner.invoke(main, ["pack", src, "-o", out, "--bpw", "3.5", *extra])
        assert isinstance(r.exception, EdgerunError) and "not both" in str(r.exception)
    r = runner.invoke(main, ["pack", src, "-o", out, "--bpw", "0.5"])
    assert isinstance(r.exception, EdgerunError) and "below the smallest pack" in str(r.exception)
    r = runner.invoke(main, ["pack", "--help"])
    assert "--bpw" in r.output and "--size" in r.output


def test_cli_bpw_pack_prints_choice_and_achieved(tiny_dir, tmp_path):
    src = str(tiny_dir("qwen2"))
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    r = CliRunner().invoke(main, ["pack", src, "-o", str(tmp_path / "b.ebin"), "--bpw", "4",
                                  "--calib", str(calib), "--calib-tokens", "512"])
    assert r.exit_code == 0, r.output
    assert "chose embed=" in r.output
    achieved = float(r.output.split("achieved ")[1].split(" bits/weight")[0])
    assert achieved <= 4.0


def test_group_options_cover_every_candidate(tiny_dir):
    _, cfg = _meta_cfg(tiny_dir("llama"))
    opts = group_options(cfg)
    assert set(opts) == {"embed", "attention", "ffn", "head"}
    n = sum(len(c.candidates()) for c in all_codecs().values())
    assert all(len(v) == n for v in opts.values())
    with pytest.raises(EdgerunError):
        from edgerun.convert.budget import budget_bytes
        budget_bytes(cfg, bpw=-1)
