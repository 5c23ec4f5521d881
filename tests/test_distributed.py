"""imgclf under torchrun: the same results as one process, one output, bounded failure.

Real ``torchrun`` launches (``python -m torch.distributed.run``) on this machine, loopback
only, one thread per rank, tiny synthetic images, the fast recipe; every launch has a
subprocess timeout so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_shapes_dataset
from imgclf import distributed

LAUNCH_TIMEOUT_S = 300
FAILURE_TIMEOUT_S = 60  # IMGCLF_DIST_TIMEOUT_S in the tests: the bound on any collective


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(cache_dir: Path | None = None) -> dict:
    env = {**os.environ, "IMGCLF_THREADS_PER_RANK": "1", "OMP_NUM_THREADS": "1", "IMGCLF_DIST_TIMEOUT_S": str(FAILURE_TIMEOUT_S)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    if cache_dir is not None:
        env["IMGCLF_CACHE_DIR"] = str(cache_dir)
    return env


def torchrun(*launcher_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "imgclf"]


def run(cmd: list[str], env: dict, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"{time.perf_counter() - t0:.1f} s: {' '.join(cmd[3:8])} ...")
    assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def cache_digests(cache_dir: Path) -> dict[str, str]:
    """Every cached feature file (relative path) → its SHA-256."""
    root = cache_dir / "features"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.f32"))}


def fresh_features(tmp_path: Path, cache: Path) -> Path:
    """An empty feature cache holding ``cache``'s exported backbone, so a launch computes every
    feature but skips the ONNX export (seconds per rank)."""
    shutil.copytree(cache / "backbones", tmp_path / "cache" / "backbones")
    return tmp_path / "cache"


def children(pid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


TRAIN_FLAGS = ["--recipe", "fast", "--no-progress", "--no-report", "--seed", "3"]


@pytest.fixture(scope="module")
def dist_data(tmp_path_factory) -> Path:
    """A flat set: the split is carved (seeded), so equal splits show the ranks agree."""
    return make_shapes_dataset(tmp_path_factory.mktemp("dist-data"), {"": 8}, size=64)


@pytest.fixture(scope="module")
def single_run(dist_data, tmp_path_factory) -> tuple[Path, Path]:
    """The single-process reference: (run folder, its feature cache)."""
    base = tmp_path_factory.mktemp("single")
    cache = base / "cache"
    run([sys.executable, "-m", "imgclf", "-q", "train", str(dist_data), *TRAIN_FLAGS, "--project", str(base / "runs"), "--name", "one"], job_env(cache))
    return base / "runs" / "one", cache


# ------------------------------------------------------------------ without torchrun


def test_single_process_has_no_distributed_setup(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detect() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.detect() is None and distributed.setup() is None
    assert distributed.current() is None and distributed.is_main()
    assert list(distributed.shard(5)) == [0, 1, 2, 3, 4]
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert np.array_equal(distributed.gather_rows(rows, range(4), 4), rows)
    assert distributed.map_sharded(["a", "b"], lambda items: [s.upper() for s in items]) == ["A", "B"]
    assert distributed.broadcast_object({"x": 1}) == {"x": 1} and distributed.all_gather_object(7) == [7]
    assert distributed.threads_per_rank() is None  # the engines keep their defaults
    with pytest.raises(ValueError, match="not held by any rank"):
        distributed.gather_rows(rows[:2], [0, 1], 4)


def test_detect_reads_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ctx = distributed.detect()
    assert (ctx.world_size, ctx.rank, ctx.local_rank, ctx.local_world_size) == (4, 3, 1, 2) and not ctx.is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(distributed.DistributedError, match="outside 0..3"):
        distributed.detect()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(distributed.DistributedError, match="not an integer"):
        distributed.detect()
    monkeypatch.setenv("IMGCLF_THREADS_PER_RANK", "0")
    with pytest.raises(distributed.DistributedError, match="at least 1"):
        distributed.threads_per_rank()


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from imgclf import distributed

    ctx = distributed.setup()
    n = 7  # 4 rows on rank 0, 3 on rank 1: uneven shards
    mine = list(distributed.shard(n))
    local = np.stack([np.full(3, 10.0 * i, np.float32) for i in mine])
    full = distributed.gather_rows(local, mine, n)
    empty = distributed.all_gather_rows(np.zeros((0, 3), np.float32) if ctx.rank else np.ones((2, 3), np.float32))
    mapped = distributed.map_sharded(list(range(n)), lambda xs: [x * x for x in xs])
    decided = distributed.main_decides(lambda: {"decided_by": ctx.rank})
    try:
        distributed.main_decides(lambda: int("not a number"))
        refused = None
    except ValueError as e:
        refused = str(e)
    try:
        distributed.map_sharded(["a.jpg", "b.jpg", f"only-on-rank-{ctx.rank}.jpg"], lambda xs: xs)
        mismatch = None
    except distributed.DistributedError as e:
        mismatch = str(e)
    distributed.barrier()
    print(json.dumps({"rank": ctx.rank, "mine": mine, "full": full[:, 0].tolist(), "empty": [len(a) for a in empty],
                      "mapped": mapped, "decided": decided, "refused": refused, "mismatch": mismatch, "threads": distributed.threads_per_rank()}))
    distributed.teardown()
""")


