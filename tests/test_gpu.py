"""GPU tier: every chapter runs a small real job on MLX's GPU backend (CUDA or Metal), checked against the CPU.

Run it on a machine with a GPU: `pytest -m gpu`. Without one every test here is skipped, with the reason (CI runs on
the CPU). `EFFICIENTAI_GPU_TESTS=cpu` runs the "GPU" side on the CPU too, to check these tests on a machine without a
GPU (every comparison is then CPU against CPU, and the CPU-only paths are expected on).

Everything is built here from code: the zoo's tiny random models, random data, jsonl written to tmp_path. No zoo
asset, no Debian package, no network; imports beyond the toolkit, mlx, mlx-lm and numpy are `importorskip`ped.

Tolerances. The CPU computes in float32. On CUDA, MLX runs float32 matrix products in TF32 by default
(`MLX_ENABLE_TF32`, ~3e-4 relative error a product), so logits of the tiny models agree to LOGIT_ATOL, not to the
last bit; losses agree to LOSS_RTOL. Greedy tokens must be equal where they are decided: each comparison uses a
prompt whose greedy continuation, on the CPU, never has its two best logits closer than MARGIN (5x LOGIT_ATOL).
Adam moves every weight by about its learning rate in its first steps whatever the gradient's size, so the few
weights whose gradient is ~0 may step either way under TF32: trained weights are compared as a whole (relative
Frobenius norm), never element by element. Resuming on the same device must give the same weights, bit for bit.
"""
import contextlib, json, logging, os, subprocess, sys, threading
from pathlib import Path

import numpy as np
import pytest

import efficientai  # first: it loads the fast BLAS before mlx starts
import mlx.core as mx
from efficientai.backend import mlx_backend

_MODE = os.environ.get("EFFICIENTAI_GPU_TESTS", "").strip().lower()
if _MODE not in ("", "cpu"):
    raise pytest.UsageError(f"EFFICIENTAI_GPU_TESTS={_MODE!r}: leave it unset (the GPU) or set it to 'cpu'")
CPU_CHECK = _MODE == "cpu"
BACKEND = mlx_backend()
GPU = mx.gpu if BACKEND != "cpu" and not CPU_CHECK else mx.cpu   # the device under test
ON_GPU = GPU == mx.gpu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    BACKEND == "cpu" and not CPU_CHECK,
    reason="MLX has no GPU backend here (Metal or CUDA): run `pytest -m gpu` on a GPU machine "
           "(EFFICIENTAI_GPU_TESTS=cpu runs these tests on the CPU to check them)")]

LOGIT_ATOL = 2e-2      # logits of the tiny LMs are ~N(0, 1), |max| ~5; TF32 moves them by ~5e-3
MARGIN = 5 * LOGIT_ATOL
LOSS_RTOL = 2e-3
UPDATE_RTOL = 0.15     # weight updates of a few Adam steps, relative norm (a 1.5x learning rate gives 0.5-0.8)
N_NEW = 6              # greedy tokens compared
PROMPTS = ["def main():", "import os", "The list of files", "Return a new", "class Path", "for item in",
           "A string is", "The number of", "if value is None", "with open(path)", "# iterate over", "yield from"]


@contextlib.contextmanager
def on(device):
    "MLX computes on `device` inside the block (the toolkit asks `mx.default_device()` which paths to take)."
    before = mx.default_device()
    mx.set_default_device(device)
    try: yield
    finally: mx.set_default_device(before)


def rel_diff(a: dict, b: dict) -> float:
    "‖a − b‖ / ‖a‖ over all the arrays of two same-keyed dicts."
    assert a.keys() == b.keys()
    num = sum(float(mx.sum((a[k].astype(mx.float32) - b[k].astype(mx.float32)) ** 2).item()) for k in a)
    den = sum(float(mx.sum(a[k].astype(mx.float32) ** 2).item()) for k in a)
    return (num / max(den, 1e-30)) ** 0.5


def weights(model) -> dict:
    "The model's trainable arrays by name (MLX arrays are immutable: these stay as they are while it trains)."
    from mlx.utils import tree_flatten
    return dict(tree_flatten(model.trainable_parameters()))


