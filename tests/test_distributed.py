"""Distributed runs on torch.distributed: 2 CPU processes with gloo, started by torchrun or, for the
fault tests, by hand with torchrun's environment variables (so no launcher kills the survivor for us)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attacks
from attacks.evaluate import merge_stages, run_stage
from robustcnn.distributed import SINGLE, DistContext, setup, threads_per_process
from robustcnn.errors import UsageError
from train_fixtures import assert_one_line_error, isolated, run_cli, shapes, tiny_config  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(REPO), ROBUSTCNN_DIST_TIMEOUT="60", **extra)
    return env


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m cli ARGS``: the documented entry point."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(nproc: int, *args: str) -> list[subprocess.Popen]:
    """Start ``python -m cli ARGS`` once per rank with the variables torchrun would set, and no agent."""
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        env = _env(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _without_time(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "seconds"}


# -- one process: nothing changes ---------------------------------------------------------------------------------
def test_single_process_has_no_process_group(monkeypatch):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    ctx, dev = setup("cpu")
    assert ctx is SINGLE and dev == torch.device("cpu") and not torch.distributed.is_initialized()
    assert ctx.all_gather(5) == [5] and ctx.broadcast("x") == "x" and ctx.shard is None
    assert ctx.on_main(lambda: 3) == 3
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model, dev) is model
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: still one plain process
    assert setup("cpu")[0] is SINGLE


def test_threads_are_split_between_the_processes_of_a_node(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [threads_per_process(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_global_batch_must_split_evenly():
    three = DistContext(rank=0, world_size=3, backend="gloo")  # fails before any collective
    from robustcnn.train import train

    with pytest.raises(UsageError, match="divisible by the 3 processes"):
        train(tiny_config(batch_size=32), shapes(64, 1), shapes(16, 2), dist=three)


def test_merged_parts_equal_one_run(trained):
    """The merge of a stage run in two strided parts, at different batch sizes, is the one-process stage."""
    model, x, y = trained
    atk = attacks.PGD(eps=0.14, steps=5)
    idx = torch.arange(x.shape[0])
    whole = run_stage(model, x, y, idx, atk, "pgd", batch_size=64, device=torch.device("cpu"), seed=5,
                      keep_examples=True)
    parts = [run_stage(model, x, y, idx[r::2], atk, "pgd", batch_size=b, device=torch.device("cpu"), seed=5,
                       keep_examples=True) for r, b in ((0, 5), (1, 9))]
    merged = merge_stages(parts[::-1])  # the order parts arrive in does not matter
    assert 0 < int(whole.fooled.sum()) < x.shape[0]
    for name in ("idx", "fooled", "queries", "x_adv"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    assert torch.equal(merged.norms.isnan(), whole.norms.isnan())
    assert torch.equal(merged.norms.nan_to_num(), whole.norms.nan_to_num())
    assert _without_time(merged.stats.to_dict()) == _without_time(whole.stats.to_dict())
    assert merged.stats.gradients == whole.stats.gradients and merged.stats.norms == whole.stats.norms


@pytest.mark.parametrize("rank, printed", [(0, True), (1, False)])
def test_usage_errors_are_printed_once(isolated, monkeypatch, rank, printed):
    """Under torchrun every rank meets the same usage error; rank 0 alone prints it. Commands that do not split
    their work refuse to run as N copies."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_cli("eval")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    if printed:
        assert "does not run distributed" in assert_one_line_error(result, 2)
    else:
        assert result.stderr == "" and result.stdout == ""


