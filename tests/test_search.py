"""Greedy search (Algorithm 1) against a brute-force naive search, resume after kill -9, two gloo
processes, the similarity DP against brute force, and the overlap matrix against set arithmetic."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from markers import gpu, interpreter

from indexcache import Pattern, Trace, load_model
from indexcache.cli import main
from indexcache.data import DataError, load_calibration
from indexcache.presets import make_random_checkpoint
from indexcache.search import LossEvaluator, SearchError, greedy_search, similarity_dp, similarity_score
from indexcache.search.greedy import step_confidence

N_LAYERS = 12


def _model_dir(tmp_path, seed, layers=N_LAYERS):
    return make_random_checkpoint(tmp_path / f"m{seed}", "glm_moe_dsa", "tiny", seed=seed,
                                  num_hidden_layers=layers, first_k_dense_replace=2)


def _batches(seed, n=2, seq=24):
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randint(0, 300, (1, seq), generator=g) for _ in range(n)]


def _naive_loss(model, batches, pattern):
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(ids, pattern=pattern)
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += ids[:, 1:].numel()
    return total / count


def _naive_greedy(model, batches, n, target, blocks=(0,)):
    """Algorithm 1 written plainly: full forward passes, min loss, ties to the lowest layer."""
    pat = ["F"] * n
    traj = []
    forced = set(blocks) | {0}
    bounds = list(zip(blocks, list(blocks[1:]) + [n], strict=True))
    while pat.count("F") > target:
        for lo, hi in bounds:
            if pat.count("F") == target:
                break
            cands = [i for i in range(lo, hi) if pat[i] == "F" and i not in forced]
            if not cands:
                continue
            scored = [(_naive_loss(model, batches, "".join(pat[:i] + ["S"] + pat[i + 1:])), i) for i in cands]
            loss, best = min(scored)
            pat[best] = "S"
            traj.append(("".join(pat), best, loss))
    return traj


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_with_prefix_reuse_equals_naive(tmp_path, seed):
    model = load_model(_model_dir(tmp_path, seed), verbose=False)
    batches = _batches(seed)
    ev = LossEvaluator(model, batches)
    res = greedy_search(ev, progress=False)  # to the end: a full trajectory
    naive = _naive_greedy(model, batches, N_LAYERS, target=1)
    assert [(str(e.pattern), e.flipped) for e in res.trajectory] == [(p, f) for p, f, _ in naive]
    for e, (_, _, loss) in zip(res.trajectory, naive, strict=True):
        assert e.loss == pytest.approx(loss, rel=1e-6)
    assert res.all_full_loss == pytest.approx(_naive_loss(model, batches, "F" * N_LAYERS), rel=1e-6)
    c = res.counters
    assert c["evaluations"] == 1 + sum(range(1, N_LAYERS))
    assert c["naive_layer_forwards"] == c["evaluations"] * N_LAYERS * len(batches)
    assert c["ratio_vs_naive"] <= 0.5, c


def test_staged_greedy_equals_naive_staged(tmp_path):
    model = load_model(_model_dir(tmp_path, 5), verbose=False)
    batches = _batches(5)
    res = greedy_search(LossEvaluator(model, batches), target_full=4, stages=3, progress=False)
    assert res.forced_full == [0, 4, 8]
    naive = _naive_greedy(model, batches, N_LAYERS, target=4, blocks=(0, 4, 8))
    assert [str(e.pattern) for e in res.trajectory] == [p for p, _, _ in naive]
    final = res.trajectory[-1].pattern
    assert final.num_full == 4 and all(final.is_full(i) for i in (0, 4, 8))


def test_no_reuse_gives_the_same_trajectory(tmp_path):
    model = load_model(_model_dir(tmp_path, 3), verbose=False)
    batches = _batches(3)
    a = greedy_search(LossEvaluator(model, batches), target_full=3, progress=False)
    b = greedy_search(LossEvaluator(model, batches, reuse=False), target_full=3, progress=False)
    assert a.trajectory == b.trajectory
    assert b.counters["ratio_vs_naive"] == 1.0 and a.counters["ratio_vs_naive"] < 0.5


def test_spilled_prefix_cache_gives_the_same_search(tmp_path):
    """A device share that holds two layers' states, the rest spilled to host memory and copied back: the
    same trajectory, bit for bit, and the same work as an unlimited cache; without the host tier, more work."""
    model = load_model(_model_dir(tmp_path, 6), verbose=False)
    batches = _batches(6)
    big = greedy_search(LossEvaluator(model, batches, cache_bytes=1 << 34), target_full=3, progress=False)
    probe = LossEvaluator(model, batches)
    two_layers = 2 * probe.state_bytes() + 4096
    spill = LossEvaluator(model, batches, cache_bytes=two_layers, host_bytes=1 << 34, separate_host=True)
    res = greedy_search(spill, target_full=3, progress=False)
    assert res.trajectory == big.trajectory
    assert res.counters["layer_forwards"] == big.counters["layer_forwards"]
    assert res.counters["spilled"] > 0 and res.counters["host_hits"] > 0
    tight = greedy_search(LossEvaluator(model, batches, cache_bytes=two_layers), target_full=3, progress=False)
    assert tight.trajectory == big.trajectory
    assert tight.counters["layer_forwards"] > big.counters["layer_forwards"]


def test_a_full_cache_keeps_the_states_every_candidate_starts_from(tmp_path):
    """A device tier that holds the states of the pattern a step flips from and little more (no host tier):
    the candidates' own states are turned away rather than those, so every candidate starts at its own
    layer (one layer earlier after a commit: the winner's states were not kept) and never from the start."""
    n = 8
    model = load_model(_model_dir(tmp_path, 12, layers=n), verbose=False)
    batches = _batches(12)
    probe = LossEvaluator(model, batches)
    ev = LossEvaluator(model, batches, cache_bytes=(n + 1) * probe.state_bytes() * 2)
    res = greedy_search(ev, target_full=4, progress=False)
    ref = greedy_search(LossEvaluator(model, batches, cache_bytes=1 << 34), target_full=4, progress=False)
    assert res.trajectory == ref.trajectory
    most = n * len(batches)  # the all-Full pass
    before = Pattern.all_full(n)
    for step in res.trajectory:
        last = next((i for i in range(n) if before.is_full(i) != Pattern.all_full(n).is_full(i)), None)
        most += sum(n - i + (1 if last is not None and i > last else 0)
                    for i in range(1, n) if before.is_full(i)) * len(batches)
        before = step.pattern
    assert res.counters["layer_forwards"] <= most


def test_the_count_with_a_searchs_own_flip_order_is_its_work(tmp_path):
    """layer_forward_counts with the flips a search made counts exactly the layer-forwards it ran (beyond the
    all-Full loss): the plan's averaged count differs only by the order."""
    from indexcache.search.greedy import layer_forward_counts

    n = 8
    model = load_model(_model_dir(tmp_path, 14, layers=n), verbose=False)
    batches = _batches(14)
    res = greedy_search(LossEvaluator(model, batches, cache_bytes=1 << 34), target_full=3, progress=False)
    order = [s.flipped for s in res.trajectory]
    full, shared = layer_forward_counts(Pattern.all_full(n), len(order), list(range(n)), n, len(batches),
                                        flip_order=order)
    assert sum(full) + sum(shared) == res.counters["layer_forwards"] - n * len(batches)


def test_step_confidence_tells_a_clear_flip_from_a_coin_toss():
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(8, generator=g) * 0.1 + 3.0).tolist()  # 8 windows: how hard each is

    def cand(layer: int, shift: float, noise: float) -> tuple[int, float, list[float]]:
        w = [b + shift + noise * float(torch.randn(1, generator=g)) for b in base]
        return layer, sum(w) / len(w), w

    clear = [cand(1, 0.0, 0.001), cand(2, 0.05, 0.001), cand(3, 0.08, 0.001)]
    c = step_confidence(clear, 1)
    assert c["runner_up"] == 2 and c["stays"] == 1.0 and not c["within_noise"]
    assert 0 < c["margin_ci95"][0] <= c["margin"] <= c["margin_ci95"][1] and c["windows"] == 8
    toss = [cand(1, 0.0, 0.05), cand(2, 0.0, 0.05), cand(3, 0.0, 0.05)]
    committed = min(toss, key=lambda t: (t[1], t[0]))[0]
    t = step_confidence(toss, committed)
    assert t["within_noise"] and t["stays"] < 0.9 and abs(sum(t["picked"].values()) - 1) < 1e-9
    assert "no bootstrap" in step_confidence([(1, 3.0, [3.0]), (2, 3.1, [3.1])], 1)["note"]