def assert_same_update(before: dict, gpu: dict, cpu: dict) -> None:
    "What training changed on the GPU is what it changed on the CPU, to UPDATE_RTOL (see the module's docstring)."
    delta = lambda after: {k: after[k] - before[k] for k in before}
    d = rel_diff(delta(cpu), delta(gpu))
    print(f"weight updates differ by {d:.2e} (relative; limit {UPDATE_RTOL})")
    assert d < UPDATE_RTOL, f"the GPU's weight updates differ from the CPU's by {d:.3f} (relative)"


# -- the tiny LM, greedy decoding on both devices --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    "An mlx-lm model folder: the zoo's tiny llama (2 layers, hidden 128) and its byte-level BPE tokenizer."
    from efficientai.zoo.tiny import TinyLMConfig, build_tiny_lm, save_tiny_lm, tiny_tokenizer
    with on(mx.cpu):
        model = build_tiny_lm(TinyLMConfig(num_hidden_layers=2))
        # the default corpus is the docstrings of a few stdlib modules: no asset needed
        return save_tiny_lm(model, tmp_path_factory.mktemp("gpu") / "tiny-lm", tiny_tokenizer(512))


def greedy(model, tokenizer, prompt: list[int], device, n: int = N_NEW) -> list[int]:
    "mlx-lm's greedy tokens on `device` (its generation stream is made at import, on the default device: pass ours)."
    from mlx_lm import stream_generate
    with on(device):
        return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=n,
                                                 stream=mx.default_stream(device))]


def predicting_logits(model, prompt: list[int], tokens: list[int], device) -> np.ndarray:
    "The logits that predicted each of `tokens` after `prompt`: one forward pass over the whole sequence."
    with on(device):
        out = model(mx.array([prompt + tokens[:-1]]))[0, len(prompt) - 1:]
        return np.array(out.astype(mx.float32))


def decisive_prompt(model, tokenizer) -> tuple[list[int], list[int], np.ndarray]:
    "A prompt whose greedy continuation on the CPU keeps its two best logits MARGIN apart; its tokens and logits."
    for text in PROMPTS:
        ids = list(tokenizer.encode(text))
        tokens = greedy(model, tokenizer, ids, mx.cpu)
        logits = predicting_logits(model, ids, tokens, mx.cpu)
        top2 = np.sort(logits, axis=-1)[:, -2:]
        if (top2[:, 1] - top2[:, 0]).min() >= MARGIN: return ids, tokens, logits
    pytest.fail(f"none of {len(PROMPTS)} prompts has a greedy continuation with top-2 logit margins >= {MARGIN}")


def assert_greedy_agrees(model, tokenizer) -> tuple[list[int], list[int]]:
    "The GPU's logits match the CPU's to LOGIT_ATOL and its greedy tokens equal the CPU's; returns (prompt, tokens)."
    ids, cpu_tokens, cpu_logits = decisive_prompt(model, tokenizer)
    gpu_logits = predicting_logits(model, ids, cpu_tokens, GPU)
    top2 = np.sort(cpu_logits, axis=-1)[:, -2:]
    print(f"greedy: logits differ by {np.abs(gpu_logits - cpu_logits).max():.2e} at most "
          f"(atol {LOGIT_ATOL}), smallest top-2 margin {(top2[:, 1] - top2[:, 0]).min():.3f}")
    np.testing.assert_allclose(gpu_logits, cpu_logits, rtol=0, atol=LOGIT_ATOL)
    assert greedy(model, tokenizer, ids, GPU) == cpu_tokens
    return ids, cpu_tokens


