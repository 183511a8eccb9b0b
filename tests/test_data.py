"""data/ holds small examples people read and copy. Each file is loaded here through the toolkit's own loaders, so an
example that the code no longer accepts fails CI; a file this module does not know how to check fails too."""
import json, os, re, shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DATA = ROOT / "data"
MODEL = "smollm2-135m-instruct"            # the model the README's commands name
FORMATS = ("chat", "completions", "text")  # mlx-lm's jsonl formats, one folder each under data/instruct/
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def tokenizer():
    "The zoo model's tokenizer alone (no weights): what the LoRA chapter encodes the data with."
    from mlx_lm.utils import load_tokenizer
    from efficientai.zoo.catalog import model_path
    return load_tokenizer(model_path(MODEL))


@pytest.fixture(scope="module")
def parser():
    from efficientai.cli import build_parser
    return build_parser()


def _assert_commented(path: Path) -> None:
    "Every key of an example config says what it does, on its own line."
    bare = [line for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#") and "#" not in line]
    assert not bare, f"{path}: keys without a comment: {bare}"


def check_readme(path: Path, tok, parser, tmp: Path) -> None:
    text = path.read_text()
    for must in ("~/.cache/efficientai", "$EFFICIENTAI_CACHE", "efficientai zoo list", "tests/test_data.py"):
        assert must in text, f"{path} should mention {must!r}"
    for sub in sorted(p.name for p in DATA.iterdir() if p.is_dir()):
        assert f"`{sub}/" in text, f"{path} does not describe data/{sub}/"
    # the snippet that writes the instruction samples reproduces them byte for byte (else they are stale)
    snippet = re.search(r"```python\n(.*?)```", text, re.S)
    assert snippet, f"{path}: no python block regenerating data/instruct"
    cwd = os.getcwd()
    try: os.chdir(tmp); exec(snippet[1], {})
    finally: os.chdir(cwd)
    made = sorted(p.relative_to(tmp).as_posix() for p in (tmp / "data").rglob("*.jsonl"))
    kept = sorted(p.relative_to(ROOT).as_posix() for p in (DATA / "instruct").rglob("*.jsonl"))
    assert made == kept, (made, kept)
    stale = [f for f in kept if (tmp / f).read_bytes() != (ROOT / f).read_bytes()]
    assert not stale, f"stale samples, rerun the snippet in {path}: {stale}"


def check_lora(path: Path, tok, parser, tmp: Path) -> None:
    from mlx_lm.lora import CONFIG_DEFAULTS
    from efficientai.lora.config import load_config
    from efficientai.lora.data import load_folder
    from efficientai.zoo.catalog import entry
    _assert_commented(path)
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(CONFIG_DEFAULTS), f"not mlx_lm.lora keys: {set(raw) - set(CONFIG_DEFAULTS)}"
    assert set(raw["lora_parameters"]) <= {"rank", "scale", "dropout", "keys"}
    assert entry(cfg.model).kind == "model" and cfg.model == MODEL
    assert cfg.train and cfg.iters <= 50, "an example that trains in a minute or two"
    assert Path(cfg.adapter_path).parts[0] == "runs", "outputs go to the git-ignored runs/"
    folder = (ROOT / cfg.data).resolve()
    assert folder.is_relative_to(DATA / "instruct"), f"data: {cfg.data} should be a sample in data/instruct"
    data = load_folder(folder, tok, mask_prompt=cfg.mask_prompt, max_seq_length=cfg.max_seq_length, progress=False)
    assert set(data) == set(SPLITS)
    assert all(r.truncated == 0 and r.n_loss_tokens > 0 for _, r in data.values())
    assert load_config(path, iters=2).iters == 2  # what `--iters 2` does


def _check_run_config(path: Path, parser, command: str):
    "Parse `efficientai COMMAND run MODEL -c path`; every value in the file arrives, converted as a flag would be."
    from efficientai.cli import parse_args
    _assert_commented(path)
    args = parse_args(parser, [command, "run", MODEL, "-c", str(path)])
    assert (args.model, args.run_config) == (MODEL, path)
    for key, value in yaml.safe_load(path.read_text()).items():
        if value is not None: assert str(getattr(args, key.replace("-", "_"))) == str(value), key
    assert isinstance(args.out, Path) and args.out.parts[0] == "runs", "outputs go to the git-ignored runs/"
    return args


def check_quant(path: Path, tok, parser, tmp: Path) -> None:
    from efficientai.quant.ptq import parse_spec
    args = _check_run_config(path, parser, "quant")
    parse_spec(args.spec)
    assert args.method != "mixed" or args.bpw is not None


def check_compress(path: Path, tok, parser, tmp: Path) -> None:
    from efficientai.compress.pipeline import parse_pipeline
    args = _check_run_config(path, parser, "compress")
    assert len(parse_pipeline(args.pipeline)) >= 2


def check_instruct(path: Path, tok, parser, tmp: Path) -> None:
    "A sample of one mlx-lm format: detected as that format, every record giving tokens the loss sees."
    from efficientai.lora.data import load_jsonl, record_format
    fmt = path.parent.name
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines, f"{path} is empty"
    found = {record_format(json.loads(l), file=path, line=i) for i, l in enumerate(lines, 1)}
    assert found == {fmt}, f"{path}: records in format(s) {found}, expected {fmt!r}"
    samples, report = load_jsonl(path, tok, progress=False)
    assert report.kept == len(lines) and not report.skipped and report.truncated == 0, str(report)
    for s in samples:
        assert s.n_loss_tokens > 0, f"{path}:{s.line}: nothing to learn"
        if fmt != "text": assert 0 < s.offset < len(s.tokens), f"{path}:{s.line}: prompt not masked"


def check_clip(path: Path, tok, parser, tmp: Path) -> None:
    "`efficientai clip train -c path`: every value arrives, and the data it names loads."
    from efficientai.cli import parse_args
    from efficientai.clip.cli import pair_data
    _assert_commented(path)
    args = parse_args(parser, ["clip", "train", "-c", str(path)])
    for key, value in yaml.safe_load(path.read_text()).items():
        if value is not None: assert str(getattr(args, key.replace("-", "_"))) == str(value), key
    assert isinstance(args.out, Path) and args.out.parts[0] == "runs", "outputs go to the git-ignored runs/"
    assert len(pair_data(args.data, 32, "train")) > args.batch_size


def check_diffusion(path: Path, tok, parser, tmp: Path) -> None:
    "`efficientai diffusion train -c path`: every value arrives, and the data it names loads."
    from efficientai.cli import parse_args
    from efficientai.diffusion.cli import training_data
    _assert_commented(path)
    args = parse_args(parser, ["diffusion", "train", "-c", str(path)])
    for key, value in yaml.safe_load(path.read_text()).items():
        got = getattr(args, key.replace("-", "_"))
        got = ",".join(map(str, got)) if isinstance(got, tuple) else got
        if value is not None: assert str(got) == str(value), key
    assert isinstance(args.out, Path) and args.out.parts[0] == "runs", "outputs go to the git-ignored runs/"
    images, labels, classes, _ = training_data(args.data, args.image_size)
    assert len(images) > args.batch_size and len(classes) == labels.max() + 1


def check_captions(path: Path, tok, parser, tmp: Path) -> None:
    "The sample caption folder loads through the toolkit's reader; each image is one of its files."
    from efficientai.zoo.captions import load_caption_folder
    folder = path.parent
    cs = load_caption_folder(folder, 32)
    images = sorted(p.name for p in folder.glob("*.png"))
    assert sorted(cs.ids) == images and all(c.strip() for c in cs.captions)
    assert path.name == "captions.jsonl" or path.name in images


CHECKS = {"README.md": check_readme, "configs/lora.yaml": check_lora, "configs/quant.yaml": check_quant,
          "configs/compress.yaml": check_compress, "configs/clip.yaml": check_clip,
          "configs/diffusion.yaml": check_diffusion}
CHECKS |= {f"captions/{p.name}": check_captions for p in (DATA / "captions").iterdir()}
CHECKS |= {f"instruct/{fmt}/{split}.jsonl": check_instruct for fmt in FORMATS for split in SPLITS}


def test_every_data_file_is_checked(tokenizer, parser, tmp_path):
    files = sorted(p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file())
    unknown = [f for f in files if f not in CHECKS]
    assert not unknown, f"files in data/ with no check in tests/test_data.py (add one): {unknown}"
    missing = sorted(set(CHECKS) - set(files))
    assert not missing, f"checked files missing from data/: {missing}"
    for i, f in enumerate(files):
        (tmp := tmp_path / str(i)).mkdir()
        CHECKS[f](DATA / f, tokenizer, parser, tmp)
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 100_000, "data/ is for small files"


def test_run_config_typo_fails_through_the_cli(cli, tmp_path):
    "The installed `efficientai` applies a run config: a misspelt key stops it, naming the file and the key."
    bad = tmp_path / "quant.yaml"
    shutil.copy(DATA / "configs" / "quant.yaml", bad)
    with bad.open("a") as f: f.write("bits: 4  # not an option of quant run\n")
    p = cli("quant", "run", MODEL, "-c", str(bad), check=False, timeout=120)
    assert p.returncode == 2, p.stderr
    assert f"{bad}:bits: unknown key; valid keys: spec, method, bpw, out" in p.stderr, p.stderr