def test_search_report_carries_each_steps_confidence(tmp_path):
    mdir = _model_dir(tmp_path, 13, layers=6)
    out = tmp_path / "s"
    rc = main(["search", str(mdir), "--num-samples", "4", "--seq-len", "48", "--num-full", "3", "--baselines", "none",
               "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    confs = [e["confidence"] for e in r["trajectory"]]
    assert len(confs) == 3 and all(c["windows"] == 4 and 0 <= c["stays"] <= 1 for c in confs)
    assert r["steps_within_noise"] == [e["num_full"] for e in r["trajectory"] if e["confidence"]["within_noise"]]
    summary = (out / "summary.md").read_text()
    assert "- confidence: a bootstrap over the 4 calibration windows" in summary and "stays lowest" in summary


def test_no_spill_of_candidate_states_that_no_step_can_reuse(tmp_path):
    """Device and host tiers that together hold far less than a step's states: a candidate's own states are
    dropped, not copied out to host memory (each copy would cost more than the reuse it cannot buy); only
    the current path's states may go there. The trajectory is unchanged."""
    n = 8
    model = load_model(_model_dir(tmp_path, 15, layers=n), verbose=False)
    batches = _batches(15)
    one = LossEvaluator(model, batches).state_bytes() * 2
    ev = LossEvaluator(model, batches, cache_bytes=(n + 1) * one, host_bytes=4 * one, separate_host=True)
    res = greedy_search(ev, target_full=4, progress=False)
    ref = greedy_search(LossEvaluator(model, batches, cache_bytes=1 << 34), target_full=4, progress=False)
    assert res.trajectory == ref.trajectory
    assert res.counters["spilled"] == 0 and ev.spill_unprotected


def test_cache_below_one_layer_is_refused_before_writing(tmp_path, capsys):
    mdir = _model_dir(tmp_path, 6)
    out = tmp_path / "never"
    rc = main(["search", str(mdir), "--num-samples", "2", "--seq-len", "64", "--cache-gb", "0.00001", "--out",
               str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds less than one layer's states" in err and err.count("\n") == 1
    assert not out.exists()


def test_target_and_forced_validation(tmp_path):
    model = load_model(_model_dir(tmp_path, 4, layers=6), verbose=False)
    ev = LossEvaluator(model, _batches(4))
    with pytest.raises(SearchError, match="cannot reach 1 Full layers"):
        greedy_search(ev, target_full=1, forced_full=[3], progress=False)
    with pytest.raises(SearchError, match="--stages must be between 1"):
        greedy_search(ev, stages=9, progress=False)


def _cli(*args, env=None):
    return [sys.executable, "-m", "indexcache.cli", *map(str, args)]


def _env(threads=1):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def test_resume_after_kill_9_gives_identical_trajectory(tmp_path):
    mdir = _model_dir(tmp_path, 7)
    common = ["search", mdir, "--num-samples", 3, "--seq-len", 48, "--to-end", "--baselines", "none", "--keep", "0.25"]
    ref = subprocess.run(_cli(*common, "--out", tmp_path / "ref"), env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--out", out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = out / "search_state.json"
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                steps = len(json.loads(state.read_text())["result"]["trajectory"])
            except (json.JSONDecodeError, KeyError):
                steps = 0
            if 2 <= steps < N_LAYERS - 2:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = steps
                break
        time.sleep(0.005)
    assert killed_at is not None, "the search finished before it could be killed"
    assert not (out / "report.json").exists()
    res = subprocess.run(_cli(*common, "--out", out, "--resume"), env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a = json.loads((tmp_path / "ref" / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    assert a["trajectory"] == b["trajectory"] and a["selected"] == b["selected"]
    assert len(b["trajectory"]) == N_LAYERS - 1 > killed_at
    # a resume with other settings is refused rather than mixing two searches
    bad = subprocess.run(_cli(*common, "--out", out, "--resume", "--seed", 9), env=_env(), capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "other settings" in bad.stderr


def test_resume_inside_a_step_keeps_the_candidates_done(tmp_path):
    """A search stopped in the middle of a step (here: the 2nd candidate of the third) resumes at that candidate:
    the losses written before it are read back, not recomputed, and the trajectory is the uninterrupted one."""
    model = load_model(_model_dir(tmp_path, 11, layers=8), verbose=False)
    batches = _batches(11)
    ref = greedy_search(LossEvaluator(model, batches), target_full=4, progress=False)

    class Stop(Exception):
        pass

    class Stopping(LossEvaluator):
        calls = 0

        def loss(self, pattern):
            Stopping.calls += 1
            if Stopping.calls == 16:  # the all-Full loss, 7 candidates, then 6: the second of the third step
                raise Stop
            return super().loss(pattern)

    state = tmp_path / "state.json"
    with pytest.raises(Stop):
        greedy_search(Stopping(model, batches), target_full=4, state_path=state, progress=False)
    saved = json.loads(state.read_text())["result"]
    assert len(saved["trajectory"]) == 2 and len(saved["partial"]["losses"]) == 1
    again = LossEvaluator(model, batches)
    res = greedy_search(again, target_full=4, state_path=state, resume=True, progress=False)
    assert res.trajectory == ref.trajectory and res.partial is None
    assert again.counters.evaluations == 4 + 4  # the rest of the third step, then the fourth


def test_two_gloo_processes_match_one(tmp_path):
    mdir = _model_dir(tmp_path, 8)
    common = ["search", mdir, "--num-samples", 2, "--seq-len", 32, "--num-full", 3, "--baselines", "none"]
    one = subprocess.run(_cli(*common, "--out", tmp_path / "one"), env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "-m", "indexcache.cli", *map(str, common),
                          "--out", tmp_path / "two"], env=_env(), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert a["trajectory"] == b["trajectory"] and a["all_full_loss"] == b["all_full_loss"]
    assert a["counters"]["evaluations"] == b["counters"]["evaluations"]


def test_similarity_dp_against_brute_force():
    g = torch.Generator().manual_seed(0)
    n = 7
    sims = torch.rand(n, n, generator=g, dtype=torch.float64).tril(-1) + torch.eye(n, dtype=torch.float64)
    for forced in ([], [3]):
        for m in range(1 + len(forced), n + 1):
            best = None
            for full in itertools.combinations(range(1, n), m - 1):
                if not set(forced) <= set(full):
                    continue
                p = "".join("F" if i == 0 or i in full else "S" for i in range(n))
                score = similarity_score(sims, Pattern.parse(p))
                if best is None or score > best[0] + 1e-12:
                    best = (score, p)
            pat, score = similarity_dp(sims, m, forced)
            assert score == pytest.approx(best[0]) and similarity_score(sims, pat) == pytest.approx(best[0])
            assert pat.num_full == m and all(pat.is_full(f) for f in forced)


def test_overlap_matrix_against_sets(tmp_path):
    from indexcache.analysis.overlap import overlap_matrix

    model = load_model(_model_dir(tmp_path, 9, layers=5), verbose=False)
    batches = _batches(9, n=2, seq=30)
    mat = overlap_matrix(model, batches, progress=False, budget_bytes=2000)
    k = model.config.index_topk
    sums = torch.zeros(5, 5, dtype=torch.float64)
    count = 0
    for ids in batches:
        tr = Trace()
        with torch.no_grad():
            model(ids, trace=tr)
        for s in range(k, ids.shape[1]):
            sets = [set(tr.records[i].indices[0, s].tolist()) for i in range(5)]
            for i in range(5):
                for j in range(5):
                    sums[i, j] += len(sets[i] & sets[j]) / k
            count += 1
    torch.testing.assert_close(mat, sums / count)
    assert torch.allclose(mat.diag(), torch.ones(5, dtype=torch.float64)) and (mat < 1).any()


def test_calibration_sources(tmp_path):
    import lzma

    import numpy as np

    mdir = _model_dir(tmp_path, 10, layers=4)
    with pytest.raises(DataError, match="not longer than index_topk=8"):
        load_calibration(mdir, None, 2, 8, index_topk=8)
    a = load_calibration(mdir, None, 3, 40, seed=1, index_topk=8)
    b = load_calibration(mdir, None, 3, 40, seed=1, index_topk=8)
    c = load_calibration(mdir, None, 3, 40, seed=2, index_topk=8)
    assert a.windows.shape == (3, 40) and torch.equal(a.windows, b.windows) and not torch.equal(a.windows, c.windows)
    assert "synthetic" in a.source
    rows = np.arange(10 * 50).reshape(10, 50) % 300
    np.save(tmp_path / "rows.npy", rows)
    cal = load_calibration(None, tmp_path / "rows.npy", 4, 40, seed=0, index_topk=8)
    assert cal.windows.shape == (4, 40) and all((w.numpy() == rows[:, :40]).all(1).any() for w in cal.windows)
    with lzma.open(tmp_path / "book.txt.xz", "wt") as f:
        f.write("It was the best of times, it was the worst of times. " * 40)
    cal = load_calibration(mdir, tmp_path, 2, 64, index_topk=8)  # a directory with a .txt.xz
    assert cal.windows.shape == (2, 64)


def test_search_and_overlap_commands_write_their_outputs(tmp_path, capsys):
    from indexcache.cli import main

    mdir = _model_dir(tmp_path, 11, layers=6)
    rc = main(["search", str(mdir), "--num-samples", "2", "--seq-len", "32", "--keep", "0.5",
               "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert rc == 0 and "selected 3/6 Full" in out and "--json-model-override-args" in out
    r = json.loads((tmp_path / "s" / "report.json").read_text())
    assert {"num_layers", "method", "all_full_loss", "trajectory", "selected"} <= set(r)
    assert r["num_layers"] == 6 and r["method"] == "greedy" and len(r["trajectory"]) == 3
    assert set(r["trajectory"][0]) == {"pattern", "num_full", "flipped", "loss", "confidence"}
    assert r["selected"]["num_full"] == 3 and r["selected"]["pattern"] == r["trajectory"][-1]["pattern"]
    assert {u["convention"] for u in r["baselines"]["uniform"]} == {"official", "glm52", "paper"}
    assert all("pattern" in s for s in r["baselines"]["similarity"])
    for f in ("loss_curve.png", "summary.md", "config_patch.json", "engine_flags.txt"):
        assert (tmp_path / "s" / f).stat().st_size > 0
    rc = main(["overlap", str(mdir), "--num-samples", "2", "--seq-len", "32", "--out", str(tmp_path / "o"),
               "--pattern", r["selected"]["pattern"]])
    assert rc == 0
    rows = (tmp_path / "o" / "overlap.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[1].split(",")[1] == "1.0000"
    assert (tmp_path / "o" / "overlap.png").stat().st_size > 0
    summary = json.loads((tmp_path / "o" / "overlap.json").read_text())
    assert 0 < summary["mean_shared_to_source_overlap"] <= 1
    rc = main(["search", str(mdir), "--seq-len", "8", "--out", str(tmp_path / "bad")])
    assert rc == 2 and "a query keeps 8 tokens, so every query would keep all it sees" in capsys.readouterr().err


@interpreter
def test_search_on_the_kernels_follows_the_plain_ops(tmp_path):
    """The native runner uses the model's ops backend: on the Triton kernels (here in the interpreter) the
    greedy trajectory is the plain ops' (16 indexer heads, so no exact score ties), its losses within fp32
    summation order."""
    d = make_random_checkpoint(tmp_path / "k", "glm_moe_dsa", "tiny", seed=2, num_hidden_layers=6, kv_lora_rank=32,
                               qk_rope_head_dim=16, index_n_heads=16, first_k_dense_replace=2)
    batches = _batches(2, n=1, seq=24)
    model = load_model(d, verbose=False)
    plain = greedy_search(LossEvaluator(model, batches), target_full=3, progress=False)
    model.set_backend("triton")
    kern = greedy_search(LossEvaluator(model, batches), target_full=3, progress=False)
    assert [e.pattern for e in kern.trajectory] == [e.pattern for e in plain.trajectory]
    for a, b in zip(kern.trajectory, plain.trajectory, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)


@gpu
def test_spilled_prefix_cache_on_a_gpu_uses_page_locked_host_memory(tmp_path):
    """On CUDA the host tier holds page-locked copies, copied out and back asynchronously: the same
    trajectory and work as an unlimited cache."""
    model = load_model(_model_dir(tmp_path, 6), device="cuda", verbose=False)
    batches = [b.cuda() for b in _batches(6)]
    big = greedy_search(LossEvaluator(model, batches, cache_bytes=1 << 34), target_full=3, progress=False)
    two_layers = 2 * LossEvaluator(model, batches).state_bytes() + 4096
    spill = LossEvaluator(model, batches, cache_bytes=two_layers, host_bytes=1 << 34)
    res = greedy_search(spill, target_full=3, progress=False)
    assert res.trajectory == big.trajectory and res.counters["layer_forwards"] == big.counters["layer_forwards"]
    assert res.counters["spilled"] > 0 and res.counters["host_hits"] > 0
    held = [t for state in spill._host.items.values() for s in state for t in (s.hidden, s.carry) if t is not None]
    assert held and all(t.is_pinned() for t in held)


def test_default_calibration_length_is_long_on_a_gpu_and_short_on_the_cpu():
    from types import SimpleNamespace

    from indexcache.search.run import LONG_CALIBRATION, default_seq_len

    info = SimpleNamespace(index_topk=256, tokens_per_unit=1, max_position_embeddings=131072)
    assert default_seq_len(info, "cpu") == 512 and default_seq_len(info) == 512
    assert default_seq_len(info, "cuda") == default_seq_len(info, "cuda:1") == LONG_CALIBRATION == 16384
    short = SimpleNamespace(index_topk=2048, tokens_per_unit=1, max_position_embeddings=8192)
    assert default_seq_len(short, "cuda") == 8192 and default_seq_len(short, "cpu") == 4096