# -- (1) LoRA ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_data(tmp_path_factory) -> Path:
    "train.jsonl / valid.jsonl in mlx-lm's completions format: prompts and their answers, made up from a seed."
    rng = np.random.default_rng(0)
    words = "path file list string value number module class function object".split()
    folder = tmp_path_factory.mktemp("gpu-data")
    for split, n in (("train", 16), ("valid", 4)):
        rows = []
        for _ in range(n):
            a, b = rng.choice(words, 2, replace=False)
            rows.append({"prompt": f"Which is first, {a} or {b}?", "completion": f"The {min(a, b)} comes first."})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_lora_train_resume_and_generate(tiny_lm, lora_data, tmp_path):
    "LoRA on the GPU: same losses as the CPU, resume gives the same adapters, greedy generation agrees."
    import mlx_lm
    from efficientai.checkpoint import WEIGHTS_FILE
    from efficientai.lora.config import load_config
    from efficientai.lora.train import finetune

    def run(name: str, iters: int, device, dtype: str = "float32"):     # float32 on both: the numbers must agree
        cfg = load_config(model=str(tiny_lm), data=str(lora_data), iters=iters, num_layers=2, batch_size=2,
                          learning_rate=1e-3, steps_per_report=1, steps_per_eval=100, save_every=2, val_batches=2,
                          adapter_path=tmp_path / name, dtype=dtype)
        with on(device): return finetune(cfg, progress=False, plot=False)

    gpu = run("gpu", 4, GPU)
    run("resumed", 2, GPU)
    resumed = run("resumed", 4, GPU)
    cpu = run("cpu", 4, mx.cpu)
    # the fast CPU training kernels (swiglu, attention, exp) step aside on a GPU; on the CPU they are on
    assert gpu.fast_kernels is (not ON_GPU) and cpu.fast_kernels is True
    assert any(h.get("event") == "resumed" for h in resumed.history) and resumed.state.step == 4
    straight, again = (mx.load(str(r.adapter_path / "checkpoint" / WEIGHTS_FILE)) for r in (gpu, resumed))
    assert straight.keys() == again.keys()
    same = [k for k in straight if mx.array_equal(straight[k], again[k]).item()]
    assert len(same) == len(straight), f"resume on {GPU} changed {len(straight) - len(same)} arrays, " \
                                       f"relative difference {rel_diff(straight, again):.2e}"
    losses = lambda r, key: [h[key] for h in r.history if key in h]
    np.testing.assert_allclose(losses(gpu, "train_loss"), losses(cpu, "train_loss"), rtol=LOSS_RTOL)
    np.testing.assert_allclose(losses(gpu, "val_loss"), losses(cpu, "val_loss"), rtol=LOSS_RTOL)
    assert losses(gpu, "val_loss")[-1] < losses(gpu, "val_loss")[0], "validation loss did not go down on the GPU"
    on_cpu = mx.load(str(cpu.adapter_path / "checkpoint" / WEIGHTS_FILE))
    b = lambda w: {k: v for k, v in w.items() if k.endswith("lora_b")}     # B starts at zero: B is the update
    assert_same_update({k: mx.zeros_like(v) for k, v in b(on_cpu).items()}, b(straight), b(on_cpu))
    model, tokenizer = mlx_lm.load(str(tiny_lm), adapter_path=str(gpu.adapter_path))
    assert_greedy_agrees(model, tokenizer)
    # dtype auto follows the backend: the float32 model trains in bfloat16 on the GPU, in float32 on the CPU
    for device, want in ((GPU, "float32 -> bfloat16" if ON_GPU else "float32 kept"), (mx.cpu, "float32 kept")):
        with _Said("efficientai.lora.adapters") as said: auto = run(f"auto-{device}", 2, device, dtype="auto")
        assert any(want in m for m in said), said
        assert np.isfinite([h["train_loss"] for h in auto.history if "train_loss" in h]).all()


# -- (2) quantization ------------------------------------------------------------------------------------------------

class _Said(logging.Handler):
    "Collects the messages of one logger (the toolkit's logger may not propagate to pytest's caplog)."
    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.logger, self.messages = logging.getLogger(name), []
    def emit(self, record): self.messages.append(record.getMessage())
    def __enter__(self):
        self.level = self.logger.level
        self.logger.addHandler(self); self.logger.setLevel(logging.INFO)
        return self.messages
    def __exit__(self, *exc):
        self.logger.removeHandler(self); self.logger.setLevel(self.level)


