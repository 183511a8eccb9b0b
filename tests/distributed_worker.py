"""What each process runs under `mlx.launch` in tests/test_distributed.py (its `fit` alone is the reference there).

`python distributed_worker.py WORK ARGS...` runs `efficientai lora train ARGS` for 2 steps, then again for 4: the
second run resumes from the first one's checkpoint, as a run restarted after an interruption does; each process
records the rows of every batch it trained on as WORK/lora-rows-rank{rank}.json. Then
`compress.train.fit` on a tiny classifier, stopped after 2 of 4 steps (its batches run out) and resumed; every
process saves the weights it ends with as WORK/fit-rank{rank}.safetensors.
"""
import itertools, json, sys
from pathlib import Path
import efficientai  # first: loads fast BLAS
import numpy as np
import mlx.core as mx
from mlx.utils import tree_flatten

FIT_STEPS, FIT_BATCH = 4, 8

def lora(work: Path, args: list[str]) -> None:
    "Train, then resume to 4 steps; record which samples of each batch this process trained on (lora-rows-rank*.json)."
    import efficientai.lora.train as lora_train
    from efficientai.cli import main
    rows, shard = [], lora_train.shard_batch
    def recorded(samples, batch, rank, size):
        mine = shard(samples, batch, rank, size)
        rows.append({"batch": batch.indices, "mine": mine.indices})
        return mine
    lora_train.shard_batch = recorded
    for iters in (2, 4):
        rc = main(["lora", "train", *args, "--iters", str(iters)])
        if rc: sys.exit(rc)
    lora_train.shard_batch = shard
    rank = mx.distributed.init().rank()
    (work / f"lora-rows-rank{rank}.json").write_text(json.dumps(rows))

def _batches(n: int):
    "The same `n` global batches of a fixed synthetic 3-class problem in every process."
    rng = np.random.default_rng(0)
    for _ in range(n):
        x = rng.normal(size=(FIT_BATCH, 12)).astype(np.float32)
        yield mx.array(x), mx.array((x[:, :3].argmax(1)).astype(np.int32))

def fit(work: Path, interrupt: bool = True) -> Path:
    """Train the tiny classifier for `FIT_STEPS`; `interrupt`: stop after half, each process starting from other
    weights (seed = rank: rank 0's are everyone's), then resume. Returns where this process saved its weights."""
    from efficientai.compress.train import fit as train, classifier_loss
    from efficientai.zoo.tiny import tiny_model
    rank = mx.distributed.init().rank()
    def run(batches, seed=0):
        model = tiny_model("mlp", input_dim=12, hidden=(16,), num_classes=3, seed=seed)
        train(model, classifier_loss, batches, steps=FIT_STEPS, lr=1e-2, checkpoint=work / "fit-ck", save_every=1)
        return model
    if interrupt:
        try: run(itertools.islice(_batches(FIT_STEPS), FIT_STEPS // 2), seed=rank)    # batches run out at step 2
        except StopIteration: pass
    model = run(_batches(FIT_STEPS), seed=rank)
    out = work / f"fit-rank{rank}.safetensors"
    mx.save_safetensors(str(out), dict(tree_flatten(model.trainable_parameters())))
    return out

if __name__ == "__main__":
    work, *lora_args = sys.argv[1:]
    lora(Path(work), lora_args)
    fit(Path(work))