# -- two processes: the same report, sample by sample ---------------------------------------------------------------
def test_two_process_report_equals_one_process(newest, tmp_path):
    args = ("report", "--attacks", "fgsm,pgd", "--eps", "0.01,0.02", "-n", "40", "--device", "cpu", "--json")
    one = run_cli(*args, "--out", str(tmp_path / "one"), "--batch-size", "16")
    assert one.exit_code == 0, one.stderr
    two = torchrun(2, *args, "--out", str(tmp_path / "two"), "--batch-size", "7")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # exactly one JSON document: rank 0's
    assert b["clean_accuracy"] == a["clean_accuracy"] and b["warnings"] == a["warnings"]
    fooled_somewhere = False
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert rb["per_sample"] == ra["per_sample"]
        assert (rb["robust_accuracy"], rb["accuracy_after"], rb["accuracy_alone"]) == \
            (ra["robust_accuracy"], ra["accuracy_after"], ra["accuracy_alone"])
        assert [_without_time(s) for s in rb["attacks"]] == [_without_time(s) for s in ra["attacks"]]
        fooled_somewhere |= 0 < ra["robust_accuracy"] < a["clean_accuracy"]
    assert fooled_somewhere  # a budget where the per-sample outcomes are not all alike
    on_disk = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert on_disk == ["accuracy_vs_eps.png", "gallery.png", "report.html", "report.json", "report.md"]
    assert json.loads((tmp_path / "two" / "report.json").read_text())["results"] == b["results"]


def test_two_process_attack_equals_one_process(newest, tmp_path):
    args = ("attack", "--method", "pgd", "--eps", "0.015", "--steps", "5", "-n", "40", "--device", "cpu", "--json",
            "--per-sample")
    one = run_cli(*args, "--batch-size", "40")
    assert one.exit_code == 0, one.stderr
    two = torchrun(2, *args, "--batch-size", "3", "--save-examples", str(tmp_path / "ex.png"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout)["results"][0], json.loads(two.stdout)["results"][0]
    assert b["per_sample"] == a["per_sample"]
    assert 0 < a["robust_accuracy"] < a["clean_accuracy"]
    assert _without_time(b["attacks"]["pgd"]) == _without_time(a["attacks"]["pgd"])
    assert b["config"]["processes"] == 2 and a["config"]["processes"] == 1
    assert (tmp_path / "ex.png").stat().st_size > 0


# -- DDP training ----------------------------------------------------------------------------------------------
def test_ddp_training_reaches_the_single_process_accuracy_band(isolated, tmp_path):
    args = ("train", "--dataset", "shapes", "--model", "simple", "--limit", "2048", "--epochs", "1",
            "--optimizer", "adam", "--lr", "0.005", "--batch-size", "32", "--device", "cpu", "--json")
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    assert one.exit_code == 0, one.stderr
    two = torchrun(2, *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    acc_one, acc_two = a["metrics"]["test_accuracy"], b["metrics"]["test_accuracy"]
    assert acc_one > 0.4 and acc_two > 0.4, (acc_one, acc_two)  # chance is 1/6; one process reaches ~0.57
    assert abs(acc_one - acc_two) < 0.15, (acc_one, acc_two)
    assert b["timing"]["processes"] == 2 and b["config"]["batch_size"] == 32  # the global batch
    from robustcnn.checkpoint import load_model, read_checkpoint

    ckpt = tmp_path / "two" / "shapes-simple.pt"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["shapes-simple.pt"]  # one file, from rank 0
    assert not any(k.startswith("module.") for k in read_checkpoint(ckpt)["model"])  # the unwrapped model
    load_model(ckpt)


@pytest.mark.parametrize("method", ["trades", "pgd"])
def test_ddp_adversarial_training_keeps_an_epoch_and_the_threat_model(isolated, tmp_path, method):
    """Adversarial training under DDP: attacks on each rank's share, the loss through the DDP net in one call."""
    args = ("train", "--dataset", "shapes", "--model", "simple", "--limit", "512", "--epochs", "2", "--adv", method,
            "--eps", "0.05", "--adv-steps", "2", "--adv-val", "64", "--batch-size", "32", "--device", "cpu", "--json")
    two = torchrun(2, *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    doc = json.loads(two.stdout)
    assert doc["timing"]["processes"] == 2 and doc["adversarial"]["method"] == method
    assert doc["kept_epoch"] in (1, 2) and 0.0 <= doc["metrics"]["val_robust_accuracy"] <= 1.0
    from robustcnn.checkpoint import read_checkpoint

    meta = read_checkpoint(tmp_path / "two" / f"shapes-simple-{method}.pt")["meta"]
    assert meta["adversarial"]["eps"] == 0.05 and meta["epochs_done"] == 2


# -- faults ------------------------------------------------------------------------------------------------------
def _wait(procs, seconds):
    deadline = time.monotonic() + seconds
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))


def test_a_killed_rank_stops_the_other_and_the_report_resumes(newest, tmp_path):
    out = tmp_path / "rep"
    args = ("report", "--attacks", "fgsm,pgd", "--eps", "0.01,0.02,0.03,0.05", "-n", "40", "--device", "cpu",
            "--batch-size", "8", "--json")
    procs = launch_ranks(2, *args, "--out", str(out))
    try:
        deadline = time.monotonic() + 120
        while not (out / "state.pt").exists():  # rank 0 saved the first finished step
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].stderr.read()
            assert time.monotonic() < deadline, "the distributed report never saved a state"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)  # bounded: no hang
        stopped_after = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1 and stopped_after < 60
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: rank 0 of 2: lost contact with another process") and "resume" in lines[0]
    assert (out / "state.pt").exists() and not (out / "report.json").exists()

    resumed = torchrun(2, *args, "--out", str(out))  # the same command resumes from the saved stages
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fresh = run_cli(*args, "--out", str(tmp_path / "fresh"))
    assert fresh.exit_code == 0, fresh.stderr
    got, want = json.loads(resumed.stdout), json.loads(fresh.stdout)
    assert [r["per_sample"] for r in got["results"]] == [r["per_sample"] for r in want["results"]]
    assert got["warnings"] == want["warnings"]


