"""``indexcache train``: the three DSA training stages, with IndexCache's training-aware distillation.

    dense   pretrain the backbone with dense attention (the indexers are not used and not trained)
    warmup  freeze the backbone; train the Full layers' indexers with KL(p || softmax(I)) on dense attention
    sparse  sparse attention over the indexer's top-k; the LM loss trains the backbone, the top-k-restricted
            KL (on detached inputs) trains the indexers

With ``pattern`` (e.g. uniform 1/4) warm-up and sparse training are training-aware: Shared layers own no
indexer and attend with their source's indices, and each Full indexer is distilled against the attention
of every layer it serves (``cross_layer=False``: its own layer only, the paper's ablation).

Seeded and resumable: batch ``step`` is drawn from ``(seed, step)``, the state (weights, optimiser, log) is
written atomically every ``save_every`` steps, and ``resume`` continues to the result an uninterrupted run
gives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import load_model, save_model
from ..config import DSAConfig
from ..data.text import DataError
from ..errors import OptionError, OutputError
from ..model.dsa import DSAForCausalLM, MoE, checkpoint_tensors
from ..outputs import OutputDir, check_output_dir
from ..pattern import Pattern, parse_spec
from ..presets import preset_config
from .data import EOS, PAD, fixed_windows, sample_windows, split_documents, tokenize, train_tokenizer
from .losses import IndexerDistillation
from .retrieval import FIRST_KINDS, KINDS, retrieval_batch

STAGES = ("dense", "warmup", "sparse")
STATE_FILE = "state.pt"
PARTIAL_MODEL = "partial_model"  # the weights of a run stopped before its last step
TOKENIZER_PARTS = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class TrainConfig:
    out: str
    stage: str
    data: str
    init: str | None = None
    preset: str = "mini"
    heldout: int = 3
    vocab_size: int = 8192
    seq_len: int = 4096
    batch_size: int = 8
    micro_batch: int | None = None  # split each batch into micro-batches of this size (gradient accumulation)
    steps: int = 1000
    lr: float = 3e-3
    indexer_lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    indexer_loss_weight: float = 1.0
    bias_update_rate: float = 1e-3
    pattern: str | None = None
    cross_layer: bool = True
    synthetic_mix: float = 0.0  # share of each batch replaced by synthetic retrieval windows (train/retrieval.py)
    synthetic_kinds: str | None = None  # comma-separated episode kinds (default: all)
    synthetic_density: float | None = None  # structured share of a synthetic window (default: random 0.15-0.5)
    kl_rows: int = 0  # warm-up and sparse stages: the indexer loss on this many random query rows (0: all)
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    eval_every: int = 200
    eval_windows: int = 8
    save_every: int = 200
    resume: bool = False
    progress: bool = True
    stop_after: int | None = None  # save and stop at this step (continue later with resume)
    time_limit_s: float | None = None  # save and stop once this invocation has run this long
    selection_kernels: bool = False  # sparse stage on a GPU: select on the Triton kernels (measured slower)
    shard_mb: int = 4096  # safetensors shard size of the saved model
    token_cache: str | None = None  # an earlier run's tokens.npz to reuse (checked against tokenizer and texts)
    overwrite: bool = False  # replace an earlier run's outputs in ``out``
    command: str = ""  # the command line, recorded in the output directory's manifest

    def fingerprint(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("resume", "progress", "device", "log_every", "eval_every", "save_every", "stop_after",
                  "time_limit_s", "selection_kernels", "micro_batch", "shard_mb", "overwrite", "command",
                  "token_cache"):
            d.pop(k)
        return d


# ------------------------------------------------------------------------------------- model setup
@torch.no_grad()
def init_weights(model: DSAForCausalLM, seed: int, std: float = 0.02) -> None:
    """GPT-style initialisation: normal(0, std) weights, residual output projections scaled by
    1/sqrt(2 L), unit norm gains, zero LayerNorm biases and router biases."""
    g = torch.Generator().manual_seed(seed)
    resid = std / math.sqrt(2 * model.config.num_hidden_layers)
    for name, p in checkpoint_tensors(model.named_parameters()):
        if name.endswith(("norm.weight", "layernorm.weight")):
            p.fill_(1.0)
        elif name.endswith("k_norm.bias"):
            p.zero_()
        else:
            s = resid if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            p.copy_(torch.randn(p.shape, generator=g) * s)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()


def _trainable(model: DSAForCausalLM, stage: str) -> tuple[list, list]:
    """(backbone params, indexer params) that this stage trains; the rest is frozen."""
    backbone, indexer = [], []
    for name, p in model.named_parameters():
        is_idx = ".indexer." in name
        train = (stage == "dense" and not is_idx) or (stage == "warmup" and is_idx) or stage == "sparse"
        p.requires_grad_(train)
        if train:
            (indexer if is_idx else backbone).append(p)
    return backbone, indexer


def _param_groups(params: list, lr: float, wd: float) -> list[dict]:
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": decay, "lr": lr, "weight_decay": wd, "base_lr": lr},
                        {"params": other, "lr": lr, "weight_decay": 0.0, "base_lr": lr}) if g["params"]]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def update_router_biases(model: DSAForCausalLM, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the selection bias of under-loaded experts and
    lower it for over-loaded ones, by ``rate`` per step."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE) and layer.mlp.gate.last_load is not None:
            load = layer.mlp.gate.last_load.float()
            layer.mlp.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
            layer.mlp.gate.last_load = None


# ------------------------------------------------------------------------------------------ losses
def step_losses(model: DSAForCausalLM, ids: torch.Tensor, stage: str, pattern: Pattern, cross_layer: bool,
                indexer_backward_scale: float | None = None, kl_rows: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(LM loss, indexer loss, per-term KL values) of one batch in ``stage``. With
    ``indexer_backward_scale`` the indexer loss is back-propagated block by block during the forward;
    with ``kl_rows`` (sorted query positions) the indexer loss is the mean over those rows only."""
    distill = IndexerDistillation(pattern, cross_layer, indexer_backward_scale) if stage != "dense" else None
    logits = model(ids, dense=stage != "sparse", collect=distill, kl_rows=kl_rows if distill else None)
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return lm, (distill.finish() if distill else None), (distill.terms if distill else {})


