"""The Gradio demos as a user meets them: each is served on a free loopback port (the chat demo as its own process,
through the CLI), opened in headless Chromium, given a prompt and submitted; the answers must arrive with live
numbers, the fine-tune must answer differently from its base, and a screenshot of each page is kept. Nothing may be
left running afterwards."""
import os, shutil, signal, socket, subprocess, sys, time
from pathlib import Path
import psutil
import pytest
from conftest import ROOT, CI_OUT

CLI = [sys.executable, "-c", "import efficientai.deploy.demos, sys; from efficientai.cli import main; "
                             "sys.exit(main(sys.argv[1:]))"]
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


def _start(args: list[str], timeout_s: float = 180) -> tuple[subprocess.Popen, str, list[str]]:
    "Start `efficientai demo ...`; returns the process, the URL it prints and its output so far."
    proc = subprocess.Popen([*CLI, "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), cwd=ROOT)
    lines, end = [], time.monotonic() + timeout_s
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None: break
        lines.append(line)
        if " running at " in line: return proc, line.split(" running at ")[1].split()[0], lines
    proc.kill(); proc.wait()
    raise AssertionError("the demo did not start:\n" + "".join(lines[-40:]))


def test_chat_demo_from_the_cli(adapter, shots):
    from efficientai.deploy.demos import drive, free_port
    from efficientai.zoo.instruct import load_cite_examples
    prompt = load_cite_examples("test")[0].prompt
    proc, url, lines = _start(["chat", "--adapter-path", str(adapter), "--port", str(free_port()),
                               "--max-tokens", "24"])
    try:
        main = psutil.Process(proc.pid)
        family = [main, *main.children(recursive=True)]
        seen = drive(url, prompt, CHAT_IDS, shots / "demo-chat.png")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + out
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], family
    assert not _listening(url), f"{url} still answers after the demo stopped"
    assert (shots / "demo-chat.png").stat().st_size > 10_000
    base, tuned = seen["base-answer"], seen["tuned-answer"]
    assert base.strip() and tuned.strip(), seen
    for k in CHAT_IDS[2:-1]: assert float(seen[k]) > 0, (k, seen)
    assert seen["status"].startswith("done"), seen
    # Different weights: the fine-tune answers in its training data's style (one line of JSON, keys in order),
    # which the base model, wrapping its JSON in a Markdown fence, does not.
    assert base != tuned and tuned.startswith('{"book": ') and not base.startswith('{"book": '), seen


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
