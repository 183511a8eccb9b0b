"""The command line's contract, held for every subcommand: a `ToolkitError` (or a usage error) exits 2 with a short
message naming what is wrong and no traceback; anything unexpected exits 1 with the error's type, its first line and a
pointer to `-v`; with `-v` both print the traceback too.

The subcommands are found by walking the parser `efficientai` builds, so a new command fails
`test_bad_invocation[NEW]` until it gets a bad invocation below. In-process (`cli.main`), each failing before any
model, dataset or server is loaded or started."""
import argparse

import pytest

from efficientai import cli


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple = ()) -> list[str]:
    "Every runnable subcommand of `parser`, as the words a user types: 'quant run', 'serve', ..."
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs: return [" ".join(prefix)]
    return [c for name, p in subs[0].choices.items() for c in leaf_commands(p, (*prefix, name))]


LEAVES = leaf_commands(cli.build_parser())

# command -> (arguments after it, what the message must contain, environment); {N}: a path that does not exist,
# {T}: a scratch folder. Each reaches the command's own checks (not only argparse's) where the command has any.
BAD = {
    "info": (["--size", "-5"], "-5", {}),
    "bench matmul": (["--sizes", "0", "--out", "{T}/b"], "got 0", {}),
    "bench notebook": (["{N}"], "{N}", {}),
    "config show": (["--config", "{N}.yaml"], "{N}.yaml", {}),
    "kernel install": (["--name", "bad/name"], "bad/name", {}),
    "docs build": (["--skip", "no-such-folder", "--out", "{T}/site"], "no-such-folder", {}),
    "docs readme": (["--check"], "not inside the EfficientAI repository", {"cwd": "{T}"}),
    "notebooks run": (["{N}"], "{N}", {}),
    "notebooks slowest": (["{N}"], "{N}", {}),
    "zoo list": ([], "/dev/null/cache", {"EFFICIENTAI_CACHE": "/dev/null/cache"}),
    "zoo fetch": (["no-such-entry"], "no-such-entry", {}),
    "zoo info": (["no-such-entry"], "no-such-entry", {}),
    "lora train": (["--model", "{N}", "--data", "{N}", "--adapter-path", "{T}/a"], "{N}", {}),
    "lora eval": (["--adapter-path", "{N}"], "{N}", {}),
    "lora fuse": (["--adapter-path", "{N}", "--save-path", "{T}/fused"], "{N}", {}),
    "lora generate": (["--adapter-path", "{N}", "--prompt", "hi"], "{N}", {}),
    "lora search": (["--model", "{N}", "--data", "{N}", "--out", "{T}/s"], "{N}", {}),
    "quant run": (["{N}", "--spec", "q4", "--out", "{T}/q"], "{N}", {}),
    "quant compare": (["{N}", "--out", "{T}/qc"], "{N}", {}),
    "quant export": (["{N}", "--to", "onnx", "--out", "{T}/qe"], "{N}", {}),
    "compress run": (["{N}", "--pipeline", "prune=0.5", "--out", "{T}/c"], "{N}", {}),
    "clip train": (["--data", "{N}", "--out", "{T}/ct"], "{N}", {}),
    "clip eval": (["{N}"], "{N}", {}),
    "clip embed": (["{N}", "--texts", "{N}", "--out", "{T}/ce"], "{N}", {}),
    "clip search": (["{N}", "{N}", "--query", "a cat"], "{N}", {}),
    "diffusion train": (["--data", "{N}", "--out", "{T}/dt"], "{N}", {}),
    "diffusion sample": (["{N}", "--out", "{T}/ds"], "{N}", {}),
    "diffusion distill": (["{N}", "--out", "{T}/dd"], "{N}", {}),
    "diffusion lora": (["{N}", "--out", "{T}/dl"], "{N}", {}),
    "diffusion export": (["{N}", "--out", "{T}/de"], "{N}", {}),
    "fed simulate": (["--dataset", "no-such-data", "--out", "{T}/fs"], "no-such-data", {}),
    "fed run": (["--dataset", "no-such-data", "--out", "{T}/fr"], "no-such-data", {}),
    "fed serve": (["--home", "/dev/null/home", "--seconds", "1"], "/dev/null/home", {}),
    "fed join": (["--superlink", "127.0.0.1:9", "--partition-id", "5", "--num-partitions", "2", "--seconds", "1"],
                 "got 5", {}),
    "serve": (["{N}"], "{N}", {}),
    "demo": (["chat"], "--adapter-path", {}),   # chat compares a fine-tune with its base: no adapter, no demo
    "export": (["{N}", "--to", "onnx", "--out", "{T}/ex"], "{N}", {}),
}


def run(argv: list[str], capsys) -> tuple[int, str]:
    "Exit status and stderr of `efficientai ARGV`, as the console script would give them."
    capsys.readouterr()
    try: rc = cli.main(argv)
    except SystemExit as e: rc = e.code   # argparse's usage errors
    return rc, capsys.readouterr().err


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTAI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EFFICIENTAI_PROJECT__OUTPUT_DIR", str(tmp_path / "runs"))
    return tmp_path


def test_every_command_is_listed():
    assert len(LEAVES) > 30 and "quant run" in LEAVES and "serve" in LEAVES
    assert not set(BAD) - set(LEAVES), f"commands that no longer exist: {sorted(set(BAD) - set(LEAVES))}"


@pytest.mark.parametrize("command", LEAVES)
def test_bad_invocation(command, scratch, monkeypatch, capsys):
    assert command in BAD, f"`efficientai {command}` has no bad invocation in BAD: add one"
    args, named, env = BAD[command]
    fill = lambda s: s.replace("{N}", str(scratch / "nope")).replace("{T}", str(scratch))
    for k, v in env.items():
        if k == "cwd": monkeypatch.chdir(fill(v))
        else: monkeypatch.setenv(k, fill(v))
    rc, err = run([*command.split(), *map(fill, args)], capsys)
    assert rc == 2, err
    assert fill(named) in err and "Traceback" not in err, err
    assert err.strip() and "\n\n" not in err.strip(), err          # one paragraph
    assert "unexpected" not in err, err


@pytest.fixture
def broken_command():
    "A command registered the way a chapter registers one, with a bug a test can't prevent: it trusts its file."
    @cli.command("broken")
    def _broken(sub):
        p = sub.add_parser("broken", help="reads a number from a file")
        p.add_argument("file")
        p.set_defaults(func=lambda args: int(open(args.file).read()) and 0)
    yield
    del cli.COMMANDS["broken"]


def test_unexpected_error_exits_1_with_a_pointer_to_verbose(broken_command, scratch, capsys):
    (scratch / "n.txt").write_text("twelve\n")
    rc, err = run(["broken", str(scratch / "n.txt")], capsys)
    assert rc == 1, err
    assert "unexpected ValueError: invalid literal for int() with base 10: 'twelve" in err, err
    assert "efficientai -v broken" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    rc, err = run(["-v", "broken", str(scratch / "n.txt")], capsys)
    assert rc == 1 and "Traceback (most recent call last)" in err and "unexpected ValueError" in err, err


def test_verbose_shows_the_traceback_of_a_toolkit_error(scratch, capsys):
    rc, err = run(["-v", "zoo", "info", "no-such-entry"], capsys)
    assert rc == 2 and "Traceback (most recent call last)" in err and "no zoo entry named 'no-such-entry'" in err, err
