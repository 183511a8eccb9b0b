"""The diffusion chapter's training run as a user meets it: killed mid-run and restarted, it ends where an
uninterrupted run ends; a damaged checkpoint or model folder is named, not crashed on."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
from conftest import BIN, ROOT, run

TRAIN = """
import sys
from pathlib import Path
from efficientai.diffusion.train import DiffusionConfig, train_diffusion, save_diffusion
from efficientai.diffusion.unet import UNet, UNetConfig
from efficientai.zoo.images import fashion_mnist
out, steps = Path(sys.argv[1]), int(sys.argv[2])
fm = fashion_mnist()
cfg = DiffusionConfig(steps=steps, batch_size=16, save_every=2, ema=0.99)
model = UNet(UNetConfig(channels=(16, 32), attention=(False, True), num_classes=10))
res = train_diffusion(model, fm.train.images[:512], fm.train.labels[:512], cfg, checkpoint=out / "checkpoint")
save_diffusion(out / "model", model, cfg, extra={"losses": res.losses})
"""
STEPS = 24


def _cmd(out: Path, steps: int = STEPS) -> list[str]:
    return [str(BIN / "python"), "-c", TRAIN, str(out), str(steps)]


def _steps_saved(state: Path) -> int:
    "Steps in the checkpoint's state.json; -1 while it is missing or being replaced (the folder is swapped atomically)."
    try: return len(json.loads(state.read_text())["state"]["losses"])
    except (OSError, ValueError): return -1


def _weights(folder: Path) -> dict:
    import safetensors.numpy
    return safetensors.numpy.load_file(str(folder / "model" / "model.safetensors"))


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(_cmd(whole))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EFFICIENTAI_")}
    p = subprocess.Popen(_cmd(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if 8 <= _steps_saved(state) < STEPS - 4: break
        time.sleep(0.02)
    assert p.poll() is None, f"the run ended before it could be killed: {p.stderr.read()[-2000:]}"
    p.send_signal(signal.SIGKILL); p.wait()
    done = _steps_saved(state)
    assert p.returncode == -signal.SIGKILL and 8 <= done < STEPS and not (killed / "model").exists()
    run(_cmd(killed))
    a, b = _weights(whole), _weights(killed)           # the EMA weights: the average resumed too
    assert sorted(a) == sorted(b)
    for k in a: np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)
    la = json.loads((whole / "model" / "config.json").read_text())["losses"]
    lb = json.loads((killed / "model" / "config.json").read_text())["losses"]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_damaged_checkpoint_and_model_folder_are_named(tmp_path):
    out = tmp_path / "run"
    run(_cmd(out, 4))
    (out / "checkpoint" / "weights.safetensors").write_bytes(b"\x00" * 12)
    p = run(_cmd(out, 4), check=False)
    assert p.returncode != 0 and "weights.safetensors: unreadable checkpoint file" in p.stderr, p.stderr[-2000:]
    assert "Segmentation" not in p.stderr
    cfg = out / "model" / "config.json"
    meta = json.loads(cfg.read_text()); meta["diffusion"]["kind"] = "ve"
    cfg.write_text(json.dumps(meta))
    probe = "import sys; from efficientai.diffusion.train import load_diffusion; load_diffusion(sys.argv[1])"
    p = run([str(BIN / "python"), "-c", probe, str(out / "model")], check=False)
    assert p.returncode != 0 and "config.json:kind" in p.stderr and "vp | flow" in p.stderr, p.stderr[-2000:]