def test_a_killed_rank_stops_ddp_training_and_one_process_resumes_it(isolated, tmp_path):
    """A peer lost inside DDP's all-reduce: one clear line; the global batch makes the run resumable anywhere."""
    args = ("train", "--dataset", "shapes", "--model", "simple", "--limit", "768", "--epochs", "3",
            "--batch-size", "32", "--device", "cpu", "--json", "--out", str(tmp_path / "runs"))
    ckpt = tmp_path / "runs" / "shapes-simple.pt"
    procs = launch_ranks(2, *args)
    try:
        deadline = time.monotonic() + 150
        while not ckpt.exists():
            assert procs[0].poll() is None, procs[0].stderr.read()
            assert time.monotonic() < deadline, "no epoch was ever saved"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        out, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 of 2: lost contact") and "--resume" in lines[0]
    from robustcnn.checkpoint import read_checkpoint

    assert 1 <= read_checkpoint(ckpt)["meta"]["epochs_done"] < 3
    resumed = run_cli(*args, "--resume")  # one process continues the 2-process run: same global batch
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs"] == 3


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find torchrun's workers")
def test_torchrun_stops_the_run_when_a_rank_is_killed_and_training_resumes(isolated, tmp_path):
    """Under torchrun the agent notices a dead worker and stops the others; `--resume` continues training."""
    args = ("train", "--dataset", "shapes", "--model", "simple", "--limit", "768", "--epochs", "3",
            "--optimizer", "adam", "--batch-size", "32", "--device", "cpu", "--json", "--out", str(tmp_path / "runs"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cli", *args]
    agent = subprocess.Popen(cmd, cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = tmp_path / "runs" / "shapes-simple.pt"
    try:
        deadline = time.monotonic() + 150
        while not ckpt.exists():  # epoch 1 is saved
            assert agent.poll() is None, agent.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no epoch was ever saved"
            time.sleep(0.05)
        workers = _children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = agent.communicate(timeout=90)
        stopped_after = time.monotonic() - killed_at
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0 and stopped_after < 90
    assert "Signal 9 (SIGKILL)" in err or "SIGKILL" in err, err[-2000:]
    from robustcnn.checkpoint import read_checkpoint

    saved = read_checkpoint(ckpt)["meta"]["epochs_done"]
    assert 1 <= saved < 3
    resumed = torchrun(2, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    doc = json.loads(resumed.stdout)
    assert doc["epochs"] == 3 and [h["epoch"] for h in doc["history"]] == [1, 2, 3]
