"""Deterministic fuzzing of the files the toolkit reads (used by test_fuzz.py).

A *format* is a seed folder (the toolkit's own files: zoo entries, `data/` fixtures, what its writers write), the files
in it to damage, and a reader. `cases` makes damaged copies: truncations, bit flips, byte overwrites and, for JSON,
JSON lines, YAML and TOML files, structural damage (a key removed, a value of the wrong type). A case passes when the
reader either loads it or raises a `ToolkitError`, and leaves no file behind. Readers that hand the file to native code
(MLX, numpy, Pillow, tokenizers) run in a long-lived worker process per format, so a crash fails one case instead of
the test run.

Sizes: `EFFICIENTAI_FUZZ_CASES` cases per format (default 40); `EFFICIENTAI_FUZZ=long` makes the default 1,000.
"""
from __future__ import annotations
import copy, json, os, resource, select, shutil, subprocess, sys, textwrap, traceback
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
LONG = os.environ.get("EFFICIENTAI_FUZZ", "").lower() == "long"
CASES = int(os.environ.get("EFFICIENTAI_FUZZ_CASES") or (1000 if LONG else 40))
CASE_TIMEOUT_S = 60          # a reader stuck this long on one case is a failure (and its worker is restarted)
WORKER_MEMORY = 8 << 30      # address space of a worker: a header asking for terabytes fails there, not the machine


# ---------------------------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------------------------
WRONG_VALUES = [None, True, False, 0, -1, 2**64, 1.5, -1e308, "", "x", "-1", [], [1, "a"], {}, {"a": 1}]


def _offset(rng: np.random.Generator, n: int) -> int:
    "A position in `n` bytes, half of the time in the first KiB (headers hold the lengths and offsets readers trust)."
    if n <= 1: return 0
    return int(rng.integers(0, min(n, 1024))) if rng.random() < 0.5 else int(rng.integers(0, n))


