"""The command line as a user runs it: pack, generate, chat (piped), info, verify, and the
clear errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def edgerun(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "edgerun", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tiny_ebin(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny.ebin"
    r = edgerun("pack", tiny_dir("llama"), "-o", out, "--dtype", "f16")
    assert r.returncode == 0, r.stderr
    assert "bits/weight" in r.stderr and out.exists()
    return out


def test_generate_greedy_is_deterministic(tiny_ebin):
    a = edgerun("generate", tiny_ebin, "-p", "Once upon a time", "-n", "8", "--temp", "0", "-t", "1")
    b = edgerun("generate", tiny_ebin, "-p", "Once upon a time", "-n", "8", "--temp", "0", "-t", "2")
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("Once upon a time") and len(a.stdout) > len("Once upon a time\n")
    assert a.stdout == b.stdout
    assert "tok/s" in a.stderr and "peak RSS" in a.stderr


def test_chat_piped_conversation(tiny_ebin):
    script = 'Hi there\n/help\n"""\nfirst line\nsecond line\n"""\n/regen\n/clear\n/nonsense\nHello\n/bye\nnever read\n'
    r = edgerun("chat", tiny_ebin, "--temp", "0", "-n", "6", "-sys", "Be brief.", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "/regen" in r.stdout                       # the help text
    assert "(conversation cleared)" in r.stdout
    assert "unknown command /nonsense" in r.stdout
    assert r.stderr.count("[prompt") == 4              # Hi there, the multi-line message, /regen, Hello


def test_info_and_verify(tiny_ebin):
    r = edgerun("info", tiny_ebin, "-c", "256")
    assert r.returncode == 0, r.stderr
    assert "LlamaForCausalLM" in r.stdout and "bits/weight" in r.stdout and "KV cache" in r.stdout
    r = edgerun("verify", tiny_ebin)
    assert r.returncode == 0 and "OK" in r.stdout


def test_verify_names_corrupted_array(tiny_ebin, tmp_path):
    from edgerun.ebin import EbinFile
    bad = tmp_path / "bad.ebin"
    data = bytearray(tiny_ebin.read_bytes())
    with EbinFile(tiny_ebin) as f:
        info = f.arrays["model.layers.1.mlp.up_proj.weight"]
    data[info.offset + 10] ^= 0xFF
    bad.write_bytes(bytes(data))
    r = edgerun("verify", bad)
    assert r.returncode == 1
    assert "model.layers.1.mlp.up_proj.weight" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--ram", "12XB"], "cannot read memory size"),
    (["--ram", "1MB"], "needs at least"),
    (["-c", "100000"], "exceeds the model's trained context"),
])
def test_bad_flags_are_clear_errors(tiny_ebin, args, message):
    r = edgerun("generate", tiny_ebin, "-p", "x", *args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr


def test_budget_error_names_the_minimum(tiny_ebin):
    r = edgerun("generate", tiny_ebin, "-p", "x", "--ram", "50MB")
    assert r.returncode == 1
    assert "--ram " in r.stderr and "MiB" in r.stderr


def test_bad_model_files(tmp_path, tiny_dir):
    r = edgerun("chat", tmp_path / "missing.ebin")
    assert r.returncode != 0 and "no such" in r.stderr.lower()
    trunc = tmp_path / "trunc.ebin"
    trunc.write_bytes(b"EDGERUN\x00" + b"\x00" * 20)
    r = edgerun("generate", trunc, "-p", "x")
    assert r.returncode == 1 and "trunc.ebin" in r.stderr and "Traceback" not in r.stderr
    r = edgerun("generate", tiny_dir("llama"), "-p", "x")
    assert r.returncode == 1 and "edgerun pack" in r.stderr


def test_pack_unsupported_architecture_leaves_nothing(tiny_dir, tmp_path):
    import shutil
    src = tmp_path / "gpt2"
    shutil.copytree(tiny_dir("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out.ebin"
    r = edgerun("pack", src, "-o", out)
    assert r.returncode == 1 and "GPT2LMHeadModel" in r.stderr and "not supported" in r.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_interrupted_pack_leaves_no_file(tiny_dir, tmp_path, monkeypatch):
    from edgerun.convert import hf
    from edgerun.convert.pack import pack
    calls = {"n": 0}
    real_read = hf.HFSource.read

    def read_then_interrupt(self, name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_read(self, name)

    monkeypatch.setattr(hf.HFSource, "read", read_then_interrupt)
    out = tmp_path / "out.ebin"
    out.write_bytes(b"previous contents")
    with pytest.raises(KeyboardInterrupt):
        pack(tiny_dir("llama"), out)
    assert out.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["out.ebin"]
