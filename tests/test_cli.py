"""The `efficientai` command line, run as a user would."""
import json
from pathlib import Path


def test_help_lists_every_command(cli):
    out = cli("--help").stdout
    for c in ("info", "bench", "config", "kernel", "docs", "zoo", "lora", "quant", "compress"):
        assert c in out


def test_info_reports_backend_blas_and_live_matmul(cli):
    d = json.loads(cli("info", "--size", "256", "--json").stdout)
    assert d["backend"] in ("cpu", "metal", "cuda")
    assert d["blas"]["how"] in ("preloaded", "LD_PRELOAD", "native")
    assert d["matmul"]["mlx_gflops"] > 0 and d["matmul"]["numpy_gflops"] > 0
    human = cli("info", "--size", "128").stdout
    assert "BLAS" in human and "matmul" in human and "ratio" in human
    assert d["quant_kernels"] and "quantized CPU kernels" in human   # built, loaded, or why not
    assert d["engine"] and "fused CPU primitives" in human           # the engine's MLX extension: the same


def test_config_show_profiles_and_env(cli):
    out = cli("config", "show", "--profile", "ci").stdout
    assert "benchmark.repeats = 3" in out and "profile: ci" in out
    out = cli("config", "show", env={"EFFICIENTAI_BENCHMARK__REPEATS": "4"}).stdout
    assert "benchmark.repeats = 4  (env)" in out


def test_bad_configs_name_file_key_and_type(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmark:\n  repeats: many\n")
    p = cli("config", "show", "--config", str(bad), check=False)
    assert p.returncode == 2
    assert f"{bad}:benchmark.repeats: wrong type (expected int, got 'many')" in p.stderr
    assert "Traceback" not in p.stderr
    p = cli("config", "show", "--profile", "nope", check=False)
    assert p.returncode == 2 and "unknown profile 'nope'; available: ci, mac" in p.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[benchmark\nrepeats = 3\n")
    p = cli("config", "show", "--config", str(broken), check=False)
    assert p.returncode == 2 and f"{broken}: cannot parse TOML" in p.stderr
    typo = tmp_path / "typo.json"
    typo.write_text('{"deployment": {"prot": 8080}}')
    p = cli("config", "show", "--config", str(typo), check=False)
    assert p.returncode == 2 and "deployment.prot: unknown key" in p.stderr


def test_bench_matmul_writes_results_plot_and_history(cli, tmp_path):
    out = tmp_path / "bench"
    env = {"EFFICIENTAI_PROFILE": "ci", "EFFICIENTAI_BENCHMARK__HISTORY_FILE": str(out / "history.jsonl")}
    for _ in range(2):
        cli("bench", "matmul", "--sizes", "64", "128", "--dtypes", "float32", "--out", str(out), env=env)
    res = json.loads((out / "matmul.json").read_text())
    names = {r["name"] for r in res["results"]}
    assert names == {"numpy float32", "mlx (efficientai)", "mlx (plain import)"}
    assert res["backend"]["blas"]["how"] in ("preloaded", "native")
    assert all(r["speedup"] > 0 and r["previous_median_s"] for r in res["results"])  # second run saw the first
    assert (out / "matmul.png").read_bytes()[:4] == b"\x89PNG"
    assert "| group" in (out / "matmul.md").read_text()
    assert len((out / "history.jsonl").read_text().splitlines()) == 12
