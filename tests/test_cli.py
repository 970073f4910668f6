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


@pytest.mark.parametrize("flag, value, valid", [
    ("--temp", "-1", "a number >= 0"),
    ("--temp", "nan", "a number >= 0"),
    ("--top-p", "2", "(0, 1]"),
    ("--top-p", "0", "(0, 1]"),
    ("--top-k", "-3", "[0, 2147483647]"),
    ("--min-p", "1.5", "[0, 1]"),
    ("--min-p", "-0.1", "[0, 1]"),
    ("--repeat-penalty", "0", "> 0"),
    ("--repeat-penalty", "-1", "> 0"),
    ("-s", "-1", "[0, 2**64 - 1]"),
])
def test_out_of_range_sampling_flags_name_the_range(tiny_ebin, flag, value, valid):
    """Refused by click before the model loads, with the range sampling.check_sampling (the
    server's check too) states."""
    for command in ("generate", "chat"):
        args = ["-p", "x"] if command == "generate" else []
        r = edgerun(command, tiny_ebin, *args, flag, value, stdin="")
        assert r.returncode == 2, r.stderr
        assert valid in r.stderr and flag in r.stderr and "Traceback" not in r.stderr


def test_machine_warnings_for_ram_and_threads(tiny_ebin):
    r = edgerun("generate", tiny_ebin, "-p", "x", "-n", "2", "--temp", "0", "--ram", "100TB", "-t", "4096")
    assert r.returncode == 0, r.stderr
    assert "--ram 100TB is more than this machine's physical memory" in r.stderr
    assert "-t 4096 is more than the" in r.stderr