def test_collectives_in_a_real_process_group_without_torchrun(tmp_path):
    """Two processes given torchrun's variables by hand: the gathers put rows back in order."""
    env = job_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outs), key=lambda r: r["rank"])
    assert results[0]["mine"] == [0, 2, 4, 6] and results[1]["mine"] == [1, 3, 5]
    for r in results:
        assert r["full"] == [10.0 * i for i in range(7)]
        assert r["empty"] == [2, 0]
        assert r["mapped"] == [i * i for i in range(7)]
        assert r["decided"] == {"decided_by": 0}
        assert r["refused"] and "not a number" in r["refused"]
        assert r["mismatch"] and "rank(s) 1 see other inputs than rank 0" in r["mismatch"]  # refused on every rank, before any work
        assert r["threads"] == 1


# ------------------------------------------------------------------ torchrun


def test_torchrun_train_matches_single_process(dist_data, single_run, tmp_path):
    """Two ranks: the same split, features (cache files byte for byte), metrics and predictions
    as one process; one run folder, written by rank 0."""
    one, one_cache = single_run
    cache = fresh_features(tmp_path, one_cache)
    run(torchrun("--standalone", "--nproc-per-node", "2") + ["-q", "train", str(dist_data), *TRAIN_FLAGS, "--project", str(tmp_path / "runs"), "--name", "two"],
        job_env(cache))
    two = tmp_path / "runs" / "two"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["two"]
    assert (two / "split.csv").read_bytes() == (one / "split.csv").read_bytes()
    assert cache_digests(cache) == cache_digests(one_cache) and cache_digests(cache)
    assert (two / "test_predictions.csv").read_bytes() == (one / "test_predictions.csv").read_bytes()
    m1, m2 = (json.loads((d / "test_metrics.json").read_text()) for d in (one, two))
    assert {k: v for k, v in m1.items() if k != "run"} == {k: v for k, v in m2.items() if k != "run"}
    assert json.loads((two / "run.json").read_text())["status"] == "complete"


def test_torchrun_predict_and_evaluate_write_what_one_process_writes(dist_data, single_run, tmp_path):
    one, one_cache = single_run
    env = job_env(one_cache)  # features from the cache: only the sharding and the gathering differ
    run([sys.executable, "-m", "imgclf", "-q", "predict", str(one), str(dist_data), "--out", str(tmp_path / "one.csv"), "--no-progress"], env)
    run(torchrun("--standalone", "--nproc-per-node", "2") + ["-q", "predict", str(one), str(dist_data), "--out", str(tmp_path / "two.csv"), "--no-progress"], env)
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert len((tmp_path / "two.csv").read_text().splitlines()) == 1 + 3 * 8
    # DATA is the run's own flat set: evaluate scores its test split, as training did
    run(torchrun("--standalone", "--nproc-per-node", "2") + ["-q", "evaluate", str(one), str(dist_data), "--out", str(tmp_path / "m.json"), "--no-progress"], env)
    evaluated, trained = json.loads((tmp_path / "m.json").read_text()), json.loads((one / "test_metrics.json").read_text())
    assert {k: v for k, v in evaluated.items() if k not in ("model", "data")} == {k: v for k, v in trained.items() if k != "run"}


