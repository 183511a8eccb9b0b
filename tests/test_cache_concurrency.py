"""Zoo cache under concurrency: real processes fetching at once, a real HTTP server that holds the first download open
until the second process is either downloading too or waiting for the lock."""
import hashlib, http.server, os, subprocess, sys, threading, time
from pathlib import Path


from efficientai.zoo.cache import verify_entry

PAYLOAD = os.urandom(1 << 20)
SHA = hashlib.sha256(PAYLOAD).hexdigest()

FETCH = '''
import sys
from pathlib import Path
from efficientai.zoo.cache import ZooEntry, download, fetch_entry
name, url, sha, root, log = sys.argv[1:6]
root = Path(root)
def build(folder):
    with open(log, "a") as f: f.write(name + "\\n")
    src = download(url, root / "downloads" / "shared.bin", sha)   # one file several entries are made from
    (folder / "data.bin").write_bytes(src.read_bytes())
    return {"sha": sha}
print(fetch_entry(ZooEntry(name, "dataset", "MIT", url, "a test entry", build), root=root))
'''


class Server:
    "Serves PAYLOAD; the first request sends half, then waits for a second request or a process waiting on a lock."
    def __init__(self, wait_files: list[Path]):
        self.requests, self.first = 0, threading.Event()
        server = self
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_GET(self):
                server.requests += 1; n = server.requests
                self.send_response(200); self.send_header("Content-Length", str(len(PAYLOAD))); self.end_headers()
                self.wfile.write(PAYLOAD[:len(PAYLOAD) // 2]); self.wfile.flush()
                if n == 1:
                    server.first.set()
                    end = time.monotonic() + 60   # a safety net only: the test finishes long before
                    while server.requests < 2 and not any(f.exists() for f in wait_files) and time.monotonic() < end:
                        time.sleep(0.02)
                self.wfile.write(PAYLOAD[len(PAYLOAD) // 2:])
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/shared.bin"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def fetch_at_once(tmp_path: Path, names: tuple[str, str]):
    script, root, log = tmp_path / "fetch.py", tmp_path / "cache", tmp_path / "builds.log"
    script.write_text(FETCH)
    waits = [tmp_path / f"wait-{i}" for i in range(2)]
    server = Server(waits)
    def start(i: int) -> subprocess.Popen:
        env = {**os.environ, "EFFICIENTAI_WAIT_FILE": str(waits[i]), "EFFICIENTAI_CACHE": str(root)}
        return subprocess.Popen([sys.executable, str(script), names[i], server.url, SHA, str(root), str(log)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = start(0)
        assert server.first.wait(60), first.communicate()[1]   # the first process is mid-download...
        second = start(1)                                       # ...when the second starts
        done = [p.communicate(timeout=120) for p in (first, second)]
    finally:
        server.httpd.shutdown()
    for p, (out, err) in zip((first, second), done):
        assert p.returncode == 0, err[-3000:]
    return root, log.read_text().split(), server.requests


def test_two_processes_fetch_one_entry(tmp_path):
    root, builds, requests = fetch_at_once(tmp_path, ("shared-entry", "shared-entry"))
    folder = root / "datasets" / "shared-entry"
    assert builds == ["shared-entry"] and requests == 1          # built once; the second found it ready
    assert verify_entry(folder, full=True) == [] and (folder / "data.bin").read_bytes() == PAYLOAD
    assert sorted(p.name for p in folder.parent.iterdir()) == ["shared-entry"]   # no temp folders left


def test_two_entries_from_one_download_at_once(tmp_path):
    "Two entries made from one file, fetched at once: the second waits for the first's download, deletes nothing."
    root, builds, requests = fetch_at_once(tmp_path, ("entry-a", "entry-b"))
    assert sorted(builds) == ["entry-a", "entry-b"] and requests == 1
    for name in ("entry-a", "entry-b"):
        assert verify_entry(root / "datasets" / name, full=True) == []
        assert (root / "datasets" / name / "data.bin").read_bytes() == PAYLOAD
    assert not list((root / "downloads").glob("*.part"))
