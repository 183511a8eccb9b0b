"""The profile's `project` keys act on every command: log level and format, device, seeds, default output folder."""
import json, sys

from conftest import run

PROFILES = """[DEFAULT]
project.log_level = WARNING

[debug]
project.log_level = DEBUG

[json]
project.log_level = DEBUG
project.log_json = true

[cpu]
project.device = cpu

[gpu]
project.device = gpu
"""


def under(tmp_path, profile: str, **env) -> dict:
    "Environment that runs under `profile` of a settings file of our own."
    (tmp_path / "settings.ini").write_text(PROFILES)
    return {"EFFICIENTAI_CONFIG": str(tmp_path / "settings.ini"), "EFFICIENTAI_PROFILE": profile, **env}


def test_log_level_comes_from_the_profile_and_v_wins(cli, tmp_path):
    quiet = cli("info", "--size", "0", env=under(tmp_path, "DEFAULT")).stderr
    assert "DEBUG" not in quiet, quiet
    debug = cli("info", "--size", "0", env=under(tmp_path, "debug")).stderr
    assert "DEBUG efficientai.cli: settings" in debug and "profile debug" in debug, debug
    flag = cli("-v", "info", "--size", "0", env=under(tmp_path, "DEFAULT")).stderr   # -v over the profile's WARNING
    assert "DEBUG efficientai.cli: settings" in flag, flag


def test_log_json_makes_every_log_line_a_json_object(cli, tmp_path):
    lines = cli("info", "--size", "0", env=under(tmp_path, "json")).stderr.splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(r["level"] in ("DEBUG", "INFO", "WARNING") for r in records), lines
    assert any(r["logger"] == "efficientai.cli" and "profile json" in r["message"] for r in records), records


def test_device_is_set_from_the_profile(cli, tmp_path):
    d = json.loads(cli("info", "--size", "0", "--json", env=under(tmp_path, "cpu")).stdout)
    assert "cpu" in d["default_device"], d["default_device"]
    p = cli("info", "--size", "0", "--json", env=under(tmp_path, "gpu"), check=False)
    if d["backend"] == "cpu":      # the [mac]-style profile on a machine without a GPU: refused, not run on the CPU
        assert p.returncode == 2, p.stdout
        assert "settings.ini:project.device: no GPU backend" in p.stderr and "profile gpu" in p.stderr, p.stderr
    else:
        assert p.returncode == 0 and "gpu" in json.loads(p.stdout)["default_device"], p.stdout + p.stderr


def test_seed_fixes_the_global_draws_of_a_command(tmp_path):
    code = ("import sys; from efficientai.cli import main; import mlx.core as mx, numpy as np, random; "
            "main(['config', 'show', '--json']); "
            "print('DRAW', mx.random.uniform().item(), np.random.rand(), random.random())")
    def draw(seed: str) -> str:
        out = run([sys.executable, "-c", code], env={"EFFICIENTAI_PROJECT__SEED": seed}).stdout
        return out.split("DRAW", 1)[1].strip()
    assert draw("3") == draw("3")
    assert draw("3") != draw("4")


def test_output_dir_is_where_commands_write_by_default(cli, tmp_path):
    runs = tmp_path / "elsewhere"
    (runs / "notebooks").mkdir(parents=True)
    (runs / "notebooks" / "notebooks.json").write_text('[{"name": "only-here.ipynb", "seconds": 4.5}]')
    out = cli("notebooks", "slowest", env={"EFFICIENTAI_PROJECT__OUTPUT_DIR": str(runs)}).stdout
    assert "| 1 | notebook | only-here.ipynb | 4.5 |" in out, out
    p = cli("notebooks", "slowest", str(tmp_path / "none"), env={"EFFICIENTAI_PROJECT__OUTPUT_DIR": str(runs)},
            check=False)                                               # a path on the command line wins
    assert p.returncode == 2 and str(tmp_path / "none") in p.stderr, p.stderr