def two_node_launch(node: int, port: int, args: list[str], env: dict) -> subprocess.Popen:
    cmd = torchrun("--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "imgclf-test") + args
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_two_nodes_extract_fill_the_cache_like_one_process(dist_data, single_run, tmp_path):
    """Two torchrun launches as two machines (loopback): `imgclf extract` fills a fresh cache
    with exactly the features a single-process training run computed."""
    _, one_cache = single_run
    cache = fresh_features(tmp_path, one_cache)
    port = free_port()
    t0 = time.perf_counter()
    procs = [two_node_launch(node, port, ["-q", "extract", str(dist_data), *TRAIN_FLAGS[:2], "--seed", "3", "--no-progress"], job_env(cache)) for node in (0, 1)]
    outs = [p.communicate(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    print(f"{time.perf_counter() - t0:.1f} s: two-node extract")
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "24 images" in outs[0][0] and "feature cache:" in outs[0][0] and "img/s on 2 ranks" in outs[0][0]
    assert outs[1][0] == ""  # rank 1 prints nothing
    assert cache_digests(cache) == cache_digests(one_cache)


def test_a_killed_rank_ends_the_other_with_one_line(dist_data, tmp_path):
    """Node 1's process is killed mid-run: node 0's rank stops with one clear line, well
    inside the collective timeout, and no run is marked complete."""
    port = free_port()
    project = tmp_path / "runs"
    env = job_env(tmp_path / "cache")  # a fresh cache: the backbone export keeps the ranks busy long enough
    args = ["-q", "train", str(dist_data), *TRAIN_FLAGS, "--project", str(project), "--name", "killed"]
    procs = [two_node_launch(node, port, args, env) for node in (0, 1)]
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (project / "killed").exists():  # rank 0 makes the folder once both ranks joined and agreed on the data
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.1)
        workers = children(procs[1].pid)
        assert workers, "node 1 has no worker process"
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.monotonic()
        out0, err0 = procs[0].communicate(timeout=FAILURE_TIMEOUT_S + 30)
        waited = time.monotonic() - killed_at
        procs[1].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    print(f"rank 0 ended {waited:.1f} s after rank 1 was killed")
    assert procs[0].returncode != 0
    assert waited < FAILURE_TIMEOUT_S
    lines = [line for line in err0.splitlines() if line.startswith("imgclf: error:")]
    assert len(lines) == 1 and "rank 0" in lines[0], err0[-3000:]
    assert "Traceback" not in err0.split("imgclf: error:")[0]  # imgclf's own output has no traceback (torchrun's report may follow)
    assert json.loads((project / "killed" / "run.json").read_text())["status"] != "complete"


def test_max_restarts_resumes_the_run_after_a_rank_dies(dist_data, single_run, tmp_path):
    """torchrun --max-restarts 1, rank 1 killed while the head trains: the restarted job
    resumes the same run folder from its head checkpoint and completes it."""
    _, one_cache = single_run
    project = tmp_path / "runs"
    env = {**job_env(one_cache), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # PyTorch issue 135712, see README
           "IMGCLF_CHECKPOINT_EVERY_S": "0"}  # every epoch on disk: the killed job must have one to resume from
    cmd = torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1") + [
        "-q", "train", str(dist_data), *TRAIN_FLAGS, "--project", str(project), "--epochs", "150", "--patience", "150",
        "--heads", "1"]  # one long head: the other ranks wait for it within the tests' 60 s collective bound
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not list(project.glob("*/checkpoint-head.safetensors")):  # rank 0 is training the head
            assert time.monotonic() < deadline and job.poll() is None, job.communicate()
            time.sleep(0.1)
        rank1 = [pid for pid in children(job.pid) if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
        os.kill(rank1[0], signal.SIGKILL)
        out, err = job.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, err[-3000:]
    folders = list(project.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("train-")  # named after the job, the same after the restart
    log = (folders[0] / "train.log").read_text()
    assert "resuming run" in log and "head: resuming after epoch" in log
    assert json.loads((folders[0] / "run.json").read_text())["status"] == "complete"


def test_torchrun_restart_resumes_the_unfinished_run(dist_data, single_run, tmp_path, monkeypatch):
    """Without --name a torchrun job's run folder is named after TORCHELASTIC_RUN_ID; a restart
    finding it unfinished with the same settings resumes it, a complete one is never resumed."""
    from imgclf.runs.train_run import _torchrun_run

    one, _ = single_run
    project = tmp_path / "runs"
    folder = project / "train-job7"
    shutil.copytree(one, folder)
    config = json.loads((folder / "config.json").read_text())
    given = {k: v for k, v in config["run"].items() if k in ("project",)}
    given["project"] = str(project)
    config["run"] = {**config["run"], "project": str(project), "name": "train-job7"}
    (folder / "config.json").write_text(json.dumps(config))
    options = dict(recipe="fast", seed=3)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    status = json.loads((folder / "run.json").read_text())
    assert _torchrun_run(dist_data, None, None, None, options, given, {"progress": False}) == ({**given, "name": "train-job7"}, None)  # complete
    (folder / "run.json").write_text(json.dumps({**status, "status": "failed", "error": "DistributedError: rank 1 died"}))
    run_given, resume = _torchrun_run(dist_data, None, None, None, options, given, {"progress": False})
    assert resume == str(folder) and run_given["name"] == "train-job7"
    other = _torchrun_run(dist_data, None, None, None, {**options, "seed": 4}, given, {"progress": False})
    assert other[1] is None  # other settings: a new run folder, not this one
    assert _torchrun_run(dist_data, None, None, None, options, {**given, "name": "mine"}, {})[1] is None  # --name given: no automatic resume


def test_concurrent_writers_of_one_cache_entry_never_leave_it_corrupt(tmp_path, caplog):
    """Ranks sharing --cache-dir may write the same entry at once (two launches extracting the
    same image): atomic replace of uniquely named temporary files, so every read is complete."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from imgclf.engines.cache import FeatureCache

    dim = 4096  # 16 KiB entries: large enough for a torn write to be visible
    vec = np.arange(dim, dtype=np.float32)
    caches = [FeatureCache(tmp_path, "key", dim) for _ in range(4)]  # one object per "process"

    def write(i: int) -> None:
        caches[i % 4].put("ab" * 32, vec)

    def read(i: int):
        return caches[i % 4].get("ab" * 32)

    with caplog.at_level(logging.WARNING, logger="imgclf"), ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(write if i % 2 else read, i) for i in range(400)]
        reads = [f.result() for i, f in enumerate(futures) if i % 2 == 0]
    assert all(r is None or np.array_equal(r, vec) for r in reads)
    assert np.array_equal(caches[0].get("ab" * 32), vec)
    assert "corrupt" not in caplog.text
    assert [p.name for p in (tmp_path / "features" / "key" / "ab").iterdir()] == ["ab" * 32 + ".f32"]  # no temporary files left


def test_extract_refuses_a_cache_inside_a_manifest_image_folder(tmp_path, capsys):
    """A manifest may list images outside its own folder; the cache must go into none of them."""
    from imgclf.cli.main import main

    images = make_shapes_dataset(tmp_path / "images", {"": 3}, size=48)
    lists = tmp_path / "lists"
    lists.mkdir()
    rows = [f"{p},{p.parent.name}" for p in sorted(images.rglob("*.jpg"))]
    (lists / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    cache = images / rows[0].split(",")[1] / "cache"
    rc = main(["-q", "extract", "--manifest", str(lists / "m.csv"), "--cache-dir", str(cache), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "never writes into the dataset folder" in err and len(err.strip().splitlines()) == 1
    assert not cache.exists()


def test_features_of_mixed_precision_across_ranks_are_refused():
    from imgclf.engines.extract import check_same_precision

    check_same_precision(["fp32", "fp32", "fp32"])
    with pytest.raises(distributed.DistributedError, match=r"different precisions \(rank 0: bf16, rank 1: fp32\); pass --precision fp32"):
        check_same_precision(["bf16", "fp32"])
