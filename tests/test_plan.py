"""``indexcache plan``: exact parameter counts against checkpoints transformers wrote, the layer-forward
estimate against the counters of real searches, the probe on CPU, the layouts, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import tiny

from indexcache import Pattern
from indexcache.architectures import model_info
from indexcache.checkpoint import TensorSource
from indexcache.cli import main
from indexcache.plan import make_plan, model_size, search_work
from indexcache.search import LossEvaluator, estimate_layer_forwards, greedy_search

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for arch in tiny.ALL_ARCHS:
        d = tmp_path_factory.mktemp(arch) / "m"
        tiny.save_new(tiny.any_model(arch, seed=7), d)
        out[arch] = d
    return out


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("arch", tiny.ALL_ARCHS)
def test_parameter_count_is_the_checkpoints(dirs, arch):
    size = model_size(model_info(dirs[arch]))
    src = TensorSource(dirs[arch])
    try:
        on_disk = sum(math.prod(src.shape(n)) for n in src.names() if ".mtp." not in n and "vision" not in n)
    finally:
        src.close()
    # tied embeddings are one tensor in memory and one on disk; the vision tower of GLM-5.3 is counted in
    # "other" (embeddings, head) but left out of the comparison with the language model's tensors
    lm = sum(x.params for x in size.layers)
    assert lm > 0 and lm <= on_disk <= size.params
    if arch != "glm5_next":
        assert size.params == on_disk
    assert size.weight_bytes() == 2 * size.params  # bf16: no FP8 quantization in these configs


def test_fp8_weights_count_one_byte_and_their_block_scales(dirs):
    info = model_info(dirs["deepseek_v32"])
    info.raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    size = model_size(info)
    q = sum(x.fp8_params for x in size.layers)
    assert q > 0
    assert size.weight_bytes() == 2 * (size.params - q) + q + 4 * math.ceil(q / 128**2)
    assert size.weight_bytes(fp8=False) == 2 * size.params


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_forward_estimate_against_real_searches(tmp_path, seed):
    """The estimate averages over random flip orders; a real search flips in its own order. On a 16-layer
    model with 4 batches the two agree to 15%, and the exact count of the order the search took (the same
    rule without the averaging) equals the counter."""
    import torch

    from indexcache.checkpoint import load_model
    from indexcache.presets import make_random_checkpoint
    from indexcache.runner import NativeRunner

    d = make_random_checkpoint(tmp_path / "m", "glm_moe_dsa", "tiny", seed=seed, num_hidden_layers=16,
                               first_k_dense_replace=1)
    model = load_model(d)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 300, (1, 40), generator=g) for _ in range(4)]
    ev = LossEvaluator(NativeRunner(model), batches, cache_bytes=1 << 30)
    res = greedy_search(ev, target_full=4, progress=False)
    done = res.counters["layer_forwards"] - 16 * 4  # less the all-Full evaluation
    est = estimate_layer_forwards(Pattern.all_full(16), 12, list(range(16)), 16, 4)
    assert abs(est - done) / done < 0.15, (est, done)
    # the rule itself, in the order the search flipped
    full, prev, exact = set(range(1, 16)), None, 0
    for step in res.trajectory:
        exact += sum(16 - max(i, prev or 0) for i in full) * 4
        prev = step.flipped
        full.discard(prev)
    assert exact == done


def test_search_work_counts_flips_and_evaluations(dirs):
    info = model_info(dirs["deepseek_v4"])  # 4 CSA layers carry the pattern
    w = search_work(info, num_samples=3, target_full=1)
    assert (w.flips, w.candidates) == (3, 3)
    assert w.evaluations == (3 + 2 + 1) * 3
    assert w.first_evaluation == info.num_layers * 3
    assert search_work(info, 3, 1, flips=2).flips == 2


@pytest.mark.parametrize("arch", ["glm_moe_dsa", "deepseek_v4", "minimax_m3"])
def test_probe_on_cpu_times_every_layer_kind(dirs, arch):
    info = model_info(dirs[arch])
    plan = make_plan(dirs[arch] / "config.json", seq_len=96, num_samples=2, target_full=2, gpus=2, gpu_gib=80,
                     do_probe=True, device="cpu")
    kinds = {x.kind for x in model_size(info).layers}
    assert set(plan.timing.full_s) == kinds and all(t > 0 for t in plan.timing.full_s.values())
    indexer_kinds = {model_size(info).layers[s].kind for s in info.slots[1:]}
    assert indexer_kinds <= set(plan.timing.shared_s)
    assert plan.timing.state_bytes > 0 and plan.s_per_layer_forward > 0
    names = [lay.name for lay in plan.layouts]
    assert names[0] == "one GPU" and "device_map over 2" in names and "2 replicas (candidates split, NCCL)" in names


def test_plan_command_on_a_config_alone(capsys, dirs, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text((dirs["glm_moe_dsa"] / "config.json").read_text())  # no weights beside it
    rc, out, err = run(capsys, "plan", cfg, "--seq-len", 96, "--num-samples", 2, "--gpus", 4, "--num-full", 2)
    assert rc == 0, err
    assert "layer-forwards with prefix reuse" in out and "4 x tensor parallel" not in out
    assert "1 x tensor parallel 4" in out and "2 x tensor parallel 2" in out and "fastest layout that fits" in out
    rc, out, err = run(capsys, "plan", cfg, "--seq-len", 96, "--num-samples", 2, "--json", "--out", tmp_path / "p.json")
    assert rc == 0, err
    rep = json.loads((tmp_path / "p.json").read_text())
    assert rep["written_by"].startswith("indexcache") and rep["work"]["layer_forwards"] > 0
    assert rep["command"].startswith("indexcache plan")


def test_plan_refuses_bad_input_in_one_line(capsys, dirs, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for argv, want in [
        (["plan", tmp_path / "notes.txt"], "neither a model directory nor a config.json"),
        (["plan", dirs["glm_moe_dsa"], "--seq-len", 10**7], "max_position_embeddings"),
        (["plan", dirs["glm_moe_dsa"], "--num-full", 99], "more than the 4 layers"),
        (["plan", dirs["glm_moe_dsa"], "--probe", "--device", "cpu"], "--probe times the layers on this machine's GPU"),
        (["plan", dirs["glm_moe_dsa"], "--gpus", 0], "--gpus"),
    ]:
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and want in err and len(err.strip().splitlines()) == 1, err


def test_without_room_for_a_step_every_candidate_starts_at_its_own_layer():
    from indexcache.search import layer_forward_counts

    n = 10
    full, shared = layer_forward_counts(Pattern.all_full(n), 3, list(range(n)), n, 2, reuse_previous=False)
    # each step runs every remaining candidate from its own layer; which one leaves varies with the order
    first_step = sum(n - i for i in range(1, n))
    assert first_step * 2 < sum(full) + sum(shared) <= 3 * first_step * 2
    # each candidate's own layer runs Shared once per step, and flipped layers stay Shared
    assert sum(shared) >= 3 * 9 * 2 - 3 * 2
    reused = layer_forward_counts(Pattern.all_full(n), 3, list(range(n)), n, 2)
    assert sum(reused[0]) + sum(reused[1]) < sum(full) + sum(shared)


def test_the_probe_loads_the_checkpoints_own_layers():
    """A checkpoint with weights is probed on its trained layers: layer j of the probe model is layer keep[j]
    of the checkpoint, tensor for tensor."""
    import torch

    from indexcache.bundled import default_model
    from indexcache.checkpoint import load_layers, load_model
    from indexcache.plan import _kinds_to_probe, _reduced_config

    info = model_info(default_model())
    keep = _kinds_to_probe(info, model_size(info))
    sub = load_layers(default_model(), keep, _reduced_config(info, keep), torch.float32, "cpu")
    whole = load_model(default_model(), verbose=False)
    assert len(sub.model.layers) == len(keep)
    for j, orig in enumerate(keep):
        a = dict(sub.model.layers[j].state_dict())
        b = dict(whole.model.layers[orig].state_dict())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(sub.lm_head.weight, whole.lm_head.weight)
    plan = make_plan(default_model(), seq_len=512, num_samples=1, target_full=8, do_probe=True, device="cpu")
    assert any("trained layers" in n for n in plan.timing.notes) and plan.s_per_layer_forward > 0
