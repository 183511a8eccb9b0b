"""The CLIP chapter from the command line: train, resume after a kill, evaluate, embed, search; bad inputs."""
import json, os, signal, subprocess, time
from pathlib import Path

import numpy as np
from conftest import BIN, ROOT, run

FAST = ["--data", "emoji", "--batch-size", "64", "--embed-dim", "64", "--image-size", "64"]


def _train(out, steps, recipe="lit", **kw):
    return [str(BIN / "efficientai"), "clip", "train", "--out", str(out), *FAST, "--recipe", recipe, "--steps", str(steps),
            "--save-every", "5", *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in kw.items()), [])]


def _steps_saved(state: Path) -> int:
    "Steps in the checkpoint's state.json; -1 while it is missing or being replaced (the folder is swapped atomically)."
    try: return len(json.loads(state.read_text())["state"]["losses"])
    except (OSError, ValueError): return -1


def _weights(folder):
    import safetensors.numpy
    return safetensors.numpy.load_file(str(Path(folder) / "clip.safetensors"))


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    whole = tmp_path / "whole"
    run(_train(whole, 24, batch_size=32))
    killed = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EFFICIENTAI_")}
    p = subprocess.Popen(_train(killed, 24, batch_size=32), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if 10 <= _steps_saved(state) < 24: break
        time.sleep(0.05)
    assert p.poll() is None, f"the run ended before it could be killed: {p.stderr.read()[-2000:]}"
    p.send_signal(signal.SIGKILL); p.wait()
    done = _steps_saved(state)
    assert p.returncode == -signal.SIGKILL and 10 <= done < 24 and not (killed / "clip.safetensors").exists()
    run(_train(killed, 24, batch_size=32))
    a, b = _weights(whole), _weights(killed)
    assert sorted(a) == sorted(b)
    for k in a: np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert json.loads((killed / "config.json").read_text())["losses"] == json.loads((whole / "config.json").read_text())["losses"]


def test_train_eval_embed_search(cli, tmp_path):
    out = tmp_path / "m"
    p = cli("clip", "train", "--out", str(out), *FAST, "--recipe", "heads", "--steps", "60")
    assert "before" in p.stdout and "after" in p.stdout, p.stdout
    e = cli("clip", "eval", str(out), "--zero-shot", "digits", "--json", str(tmp_path / "e.json"))
    row = json.loads((tmp_path / "e.json").read_text())
    assert row["emoji test image→text R@5"] > 0.2 and row["digits zero-shot"] >= 0.0, e.stdout
    imgs = ROOT / "data" / "captions"
    cli("clip", "embed", str(out), "--images", str(imgs), "--out", str(tmp_path / "img.npy"))
    emb = np.load(tmp_path / "img.npy")
    assert emb.shape[1] == 64 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    names = json.loads((tmp_path / "img.json").read_text())["inputs"]
    s = cli("clip", "search", str(out), str(imgs), "--query", "turtle", "-k", "3")
    top = s.stdout.splitlines()[2]
    assert "turtle" in top, s.stdout
    (tmp_path / "texts.txt").write_text("turtle\nbanana\nrocket\n")
    r = cli("clip", "search", str(out), str(imgs), "--image", str(imgs / "banana.png"), "--texts", str(tmp_path / "texts.txt"))
    assert "banana" in r.stdout.splitlines()[2], r.stdout
    assert len(names) == len(emb)


def test_bad_inputs_name_the_file_and_line(cli, tmp_path):
    bad = tmp_path / "bad"; bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png at all")
    (bad / "captions.jsonl").write_text('{"image": "a.png", "caption": "a thing"}\n')
    p = cli("clip", "train", "--out", str(tmp_path / "x"), "--data", str(bad), "--steps", "2", check=False)
    assert p.returncode == 2 and "a.png" in p.stderr and "captions.jsonl:1" in p.stderr, p.stderr
    (bad / "captions.jsonl").write_text('{"image": "a.png", "caption": "a thing"}\n{"image": "b.png"\n')
    p = cli("clip", "train", "--out", str(tmp_path / "x"), "--data", str(bad), "--steps", "2", check=False)
    assert p.returncode == 2 and "captions.jsonl:2" in p.stderr, p.stderr
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 2\nbatch_sizes: 8\n")
    p = cli("clip", "train", "--out", str(tmp_path / "x"), "-c", str(cfg), check=False)
    assert p.returncode == 2 and "batch_sizes" in p.stderr and "run.yaml" in p.stderr, p.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"clip": {"embed_dim": 64, "towers": 2}}))
    p = cli("clip", "eval", str(tmp_path / "m"), check=False)
    assert p.returncode == 2 and "towers" in p.stderr and "config.json" in p.stderr, p.stderr
    p = cli("clip", "search", str(tmp_path / "m"), str(bad), "--query", "x", check=False)
    assert p.returncode == 2 and "config.json" in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()