def test_quantize_decode_and_cpu_kernels_step_aside(tiny_lm):
    "A q4 tiny LM decodes the same greedy tokens on the GPU as on the CPU; the quantized C kernels stay off the GPU."
    import mlx_lm
    from efficientai.quant import kernels
    from efficientai.models import is_quantized
    from efficientai.quant.ptq import quantize
    model, tokenizer = mlx_lm.load(str(tiny_lm))
    quantize(model, "q4g64")
    assert is_quantized(model)
    assert_greedy_agrees(model, tokenizer)
    with on(GPU), _Said("efficientai.quant.kernels") as said:
        swapped = kernels.accelerate(model, "auto")
        status = kernels.kernels_status() if hasattr(kernels, "kernels_status") else None
    kernels.restore(model)
    print(f"quantized CPU kernels on {GPU}: {swapped} layers swapped; status: {status}; log: {said}")
    if ON_GPU:
        assert swapped == 0, "the CPU's quantized kernels must not replace MLX's on a GPU"
        assert any(str(mx.default_device()) in m or "gpu" in m.lower() for m in said), said   # and it says so
        if status is not None: assert "not used" in status, status
    else:
        assert swapped > 0 or kernels.find_compiler() is None


# -- (3) compression -------------------------------------------------------------------------------------------------

def test_compression_fit_prune_and_lowrank():
    "`fit` trains a tiny CNN as on the CPU; a magnitude prune stays sparse through fine-tuning; SVD factors agree."
    from efficientai.compress.lowrank import factorize
    from efficientai.compress.prune import magnitude_masks, prune_oneshot
    from efficientai.compress.train import classifier_loss, fit
    from efficientai.zoo.tiny import tiny_model
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 16, 16, 1)).astype(np.float32), rng.integers(0, 10, 64)

    def batches():
        for i in range(10_000):
            s = slice(16 * (i % 4), 16 * (i % 4 + 1))
            yield mx.array(x[s]), mx.array(y[s])

    def trained(device):
        with on(mx.cpu): model = tiny_model("cnn", input_shape=(16, 16, 1), channels=(8, 16), hidden=32)
        before = weights(model)
        with on(device): return model, fit(model, classifier_loss, batches(), steps=6, lr=3e-3, desc="gpu test"), before

    (model, gpu, before), (cpu_model, cpu, _) = trained(GPU), trained(mx.cpu)
    assert_same_update(before, weights(model), weights(cpu_model))
    np.testing.assert_allclose(gpu.losses, cpu.losses, rtol=5e-3)
    assert gpu.losses[-1] < gpu.losses[0]
    with on(GPU):
        res = prune_oneshot(model, magnitude_masks(model, 0.5), classifier_loss, batches(), steps=3, lr=1e-3)
    assert res.sparsity >= 0.5 - 1e-6 and len(res.losses) == 3 and np.isfinite(res.losses).all()
    with on(GPU): small, report = factorize(model, rank=4, progress=False)
    assert report["replaced"].any()
    probe = mx.array(x[:8])
    with on(GPU): out_gpu = np.array(small(probe))
    with on(mx.cpu): out_cpu = np.array(small(probe))
    np.testing.assert_allclose(out_gpu, out_cpu, rtol=0, atol=1e-2 * max(1.0, np.abs(out_cpu).max()))


# -- (4) CLIP --------------------------------------------------------------------------------------------------------

