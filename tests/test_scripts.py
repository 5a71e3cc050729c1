"""The GPU scripts' command lines, checked on CPU: a wrong flag in a script otherwise shows only on the GPU."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from indexcache.cli import build_parser, check_train
from indexcache.errors import OptionError

ROOT = Path(__file__).resolve().parents[1]
CURRICULUM_STEPS = ("dense8k", "dense16k", "warm8k", "warm16k", "sparse16k", "eval")


def dry_run(*argv: str) -> list[list[str]]:
    env = {**os.environ, "DRY_RUN": "1", "OUT": "/nonexistent/out"}
    out = subprocess.run(["bash", *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("step", CURRICULUM_STEPS)
def test_every_curriculum_step_parses_as_an_indexcache_command(step):
    (cmd,) = dry_run("scripts/long_context_curriculum.sh", step, "models/dsa-mini", "3")
    args = build_parser().parse_args(cmd)  # argparse exits (SystemExit) on a flag or value it refuses
    assert args.cmd == cmd[0]
    if step == "eval":
        assert args.lengths == [4096, 16384, 32768] and args.samples == 50
    else:
        assert args.time_limit_min == 3 and args.init == "models/dsa-mini"
        assert args.resume == (ROOT / args.out / "state.pt").exists()  # resumes only a run stopped here


def test_curriculum_eval_with_yarn_reads_an_extended_model():
    env = {**os.environ, "YARN": "2", "LENGTHS": "16384 32768"}
    out = subprocess.run(["bash", "scripts/long_context_curriculum.sh", "eval", "models/dsa-mini"], cwd=ROOT,
                         env={**env, "DRY_RUN": "1", "OUT": "o"}, capture_output=True, text=True, check=True).stdout
    args = build_parser().parse_args(shlex.split(out))
    assert args.model == "runs/yarn2-models-dsa-mini" and args.lengths == [16384, 32768]
    assert args.out == "o/eval-long-yarn2.json"


def test_curriculum_overrides(tmp_path):
    out = subprocess.run(["bash", "scripts/long_context_curriculum.sh", "sparse16k", "run:none"], cwd=ROOT,
                         env={**os.environ, "DRY_RUN": "1", "OUT": "o", "STEPS": "37"}, capture_output=True, text=True)
    assert out.returncode == 2 and "no model in runs/none" in out.stderr  # run:NAME must name a run that exists
    (cmd,) = [shlex.split(line) for line in subprocess.run(
        ["bash", "scripts/long_context_curriculum.sh", "sparse16k", "models/dsa-mini"], cwd=ROOT,
        env={**os.environ, "DRY_RUN": "1", "OUT": "o", "STEPS": "37"}, capture_output=True, text=True,
        check=True).stdout.splitlines()]
    assert build_parser().parse_args(cmd).steps == 37
    env = {**os.environ, "DRY_RUN": "1", "OUT": "o", "MIX": "0.7", "KINDS": "secret,fact"}
    (cmd,) = [shlex.split(line) for line in subprocess.run(
        ["bash", "scripts/long_context_curriculum.sh", "sparse16k", "models/dsa-mini"], cwd=ROOT, env=env,
        capture_output=True, text=True, check=True).stdout.splitlines()]
    args = build_parser().parse_args(cmd)
    assert (args.synthetic_mix, args.synthetic_kinds) == (0.7, "secret,fact")
    for step, kl_rows in (("warm16k", {}), ("warm8k", {"KL_ROWS": "512"})):
        env = {**os.environ, "DRY_RUN": "1", "OUT": "o", "KINDS": "secret:0.6,fact", **kl_rows}
        (cmd,) = [shlex.split(line) for line in subprocess.run(
            ["bash", "scripts/long_context_curriculum.sh", step, "models/dsa-mini"], cwd=ROOT, env=env,
            capture_output=True, text=True, check=True).stdout.splitlines()]
        args = build_parser().parse_args(cmd)
        assert args.kl_rows == int(kl_rows.get("KL_ROWS", 2048)) and args.synthetic_kinds == "secret:0.6,fact"
        (tmp_path / "book.txt").write_text("A book.")
        # the books are not on this machine, and runs/ may hold an earlier run: the rest of the check runs as on the GPU
        args.data, args.out, args.resume = str(tmp_path), str(tmp_path / f"run-{step}"), False
        check_train(args)  # the weighted kinds pass the CLI's own check
    args.synthetic_kinds = "secret:often,fact"
    with pytest.raises(OptionError, match="--synthetic-kinds: retrieval episode kind 'secret:often': the weight"):
        check_train(args)


def test_curriculum_refuses_an_unknown_step():
    r = subprocess.run(["bash", "scripts/long_context_curriculum.sh", "sparse64k", "models/dsa-mini"], cwd=ROOT,
                       env={**os.environ, "DRY_RUN": "1", "OUT": "/nonexistent"}, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown step sparse64k" in r.stderr


def test_rope_extend_links_the_weights_and_sets_yarn(tmp_path):
    import torch

    from indexcache.checkpoint import load_model
    from indexcache.model.rope import inv_freq_and_scaling
    from indexcache.presets import make_random_checkpoint

    base = make_random_checkpoint(tmp_path / "m", "glm_moe_dsa", "tiny", seed=1)
    out = tmp_path / "yarn2"
    run = [sys.executable, str(ROOT / "scripts/rope_extend.py"), str(base), str(out), "--factor", "2", "--original",
           "64"]
    subprocess.run(run, check=True, capture_output=True)
    assert all((out / f.name).is_symlink() for f in Path(base).iterdir() if f.suffix == ".safetensors")
    model = load_model(out, device="cpu")
    rope = model.config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 2.0, 64)
    inv, scale = inv_freq_and_scaling(rope, model.config.qk_rope_head_dim)
    inv0, _ = inv_freq_and_scaling(load_model(base, device="cpu").config.rope, model.config.qk_rope_head_dim)
    assert torch.equal(inv[0], inv0[0]) and inv[-1] < inv0[-1] and scale > 1  # fast dims kept, slow ones stretched
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr
