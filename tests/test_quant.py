"""The quantization chapter end to end from the command line: what a user who never opens a notebook runs."""
import json

from conftest import BIN, run, full_disk_run, digests

MODEL = "smollm2-135m-instruct"


def test_gptq_run_saves_a_folder_mlx_lm_generates_with(cli, tmp_path):
    out = tmp_path / "gptq-q4"
    p = cli("quant", "run", MODEL, "--method", "gptq", "--spec", "q4", "--calib-samples", "4", "--calib-len", "128",
            "--out", str(out), "--eval-tokens", "600")
    assert "bits per weight" in p.stdout and "top-1 agreement" in p.stdout, p.stdout
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 64)
    g = run([str(BIN / "python"), "-m", "mlx_lm", "generate", "--model", str(out), "--prompt", "In the beginning",
             "--max-tokens", "8", "--temp", "0"])
    assert g.stdout.count("==========") == 2 and "Generation:" in g.stdout, g.stdout


def test_compare_writes_table_and_plot_with_kernels(cli, tmp_path):
    out = tmp_path / "cmp"
    cli("quant", "compare", MODEL, "--specs", "q8,q4", "--tokens", "600", "--window", "256", "--prompt-tokens", "16",
        "--gen-tokens", "4", "--fast", "--out", str(out))
    rows = {r["variant"]: r for r in json.loads((out / "compare.json").read_text())}
    assert list(rows) == ["float", "q8", "q4"]
    assert 0 < rows["q8"]["kl"] < rows["q4"]["kl"] and rows["q8"]["top1"] > rows["q4"]["top1"]
    assert rows["q4"]["disk_mb"] < rows["q8"]["disk_mb"] < rows["float"]["disk_mb"] / 3
    assert (out / "pareto.png").stat().st_size > 10_000


def test_onnx_export_of_a_quantized_model_agrees_with_mlx(cli, tmp_path):
    p = cli("quant", "export", MODEL, "--to", "onnx", "--quantize", "q4", "--seq-len", "16", "--out", str(tmp_path / "m.onnx"))
    r = json.loads(p.stdout)
    assert r["max_abs_diff"] < 1e-3 and r["top1_agreement"] == 1.0, r
    assert r["onnx_mb"] < 150, r  # 4-bit codes, not float weights


def test_bad_inputs_name_what_is_wrong(cli, tmp_path):
    p = cli("quant", "run", "smollm2-135m-instruct-4bit", "--out", str(tmp_path / "x"), check=False)
    assert p.returncode == 2 and "already quantized" in p.stderr, p.stderr
    p = cli("quant", "run", MODEL, "--spec", "q4g48", "--out", str(tmp_path / "x"), check=False)
    assert p.returncode == 2 and "group_size" in p.stderr and "48" in p.stderr, p.stderr
    p = cli("quant", "export", MODEL, "--to", "onnx", "--out", str(tmp_path / "m.txt"), check=False)
    assert p.returncode == 2 and ".onnx" in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()


def test_existing_output_survives_a_failed_run(cli, tmp_path):
    out = tmp_path / "q8"
    cli("quant", "run", MODEL, "--spec", "q8", "--out", str(out))
    before = digests(out)
    p = cli("quant", "run", MODEL, "--method", "mixed", "--out", str(out), check=False)  # no --bpw: refused up front
    assert p.returncode == 2 and "--bpw" in p.stderr
    # A q4 run whose disk fills up while it writes the weights (files capped at 10 MB, the weights are ~85 MB):
    # the save fails half-way, and the q8 folder must be left byte for byte as it was, with no temporary beside it.
    p = full_disk_run([str(BIN / "efficientai"), "quant", "run", MODEL, "--spec", "q4", "--out", str(out)], 10_000_000)
    assert p.returncode != 0 and "Unable to write" in p.stderr, p.stderr[-3000:]
    assert digests(out) == before
    assert [f.name for f in tmp_path.iterdir()] == ["q8"]
