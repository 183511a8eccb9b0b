"""Data-parallel training with `mx.distributed`: 2 CPU processes on loopback (MLX's ring backend, launched by
`mlx.launch`) train to the weights one process gets on the same global batches, and resume after an interruption.

Tolerance: each process computes the gradient of its half of every batch and `all_sum` adds the halves, so the
same float32 numbers are summed in another order (and through half-batch matmuls) than in one process; results
agree to float32 rounding (measured: 2.5e-7 on LoRA weights of size ~0.4). TOL = 1e-5 is 40x that, and thousands of
times smaller than what one step changes (4e-2 between steps 3 and 4): a resume from the wrong step, a batch used
twice or gradients summed instead of averaged all miss it. The LoRA run uses SGD: Adam's first steps divide each
gradient by its own magnitude, so an element whose gradient is ~0 takes a full-size step of either sign and
rounding-level differences become ~1e-2 ones (data-parallel Adam runs differ from one-process ones that way too).
"""
import importlib.util, json, socket, sys
from pathlib import Path
import numpy as np
from conftest import BIN, run

HERE = Path(__file__).resolve().parent
TOL = 1e-5

def _worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", HERE / "distributed_worker.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def _setup(work: Path) -> None:
    "A tiny llama saved as an mlx-lm folder, and a completions data folder (16 train, 8 valid records)."
    import textwrap, collections
    from efficientai.zoo.tiny import tiny_model, save_tiny_lm
    save_tiny_lm(tiny_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128), work / "model")
    words = (textwrap.__doc__ + collections.__doc__).split()
    recs = [{"prompt": " ".join(words[i:i + 6]), "completion": " ".join(words[i + 6:i + 10 + i % 7])}
            for i in range(0, 24 * 9, 9)]
    (work / "data").mkdir()
    for name, part in (("train", recs[:16]), ("valid", recs[16:])):
        (work / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

def _lora_args(work: Path, out: str) -> list[str]:
    return ["--model", str(work / "model"), "--data", str(work / "data"), "--adapter-path", str(work / out),
            "--num-layers", "2", "--batch-size", "4", "--learning-rate", "0.1", "--set", "optimizer=sgd",
            "--steps-per-eval", "2", "--save-every", "1", "--set", "val_batches=-1"]

def _close(a: dict, b: dict) -> float:
    "The largest difference between same-named arrays of `a` and `b` (which must hold the same names)."
    assert a.keys() == b.keys() and a
    return max(float(np.abs(np.array(a[k]) - np.array(b[k])).max()) for k in a)

def _check_lora(work: Path, stdout: str) -> None:
    (one, one_state), (two, two_state) = _checkpoint(work / "single"), _checkpoint(work / "dist")
    assert two_state["step"] == 4 and any(h.get("event") == "resumed" for h in two_state["history"])
    assert _close(one, two) < TOL
    moved = max(float(np.abs(np.array(v)).max()) for k, v in one.items() if k.endswith("lora_b"))
    assert moved > 1000 * TOL                         # the tolerance is far below what training changed
    one_val, two_val = ({h["step"]: h["val_loss"] for h in s["history"] if "val_loss" in h}
                        for s in (one_state, two_state))
    assert one_val.keys() == two_val.keys() == {0, 2, 4}    # validation, split over the processes too, agrees
    assert max(abs(one_val[k] - two_val[k]) for k in one_val) < TOL
    assert stdout.count("adapters: ") == 2            # rank 0 alone prints, once per run (2 steps, then resumed to 4)

def _check_halves(work: Path) -> None:
    "Each process trained on its own half of every global batch."
    rank0, rank1 = (json.loads((work / f"lora-rows-rank{k}.json").read_text()) for k in (0, 1))
    assert len(rank0) == len(rank1) == 4              # 2 micro-batches, then 2 more after the resume
    for a, b in zip(rank0, rank1):
        assert a["batch"] == b["batch"] and len(a["batch"]) == 4     # the same global batch in both
        assert a["mine"] + b["mine"] == a["batch"] and len(a["mine"]) == 2

def _check_fit(work: Path, single: dict) -> None:
    import mlx.core as mx
    ranks = [mx.load(str(work / f"fit-rank{k}.safetensors")) for k in (0, 1)]
    assert _close(ranks[0], ranks[1]) == 0.0          # every process holds the same weights
    assert _close(single, ranks[0]) < TOL
    state = json.loads((work / "fit-ck" / "state.json").read_text())["state"]
    assert state["step"] == 4 and len(state["losses"]) == 4

def _checkpoint(folder: Path) -> tuple[dict, dict]:
    import mlx.core as mx
    state = json.loads((folder / "checkpoint" / "state.json").read_text())["state"]
    return mx.load(str(folder / "checkpoint" / "weights.safetensors")), state

def test_two_processes_train_as_one_does_through_a_resume(tmp_path):
    """LoRA through `efficientai lora train` and `compress.train.fit`, in one process (here) and in 2 under
    `mlx.launch --backend ring` (one test: the runs are the cost, shared by every check)."""
    import mlx.core as mx
    from efficientai.cli import main
    _setup(tmp_path)
    assert main(["lora", "train", *_lora_args(tmp_path, "single"), "--iters", "4"]) == 0
    (tmp_path / "single-fit").mkdir()
    single_fit = mx.load(str(_worker().fit(tmp_path / "single-fit", interrupt=False)))
    cmd = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2", "-p", str(_free_port()), "--",
           sys.executable, str(HERE / "distributed_worker.py"), str(tmp_path), *_lora_args(tmp_path, "dist")]
    r = run(cmd, cwd=tmp_path, timeout=600, env={"PYTHONUNBUFFERED": "1"})
    assert "exited with code" not in r.stdout + r.stderr, r.stderr[-3000:]   # mlx.launch exits 0 when a rank fails
    _check_lora(tmp_path, r.stdout)
    _check_halves(tmp_path)
    _check_fit(tmp_path, single_fit)
