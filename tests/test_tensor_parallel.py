"""``search --tp``: transformers' own tensor-parallel plan under torchrun, on CPU with gloo, on tiny random
checkpoints of the architectures whose plan covers them. The sharded search takes the same greedy steps as
one process (losses agree to fp32 rounding: the sharded matmuls sum in another order), each rank holds only
its shards, and two tensor-parallel replicas split the candidates like two processes do. Bad ``--tp`` values
get one line and leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tiny

from indexcache.cli import main

pytest.importorskip("transformers")
SEQ = 96
COVERED = ["glm_moe_dsa", "deepseek_v32", "deepseek_v4", "minimax_m3"]  # GLM-5.3: refused (see below)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for arch in [*COVERED, "glm5_next"]:
        d = tmp_path_factory.mktemp(arch) / "m"
        tiny.save_new(tiny.any_model(arch, seed=5), d)
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "doc.txt"
    p.write_text("A long sentence about rivers, mountains and the sea, told again and again. " * 40)
    return p


def _search(model, text, out, nproc: int = 1, tp: int = 1) -> dict:
    args = ["search", model, "--data", text, "--num-samples", 2, "--seq-len", SEQ, "--num-full", 2,
            "--baselines", "uniform", "--backend", "hf", "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launch = [sys.executable, "-m", "indexcache.cli"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                  "-m", "indexcache.cli"]  # --standalone: a free port, picked by torchrun
        args += ["--tp", tp]
    done = subprocess.run([*launch, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def _same_search(a: dict, b: dict) -> None:
    assert [s["pattern"] for s in a["trajectory"]] == [s["pattern"] for s in b["trajectory"]]
    assert [s["flipped"] for s in a["trajectory"]] == [s["flipped"] for s in b["trajectory"]]
    # fp32, reductions of at most a few hundred terms split in two: agreement to 1e-5 relative
    assert b["all_full_loss"] == pytest.approx(a["all_full_loss"], rel=1e-5)
    for x, y in zip(a["trajectory"], b["trajectory"], strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    for x, y in zip(a["baselines"]["uniform"], b["baselines"]["uniform"], strict=True):
        assert (x["pattern"], x["num_full"]) == (y["pattern"], y["num_full"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert a["counters"]["evaluations"] == b["counters"]["evaluations"]


def _parameters(model_dir) -> int:
    from indexcache.integrations.transformers import load_pretrained

    return sum(t.numel() for t in load_pretrained(model_dir).parameters())


@pytest.mark.parametrize("arch", COVERED)
def test_two_ranks_of_one_model_search_like_one_process(dirs, text, arch, tmp_path):
    one = _search(dirs[arch], text, tmp_path / "one")
    two = _search(dirs[arch], text, tmp_path / "two", nproc=2, tp=2)
    _same_search(one, two)
    procs = two["backend"]["processes"]
    assert (procs["world"], procs["tensor_parallel"], procs["replicas"]) == (2, 2, 1)
    # the plan really sharded the model: rank 0 holds clearly less than the whole of it
    assert procs["parameters_on_rank_0"] < 0.9 * _parameters(dirs[arch])


def test_two_tensor_parallel_replicas_split_the_candidates(dirs, text, tmp_path):
    one = _search(dirs["glm_moe_dsa"], text, tmp_path / "one")
    four = _search(dirs["glm_moe_dsa"], text, tmp_path / "four", nproc=4, tp=2)
    _same_search(one, four)
    procs = four["backend"]["processes"]
    assert (procs["world"], procs["tensor_parallel"], procs["replicas"]) == (4, 2, 2)


def _refused(capsys, monkeypatch, world: int, *argv) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))  # what torchrun would set; the check runs before any process group
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_tp_is_one_line_and_writes_nothing(capsys, monkeypatch, dirs, text, tmp_path):
    out = tmp_path / "s"
    common = ["--data", text, "--seq-len", SEQ, "--out", out]
    err = _refused(capsys, monkeypatch, 1, "search", dirs["glm_moe_dsa"], *common, "--tp", 2)
    assert "--tp 2 needs torchrun with a multiple of 2 processes" in err
    err = _refused(capsys, monkeypatch, 2, "search", dirs["glm_moe_dsa"], *common, "--tp", 3)
    assert "multiple of 3 processes" in err and "this is 2 processes" in err
    # 4 attention heads do not split over 3 ranks
    err = _refused(capsys, monkeypatch, 3, "search", dirs["glm_moe_dsa"], *common, "--tp", 3)
    assert "--tp 3 does not divide the model's attention heads 4" in err
    err = _refused(capsys, monkeypatch, 2, "search", dirs["glm_moe_dsa"], *common, "--tp", 2, "--backend", "native")
    assert "needs --backend hf" in err
    err = _refused(capsys, monkeypatch, 2, "search", dirs["glm_moe_dsa"], *common, "--tp", 2, "--device-map", "cpu")
    assert "give one" in err
    # transformers' GLM-5.3 plan shards the linear-attention layers' o_proj but not their q/k/v
    err = _refused(capsys, monkeypatch, 2, "search", dirs["glm5_next"], *common, "--tp", 2)
    assert "does not cover its linear-attention layers" in err and "--device-map" in err
    err = _refused(capsys, monkeypatch, 2, "search", dirs["glm_moe_dsa"], *common, "--tp", 0)
    assert "--tp" in err
    assert not out.exists()
