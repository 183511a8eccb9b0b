"""The Gradio demos as a user meets them: each is served on a free loopback port (chat and clip as their own process,
through the CLI), opened in headless Chromium, given a prompt and submitted; the answers must arrive with live
numbers, the fine-tune must answer differently from its base, and a screenshot of each page is kept. Nothing may be
left running afterwards."""
import contextlib, os, shutil, signal, socket, subprocess, sys, time
from pathlib import Path
import psutil
import pytest
from conftest import ROOT, CI_OUT

CLI = [str(Path(sys.executable).parent / "efficientai")]
QUICK_LORA = ["--iters", "6", "--learning-rate", "1e-3", "--num-layers", "2", "--batch-size", "2",
              "--set", "val_batches=2", "--set", "steps_per_eval=100"]
CHAT_IDS = ["base-answer", "tuned-answer", "base-tps", "tuned-tps", "base-ttft", "tuned-ttft", "base-mem", "tuned-mem",
            "base-rss", "tuned-rss", "status"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EFFICIENTAI_")}
    return {**env, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


@pytest.fixture(scope="module", autouse=True)
def browser_present():
    if not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")):
        if os.environ.get("CI") == "true": pytest.fail("no Chromium: scripts/test.sh installs Debian's `chromium`")
        pytest.skip("no Chromium or Chrome on this machine")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return CI_OUT / "screenshots" if CI_OUT is not None else tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    "A real LoRA adapter: 6 steps of `efficientai lora train` on kjv-cite (the quick settings of the LoRA tests)."
    path = tmp_path_factory.mktemp("demo-lora") / "adapter"
    r = subprocess.run([*CLI, "lora", "train", "--adapter-path", str(path), *QUICK_LORA], capture_output=True,
                       text=True, env=_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0 and (path / "adapters.safetensors").is_file(), r.stdout[-2000:] + r.stderr[-2000:]
    return path


def _listening(url: str) -> bool:
    host, port = url.split("//")[1].strip("/").split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


@contextlib.contextmanager
def _serving(args: list[str], timeout_s: float = 180):
    """Run `efficientai demo ...` as a process and yield the URL it prints; on exit stop it with SIGTERM and check
    that it, its children and its port are gone."""
    proc = subprocess.Popen([*CLI, "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), cwd=ROOT)
    lines, end, url = [], time.monotonic() + timeout_s, None
    try:
        while url is None and time.monotonic() < end:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None: break
            lines.append(line)
            if " running at " in line: url = line.split(" running at ")[1].split()[0]
        assert url, "the demo did not start:\n" + "".join(lines[-40:])
        main = psutil.Process(proc.pid)
        family = [main, *main.children(recursive=True)]
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try: out = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill(); out = proc.communicate()[0]
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + out
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], family
    assert not _listening(url), f"{url} still answers after the demo stopped"


def test_chat_demo_from_the_cli(adapter, shots):
    from efficientai.deploy.demos import drive, free_port
    from efficientai.zoo.instruct import load_cite_examples
    prompt = load_cite_examples("test")[0].prompt
    with _serving(["chat", "--adapter-path", str(adapter), "--port", str(free_port()), "--max-tokens", "24"]) as url:
        seen = drive(url, prompt, CHAT_IDS, shots / "demo-chat.png")
    assert (shots / "demo-chat.png").stat().st_size > 10_000
    base, tuned = seen["base-answer"], seen["tuned-answer"]
    assert base.strip() and tuned.strip(), seen
    for k in CHAT_IDS[2:-1]: assert float(seen[k]) > 0, (k, seen)
    assert seen["status"].startswith("done"), seen
    # Different weights: the fine-tune answers in its training data's style (one line of JSON, keys in order),
    # which the base model, wrapping its JSON in a Markdown fence, does not.
    assert base != tuned and tuned.startswith('{"book": ') and not base.startswith('{"book": '), seen


def test_clip_demo_from_the_cli(tmp_path, shots):
    from efficientai.deploy.demos import drive, label_image, emoji_example
    from efficientai.clip.model import load_clip
    folder = tmp_path / "clip"
    r = subprocess.run([*CLI, "clip", "train", "--out", str(folder), "--steps", "20", "--batch-size", "64"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    model = load_clip(folder)
    image, labels = emoji_example(model.config.image_size)      # what the page opens with
    ids = ["table", "status", "clip-image-ms", "clip-text-ms", "clip-mem", "clip-rss"]
    with _serving(["clip", "--model", str(folder)]) as url:
        seen = drive(url, "\n".join(labels), ids, shots / "demo-clip.png")
    header, *rows = seen["table"]
    assert header == ["label", "probability", "cosine similarity"], header
    assert sorted(r[0] for r in rows) == sorted(labels), rows
    probs = [float(r[1]) for r in rows]
    assert abs(sum(probs) - 1) < 1e-3 and probs == sorted(probs, reverse=True), rows
    for k in ids[2:]: assert float(seen[k]) > 0, (k, seen)
    # The browser shows what the library computes for the same picture (it crossed the page as a lossless PNG).
    want = label_image(model, image, labels)
    assert [r[0] for r in rows] == want.labels, (rows, want)
    assert max(abs(p - q) for p, q in zip(probs, want.probabilities)) < 1e-3, (rows, want)


def test_quant_demo_in_process(shots):
    from efficientai.deploy.demos import QUANT_MODELS, QUANT_COLUMNS, drive, launch, quant_demo
    from efficientai.errors import DeploymentError
    with launch(quant_demo(max_tokens=24)) as demo:
        seen = drive(demo.url, "Explain in two sentences why smaller weights make a model faster.", ["table", "status"],
                     shots / "demo-quant.png")
        with pytest.raises(DeploymentError, match="prompt is empty"):
            drive(demo.url, "   ", ["status"])
    assert not _listening(demo.url), f"{demo.url} still answers after close()"
    header, *rows = seen["table"]
    assert header == list(QUANT_COLUMNS), header
    assert [r[0] for r in rows] == list(QUANT_MODELS), rows
    for r in rows:
        assert r[-1].strip(), r
        for cell in r[4:8]: assert float(cell) > 0, (header, r)
    sizes = [float(r[2]) for r in rows]
    assert sizes[0] > sizes[1] > sizes[2], sizes
    assert [r[1].split()[0] for r in rows] == ["float32", "8-bit", "4-bit"], rows
    assert seen["status"].startswith("done"), seen


def test_diffusion_demo_from_the_cli(tmp_path, shots):
    """`efficientai diffusion train` makes a small class-conditional model; `efficientai demo diffusion` serves it; the
    page draws, for two class names, the pixels `draw_samples` draws in this process with the page's settings."""
    import io, urllib.request
    import numpy as np
    from PIL import Image
    from efficientai.deploy.demos import draw_samples, drive, enlarge, on_mlx_thread, open_diffusion
    from efficientai.errors import DeploymentError
    folder = tmp_path / "diffusion"
    r = subprocess.run([*CLI, "diffusion", "train", "--out", str(folder), "--steps", "30", "--batch-size", "16",
                        "--channels", "16,32,32"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ids = ["gallery", "status", "diffusion-seconds", "diffusion-per-image", "diffusion-per-step", "diffusion-mem",
           "diffusion-rss"]
    with _serving(["diffusion", "--model", str(folder)]) as url:
        seen = drive(url, "Trouser, 9", ids, shots / "demo-diffusion.png")
        served = [np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(u, timeout=30).read())))
                  for u in seen["gallery"]]
        with pytest.raises(DeploymentError, match="no class 'Hat'"):
            drive(url, "Hat", ["status"])
    assert seen["status"].startswith("done: 8 samples"), seen          # the page's default: 4 of each class
    for k in ids[2:]: assert float(seen[k]) > 0, (k, seen)
    want = on_mlx_thread(draw_samples, open_diffusion(folder), "Trouser, Ankle boot", 4)
    assert want.captions == ["Trouser"] * 4 + ["Ankle boot"] * 4, want.captions
    assert len(served) == 8, len(served)
    for got, w in zip(served, want.images): assert np.array_equal(got, enlarge(w))
