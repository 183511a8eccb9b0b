"""Install the `uv` binary into a private folder, from its wheel on the Python package index, with the standard
library alone. No pip, no venv, nothing written into the system Python: it works where the system Python is
"externally managed" (PEP 668: Debian 12, Ubuntu 24.04, Homebrew) and where pip or python3-venv are missing.

    python3 scripts/get_uv.py DEST_DIR          # prints the path of the installed uv
    python3 scripts/get_uv.py --check DEST_DIR  # exit 0 if DEST_DIR/uv is already that version

The version is the one `uv.lock` locks (uv is in the environment too, and the Dockerfile's uv image carries the same
tag: tests/test_setup.py checks), so a new uv release changes nothing here until the lock moves; a copy in DEST_DIR of
that version is kept. $EFFICIENTAI_UV_VERSION overrides it ("latest": the newest release).
The index is $UV_INDEX_URL or $PIP_INDEX_URL when set (a mirror), else https://pypi.org/simple. The wheel's
SHA-256 is checked against the index's before anything is unpacked.
"""
from __future__ import annotations
import hashlib, io, json, os, platform, re, stat, sys, urllib.request, zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INDEX = (os.environ.get("UV_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")


def platform_tags() -> list[str]:
    "Wheel platform tags that run here, best first."
    m = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)
    if sys.platform == "darwin":
        return ["macosx_11_0_arm64" if m == "arm64" else "macosx_10_12_x86_64", "universal2"]
    if sys.platform.startswith("linux"):
        libc = "musllinux" if "musl" in (platform.libc_ver()[0] or "").lower() else "manylinux"
        return [f"{libc}_2_17_{arch}", f"{libc}2014_{arch}", f"{libc}_2_28_{arch}", f"{libc}_1_2_{arch}"]
    raise SystemExit(f"get_uv: no uv wheel for {sys.platform}; install uv yourself: https://docs.astral.sh/uv/")


def _version(filename: str) -> tuple[int, ...] | None:
    m = re.match(r"uv-(\d+(?:\.\d+)*)-", filename)   # final releases only (no a/b/rc/dev)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def locked_version(lock: Path = ROOT / "uv.lock") -> str | None:
    "The uv version `lock` pins (its `uv` package), or None."
    m = re.search(r'^name = "uv"\nversion = "([^"]+)"', lock.read_text(), re.M) if lock.is_file() else None
    return m.group(1) if m else None


def wanted_version() -> str | None:
    "The uv version to install: $EFFICIENTAI_UV_VERSION, else the lock's; None for the newest."
    v = os.environ.get("EFFICIENTAI_UV_VERSION", "").strip() or locked_version()
    return None if v in (None, "latest") else v


def pick_wheel(files: list[dict], tags: list[str], version: str | None = None) -> dict:
    "The non-yanked uv wheel of `version` (None: the newest) whose platform tag runs here."
    best = None
    for f in files:
        name, v = f["filename"], _version(f["filename"])
        if not name.endswith(".whl") or v is None or f.get("yanked"): continue
        if version is not None and v != tuple(int(x) for x in version.split(".")): continue
        rank = next((i for i, t in enumerate(tags) if t in name), None)
        if rank is None: continue
        if best is None or (v, -rank) > (best[0], -best[1]): best = (v, rank, f)
    if best is None: raise SystemExit(f"get_uv: no uv {version or ''} wheel for {tags[0]} on {INDEX}".replace("  ", " "))
    return best[2]


def installed_version(uv: Path) -> str | None:
    "The version `uv --version` reports, or None."
    import subprocess
    try: out = subprocess.run([str(uv), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError): return None
    m = re.match(r"uv (\d+(?:\.\d+)*)", out)
    return m.group(1) if m else None


def current(uv: Path, version: str | None) -> bool:
    "Whether `uv` is already `version` (never, when the newest is wanted: `version` None)."
    return version is not None and installed_version(uv) == version


def main(dest: str) -> Path:
    version, out = wanted_version(), Path(dest).expanduser()
    if current(out / "uv", version): return out / "uv"
    req = urllib.request.Request(f"{INDEX}/uv/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r: files = json.load(r)["files"]
    wheel = pick_wheel(files, platform_tags(), version)
    print(f"get_uv: downloading {wheel['filename']} from {INDEX}", file=sys.stderr)
    with urllib.request.urlopen(wheel["url"], timeout=300) as r: data = r.read()
    want = wheel.get("hashes", {}).get("sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise SystemExit(f"get_uv: {wheel['filename']}: SHA-256 mismatch, not installed")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        member = next(n for n in z.namelist() if re.search(r"\.data/scripts/uv$", n))
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".uv.part"
        tmp.write_bytes(z.read(member))
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(tmp, out / "uv")
    return out / "uv"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(0 if current(Path(sys.argv[2]).expanduser() / "uv", wanted_version()) else 1)
    if len(sys.argv) != 2: raise SystemExit(__doc__)
    print(main(sys.argv[1]))