def _tiny_clip(tokenizer):
    "A CLIP of tiny random towers (an EfficientNet-Lite and a BERT built from small configs), LoRA recipe."
    from efficientai.clip.model import CLIP, CLIPConfig, ImageTower, TextTower, set_recipe
    from efficientai.zoo.efficientnet import EfficientNet, EfficientNetConfig
    from efficientai.zoo.minilm import BertConfig, BertModel
    with on(mx.cpu):
        mx.random.seed(0)
        net = EfficientNet(EfficientNetConfig(stem_channels=8, stages=((1, 3, 1, 1, 8), (1, 3, 2, 2, 16)),
                                              head_channels=32, num_classes=4))
        bert = BertModel(BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
        cfg = CLIPConfig(image_tower="tiny", text_tower="tiny", embed_dim=16, image_size=32, max_text_len=16,
                         recipe="lora", lora_rank=4)
        model = CLIP(cfg, ImageTower(net), TextTower(bert), tokenizer)   # no sources: nothing cached on disk
        set_recipe(model, "lora")
        mx.eval(model.parameters())
    return model


def test_clip_training_steps():
    "Three contrastive steps of tiny CLIP towers (LoRA on both) on random images: the CPU's losses and embeddings."
    from efficientai.clip.data import PairData
    from efficientai.clip.train import ClipTrainConfig, train_clip
    from efficientai.zoo.tiny import EOS, tiny_tokenizer
    rng = np.random.default_rng(0)
    colours, shapes = "red green blue black white yellow".split(), "square circle star cross".split()
    texts = [[f"a {c} {s}", c, s] for c in colours for s in shapes][:16]
    data = PairData("random", rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), texts)
    tokenizer = tiny_tokenizer(300, texts=[t for ts in texts for t in ts] * 4)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(EOS), pad_token=EOS)
    cfg = ClipTrainConfig(steps=3, batch_size=8, lr=1e-3, warmup=0, save_every=100)
    runs = {}
    for device in (GPU, mx.cpu):
        model = _tiny_clip(tokenizer)
        before = weights(model)
        with on(device): runs[device] = (model, train_clip(model, data, cfg, progress=False))
    (model, gpu), (cpu_model, cpu) = runs[GPU], runs[mx.cpu]
    assert_same_update(before, weights(model), weights(cpu_model))
    np.testing.assert_allclose(gpu.fit.losses, cpu.fit.losses, rtol=5e-3)
    assert gpu.trainable > 0 and np.isfinite(gpu.fit.losses).all()
    def embed(device) -> list[np.ndarray]:
        with on(device): return [np.array(model.encode_image(data.images[:4])), np.array(model.encode_text(texts[0]))]
    e_gpu, e_cpu = embed(GPU), embed(mx.cpu)
    for a, b in zip(e_gpu, e_cpu): np.testing.assert_allclose(a, b, rtol=0, atol=5e-3)   # unit vectors


# -- (5) diffusion ---------------------------------------------------------------------------------------------------

def test_diffusion_training_and_sampling():
    "A tiny class-conditional UNet: three flow-matching steps and a 2-step DPM++ sample, on the GPU as on the CPU."
    from efficientai.diffusion.train import DiffusionConfig, generate, train_diffusion
    from efficientai.diffusion.unet import UNet, UNetConfig
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 16)
    cfg = DiffusionConfig(steps=3, batch_size=4, lr=1e-3, warmup=0, ema=0.9, save_every=100)
    unet = UNetConfig(image_size=8, in_channels=1, patch=1, channels=(8, 16), attention=(False, True), heads=2,
                      groups=4, num_classes=3)
    out = {}
    for device in (GPU, mx.cpu):
        with on(mx.cpu): model = UNet(unet)
        before = weights(model)
        with on(device):
            res = train_diffusion(model, images, labels, cfg, desc="gpu test")   # the model ends with the EMA weights
            out[device] = (res.losses, np.array(generate(model, np.array([0, 1, 2]), cfg, steps=2, seed=0)),
                           weights(model))
    assert_same_update(before, out[GPU][2], out[mx.cpu][2])
    np.testing.assert_allclose(out[GPU][0], out[mx.cpu][0], rtol=5e-3)
    assert out[GPU][1].shape == (3, 8, 8, 1) and np.isfinite(out[GPU][1]).all()
    np.testing.assert_allclose(out[GPU][1], out[mx.cpu][1], rtol=0, atol=1e-2)


# -- (6) federated ---------------------------------------------------------------------------------------------------

def test_federated_partition_without_flower():
    "The chapter's parts that need no Flower (client splits and attacked updates) import and run here."
    from efficientai.federated.attacks import attack_update
    from efficientai.federated.partition import dirichlet_partition
    labels = np.random.default_rng(0).integers(0, 4, 200)
    parts = dirichlet_partition(labels, 3, alpha=0.5, min_size=10)
    assert sorted(np.concatenate(parts).tolist()) == list(range(200))
    update = {"w": np.ones((4, 4), np.float32)}
    assert not np.allclose(attack_update(update, "sign-flip")["w"], update["w"])


