"""End-to-end checks of the LoRA chapter through its CLI, against mlx-lm itself (real model, real data)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest

from efficientai.backend import find_fast_blas

ROOT = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).parent / "efficientai")]
QUICK = ["--num-layers", "2", "--batch-size", "2", "--set", "val_batches=2", "--set", "steps_per_eval=100"]

def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    blas = find_fast_blas()   # the toolkit's own search ($EFFICIENTAI_BLAS, then the usual OpenBLAS places)
    if blas is not None: env["LD_PRELOAD"] = str(blas)   # plain mlx_lm (no efficientai import) at full speed
    return env

def _run(*args, **kw):
    r = subprocess.run([*args], capture_output=True, text=True, env=_env(), cwd=ROOT, **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout

def _mlx_lm_generate(*args) -> str:
    out = _run(sys.executable, "-m", "mlx_lm", "generate", *args)
    return out.split("==========\n")[1].rsplit("\n==========", 1)[0].strip() if "==========" in out else out.strip()

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "adapters"
    out = _run(*CLI, "lora", "train", "--iters", "6", "--adapter-path", str(path), "--learning-rate", "1e-3", *QUICK)
    assert "trainable" in out and (path / "adapters.safetensors").is_file(), out
    return path

def test_adapters_generate_the_same_in_mlx_lm(trained):
    from efficientai.zoo.catalog import model_path
    prompt = 'Give the Bible reference of this quote as JSON: "Jesus wept." (John 11:35)'
    ours = _run(*CLI, "lora", "generate", "--adapter-path", str(trained), "--prompt", prompt, "--max-tokens", "40").strip()
    theirs = _mlx_lm_generate("--model", str(model_path("smollm2-135m-instruct")), "--adapter-path", str(trained),
                              "--prompt", prompt, "--max-tokens", "40")
    assert ours and ours == theirs

def test_fused_model_loads_in_mlx_lm(trained, tmp_path):
    _run(*CLI, "lora", "fuse", "--adapter-path", str(trained), "--save-path", str(tmp_path / "fused"))
    prompt = "Name three books of the Bible."
    fused = _mlx_lm_generate("--model", str(tmp_path / "fused"), "--prompt", prompt, "--max-tokens", "24")
    ours = _run(*CLI, "lora", "generate", "--adapter-path", str(trained), "--prompt", prompt, "--max-tokens", "24").strip()
    assert fused == ours

def _weights(folder: Path) -> dict:
    import mlx.core as mx
    return mx.load(str(folder / "checkpoint" / "weights.safetensors"))

def _step(folder: Path) -> int:
    try: return json.loads((folder / "checkpoint" / "state.json").read_text())["state"]["step"]
    except (OSError, ValueError, KeyError): return -1

def test_killed_run_resumes_to_identical_weights(tmp_path):
    import mlx.core as mx
    args = ["lora", "train", "--iters", "8", "--save-every", "1", "--set", "lora_parameters.dropout=0.1", *QUICK]
    _run(*CLI, *args, "--adapter-path", str(tmp_path / "straight"))
    p = subprocess.Popen([*CLI, *args, "--adapter-path", str(tmp_path / "killed")], env=_env(), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while _step(tmp_path / "killed") < 3 and p.poll() is None and time.time() < deadline: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = _step(tmp_path / "killed")
    assert 3 <= killed_at < 8
    out = _run(*CLI, *args, "--adapter-path", str(tmp_path / "killed"))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    hist = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["state"]["history"]
    assert any(h.get("event") == "resumed" for h in hist)

def test_bad_data_names_file_and_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n')
    r = subprocess.run([*CLI, "lora", "train", "--data", str(tmp_path / "data"), "--iters", "1", "--adapter-path",
                        str(tmp_path / "a")], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert r.returncode == 2 and "train.jsonl:3" in r.stderr, r.stderr

def _fake_hub_cache(hf: Path, repo: str, src: Path, revision: str = "0" * 40) -> Path:
    "Lay out zoo folder `src` as huggingface_hub caches `repo` (large files as blobs named by their sha256)."
    import shutil
    from efficientai.zoo.cache import read_manifest
    repo_dir = hf / ("models--" + repo.replace("/", "--")); snap = repo_dir / "snapshots" / revision
    snap.mkdir(parents=True); (repo_dir / "blobs").mkdir(); (repo_dir / "refs").mkdir()
    for rel, f in read_manifest(src)["files"].items():
        if not rel.endswith(".safetensors"): shutil.copy(src / rel, snap / rel); continue
        blob = repo_dir / "blobs" / f["sha256"]
        try: os.link(src / rel, blob)
        except OSError: shutil.copy(src / rel, blob)
        (snap / rel).symlink_to(Path("../../blobs") / f["sha256"])
    (repo_dir / "refs" / "main").write_text(revision)
    return snap

def test_resume_on_other_weights_of_the_same_name_is_refused_naming_both(tmp_path):
    "Offline, smollm2-135m-instruct is the zoo's float32 build; once the Hub's (bfloat16) copy is cached it is that."
    from efficientai.zoo.catalog import fetch
    from efficientai.lora.train import data_folder
    hf, data = tmp_path / "hf", tmp_path / "data"; hf.mkdir(); data.mkdir()
    for split in ("train", "valid", "test"):     # a slice of kjv-cite: loading 2,000 samples is not the point here
        lines = (data_folder("kjv-cite") / f"{split}.jsonl").read_text().splitlines()[:16]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(_env(), HF_HUB_CACHE=str(hf), EFFICIENTAI_HUB="off")
    args = [*CLI, "lora", "train", "--data", str(data), "--adapter-path", str(tmp_path / "a"), "--save-every", "1",
            *QUICK]
    r = subprocess.run([*args, "--iters", "1", "--set", "test=true", "--set", "test_batches=1"], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "base model: smollm2-135m-instruct: the zoo's offline build" in r.stdout, r.stdout
    assert "test loss " in r.stdout, r.stdout                  # `test: true` (mlx-lm's key) scored test.jsonl
    _fake_hub_cache(hf, "mlx-community/SmolLM2-135M-Instruct", fetch("smollm2-135m-instruct-bf16"))
    r = subprocess.run([*args, "--iters", "2"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "other base weights" in r.stderr and "the zoo's offline build" in r.stderr, r.stderr
    assert "mlx-community/SmolLM2-135M-Instruct@000000000000 from the Hugging Face Hub" in r.stderr, r.stderr
