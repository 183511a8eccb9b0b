"""The compression chapter end to end from the command line: what a user who never opens a notebook runs."""
import json

from conftest import BIN, ROOT, run, full_disk_run, digests

MODEL = "smollm2-135m-instruct"


def test_pruned_quantized_llm_is_an_mlx_lm_folder(cli, tmp_path):
    out = tmp_path / "llm"
    p = cli("compress", "run", MODEL, "--pipeline", "prune=0.3@2,quantize=q8", "--train-tokens", "4000",
            "--eval-tokens", "520", "--no-onnx", "--repeat", "1", "--out", str(out))
    rows = json.loads((out / "compare.json").read_text())
    assert [r["variant"] for r in rows] == ["original", "prune=0.3@2", "prune=0.3@2+quantize=q8"], p.stdout
    assert rows[1]["params"] < 0.85 * rows[0]["params"] and rows[2]["disk_mb"] < 0.3 * rows[1]["disk_mb"]
    assert rows[0]["perplexity"] < rows[1]["perplexity"] < 10 * rows[0]["perplexity"]
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["intermediate_size"] < 1536 and cfg["quantization"]["bits"] == 8
    g = run([str(BIN / "python"), "-m", "mlx_lm", "generate", "--model", str(out / "model"), "--prompt", "In the beginning",
             "--max-tokens", "8", "--temp", "0"])
    assert g.stdout.count("==========") == 2 and "Generation:" in g.stdout, g.stdout


def test_factorized_cnn_exports_to_onnx_and_reloads(cli, tmp_path):
    out = tmp_path / "cnn"
    cli("compress", "run", "fashion-cnn", "--pipeline", "lowrank=0.6@20", "--repeat", "1", "--out", str(out))
    rows = json.loads((out / "compare.json").read_text())
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["onnx_max_diff"] < 1e-3, rows
    assert rows[1]["accuracy"] > 0.7, rows
    # the saved model is the factorized one: a second pipeline starts from it
    cli("compress", "run", str(out / "model"), "--pipeline", "quantize=q8g32", "--repeat", "1", "--no-onnx", "--out", str(tmp_path / "q"))
    rows2 = json.loads((tmp_path / "q" / "compare.json").read_text())
    assert rows2[0]["params"] == rows[1]["params"] and abs(rows2[0]["accuracy"] - rows[1]["accuracy"]) < 1e-9


def test_bad_inputs_name_what_is_wrong_and_keep_earlier_results(cli, tmp_path):
    p = cli("compress", "run", MODEL, "--pipeline", "shrink=0.5", "--out", str(tmp_path / "x"), check=False)
    assert p.returncode == 2 and "shrink" in p.stderr, p.stderr
    p = cli("compress", "run", str(tmp_path / "missing"), "--pipeline", "prune=0.5", "--out", str(tmp_path / "x"), check=False)
    assert p.returncode == 2 and "missing" in p.stderr, p.stderr
    p = cli("compress", "run", "fashion-cnn", "--pipeline", "heads=0.5", "--out", str(tmp_path / "x"), check=False)
    assert p.returncode == 2 and "heads" in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()
    out = tmp_path / "cnn"
    cli("compress", "run", "fashion-cnn", "--pipeline", "prune=0.5,quantize=q8g32", "--no-onnx", "--repeat", "1",
        "--out", str(out))
    before = digests(out / "model")
    p = cli("compress", "run", "fashion-cnn", "--pipeline", "prune=0.5,quantize=q8", "--no-onnx", "--out", str(out), check=False)
    # 8-bit groups of 64 would leave the pruned CNN's layers in float: refused, naming the layers, nothing overwritten
    assert p.returncode == 2 and "fc" in p.stderr and "g32" in p.stderr, p.stderr
    assert digests(out / "model") == before
    # The float pruned model (stages resumed from the first run) saved on a disk that fills up while it writes the
    # weights (files capped at 1 MB, the weights are 1.6 MB): the save fails half-way, the q8 model stays as it was.
    args = ["compress", "run", "fashion-cnn", "--pipeline", "prune=0.5", "--no-onnx", "--repeat", "1", "--out", str(out)]
    p = full_disk_run([str(BIN / "efficientai"), *args], 1_000_000)
    assert p.returncode != 0 and "Unable to write" in p.stderr, p.stderr[-3000:]
    assert digests(out / "model") == before
    assert not [f.name for f in out.iterdir() if f.name.startswith(".model.")]   # no temporary left beside it


LAYOUTS = ROOT / "tests" / "fixtures" / "classifier_layouts"


def test_classifier_folders_of_the_older_layouts_load_and_resave_in_the_current_one(tmp_path):
    # Folders written by the writers before compress.classifier (commit 09222cc, see the fixtures' README):
    # save_lowrank's factorized MLP, the pipeline's first save_classifier (factorized + q8g32 CNN, fc.down kept float)
    # and the zoo teacher's CNN. Each loads to the outputs it gave when saved (to float rounding: another machine's BLAS
    # may sum in another order), and saves again in the current layout, which loads to the very same outputs.
    from efficientai.compress.classifier import classifier_layout, load_classifier, save_classifier, FORMAT_VERSION
    import numpy as np
    import mlx.core as mx
    from efficientai.compress.cli import load_any
    from efficientai.compress.distill import load_teacher
    expected = np.load(LAYOUTS / "expected.npz")
    for name, layout, x in [("lowrank-mlp", "lowrank-v0", "x_mlp"), ("pipeline-cnn", "classifier-v1", "x_cnn"),
                            ("teacher-cnn", "teacher-v0", "x_cnn")]:
        folder, want = LAYOUTS / name, expected[name.replace("-", "_")]
        assert classifier_layout(json.loads((folder / "config.json").read_text())) == layout
        outs = [np.array(m(mx.array(expected[x]))) for m in (load_classifier(folder), load_any(str(folder))[0])]
        for out in outs: np.testing.assert_allclose(out, want, atol=1e-5, err_msg=name)
        again = save_classifier(load_classifier(folder), tmp_path / name)
        info = json.loads((again / "config.json").read_text())
        assert info["format_version"] == FORMAT_VERSION and classifier_layout(info) == "current"
        assert np.array_equal(np.array(load_classifier(again)(mx.array(expected[x]))), outs[0]), name
    assert json.loads((tmp_path / "pipeline-cnn" / "config.json").read_text())["quantized"] == \
        {"head": {"bits": 8, "group_size": 32, "mode": "affine"}}
    teacher = load_teacher(LAYOUTS / "teacher-cnn")
    assert teacher.info["test_accuracy"] == 0.5 and teacher.train_logits.shape == (2, 3)