def test_federated_round():
    "One FedAvg round of a tiny MLP over two clients, q8-compressed updates: the GPU's new global model is the CPU's."
    pytest.importorskip("flwr", reason="efficientai.federated's arrays, clients and compression are built on Flower")
    from efficientai.federated.arrays import add, load_record, subtract, to_record
    from efficientai.federated.client import local_train
    from efficientai.federated.compress import decode_update, encode_update
    from efficientai.federated.partition import dirichlet_partition
    from efficientai.zoo.tiny import tiny_model
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((120, 32)).astype(np.float32), rng.integers(0, 4, 120)
    parts = dirichlet_partition(y, 2, alpha=1.0, min_size=10)
    build = lambda: tiny_model("mlp", input_dim=32, hidden=(16,), num_classes=4)
    with on(mx.cpu): start = to_record(build())
    shapes = {k: tuple(a.shape) for k, a in start.items()}

    def round_on(device) -> tuple[dict, float]:
        updates, sizes, biggest = [], [], 0.0
        with on(device):
            for i, p in enumerate(parts):
                model = load_record(build(), start)
                local_train(model, mx.array(x[p]), mx.array(y[p]), steps=3, batch_size=8, lr=0.1, seed=i)
                update = subtract(to_record(model), start)
                biggest = max(biggest, max(float(np.abs(u).max()) for u in update.values()))
                record, _ = encode_update(update, "q8")
                updates.append(decode_update(record, "q8", shapes)); sizes.append(len(p))
        avg = {k: sum(n * u[k] for n, u in zip(sizes, updates)) / sum(sizes) for k in shapes}
        return {k: a.numpy() for k, a in add(start, avg).items()}, biggest

    (gpu, scale), (cpu, _) = round_on(GPU), round_on(mx.cpu)
    assert scale > 0
    for k in shapes:     # q8: a value on a rounding boundary may land one step (range / 255) apart
        np.testing.assert_allclose(gpu[k], cpu[k], rtol=0, atol=0.02 * scale, err_msg=k)


# -- (7) deploy ------------------------------------------------------------------------------------------------------

def test_engine_generates_and_lora_kernels_step_aside(tiny_lm):
    "The serving engine decodes two requests in one batch on the GPU, each as mlx-lm does alone; fast kernels stay off."
    import mlx_lm
    from efficientai.deploy.engine import Engine, GenRequest
    from efficientai.lora.kernels import fast_kernels
    model, tokenizer = mlx_lm.load(str(tiny_lm))
    module = sys.modules[type(model).__module__]
    sdpa = module.scaled_dot_product_attention
    with on(GPU), fast_kernels(model, "auto") as fast:
        swapped = module.scaled_dot_product_attention is not sdpa
    assert fast is (not ON_GPU) and swapped is (not ON_GPU)
    ids, tokens = assert_greedy_agrees(model, tokenizer)
    other = list(tokenizer.encode("the value of a"))
    alone = greedy(model, tokenizer, other, GPU)
    with on(GPU):
        engine = Engine(model, tokenizer, max_batch=4)
        try:
            device = engine.call(mx.default_device, timeout=120)
            finished = [threading.Event() for _ in range(2)]
            reqs = [engine.submit(GenRequest(list(p), max_tokens=N_NEW, temperature=0.0),
                                  lambda r, text, finish, e=e: finish and e.set())
                    for p, e in zip((ids, other), finished)]
            assert all(e.wait(300) for e in finished), "the engine did not finish both requests"
        finally: engine.shutdown()
    assert device == GPU, device             # the engine's thread computes on the device under test
    assert [r.error for r in reqs] == [None, None]
    assert reqs[0].tokens == tokens and reqs[1].tokens == alone, [r.tokens for r in reqs]


# -- (8) efficientai info --------------------------------------------------------------------------------------------

def test_info_reports_the_gpu():
    "`efficientai info --json` in a fresh process names the GPU backend and the card."
    code = "import sys; from efficientai.cli import main; sys.exit(main(['info', '--json', '--size', '512']))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    info = json.loads(p.stdout)
    print({k: info.get(k) for k in ("backend", "default_device", "gpu_name", "gpu_memory_gb")})
    assert info["backend"] == BACKEND
    if CPU_CHECK and BACKEND == "cpu": assert info["gpu_name"] is None
    else:
        assert info["backend"] in ("cuda", "metal") and info["gpu_name"] and "gpu" in info["default_device"]
        if hasattr(mx, "cuda") and mx.cuda.is_available(): assert info["backend"] == "cuda"
    assert info["matmul"]["mlx_gflops"] > 0
