"""The server's container without a container engine: the repository's Dockerfile passes hadolint and our checks (and a
broken one gets the expected findings); its build steps, run outside Docker, make an environment whose `efficientai
info` reports the fast BLAS and whose `CMD` starts the server, as the image's non-root user, until the image's own
`HEALTHCHECK` passes; bad Dockerfiles and failing steps name their line."""
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import efficientai  # noqa: F401  (fast BLAS before MLX)
from efficientai.deploy.container import build_outside_docker, context_files, hadolint, lint, own_checks
from efficientai.deploy.server import free_port
from efficientai.errors import DeploymentError

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
# Build arguments that only make the build faster (the image keeps UV_COMPILE_BYTECODE=1, UV_LINK_MODE=copy).
QUICK = {"UV_COMPILE_BYTECODE": "0", "UV_LINK_MODE": "hardlink"}

BROKEN = """FROM debian:latest
RUN apt-get update && apt-get install -y python3
COPY . /app
RUN uv sync
CMD efficientai serve smollm2-135m-instruct
"""


def test_repo_dockerfile_lints_clean():
    assert hadolint(DOCKERFILE) == []
    assert own_checks(DOCKERFILE) == []
    found = lint(DOCKERFILE)                 # with compose.yaml: same healthcheck, an EXPOSEd port
    assert found.empty, found.to_string()


def test_broken_dockerfile_findings(tmp_path):
    (tmp_path / "Dockerfile").write_text(BROKEN)
    found = lint(tmp_path / "Dockerfile")
    by_code = dict(zip(found.code, found.line))
    assert set(by_code) == {"DL3007", "DL3008", "DL3009", "DL3015", "DL3025", "EA100", "EA101", "EA103", "EA104",
                            "EA105", "EA106", "EA107", "EA108", "EA109"}
    assert (by_code["EA100"], by_code["EA105"], by_code["EA107"], by_code["EA101"]) == (1, 2, 4, 5)
    assert set(found.tool) == {"hadolint", "efficientai"}


def test_compose_must_agree_with_the_dockerfile(tmp_path):
    (tmp_path / "Dockerfile").write_text(DOCKERFILE.read_text())
    compose = (REPO / "compose.yaml").read_text().replace('"127.0.0.1:8000:8000"', '"127.0.0.1:8000:9000"')
    compose = compose.replace("'/health', timeout=4)", "'/healthz', timeout=4)")
    (tmp_path / "compose.yaml").write_text(compose)
    assert sorted(lint(tmp_path / "Dockerfile").code) == ["EA110", "EA111"]


def test_build_context_keeps_runs_and_venv_out():
    files = context_files(REPO)
    assert {"pyproject.toml", "uv.lock", "README.md", "settings.ini", "efficientai/__init__.py"} <= set(files)
    for d in ("runs/", ".venv/", ".git/", "nbs/", "tests/"):
        assert not any(f.startswith(d) for f in files), d
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def test_failing_steps_name_their_line(tmp_path):
    df = tmp_path / "Dockerfile"
    df.write_text("FROM debian:12.11-slim\nWORKDIR /app\nRUN echo making && false\n")
    with pytest.raises(DeploymentError, match=r"Dockerfile:3") as e: build_outside_docker(df, tmp_path / "out")
    assert "making" in str(e.value) and "exit status 1" in str(e.value)
    df.write_text("FROM debian:12.11-slim\nRUN apt-get update && apt-get install -y --no-install-recommends "
                  "no-such-pkg-xyz \\\n && rm -rf /var/lib/apt/lists/*\n")
    with pytest.raises(DeploymentError, match=r"Dockerfile:2.*no-such-pkg-xyz, which this machine lacks"):
        build_outside_docker(df, tmp_path / "out")
    df.write_text("FROM debian:12.11-slim\nCOPY runs /app/runs\n")
    with pytest.raises(DeploymentError, match=r"not in the build context"):   # .dockerignore keeps runs/ out
        build_outside_docker(df, tmp_path / "out", context=REPO)
    with pytest.raises(DeploymentError, match="no such Dockerfile"): build_outside_docker(tmp_path / "nope", tmp_path)


def _wait_healthy(image, env, server, timeout=300.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert server.poll() is None, f"the server exited with {server.returncode}"
        if image.run(image.healthcheck, env=env, timeout=10).returncode == 0: return
        time.sleep(1)
    pytest.fail(f"the image's HEALTHCHECK did not pass within {timeout} s")


def _status(url: str, key: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r: return r.status
    except urllib.error.HTTPError as e: return e.code


def test_built_image_serves_as_its_user():
    out = Path(tempfile.mkdtemp(prefix="efficientai-image-"))   # under /tmp: the image's uid must reach it
    server = None
    try:
        image = build_outside_docker(DOCKERFILE, out, build_args=QUICK)
        assert set(image.steps.action) <= {"started", "checked", "ran", "copied", "set", "recorded"}
        assert "UV_COMPILE_BYTECODE=0 UV_LINK_MODE=hardlink" in set(image.steps.note)    # one ARG, two names
        info = json.loads(image.run(["efficientai", "info", "--json", "--size", "0"]).stdout)
        assert info["blas"]["fast"] and info["blas"]["how"] == "preloaded", info["blas"]
        assert image.run(["which", "efficientai"]).stdout.startswith(str(image.root))
        if os.getuid() == 0: assert image.run(["id", "-u"]).stdout.strip() == "10001"
        # The image's CMD on a free loopback port, offline (the zoo's index is a closed port), with an API key.
        port = str(free_port())
        env = {"HOST": "127.0.0.1", "PORT": port, "EFFICIENTAI_API_KEY": "k",
               "EFFICIENTAI_PYPI_URL": "http://127.0.0.1:9/simple"}
        server = image.start(env, log=out / "server.log")
        _wait_healthy(image, env, server)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert json.load(r)["status"] == "ok"
        assert _status(f"http://127.0.0.1:{port}/v1/models") == 401
        assert _status(f"http://127.0.0.1:{port}/v1/models", key="k") == 200
    except BaseException:
        log = out / "server.log"
        if log.exists(): print(log.read_text()[-3000:])
        raise
    finally:
        if server is not None: server.terminate(); server.wait(30)
        shutil.rmtree(out, ignore_errors=True)
