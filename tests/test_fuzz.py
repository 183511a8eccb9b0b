"""Every file format the toolkit reads, fuzzed: damaged copies of real seeds either load or raise a `ToolkitError`,
never another exception, never a crash, never a file left behind (see tests/fuzzing.py for the formats and sizes)."""
import importlib.util, shutil, zlib

import numpy as np
import pytest

from fuzzing import CASES, FORMATS, Worker, cases, listing, outcome_of


@pytest.mark.parametrize("name", sorted(n for n in FORMATS if not n.startswith("_")))
def test_fuzz(name, tmp_path, record_property):
    f = FORMATS[name]
    if f.needs and importlib.util.find_spec(f.needs) is None: pytest.skip(f"{f.needs} does not exist yet")
    seed = tmp_path / "seed"; seed.mkdir()
    f.seed(seed)
    worker = Worker(name, tmp_path / "worker.log") if f.native else None
    run = worker.run if worker else (lambda folder: outcome_of(f.reader, folder, f.allow))
    try:
        kind, detail = run(seed)
        assert kind == "ok", f"{name}: the undamaged seed does not load: {detail}"   # the reader really reads it
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        todo = cases(seed, f.targets, CASES, rng, f.mutate)
        failures, counts = [], {"ok": 0, "toolkit": 0}
        for i, case in enumerate(todo):
            folder = tmp_path / f"case{i}"
            shutil.copytree(seed, folder)
            (folder / case.file).write_bytes(case.data)
            before = listing(tmp_path)
            kind, detail = run(folder)
            after = listing(tmp_path)
            if kind in counts: counts[kind] += 1
            if kind not in counts: failures.append((f"[{kind}] {_where(detail)}", f"{case.label}: {detail}"))
            elif after != before:
                failures.append(("[left files]", f"{case.label}: {sorted(set(after) ^ set(before))}"))
            shutil.rmtree(folder)
    finally:
        if worker: worker.close()
    record_property("fuzz", f"{name}: {len(todo)} cases, {counts['ok']} loaded, {counts['toolkit']} ToolkitError, "
                            f"{len(failures)} failed" + (f", worker started {worker.starts}x" if worker else ""))
    kinds: dict[str, list[str]] = {}
    for key, text in failures: kinds.setdefault(key, []).append(text)
    assert not failures, f"{name}: {len(failures)} of {len(todo)} cases failed, {len(kinds)} distinct ways:\n" + \
        "\n".join(f"{k} x{len(v)}, e.g. {v[0].splitlines()[0]}" for k, v in kinds.items()) + \
        "\nthe first, its traceback's end:\n" + "\n".join(failures[0][1].splitlines()[-30:])


def _where(detail: str) -> str:
    "The exception type and the toolkit's last line in the traceback: what tells one bug from another."
    lines = detail.splitlines()
    mine = [l.strip() for l in lines if 'File "' in l and "/efficientai/" in l]
    return f"{lines[0].split(':')[0]} at {mine[-1] if mine else '?'}"


def test_worker_survives_a_crash(tmp_path):
    "A reader that kills its process fails its case (naming it) and the next case runs in a fresh worker."
    w = Worker("_crash", tmp_path / "log")
    try:
        (tmp_path / "a").mkdir(); (tmp_path / "boom").mkdir()
        assert w.run(tmp_path / "a") == ("ok", "")
        kind, detail = w.run(tmp_path / "boom")
        assert kind == "crash" and "died" in detail and "Segmentation fault" in detail
        assert w.run(tmp_path / "a") == ("ok", "") and w.starts == 2
    finally:
        w.close()
