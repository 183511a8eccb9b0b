"""`efficientai export`: real classifiers to TFLite, ONNX and Core ML, each file run by its runtime against MLX;
a language model to ONNX in onnxruntime; bad requests answered with exit code 2, a message naming the fault, no file."""
import json, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

import efficientai  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx
import efficientai.deploy.export as E
from efficientai.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import efficientai.deploy.export, sys; from efficientai.cli import main; "
                             "sys.exit(main(sys.argv[1:]))"]


def _train(kind: str, steps: int, seed: int = 0, **cfg):
    from efficientai.zoo.tiny import tiny_model
    from efficientai.zoo.images import fashion_mnist
    from efficientai.compress.train import fit, classifier_batches, classifier_loss, evaluate_classifier
    ds = fashion_mnist()
    model = tiny_model(kind, seed=seed, **cfg)
    fit(model, classifier_loss, classifier_batches(ds.train, 64, seed=seed), steps=steps, lr=3e-3, warmup=10)
    return model, evaluate_classifier(model, ds.test)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    "An MLP and a CNN trained briefly on Fashion-MNIST (well above chance), saved as classifier folders."
    from efficientai.compress.classifier import save_classifier
    root = tmp_path_factory.mktemp("classifiers")
    mlp, mlp_acc = _train("mlp", 150)
    cnn, cnn_acc = _train("cnn", 60, channels=(8, 16), hidden=32)
    assert mlp_acc > 0.6 and cnn_acc > 0.6, (mlp_acc, cnn_acc)
    return {"mlp": save_classifier(mlp, root / "fashion-mlp"), "cnn": save_classifier(cnn, root / "fashion-cnn-small")}


def _json_reports(capsys) -> list[dict]:
    return json.loads(capsys.readouterr().out)


def test_cli_exports_a_classifier_to_every_format(classifiers, tmp_path, capsys):
    out = tmp_path / "exports"
    assert main(["export", str(classifiers["cnn"]), "--to", "tflite", "onnx", "coreml", "--out", str(out),
                 "--samples", "128", "--json"]) == 0
    reports = {r["format"]: r for r in _json_reports(capsys)}
    assert set(reports) == {"tflite", "onnx", "coreml"}
    for fmt, r in reports.items():
        c = r["check"]
        assert Path(r["path"]).exists() and r["size_mb"] > 0.01, r
        assert c["inputs"] == "128 Fashion-MNIST test images" and c["metric"] == "top-1"
        assert r["passed"] and c["agreement"] >= 0.99, (fmt, c)
        limit = 1e-3 if fmt != "coreml" else 0.05 * c["max_abs_ref"]       # float32 files vs the fp16 package
        assert c["max_abs_diff"] < limit, (fmt, c)
    assert reports["tflite"]["check"]["runtime"].startswith("LiteRT")
    assert reports["onnx"]["check"]["runtime"].startswith("onnxruntime")
    assert reports["tflite"]["details"]["operators"][:2] == ["CONV_2D", "MAX_POOL_2D"]
    assert reports["coreml"]["details"]["ops"]["conv"] == 2


def test_tflite_file_runs_in_litert_like_mlx(classifiers, tmp_path):
    "Independently of the command's own check: LiteRT's interpreter on test images, MLX on the same images."
    from ai_edge_litert.interpreter import Interpreter
    from efficientai.compress.classifier import load_classifier
    from efficientai.zoo.images import fashion_mnist
    for kind in ("mlp", "cnn"):
        path = E.export_tflite(load_classifier(classifiers[kind]), tmp_path / f"{kind}.tflite")
        model = load_classifier(classifiers[kind])
        x = np.asarray(fashion_mnist().test.images[:64], np.float32) / 255
        if kind == "mlp": x = x.reshape(len(x), -1)
        it = Interpreter(model_path=str(path))
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], list(x.shape)); it.allocate_tensors()
        it.set_tensor(inp["index"], x); it.invoke()
        y = it.get_tensor(it.get_output_details()[0]["index"])
        ref = np.array(model(mx.array(x)))
        np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)


def test_int8_tflite_is_smaller_and_still_agrees(classifiers, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["export", str(classifiers["mlp"]), "--to", "tflite", "--quantize", "int8", "--out", str(out),
                 "--samples", "200", "--json"]) == 0
    (r,) = _json_reports(capsys)
    assert r["details"]["int8_weights"] == 3 and r["passed"] and r["check"]["agreement"] >= 0.98
    float_file = E.export_tflite(E.load_for_export(classifiers["mlp"]).model, tmp_path / "float.tflite")
    assert r["size_mb"] * 1e6 < 0.3 * float_file.stat().st_size