@pytest.mark.parametrize("change, key", [
    (lambda c: c.pop("hidden_size"), "'hidden_size' is missing"),
    (lambda c: c.update(hidden_size="64"), "'hidden_size' must be an integer in 1..131072, got '64'"),
    (lambda c: c.update(num_hidden_layers=-2), "'num_hidden_layers' must be an integer in 1.."),
    (lambda c: c.update(rms_norm_eps="small"), "'rms_norm_eps' must be a number in (0, 1], got 'small'"),
    (lambda c: c.update(tie_word_embeddings="false"), "'tie_word_embeddings' must be true or false"),
    (lambda c: c.update(rope_scaling={"rope_type": "linear"}), "'rope_scaling.factor' is missing"),
    (lambda c: c.update(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (lambda c: c.update(architectures=7), "'architectures' must be a list of names"),
    (None, "expected a JSON object, got a list"),
])
def test_pack_bad_config_names_the_key(tiny_dir, tmp_path, change, key):
    import shutil
    src = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    if change is None:
        cfg = [cfg]
    else:
        change(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    r = edgerun("pack", src, "-o", tmp_path / "out.ebin")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert key in lines[-1] and "config.json" in lines[-1] and lines[-1].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.glob("*.ebin*"))


def test_pack_checks_the_output_before_reading(tiny_dir, tmp_path, monkeypatch):
    """A missing or unwritable output directory fails before the source is opened."""
    from edgerun.convert import pack as pack_module
    from edgerun.errors import EdgerunError

    def never(path):
        raise AssertionError("the source was opened")

    monkeypatch.setattr(pack_module, "open_source", never)
    with pytest.raises(EdgerunError, match="does not exist"):
        pack_module.pack(tiny_dir("llama"), tmp_path / "missing" / "out.ebin")
    with pytest.raises(EdgerunError, match="is a directory"):
        pack_module.pack(tiny_dir("llama"), tmp_path)
    if os.geteuid() != 0:                         # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(EdgerunError, match="not writable"):
            pack_module.pack(tiny_dir("llama"), ro / "out.ebin")


def test_stale_tmp_is_replaced(tiny_dir, tmp_path):
    from edgerun.convert.pack import pack
    out = tmp_path / "out.ebin"
    stale = tmp_path / "out.ebin.tmp"
    stale.write_bytes(b"left by a killed pack")
    stale.chmod(0o444)
    pack(tiny_dir("llama"), out)
    assert out.exists() and not stale.exists()
    target = tmp_path / "victim"                 # a stale symlink is removed, not written through
    target.write_bytes(b"keep")
    stale.symlink_to(target)
    pack(tiny_dir("llama"), out)
    assert target.read_bytes() == b"keep" and not stale.exists() and not stale.is_symlink()


PACK_AND_WAIT = """
import signal, sys, threading, time
from edgerun.convert import hf
from edgerun.convert.pack import pack
real_read = hf.HFSource.read
def slow_read(self, name):            # a pack that takes a while: each tensor waits a little
    time.sleep(0.05)
    return real_read(self, name)
hf.HFSource.read = slow_read
before = signal.getsignal(signal.SIGTERM)
try:
    pack(sys.argv[1], sys.argv[2])
finally:
    assert signal.getsignal(signal.SIGTERM) is before     # the previous handler is back
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_pack_killed_by_signal_leaves_no_tmp(tiny_dir, tmp_path, signame):
    """A real signal to a real pack: once its .tmp exists, the signal removes it and the pack
    exits 128 + signal. Synchronized by polling for the file, not by sleeping a guessed time."""
    import signal
    import time
    out = tmp_path / "out.ebin"
    tmp = tmp_path / "out.ebin.tmp"
    script = tmp_path / "pack_and_wait.py"
    script.write_text(PACK_AND_WAIT)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_dir("llama")), str(out)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not tmp.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the pack never created its .tmp"
        time.sleep(0.01)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and f"interrupted by {signame}" in err, err
    assert not tmp.exists() and not out.exists()
    assert list(tmp_path.iterdir()) == [script]


def test_cli_pack_signal_exit_code(tiny_dir, tmp_path):
    """`edgerun pack` itself: SIGTERM -> "interrupted by SIGTERM", exit 143, no .tmp."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "-c", CLI_SLOW_PACK, str(tiny_dir("llama")), str(tmp_path / "o.ebin")],
                            stderr=subprocess.PIPE, text=True)
    tmp = tmp_path / "o.ebin.tmp"
    deadline = time.monotonic() + 120
    while not tmp.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert not tmp.exists()


CLI_SLOW_PACK = """
import sys, time                      # `edgerun pack` with each tensor read 50 ms late
from edgerun.convert import hf
real_read = hf.HFSource.read
hf.HFSource.read = lambda self, name: (time.sleep(0.05), real_read(self, name))[1]
from edgerun.cli import run
sys.argv = ["edgerun", "pack", sys.argv[1], "-o", sys.argv[2]]
run()
"""


def test_progress_in_logs_has_eta_and_does_not_flood():
    """stderr not a terminal (a log, a pipe): one line per milestone with elapsed time and ETA,
    not one per call, and always the last one."""
    import io

    from edgerun.cli import progress_bar
    now = [0.0]
    log = io.StringIO()
    update = progress_bar("compressing layers", unit="layers", file=log, clock=lambda: now[0])
    update(0, 100)
    for i in range(1, 101):                  # 100 steps of 2 s: lines at 10% steps only
        now[0] += 2.0
        update(i, 100)
    lines = log.getvalue().splitlines()
    assert 9 <= len(lines) <= 12, lines
    assert lines[0] == "compressing layers: 0/100 layers (0%), 0s elapsed"
    assert lines[1] == "compressing layers: 10/100 layers (10%), 20s elapsed, ETA 3m00s"
    assert lines[-1] == "compressing layers: 100/100 layers (100%), 3m20s elapsed"
    log = io.StringIO()
    update = progress_bar("calibrating", unit="layers", file=log, clock=lambda: now[0])
    update(0, 4)
    for i in range(1, 5):                    # slow steps (a minute each): every one shows
        now[0] += 60
        update(i, 4)
    assert [ln.split(":")[1].split("(")[0].strip() for ln in log.getvalue().splitlines()] == \
        ["0/4 layers", "1/4 layers", "2/4 layers", "3/4 layers", "4/4 layers"]
    assert "ETA 3m00s" in log.getvalue().splitlines()[1]