def sample_rows(n: int, seq_len: int, seed: int, step: int, part: int) -> torch.Tensor | None:
    """``n`` distinct query positions of ``[0, seq_len)``, sorted, drawn from ``(seed, step, part)`` alone (a
    resumed run draws the same ones); None (every row) when ``n`` is 0 or covers the sequence. Uniform rows
    make the sampled indexer loss an unbiased estimate of the mean over all rows."""
    if n <= 0 or n >= seq_len:
        return None
    rng = np.random.default_rng((seed, step, part, 0x6B6C))
    return torch.from_numpy(np.sort(rng.choice(seq_len, size=n, replace=False)))


@torch.no_grad()
def answer_accuracy(model: DSAForCausalLM, ids: np.ndarray, mask: np.ndarray, dense: bool, device: str,
                    autocast) -> dict:
    """Next-token accuracy and loss on the answer tokens of synthetic retrieval windows: the tokens that
    only a look-up of an earlier part of the window predicts (sparse attention unless ``dense``)."""
    hits, loss, n = 0, 0.0, 0
    for row, m in zip(ids, mask, strict=True):
        x = torch.from_numpy(row).long()[None].to(device)
        with autocast:
            logits = model(x, dense=dense)[0, :-1].float()
        tgt = torch.from_numpy(m[1:]).to(device)
        lg, y = logits[tgt], x[0, 1:][tgt]
        hits += int((lg.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(lg, y, reduction="sum"))
        n += int(tgt.sum())
    return {"heldout_answer_acc": hits / max(n, 1), "heldout_answer_loss": loss / max(n, 1)}


# ------------------------------------------------------------------------------------------- train
def _prepare_data(cfg: TrainConfig, out: OutputDir) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(training token stream, held-out token stream, held-out file names); the tokenizer is written to
    the run's directory (trained for a dense run from scratch, copied from ``init`` otherwise) and copied
    into every model saved there."""
    from tokenizers import Tokenizer

    train_txt, test_txt, held_names = split_documents(cfg.data, cfg.heldout, cfg.seed)
    tok_file = out.path / "tokenizer.json"
    if not tok_file.exists():
        if cfg.init is not None:  # a later stage must keep the tokenizer its embeddings were trained with
            if not (Path(cfg.init) / "tokenizer.json").exists():
                raise DataError(f"{cfg.init} has no tokenizer.json: cannot continue its training on text")
            for f in TOKENIZER_PARTS:
                if (Path(cfg.init) / f).exists():
                    out.write(f, lambda p, f=f: shutil.copyfile(Path(cfg.init) / f, p))
        else:
            train_tokenizer(train_txt, cfg.vocab_size, out.path)
            for f in TOKENIZER_PARTS:
                out.record(f)
    tok = Tokenizer.from_file(str(tok_file))
    cache = "tokens.npz"
    # the cache is valid for the same tokenizer, the same split and the same texts
    sig = hashlib.sha256(tok_file.read_bytes())
    for doc in train_txt + ["\0held\0"] + test_txt:
        sig.update(len(doc).to_bytes(8, "little"))
        sig.update(doc[:4096].encode("utf-8", "replace"))
    tok_hash = sig.hexdigest()
    for f in (out.path / cache, cfg.token_cache):  # this run's cache, then one named by --token-cache
        if f is not None and Path(f).is_file():
            with np.load(f, allow_pickle=False) as z:
                if str(z["tok_hash"]) == tok_hash and list(z["held"]) == held_names:
                    train_ids, test_ids = z["train"], z["test"]
                    break
    else:
        train_ids, test_ids = None, None
    if train_ids is not None:
        if not (out.path / cache).exists():
            out.write(cache, lambda p: shutil.copyfile(cfg.token_cache, p))
        return train_ids, test_ids, held_names
    train_ids, test_ids = tokenize(train_txt, tok), tokenize(test_txt, tok)
    if tok.get_vocab_size() <= np.iinfo(np.uint16).max:  # half the bytes on disk and in memory
        train_ids, test_ids = train_ids.astype(np.uint16), test_ids.astype(np.uint16)
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, train=train_ids, test=test_ids, tok_hash=tok_hash, held=np.array(held_names))

    out.write(cache, write)
    return train_ids, test_ids, held_names


def use_selection_kernels(model: DSAForCausalLM) -> bool:
    """On a CUDA GPU, the model's ops backend becomes ``triton`` where the kernels take its shapes. The sparse
    stage then selects its top-k (indexer logits and top-k, under no_grad) and runs its no-grad evaluations
    on the kernels; everything that trains stays on the plain ops (norms, RoPE, the router, MoE and attention
    check for it). Returns whether it switched."""
    from ..ops.triton_support import HAVE_TRITON

    if model.device.type != "cuda" or not HAVE_TRITON:
        return False
    try:
        model.set_backend("triton")
    except ValueError:  # shapes the kernels do not take: the plain ops select too
        return False
    return True


def train(cfg: TrainConfig) -> dict:
    if cfg.stage not in STAGES:
        raise OptionError(f"unknown stage {cfg.stage!r} (choose from {', '.join(STAGES)})")
    if cfg.stage != "dense" and cfg.init is None:
        raise OptionError(f"stage {cfg.stage!r} starts from a trained model: pass --init MODEL_DIR")
    if not 0.0 <= cfg.synthetic_mix <= 1.0:
        raise OptionError(f"--synthetic-mix is a share of the batch, in [0, 1]; got {cfg.synthetic_mix}")
    check_output_dir(cfg.out, "OUT", overwrite=cfg.overwrite, resume_file=STATE_FILE, resume=cfg.resume)
    state_file = Path(cfg.out) / STATE_FILE
    if cfg.resume and not state_file.exists():
        raise OutputError(f"--resume: no {state_file} to resume from (run without --resume to start)")
    out = OutputDir(cfg.out, cfg.command).open()
    torch.manual_seed(cfg.seed)

    train_ids, test_ids, held_names = _prepare_data(cfg, out)
    tokenizer = None
    kinds = tuple(cfg.synthetic_kinds.split(",")) if cfg.synthetic_kinds else KINDS
    if cfg.synthetic_mix > 0:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(out.path / "tokenizer.json"))
    if cfg.init is not None:
        pat = None
        if cfg.pattern is not None:
            pat = parse_spec(cfg.pattern, DSAConfig.from_file(cfg.init).num_hidden_layers)
        # trained weights must be full precision: an FP8 checkpoint is dequantised
        model = load_model(cfg.init, pattern=pat, device=cfg.device, verbose=False, keep_fp8=False)
    else:  # dense pretraining builds every indexer; a pattern only matters from the warm-up on
        vocab = len(json.loads((out.path / "tokenizer.json").read_text())["model"]["vocab"])
        model = DSAForCausalLM(preset_config(cfg.preset, vocab_size=max(vocab, cfg.vocab_size)))
        init_weights(model, cfg.seed)
        model.to(cfg.device)
    if cfg.stage == "sparse" and cfg.selection_kernels:  # the one stage that selects
        # opt-in: on an H200 at 16K tokens (16 layers, 4 indexer heads of 64, top-256) a sparse step took
        # 10.9 s with the selection on the kernels against 8.5 s on the plain ops (results/train/long-context)
        use_selection_kernels(model)
    if int(train_ids.max()) >= model.config.vocab_size:
        raise DataError("the tokenizer has more tokens than the model's vocabulary")
    if cfg.seq_len <= model.config.index_topk and cfg.stage != "dense":
        raise DataError(f"--seq-len {cfg.seq_len} must exceed index_topk={model.config.index_topk}")
    pattern = model.pattern
    backbone, indexer = _trainable(model, cfg.stage)
    groups = _param_groups(backbone, cfg.lr, cfg.weight_decay)
    groups += _param_groups(indexer, cfg.indexer_lr or cfg.lr, 0.0)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)

    log: list[dict] = []
    evals: list[dict] = []
    start = 0
    if cfg.resume and state_file.exists():
        st = torch.load(state_file, map_location=cfg.device, weights_only=False)
        if st["fingerprint"] != cfg.fingerprint():
            saved, now = st["fingerprint"], cfg.fingerprint()
            diff = "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in dict.fromkeys([*saved, *now])
                             if saved.get(k) != now.get(k))
            raise OutputError(f"cannot resume: {state_file} was written with other settings ({diff}); "
                             "run with the same settings, or without --resume")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, log, evals = st["step"], st["log"], st["evals"]

    held_batches = fixed_windows(test_ids, cfg.eval_windows, cfg.seq_len)
    held_synthetic = None
    if tokenizer is not None:  # retrieval windows built on the held-out books, the same every evaluation
        # the first curriculum's kinds (comparable across all runs) and, apart, the kinds added after it
        held_synthetic = {"": retrieval_batch(test_ids, tokenizer, 4, cfg.seq_len, cfg.seed, 0, salt=2,
                                              kinds=FIRST_KINDS),
                          "_new": retrieval_batch(test_ids, tokenizer, 4, cfg.seq_len, cfg.seed, 0, salt=3,
                                                  kinds=KINDS[len(FIRST_KINDS):])}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if str(cfg.device).startswith("cuda")
                else torch.autocast("cpu", enabled=False))
    t0 = time.time() - (log[-1]["seconds"] if log else 0.0)

    def save_state(step: int) -> None:
        state = {"fingerprint": cfg.fingerprint(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "step": step, "log": log, "evals": evals}
        out.write(STATE_FILE, lambda p: torch.save(state, p))

    def evaluate(step: int) -> dict:
        model.eval()
        lm_sum, idx_sum = 0.0, 0.0
        with torch.no_grad(), autocast:
            for ids in held_batches:
                lm, il, _ = step_losses(model, ids[None].to(cfg.device), cfg.stage, pattern, cfg.cross_layer)
                lm_sum += float(lm)
                idx_sum += float(il) if il is not None else 0.0
        e = {"step": step, "heldout_lm_loss": lm_sum / len(held_batches)}
        if cfg.stage != "dense":
            e["heldout_indexer_kl"] = idx_sum / len(held_batches)
        if held_synthetic is not None:
            for suffix, (s_ids, s_mask) in held_synthetic.items():
                acc = answer_accuracy(model, s_ids, s_mask, dense=cfg.stage == "dense", device=cfg.device,
                                      autocast=autocast)
                e.update({k + suffix: v for k, v in acc.items()})
        model.train()
        evals.append(e)
        return e

    model.train()
    began = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.stage}",
               disable=not cfg.progress)
    for step in bar:
        f = lr_factor(step, cfg)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        ids = sample_windows(train_ids, cfg.batch_size, cfg.seq_len, cfg.seed, step)
        n_syn = round(cfg.synthetic_mix * cfg.batch_size)
        if n_syn:  # spread over the batch, so every micro-batch gets its share
            rows = torch.arange(n_syn) * cfg.batch_size // n_syn
            ids[rows] = torch.from_numpy(retrieval_batch(train_ids, tokenizer, n_syn, cfg.seq_len, cfg.seed, step,
                                                         kinds=kinds, density=cfg.synthetic_density)[0])
        ids = ids.to(cfg.device)
        micro = ids.split(cfg.micro_batch or cfg.batch_size)
        opt.zero_grad(set_to_none=True)
        lm_sum, il_sum = 0.0, None
        for i, part in enumerate(micro):
            share = part.shape[0] / ids.shape[0]
            idx_scale = None if cfg.stage == "dense" else share * (1.0 if cfg.stage == "warmup"
                                                                   else cfg.indexer_loss_weight)
            rows = sample_rows(cfg.kl_rows, cfg.seq_len, cfg.seed, step, i) if cfg.stage != "dense" else None
            with autocast:
                lm, il, _ = step_losses(model, part, cfg.stage, pattern, cfg.cross_layer, idx_scale, rows)
            if cfg.stage != "warmup":
                (share * lm).backward()  # the indexer loss was back-propagated block by block already
            lm_sum += share * float(lm.detach())
            if il is not None:
                il_sum = (il_sum or 0.0) + share * float(il)
        gnorm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        if cfg.stage != "warmup" and cfg.bias_update_rate > 0:
            update_router_biases(model, cfg.bias_update_rate)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rec = {"step": step, "lr": cfg.lr * f, "lm_loss": lm_sum, "grad_norm": float(gnorm),
                   "tokens": (step + 1) * cfg.batch_size * cfg.seq_len, "seconds": round(time.time() - t0, 2)}
            if il_sum is not None:
                rec["indexer_kl"] = il_sum
            log.append(rec)
            bar.set_postfix({k: f"{v:.4f}" for k, v in rec.items() if k in ("lm_loss", "indexer_kl")})
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            evaluate(step + 1)
        stop = (cfg.stop_after is not None and step + 1 >= cfg.stop_after) or (
            cfg.time_limit_s is not None and time.time() - began > cfg.time_limit_s)
        if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1 or stop:
            save_state(step + 1)
        if stop and step + 1 < cfg.steps:
            bar.close()
            # the weights so far travel without the optimiser state: a run cut short on one machine can be
            # continued elsewhere from PARTIAL_MODEL (--init), or here with --resume
            save_model(model, out.path / PARTIAL_MODEL, dtype=torch.bfloat16, copy_tokenizer_from=out.path,
                       max_shard_bytes=cfg.shard_mb << 20, overwrite=True, command=cfg.command)
            out.record(PARTIAL_MODEL)
            out.write_text("losses.json", json.dumps({"train": log, "eval": evals}, indent=1) + "\n")
            return {"stage": cfg.stage, "stopped_at": step + 1, "steps": cfg.steps, "resumable": str(state_file),
                    "partial_model": str(out.path / PARTIAL_MODEL), "seconds": log[-1]["seconds"] if log else None}
    bar.close()
    if not evals:
        evaluate(cfg.steps)
    shutil.rmtree(out.path / PARTIAL_MODEL, ignore_errors=True)
    return finish(cfg, out, model, log, evals, held_names, held_batches)


def finish(cfg: TrainConfig, out: OutputDir, model: DSAForCausalLM, log: list[dict], evals: list[dict],
           held_names: list[str], held_batches: torch.Tensor) -> dict:
    from ..analysis.recall import indexer_recall

    model.eval()
    save_model(model, out.path / "model", dtype=torch.bfloat16, copy_tokenizer_from=out.path,
               max_shard_bytes=cfg.shard_mb << 20, overwrite=True, command=cfg.command)
    out.record("model")
    summary = {"stage": cfg.stage, "steps": cfg.steps, "pattern": str(model.pattern), "cross_layer": cfg.cross_layer,
               "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
               "heldout_files": held_names, "final_train": log[-1] if log else None, "final_eval": evals[-1],
               "seconds": log[-1]["seconds"] if log else None, "config": dataclasses.asdict(cfg)}
    if cfg.stage != "dense" and cfg.seq_len > model.config.index_topk:
        with torch.no_grad():
            summary["indexer_recall"] = indexer_recall(model, [b[None] for b in held_batches[:2]])
    out.write_text("losses.json", json.dumps({"train": log, "eval": evals}, indent=1) + "\n")
    out.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    out.write("losses.png", lambda p: plot_losses(log, evals, p, f"{cfg.stage} stage"))
    return summary


def plot_losses(log: list[dict], evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    steps = [r["step"] for r in log]
    if any("lm_loss" in r for r in log):
        ax.plot(steps, [r["lm_loss"] for r in log], label="train LM loss", color="C0", lw=1)
    if evals:
        ax.plot([e["step"] for e in evals], [e["heldout_lm_loss"] for e in evals], "o-", ms=3,
                label="held-out LM loss", color="C1")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (nats/token)")
    if any("indexer_kl" in r for r in log):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("indexer_kl", float("nan")) for r in log], color="C2", lw=1, label="indexer KL")
        ax2.set_ylabel("indexer KL", color="C2")
        ax2.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")  # path may be a temporary name without .png
    plt.close(fig)


__all__ = ["TrainConfig", "train", "init_weights", "lr_factor", "step_losses", "EOS", "PAD"]
