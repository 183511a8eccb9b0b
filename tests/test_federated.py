"""The federated chapter as a user meets it: a real deployment (a SuperLink and three SuperNodes, each its own process
on loopback) trained through `flwr run` by `efficientai fed run`, which leaves no process behind; `efficientai fed
simulate` writing its outputs; bad strategies and node configs named, whether on the command line or on a SuperNode."""
import contextlib, json, os, subprocess, sys, time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, ROOT, run


def flower_processes(home: Path) -> list[psutil.Process]:
    "Running processes whose FLWR_HOME lies under `home`: everything a command started with that home."
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("FLWR_HOME", "").startswith(str(home)):
                found.append(p)
    return found


def _role(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error, IndexError):
        return Path(p.cmdline()[1]).name
    return "?"


def test_deployment_trains_fashion_mnist_and_stops_everything(tmp_path):
    out, home = tmp_path / "out", tmp_path / "home"
    cmd = [str(BIN / "efficientai"), "fed", "run", "--nodes", "3", "--rounds", "2", "--per-client", "1000",
           "--local-steps", "100", "--test-size", "1000", "--out", str(out), "--home", str(home)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EFFICIENTAI_")}
    cli = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}                        # every Flower process that ran with this home, by role
    deadline = time.time() + 600
    while cli.poll() is None and time.time() < deadline:
        for p in flower_processes(home): seen.setdefault(p.pid, _role(p))
        time.sleep(0.5)
    if cli.poll() is None: cli.kill()
    stdout, stderr = cli.communicate()
    assert cli.returncode == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"

    roles = sorted(seen.values())
    assert roles.count("flower-superlink") == 1 and roles.count("flower-supernode") == 3, roles
    assert "flwr-serverapp" in roles and "flwr-clientapp" in roles, roles     # Flower's own app processes ran too
    record = json.loads((out / "history.json").read_text())
    rounds = record["rounds"]
    assert [(r["sent"], r["replies"], r["failures"], r["missing"]) for r in rounds] == [(3, 3, 0, 0)] * 2
    assert len({n for r in rounds for n in r["replied"]}) == 3                 # three distinct SuperNodes answered
    acc = record["history"]["accuracy"]
    assert len(acc) == 3 and acc[0] < 0.2, acc                                 # round 0: the untrained MLP
    assert acc[-1] > 0.6, acc        # measured 0.650 (0.426, 0.650 by round; 0.681 after a third), as simulate gives
    assert "round 2: accuracy" in stdout and (out / "rounds.md").is_file() and (out / "accuracy.png").is_file()
    left = flower_processes(home)
    assert left == [], [(p.pid, _role(p)) for p in left]
    assert not [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_cli_simulate_writes_json_markdown_and_plot(tmp_path, cli):
    p = cli("fed", "simulate", "--out", str(tmp_path), "--strategy", "fedavg", "--strategy", "median", "--clients", "3",
            "--rounds", "2", "--per-client", "200", "--local-steps", "5", "--test-size", "300")
    saved = json.loads((tmp_path / "histories.json").read_text())
    assert [h["strategy"] for h in saved["histories"]] == ["fedavg", "median"]
    assert all(len(h["accuracy"]) == 3 for h in saved["histories"])
    assert saved["task"]["num_clients"] == 3 and saved["task"]["per_client"] == 200
    table = (tmp_path / "histories.md").read_text()
    assert "| fedavg" in table and "| median" in table and "final acc" in table
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert "wrote histories.json" in p.stdout


def test_bad_strategy_and_node_config_are_named(tmp_path, cli):
    p = cli("fed", "simulate", "--out", str(tmp_path), "--strategy", "fedavg", "fedsgd", check=False)
    assert p.returncode == 2 and "got 'fedsgd'" in p.stderr and "fedavg | fedprox" in p.stderr, p.stderr
    p = cli("fed", "join", "--superlink", "127.0.0.1:1", "--partition-id", "3", "--num-partitions", "3", check=False)
    assert p.returncode == 2 and "partition-id" in p.stderr and "expected 0..2, got 3" in p.stderr, p.stderr
    p = cli("fed", "run", "--out", str(tmp_path), "--nodes", "3", "--byzantine", "1;3", check=False)
    assert p.returncode == 2 and "byzantine" in p.stderr and "'1;3'" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []                   # refused before anything was started or written


def test_supernode_with_a_bad_partition_is_named_by_the_run(tmp_path):
    # A SuperNode started by hand with a share outside the federation: its ClientApp refuses every message, and the
    # run fails with the client's own error (which names the value) instead of training on nothing.
    probe = r"""
import subprocess, sys
from efficientai.federated.deploy import Federation, flower_bin, process_tree, stop_processes, free_port
from efficientai.errors import DeploymentError
with Federation(0, home=sys.argv[1]) as fed:
    node = subprocess.Popen([str(flower_bin("flower-supernode")), "--insecure", "--superlink", fed.address, "--port",
                             str(free_port()), "--node-config", "partition-id=7 num-partitions=3"], env=fed.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        fed.run({"task.num_clients": 3, "task.per_client": 100, "task.local_steps": 2, "task.test_size": 200,
                 "rounds": 1, "min-train-nodes": 1, "timeout": 120}, progress=False)
        print("NO ERROR")
    except DeploymentError as e:
        print(e)
    finally:
        stop_processes(process_tree(node.pid))
"""
    home = tmp_path / "home"
    p = run([str(BIN / "python"), "-c", probe, str(home)], timeout=400)
    assert "NO ERROR" not in p.stdout, p.stdout
    assert "no client answered in any round" in p.stdout, p.stdout
    assert "partition-id" in p.stdout and "got 7" in p.stdout, p.stdout
    assert flower_processes(home) == []
