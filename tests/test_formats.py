"""Broken model files of the kinds people really have, through the public CLI (issue 21): a truncated
`model.safetensors`, a hand-edited `config.json`, a file that only looks like a GGUF. Each must end in exit code 2 and
one paragraph naming the file (and the key), never a traceback or a crash."""
import json, shutil, struct, sys
from pathlib import Path

import pytest

from conftest import run


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    "The zoo's tiny llama at its smallest, saved as an mlx-lm folder (config.json, model.safetensors, tokenizer)."
    from efficientai.zoo.tiny import tiny_model, save_tiny_lm
    return save_tiny_lm(tiny_model("llama", num_hidden_layers=1, hidden_size=64, intermediate_size=128),
                        tmp_path_factory.mktemp("tiny") / "model")


def damaged_copy(src: Path, dest: Path, *, truncate: bool = False, config: dict | None = None, drop: str = "") -> Path:
    shutil.copytree(src, dest)
    if truncate:
        w = dest / "model.safetensors"; w.write_bytes(w.read_bytes()[: w.stat().st_size * 2 // 3])
    if config is not None or drop:
        c = {**json.loads((dest / "config.json").read_text()), **(config or {})}
        c.pop(drop, None)
        (dest / "config.json").write_text(json.dumps(c))
    return dest


COMMANDS = {
    "quant": lambda m, out: ["quant", "run", str(m), "--out", str(out)],
    "lora": lambda m, out: ["lora", "train", "--model", str(m), "--set", f"adapter_path={out}"],
    "compress": lambda m, out: ["compress", "run", str(m), "--pipeline", "quantize=q8", "--out", str(out)],
}


def assert_named_refusal(p, *names: str) -> None:
    "Exit code 2, a message naming each of `names`, one paragraph (message + fix), no traceback."
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, err[-2000:])
    assert "Traceback" not in err and all(n in err for n in names), err[-2000:]
    lines = [l for l in err.splitlines() if "warning" not in l.lower()]
    assert 1 <= len(lines) <= 3 and "" not in lines, err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_truncated_weights_are_named(command, cli, tiny_lm, tmp_path):
    m = damaged_copy(tiny_lm, tmp_path / "m", truncate=True)
    p = cli(*COMMANDS[command](m, tmp_path / "out"), check=False, cwd=tmp_path)
    assert_named_refusal(p, str(m / "model.safetensors"), "truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command,change,key", [
    ("quant", {"config": {"hidden_size": "64"}}, "'hidden_size' must be an integer"),
    ("lora", {"drop": "num_attention_heads"}, "lacks 'num_attention_heads'"),
])
def test_bad_config_is_named_with_its_key(command, change, key, cli, tiny_lm, tmp_path):
    m = damaged_copy(tiny_lm, tmp_path / "m", **change)
    p = cli(*COMMANDS[command](m, tmp_path / "out"), check=False, cwd=tmp_path)
    assert_named_refusal(p, str(m / "config.json"), key)


def test_gguf_garbage_is_a_model_loading_error_not_a_segfault(tmp_path):
    "MLX's own reader dies with SIGSEGV on this file; the converter, which checks first, raises ModelLoadingError."
    g = tmp_path / "garbage.gguf"     # GGUF magic, version 3, one metadata key claiming to be 1 TiB long
    g.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40) + b"key" + bytes(16))
    old = run([sys.executable, "-c", f"import mlx.core as mx; mx.load({str(g)!r}, return_metadata=True)"], check=False)
    assert old.returncode == -11, (old.returncode, old.stderr[-500:])
    code = ("import sys; from efficientai.errors import ModelLoadingError; from efficientai.zoo.llm import convert_gguf\n"
            f"try: convert_gguf({str(g)!r}, {str(tmp_path / 'out')!r})\n"
            "except ModelLoadingError as e: print(e); sys.exit(3)")
    new = run([sys.executable, "-c", code], check=False)
    assert new.returncode == 3, (new.returncode, new.stderr[-2000:])
    assert "garbage.gguf: key of metadata entry 0 at byte 32 needs 1099511627776 bytes" in new.stdout
    assert not (tmp_path / "out").exists()