def test_a_check_can_fail(classifiers, tmp_path):
    "A file run against a different model disagrees: the check is not a formality."
    loaded = E.load_for_export(classifiers["mlp"])
    other, _ = _train("mlp", 20, seed=7)
    path = E.export_tflite(other, tmp_path / "other.tflite")
    feeds, what = E.check_inputs(loaded, samples=200)
    check = E.run_check(loaded, "tflite", path, feeds, what)
    assert check.passed is False and check.agreement < 0.95 and check.max_abs_diff > 1.0, check


def test_language_model_to_onnx_checked_by_onnxruntime(tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(["export", "smollm2-135m-instruct-4bit", "--to", "onnx", "--quantize", "own", "--seq-len", "8",
                 "--out", str(out), "--json"]) == 0
    (r,) = _json_reports(capsys)
    c = r["check"]
    assert r["family"] == "llm" and c["inputs"] == "8 held-out KJV tokens" and c["runtime"].startswith("onnxruntime")
    assert r["passed"] and c["agreement"] == 1.0 and c["max_abs_diff"] < 1e-2, c


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from efficientai.zoo.tiny import tiny_model, save_tiny_lm
    return save_tiny_lm(tiny_model("llama", num_hidden_layers=1, hidden_size=64, intermediate_size=128),
                        tmp_path_factory.mktemp("lm") / "tiny-llama")


def _corrupt_copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    weights = dest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return dest


@pytest.mark.parametrize("case", ["missing folder", "unsupported pair", "corrupt weights", "bad quantize", "bad out"])
def test_bad_requests_exit_2_naming_the_fault_and_write_nothing(case, classifiers, tiny_lm, tmp_path, capsys):
    out = tmp_path / "out"
    model, extra, named = {
        "missing folder": (tmp_path / "no-such-model", [], "no-such-model: no such folder"),
        "unsupported pair": (tiny_lm, [], "can't be exported to tflite"),
        "corrupt weights": (_corrupt_copy(classifiers["mlp"], tmp_path / "broken"), [], "broken"),
        "bad quantize": (classifiers["mlp"], ["--quantize", "palettize3"], "palettize3"),
        "bad out": (classifiers["mlp"], ["--out", str(out / "model.onnx")], "model.onnx"),
    }[case]
    argv = ["export", str(model), "--to", "tflite", *extra]
    if "--out" not in extra: argv += ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err, err
    if case == "unsupported pair": assert "classifier" in err and "coreml, onnx, tflite" in err   # lists what works
    assert not out.exists()


def test_unknown_format_through_the_command_line(classifiers, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([*CLI, "export", str(classifiers["mlp"]), "--to", "tensorflow", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "tensorflow" in run.stderr and "tflite" in run.stderr, run.stderr
    assert not out.exists()


def test_diffusion_unet_and_clip_tower_go_through_the_same_door(tmp_path, capsys):
    "The other families reach their chapters' exporters, and both files are run against MLX (cosine of the outputs)."
    from efficientai.diffusion.unet import UNet, UNetConfig
    from efficientai.diffusion.train import DiffusionConfig, save_diffusion, train_diffusion
    from efficientai.clip.model import build_clip, save_clip
    from efficientai.zoo.images import digits
    ds = digits()                                                         # 8x8 digits: a small UNet, a quick check
    unet = UNet(UNetConfig(image_size=16, channels=(16, 32), attention=(False, True), num_classes=10, groups=4))
    cfg = DiffusionConfig(steps=15, batch_size=16, warmup=2, ema=0.0)
    train_diffusion(unet, ds.train.images, ds.train.labels, cfg)         # a few steps: outputs no longer zero
    save_diffusion(tmp_path / "unet", unet, cfg)
    save_clip(build_clip(image_size=64), tmp_path / "clip")
    for name, extra in (("unet", ["--batch", "2", "--samples", "4"]), ("clip", ["--samples", "2"])):
        assert main(["export", str(tmp_path / name), "--to", "onnx", "coreml", "--out", str(tmp_path / "o"),
                     "--json", *extra]) == 0
        for r in _json_reports(capsys):
            c = r["check"]
            assert r["passed"] and c["metric"] == "cosine" and c["agreement"] > 0.999 and c["max_abs_ref"] > 0.01, r