def truncations(n: int, count: int, rng: np.random.Generator) -> list[int]:
    "`count` distinct lengths to cut an `n`-byte file to: the first bytes, spread over the file, and random ones."
    fixed = [0, 1, 2, 3, 4, 7, 8, 9, 16, 24, 32, 64, n // 2, n - 2, n - 1]
    spread = np.linspace(0, n - 1, num=max(count, 2)).astype(int).tolist()
    extra = rng.integers(0, max(n, 1), size=count).tolist()
    out = []
    for k in [*fixed, *spread, *extra]:
        if 0 <= k < n and k not in out: out.append(int(k))
    order = rng.permutation(len(out))
    return sorted(out[i] for i in order[:count])


def flip_bits(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    b = bytearray(data)
    where = []
    for _ in range(int(rng.integers(1, 4))):
        i, bit = _offset(rng, len(b)), int(rng.integers(0, 8))
        b[i] ^= 1 << bit; where.append(f"{i}.{bit}")
    return "bit flip at " + ",".join(where), bytes(b)


SPECIAL = [b"\xff" * 8, b"\x00" * 8, b"\x7f\xff\xff\xff\xff\xff\xff\xff", b"\x80", b"\xc3\x28", b"999999999999",
           b"-1", b'"', b"{", b"]", b"\n", b"\t", b"NaN", b"\xef\xbb\xbf"]


def overwrite(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    i = _offset(rng, len(data))
    new = SPECIAL[int(rng.integers(len(SPECIAL)))] if rng.random() < 0.5 else \
        rng.integers(0, 256, size=int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
    return f"{len(new)} bytes overwritten at {i}", data[:i] + new + data[i + len(new):]


def _paths(obj, prefix=()) -> list[tuple]:
    "Every path (tuple of keys / indices) to a value inside nested dicts and lists."
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append((*prefix, k)); out.extend(_paths(v, (*prefix, k)))
    return out


def damage_tree(obj, rng: np.random.Generator) -> tuple[str, Any]:
    "A copy of JSON-like `obj` with one key removed or renamed, or one value replaced by a value of another type."
    obj = copy.deepcopy(obj)
    paths = _paths(obj)
    if not paths or rng.random() < 0.03:
        v = WRONG_VALUES[int(rng.integers(len(WRONG_VALUES)))]
        return f"whole document replaced by {v!r}", v
    path = paths[int(rng.integers(len(paths)))]
    parent = obj
    for k in path[:-1]: parent = parent[k]
    key, op = path[-1], rng.random()
    shown = "/".join(map(str, path))
    if op < 0.3:
        del parent[key]; return f"{shown} removed", obj
    if op < 0.4 and isinstance(parent, dict):
        parent[f"{key}_"] = parent.pop(key); return f"{shown} renamed", obj
    if op < 0.45 and isinstance(parent, dict):      # a dotted twin: 'a' and 'a.b' (dotted keys nest in configs)
        parent[f"{key}.x"] = 1; return f"{shown}.x added", obj
    v = WRONG_VALUES[int(rng.integers(len(WRONG_VALUES)))]
    parent[key] = copy.deepcopy(v)
    return f"{shown} = {v!r}", obj


def _dump(obj, suffix: str) -> bytes:
    if suffix in (".yaml", ".yml"):
        import yaml
        return yaml.safe_dump(obj, sort_keys=False).encode()
    if suffix == ".toml":
        import tomli_w
        if not isinstance(obj, dict): return json.dumps(obj).encode()      # not TOML at all: fine as damage
        return tomli_w.dumps(_toml_safe(obj)).encode()
    return json.dumps(obj).encode()


def _toml_safe(obj):
    "TOML has no null: write None as the string 'null' (still a wrong type for the reader)."
    if obj is None: return "null"
    if isinstance(obj, dict): return {str(k): _toml_safe(v) for k, v in obj.items()}
    if isinstance(obj, list): return [_toml_safe(v) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool) and abs(obj) >= 2**63: return float(obj)
    return obj


def _parse(data: bytes, suffix: str):
    if suffix in (".yaml", ".yml"):
        import yaml
        return yaml.safe_load(data)
    if suffix == ".toml":
        import tomllib
        return tomllib.loads(data.decode())
    return json.loads(data)


def structural(data: bytes, suffix: str, rng: np.random.Generator) -> tuple[str, bytes] | None:
    "Damage to the structure of a JSON, JSON-lines, YAML or TOML file; None for other files."
    if suffix == ".jsonl":
        lines = data.splitlines()
        live = [i for i, l in enumerate(lines) if l.strip()]
        if not live: return None
        i = live[int(rng.integers(len(live)))]
        what, obj = damage_tree(json.loads(lines[i]), rng)
        lines[i] = json.dumps(obj).encode()
        return f"line {i + 1}: {what}", b"\n".join(lines) + b"\n"
    if suffix in (".json", ".yaml", ".yml", ".toml"):
        what, obj = damage_tree(_parse(data, suffix), rng)
        return what, _dump(obj, suffix)
    if suffix in (".ini", ".cfg", ".tsv"):
        lines = data.splitlines()
        i = int(rng.integers(len(lines)))
        if rng.random() < 0.4: del lines[i]; return f"line {i + 1} removed", b"\n".join(lines)
        sep = b"\t" if suffix == ".tsv" else b"="
        head = lines[i].split(sep, 1)[0]
        v = json.dumps(WRONG_VALUES[int(rng.integers(len(WRONG_VALUES)))]).encode()
        lines[i] = head + sep + v
        return f"line {i + 1} value = {v.decode()}", b"\n".join(lines) + b"\n"
    return None


@dataclass
class Case:
    label: str          # what was done, to which file: enough to reproduce it by hand
    file: str           # relative path inside the seed folder
    data: bytes         # the file's new content


def cases(seed: Path, targets: list[str], count: int, rng: np.random.Generator, mutate: Callable | None = None
          ) -> list[Case]:
    "`count` damaged variants of the `targets` files of folder `seed`, a quarter of them truncations."
    files = {t: (seed / t).read_bytes() for t in targets}
    out: list[Case] = []
    n_cut = max(1, count // 4)
    for k in range(n_cut):                              # truncations, spread over the targets
        t = targets[k % len(targets)]
        cuts = truncations(len(files[t]), -(-n_cut // len(targets)), np.random.default_rng((k, 1)))
        cut = cuts[(k // len(targets)) % len(cuts)] if cuts else 0
        out.append(Case(f"{t} truncated to {cut} of {len(files[t])} bytes", t, files[t][:cut]))
    while len(out) < count:
        t = targets[int(rng.integers(len(targets)))]
        data, op = files[t], rng.random()
        made = None
        if op < 0.4: made = mutate(seed / t, rng) if mutate else structural(data, Path(t).suffix.lower(), rng)
        if made is None: made = flip_bits(data, rng) if op < 0.7 else overwrite(data, rng)
        what, new = made
        if new != data: out.append(Case(f"{t}: {what}", t, new))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Outcomes and runners
# ---------------------------------------------------------------------------------------------------------------
def outcome_of(reader: Callable[[Path], Any], folder: Path, allow: tuple = ()) -> tuple[str, str]:
    "('ok' | 'toolkit' | 'other', detail) of `reader(folder)`."
    from efficientai.errors import ToolkitError
    try: reader(folder)
    except ToolkitError as e: return "toolkit", f"{type(e).__name__}: {str(e)[:300]}"
    except allow as e: return "toolkit", f"{type(e).__name__} (allowed): {str(e)[:300]}"
    except BaseException as e:  # noqa: B036 - what the suite looks for: anything else, SystemExit included
        if isinstance(e, KeyboardInterrupt): raise
        tb = traceback.format_exc()
        return "other", f"{type(e).__name__}: {str(e)[:300]}\n{textwrap.indent(tb, '    ')}"
    return "ok", ""


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


class Worker:
    "A process that runs one format's reader on folder after folder; restarted when it dies or hangs."
    def __init__(self, fmt: str, log: Path):
        self.fmt, self.log, self.proc, self.starts = fmt, log, None, 0

    def _start(self):
        self.starts += 1
        here = str(Path(__file__).parent)
        code = f"import sys; sys.path.insert(0, {here!r}); import fuzzing; fuzzing.serve({self.fmt!r})"
        env = {**os.environ, "PYTHONFAULTHANDLER": "1", "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "ab"), cwd=ROOT, env=env)

    def run(self, folder: Path) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None: self._start()
        self.proc.stdin.write((str(folder) + "\n").encode()); self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], CASE_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else b""
        if line: return tuple(json.loads(line))
        hung = not ready
        if hung: self.proc.kill()
        code = self.proc.wait()
        tail = self.log.read_bytes()[-1500:].decode(errors="replace")
        self.proc = None
        why = f"hung for {CASE_TIMEOUT_S} s" if hung else f"the worker process died (exit status {code})"
        return "crash", f"{why}; its stderr ends:\n{textwrap.indent(tail, '    ')}"

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try: self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()


def serve(fmt: str) -> None:
    "The worker's loop: read a folder per line on stdin, answer one JSON line on the real stdout."
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                   # whatever the reader prints goes to the log, not the protocol
    f = FORMATS[fmt]
    for line in sys.stdin:
        out.write(json.dumps(outcome_of(f.reader, Path(line.strip()), f.allow)) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Formats: seeds and readers
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Format:
    name: str
    seed: Callable[[Path], None] | None   # writes the seed files into an empty folder
    targets: list[str]                    # the files to damage
    reader: Callable[[Path], Any]         # reads the folder as the toolkit does
    native: bool = False                  # hands bytes to native code: run in a worker process
    allow: tuple = ()                     # further exceptions that are this reader's documented answer
    needs: str | None = None              # a module that must exist (a reader not written yet: skipped)
    mutate: Callable | None = None        # structural damage of a binary file: (path, rng) -> (label, bytes)


FORMATS: dict[str, Format] = {}


def fmt(name: str, targets: list[str], *, native: bool = False, allow: tuple = (), needs: str | None = None,
        mutate: Callable | None = None):
    "Register reader `f(folder)` for format `name`; its seed writer is `f.seed`."
    def deco(reader):
        FORMATS[name] = Format(name, None, targets, reader, native, allow, needs, mutate)
        def attach(seed):
            FORMATS[name].seed = seed; return seed
        reader.seed = attach
        return reader
    return deco


def _copy(src: Path, dest: Path, *names: str) -> None:
    for n in names: shutil.copyfile(src / n, dest / n)


# --- runtime settings: settings.ini and the same profiles as YAML, TOML and JSON -----------------------------------
def _read_settings(path: Path):
    from efficientai.config import ConfigManager
    cm = ConfigManager(path, env={}).validate()
    for p in cm.profiles: ConfigManager(path, profile=p, env={}).validate()


def _settings_tree() -> dict:
    from efficientai.config import read_config_file
    raw = read_config_file(ROOT / "settings.ini")
    return {**raw["base"], "profiles": raw["profiles"]}


for _suffix in ("ini", "yaml", "toml", "json"):
    def _seed(folder: Path, suffix=_suffix):
        if suffix == "ini": shutil.copyfile(ROOT / "settings.ini", folder / "settings.ini")
        else: (folder / f"settings.{suffix}").write_bytes(_dump(_settings_tree(), f".{suffix}"))
    def _reader(folder: Path, suffix=_suffix): _read_settings(folder / f"settings.{suffix}")
    fmt(f"settings-{_suffix}", [f"settings.{_suffix}"])(_reader).seed(_seed)


# --- run configs: the CLI's -c FILE (data/configs) and the LoRA chapter's YAML ------------------------------------
RUN_CONFIGS = {"quant.yaml": ["quant", "run", "smollm2-135m-instruct"], "compress.yaml": ["compress", "run", "digits"],
               "clip.yaml": ["clip", "train"], "diffusion.yaml": ["diffusion", "train"]}


@cache
def _parser():
    from efficientai.cli import build_parser
    return build_parser()


@fmt("run-config-yaml", list(RUN_CONFIGS), allow=(SystemExit,))
def run_configs(folder: Path):
    # argparse's own answer to a missing required option is `SystemExit(2)` with a usage message: allowed
    from efficientai.cli import parse_args
    import contextlib, io
    for name, argv in RUN_CONFIGS.items():
        with contextlib.redirect_stderr(io.StringIO()): parse_args(_parser(), [*argv, "-c", str(folder / name)])


@run_configs.seed
def _(folder: Path): _copy(DATA / "configs", folder, *RUN_CONFIGS)


@fmt("lora-config-yaml", ["lora.yaml"])
def lora_config(folder: Path):
    from efficientai.lora.config import load_config
    load_config(folder / "lora.yaml")


@lora_config.seed
def _(folder: Path): _copy(DATA / "configs", folder, "lora.yaml")


# --- jsonl: the LoRA chapter's three data formats, the toolkit's own logs --------------------------------------
@cache
def _tiny_lm() -> Path:
    "A small mlx-lm llama folder written by the zoo's `save_tiny_lm` (cached for the session)."
    import tempfile
    from efficientai.zoo.tiny import build_tiny_lm, save_tiny_lm, tiny_tokenizer
    import atexit
    tmp = Path(tempfile.mkdtemp(prefix="efficientai-fuzz-"))
    atexit.register(shutil.rmtree, tmp, True)
    folder = tmp / "tiny-lm"
    return save_tiny_lm(build_tiny_lm(_tiny_config()), folder, tiny_tokenizer(320))


def _tiny_config():
    from efficientai.zoo.tiny import TinyLMConfig
    return TinyLMConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128)


@cache
def _tokenizer():
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    return load_tokenizer(_tiny_lm())


LORA_SPLITS = [f"{kind}.jsonl" for kind in ("chat", "completions", "text")]


@fmt("lora-jsonl", LORA_SPLITS)
def lora_jsonl(folder: Path):
    from efficientai.lora.data import load_jsonl
    for name in LORA_SPLITS: load_jsonl(folder / name, _tokenizer(), max_seq_length=512, progress=False)


@lora_jsonl.seed
def _(folder: Path):
    for name in LORA_SPLITS: shutil.copyfile(DATA / "instruct" / name[:-6] / "valid.jsonl", folder / name)


@fmt("history-jsonl", ["history.jsonl"])
def history_jsonl(folder: Path):
    from efficientai.io import read_jsonl
    read_jsonl(folder / "history.jsonl")


@history_jsonl.seed
def _(folder: Path):
    from efficientai.io import append_jsonl
    for i in range(4): append_jsonl(folder / "history.jsonl", {"name": "matmul", "median_s": 0.01 * i, "ok": True})


@fmt("lora-adapters", ["adapter_config.json", "adapters.safetensors"], native=True)
def lora_adapters(folder: Path):
    from efficientai.lora.adapters import load_adapters
    from efficientai.zoo.tiny import build_tiny_lm
    load_adapters(build_tiny_lm(_tiny_config()), folder)


@lora_adapters.seed
def _lora_adapters_seed(folder: Path):
    from efficientai.lora.adapters import prepare_model, save_adapters
    from efficientai.lora.config import config_from_dict
    from efficientai.zoo.tiny import build_tiny_lm
    cfg = config_from_dict({"num_layers": 1, "lora_parameters": {"rank": 4}, "fine_tune_type": "lora"})
    save_adapters(prepare_model(build_tiny_lm(_tiny_config()), cfg), cfg, folder)


@fmt("served-adapter", ["adapter_config.json", "adapters.safetensors"], native=True)
def served_adapter(folder: Path):
    from efficientai.deploy.adapters import read_adapter
    read_adapter(folder, "fuzz")


@served_adapter.seed
def _(folder: Path): _lora_adapters_seed(folder)


# --- model configs the zoo's own loaders read ------------------------------------------------------------------
@fmt("efficientnet-config", ["config.json"])
def efficientnet_config(folder: Path):
    from efficientai.zoo.efficientnet import EfficientNetConfig
    EfficientNetConfig.from_file(folder / "config.json")


@efficientnet_config.seed
def _(folder: Path):
    from efficientai.zoo.efficientnet import EfficientNetConfig
    (folder / "config.json").write_text(json.dumps(EfficientNetConfig().to_dict(), indent=2))


MINILM_CONFIG = {  # all-MiniLM-L6-v2's config.json, as the zoo's `all-minilm-l6-v2` entry has it
    "_name_or_path": "nreimers/MiniLM-L6-H384-uncased", "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 384, "initializer_range": 0.02, "intermediate_size": 1536,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 6, "pad_token_id": 0, "position_embedding_type": "absolute", "transformers_version": "4.8.2",
    "type_vocab_size": 2, "use_cache": True, "vocab_size": 30522}


@fmt("bert-config", ["config.json"])
def bert_config(folder: Path):
    from efficientai.zoo.minilm import BertConfig
    BertConfig.from_file(folder / "config.json")


@bert_config.seed
def _(folder: Path): (folder / "config.json").write_text(json.dumps(MINILM_CONFIG, indent=2))


@fmt("clip-config", ["config.json"])
def clip_config(folder: Path):
    from efficientai.clip.model import read_clip_config
    read_clip_config(folder)


@clip_config.seed
def _(folder: Path):
    "config.json as `save_clip` writes it (the towers' sources recorded)."
    from dataclasses import asdict
    from efficientai.clip.model import CLIPConfig
    sources = {"image": {"folder": "efficientnet-lite0", "sha256": "ab" * 32},
               "text": {"folder": "all-minilm-l6-v2", "sha256": "cd" * 32}}
    (folder / "config.json").write_text(json.dumps({"format": "efficientai-clip/1", "clip": asdict(CLIPConfig()),
                                                    "sources": sources}, indent=1))


# --- images and arrays: PNG caption folders, the zoo's npz datasets and caption sets -------------------------------
CAPTION_FILES = ["captions.jsonl", "apple.png", "banana.png", "rocket.png"]


@fmt("caption-folder", CAPTION_FILES, native=True)
def caption_folder(folder: Path):
    from efficientai.zoo.captions import load_caption_folder
    load_caption_folder(folder, size=16)


@caption_folder.seed
def _(folder: Path): _copy(DATA / "captions", folder, *sorted(p.name for p in (DATA / "captions").iterdir()))


@fmt("caption-tsv", ["captions.tsv", "banana.png"], native=True)
def caption_tsv(folder: Path):
    from efficientai.zoo.captions import load_caption_folder
    load_caption_folder(folder, size=16)


@caption_tsv.seed
def _(folder: Path):
    rows = ["image\tcaption\tkeywords"]
    for line in (DATA / "captions" / "captions.jsonl").read_text().splitlines()[:4]:
        r = json.loads(line)
        rows.append(f"{r['image']}\t{r['caption']}\t{'|'.join(r.get('keywords', []))}")
        shutil.copyfile(DATA / "captions" / r["image"], folder / r["image"])
    (folder / "captions.tsv").write_text("\n".join(rows) + "\n")


@fmt("image-folder", ["apple.png", "rocket.png", "turtle.png"], native=True)
def image_folder(folder: Path):
    "`efficientai clip` reads a folder of images to embed or classify."
    from efficientai.clip.cli import read_images
    read_images(folder, 16)


@image_folder.seed
def _(folder: Path): _copy(DATA / "captions", folder, "apple.png", "rocket.png", "turtle.png")


@fmt("image-dataset-npz", ["train.npz", "test.npz", "meta.json"], native=True)
def image_dataset(folder: Path):
    from efficientai.zoo.images import load_dataset
    load_dataset(folder)


@image_dataset.seed
def _(folder: Path):
    from efficientai.zoo.catalog import fetch
    _copy(fetch("digits"), folder, "train.npz", "test.npz", "meta.json")     # the zoo's own files (0.1 MB)


@fmt("caption-set-npz", ["images.npz", "captions.json"], native=True)
def caption_set(folder: Path):
    from efficientai.zoo.captions import load_captions
    load_captions(folder)


@caption_set.seed
def _(folder: Path):
    from efficientai.zoo.captions import load_caption_folder, save_captions
    save_captions(load_caption_folder(DATA / "captions", size=8), folder)


# --- checkpoints (efficientai.checkpoint) -----------------------------------------------------------------------
def _checkpoint_parts():
    import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
    from efficientai.checkpoint import fingerprint
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    opt = optim.Adam(learning_rate=1e-3)
    return model, opt, fingerprint(model, lr=1e-3, batch_size=4)


@fmt("checkpoint", ["state.json", "weights.safetensors", "optimizer.safetensors", "ema.safetensors"], native=True)
def checkpoint(folder: Path):
    from efficientai.checkpoint import load_arrays, load_checkpoint
    model, opt, fp = _checkpoint_parts()
    load_checkpoint(folder, model, opt, fp)
    load_arrays(folder, "ema")


@checkpoint.seed
def _(folder: Path):
    import mlx.core as mx, mlx.nn as nn
    from efficientai.checkpoint import save_checkpoint
    model, opt, fp = _checkpoint_parts()
    loss = lambda m, x: m(x).square().mean()
    _, g = nn.value_and_grad(model, loss)(model, mx.ones((3, 8)))
    opt.update(model, g); mx.eval(model.parameters(), opt.state)
    shutil.rmtree(folder)
    save_checkpoint(folder, model, opt, fingerprint=fp, state={"step": 1, "history": [[1, 0.5]]},
                    arrays={"ema": model.parameters()}, run={"seed": 0})


# --- the runner's own check: a reader that takes its process down -------------------------------------------------
@fmt("_crash", [], native=True)
def _crash_reader(folder: Path):
    if folder.name == "boom":
        import ctypes
        ctypes.string_at(0)                         # a segmentation fault, as a native reader's bug would be


# --- model files: safetensors, GGUF, a whole mlx-lm folder (efficientai.formats checks them first) -----------------
@fmt("safetensors", ["model.safetensors"], native=True, needs="efficientai.formats")
def safetensors(folder: Path):
    from efficientai.formats import read_safetensors
    read_safetensors(folder / "model.safetensors", return_metadata=True)


@safetensors.seed
def _(folder: Path): _copy(_tiny_lm(), folder, "model.safetensors")     # the tiny LM's weights (~60 KB)


@fmt("gguf", ["model.gguf"], native=True, needs="efficientai.formats")
def gguf(folder: Path):
    from efficientai.zoo.llm import read_gguf
    read_gguf(folder / "model.gguf")


@gguf.seed
def _(folder: Path):
    import mlx.core as mx
    rng = np.random.default_rng(0)
    arrays = {"token_embd.weight": mx.array(rng.standard_normal((40, 32), dtype=np.float32)),
              "blk.0.attn_q.weight": mx.array(rng.standard_normal((32, 32), dtype=np.float32)).astype(mx.float16),
              "blk.0.attn_norm.weight": mx.ones((32,))}
    meta = {"general.architecture": "llama", "general.name": "fuzz", "llama.block_count": mx.array(1, dtype=mx.uint32),
            "llama.rope.freq_base": mx.array(10000.0), "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(40)]}
    mx.save_gguf(str(folder / "model.gguf"), arrays, meta)


MODEL_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]


@fmt("model-folder", MODEL_FILES, native=True, needs="efficientai.formats")
def model_folder(folder: Path):
    from efficientai.zoo.catalog import load_model
    load_model(folder, hub=False)


@model_folder.seed
def _(folder: Path): _copy(_tiny_lm(), folder, *MODEL_FILES)


def gguf_metadata(path: Path, rng: np.random.Generator) -> tuple[str, bytes]:
    "A GGUF written again with one metadata key removed or its value replaced by one of another type."
    import tempfile
    import mlx.core as mx
    arrays, meta = mx.load(str(path), return_metadata=True)
    key = sorted(meta)[int(rng.integers(len(meta)))]
    wrong = ["", "x", ["a", "b"], mx.array(-1, dtype=mx.int32), mx.array(2**32 - 1, dtype=mx.uint32), mx.array(0.5),
             mx.array([1, 2, 3], dtype=mx.int32), mx.array(0, dtype=mx.uint32)]
    if rng.random() < 0.3: del meta[key]; what = "removed"
    else:
        meta[key] = wrong[int(rng.integers(len(wrong)))]
        what = f"= {meta[key].tolist() if isinstance(meta[key], mx.array) else meta[key]!r}"
    with tempfile.TemporaryDirectory() as d:
        mx.save_gguf(f"{d}/x.gguf", arrays, meta)
        return f"metadata {key} {what}", Path(f"{d}/x.gguf").read_bytes()


@fmt("gguf-convert", ["model.gguf"], native=True, needs="efficientai.formats", mutate=gguf_metadata)
def gguf_convert(folder: Path):
    "The GGUF converter: a damaged file must leave no output folder behind (a converted one is removed here)."
    from efficientai.zoo.llm import convert_gguf
    out = convert_gguf(folder / "model.gguf", folder / "out")
    shutil.rmtree(out)


@gguf_convert.seed
def _(folder: Path):
    "The tiny LM as a llama GGUF laid out as llama.cpp does (q/k rows permuted, BPE vocabulary in the metadata)."
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from efficientai.zoo.llm import _BLOCK_NAMES, permute_rows
    from efficientai.zoo.tiny import build_tiny_lm
    cfg = _tiny_config()
    names = {v: k for k, v in _BLOCK_NAMES.items()}
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
    arrays = {}
    for k, v in tree_flatten(build_tiny_lm(cfg).parameters()):
        base = k.rpartition(".")[0]
        if base in top: arrays[f"{top[base]}.weight"] = v; continue
        _, _, i, rest = base.split(".", 3)
        part = names[rest]
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(part)
        arrays[f"blk.{i}.{part}.weight"] = permute_rows(v, heads) if heads else v
    tok = json.loads((_tiny_lm() / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    u32 = lambda v: mx.array(v, dtype=mx.uint32)
    meta = {"general.architecture": "llama", "general.name": "tiny", "llama.block_count": u32(cfg.num_hidden_layers),
            "llama.embedding_length": u32(cfg.hidden_size), "llama.feed_forward_length": u32(cfg.intermediate_size),
            "llama.attention.head_count": u32(cfg.num_attention_heads),
            "llama.attention.head_count_kv": u32(cfg.num_key_value_heads),
            "llama.attention.layer_norm_rms_epsilon": mx.array(cfg.rms_norm_eps),
            "llama.rope.freq_base": mx.array(cfg.rope_theta), "llama.context_length": u32(cfg.max_position_embeddings),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]],
            "tokenizer.ggml.token_type": mx.array([3 if t.startswith("<|") else 1 for t in tokens], dtype=mx.int32),
            "tokenizer.ggml.bos_token_id": u32(vocab["<|im_start|>"]),
            "tokenizer.ggml.eos_token_id": u32(vocab["<|endoftext|>"]),
            "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    mx.save_gguf(str(folder / "model.gguf"), arrays, meta)
