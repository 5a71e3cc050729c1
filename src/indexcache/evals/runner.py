"""Run the long-context suite on a DSA model: greedy answers per pattern, and perplexity per context length.

Two ways to decode the same greedy tokens:

* ``decode="cache"`` (the default): :class:`indexcache.engine.Engine` prefills the prompt into its latent
  and indexer caches once, then decodes one token per step against them.
* ``decode="recompute"``: :meth:`DSAForCausalLM.forward_layers` on the whole sequence at every step, the
  model's own reference path. To keep that affordable it verifies several tokens per forward: a draft is
  taken from the context itself (the tokens that followed the latest earlier occurrence of the sequence's
  last few tokens, as in prompt-lookup decoding), the model scores the sequence with the draft appended,
  and the draft is accepted up to its first token that differs from the model's own argmax, which is taken
  instead. The gold answers are never used. Because the model is causal, the tokens chosen are those of a
  one-token-per-forward loop (``draft=False``).

The paths can differ only where two logits tie to rounding (sums run in another order); the tests check
that they give the same tokens.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..architectures import model_info
from ..data.text import DataError, load_tokenizer, token_windows
from ..intervals import average_ci, mean_ci, paired_difference
from ..model.dsa import DSAForCausalLM
from ..ops.triton_support import FP32_DOTS, set_fp32_dot
from ..outputs import write_atomic
from ..pattern import Pattern
from ..runner import open_model
from ..search.evaluator import lm_window_losses
from .tasks import INT, Haystack, Sample, TaskError, TooShortError, chance_levels, make_sample, parse_families, score


# -------------------------------------------------------------------------------------------- decoding
@dataclass
class Generation:
    text: str  # the output, cut before its first stop string (leading whitespace kept out of the check)
    ids: list[int]  # every token generated
    forwards: int  # passes over the sequence (recompute) or prefills plus decode steps (cache)
    stopped: str  # "stop", "eos" or "length"


def _draft(seq: np.ndarray, max_len: int, max_ngram: int = 8) -> list[int]:
    """Tokens that followed the latest earlier occurrence of the longest suffix (up to ``max_ngram``) of ``seq``."""
    if max_len <= 0:
        return []
    n_seq = seq.shape[0]
    for n in range(min(max_ngram, n_seq - 1), 0, -1):
        suffix = seq[n_seq - n :]
        # start positions i < n_seq - n of earlier copies of the suffix
        win = np.lib.stride_tricks.sliding_window_view(seq[: n_seq - 1], n)
        hits = np.flatnonzero((win == suffix).all(axis=1))
        if hits.size:
            i = int(hits[-1]) + n
            return seq[i : i + max_len].tolist()
    return []


def _last_logits(model, ids: torch.Tensor, pattern: Pattern, last: int) -> torch.Tensor:
    """Logits of the last ``last`` positions (the LM head runs on those rows only)."""
    ctx = model.make_context(ids.shape[1])
    h, _ = model.forward_layers(model.model.embed_tokens(ids), ctx, pattern)
    return model.head(h[:, -last:])[0].float()


def _cut(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to its first stop string, searched after any leading whitespace (a base model may open
    its answer with a line break). The marker :data:`INT` stops right after the first complete integer."""
    body = text.lstrip()
    lead = len(text) - len(body)
    hits = [body.find(s) for s in stop if s and s != INT and s in body]
    if INT in stop:
        m = re.match(r"\D*?\d+(?=\D)", body)
        if m:
            hits.append(m.end())
    return (text[: lead + min(hits)], True) if hits else (text, False)


@torch.inference_mode()
def _ended(tokenizer, new: list[int], forwards: int, stop: tuple[str, ...], eos_id: int | None
           ) -> Generation | None:
    """The finished generation if the last token of ``new`` is end-of-text or completes a stop string."""
    if eos_id is not None and new[-1] == eos_id:
        return Generation(_cut(tokenizer.decode(new[:-1]), stop)[0], new, forwards, "eos")
    text, hit = _cut(tokenizer.decode(new), stop)
    return Generation(text, new, forwards, "stop") if hit else None


def greedy_generate(
    model,
    tokenizer,
    ids: list[int],
    max_new_tokens: int,
    pattern: Pattern | str | None = None,
    stop: tuple[str, ...] = (),
    eos_id: int | None = None,
    draft: bool = True,
) -> Generation:
    """The model's greedy continuation of ``ids``: at most ``max_new_tokens`` tokens, ending at a stop string
    (searched after any leading whitespace) or at ``eos_id``."""
    pat = model.runnable_pattern(pattern)
    seq = list(ids)
    new: list[int] = []
    forwards = 0
    limit = model.config.max_position_embeddings
    while len(new) < max_new_tokens:
        # the last accepted token is a free extra: the draft covers one token fewer than the budget left
        d = _draft(np.asarray(seq), max_new_tokens - len(new) - 1) if draft else []
        d = d[: max(0, limit - len(seq) - 1)]
        x = torch.tensor([seq + d], dtype=torch.long, device=model.device)
        preds = _last_logits(model, x, pat, len(d) + 1).argmax(-1).tolist()
        forwards += 1
        for j, t in enumerate(preds):
            new.append(t)
            seq.append(t)
            if (done := _ended(tokenizer, new, forwards, stop, eos_id)) is not None:
                return done
            if len(new) >= max_new_tokens or j >= len(d) or t != d[j]:
                break
    return Generation(tokenizer.decode(new), new, forwards, "length")


@torch.inference_mode()
def greedy_generate_cached(
    engine,
    tokenizer,
    ids: list[int],
    max_new_tokens: int,
    stop: tuple[str, ...] = (),
    eos_id: int | None = None,
) -> Generation:
    """:func:`greedy_generate` on an :class:`indexcache.engine.Engine` (its pattern): one prefill of ``ids``
    into slot 0, then one cached decode step per token."""
    logits = engine.prefill(0, torch.tensor(ids, dtype=torch.long))
    new: list[int] = []
    forwards = 1
    while True:
        t = int(logits.argmax())
        new.append(t)
        if (done := _ended(tokenizer, new, forwards, stop, eos_id)) is not None:
            return done
        if len(new) >= max_new_tokens:
            return Generation(tokenizer.decode(new), new, forwards, "length")
        logits = engine.decode(torch.tensor([t], dtype=torch.long))[0]
        forwards += 1


@torch.inference_mode()
def greedy_generate_transformers(hf_model, tokenizer, ids: list[int], max_new_tokens: int, stop: tuple[str, ...] = (),
                                 eos_id: int | None = None) -> Generation:
    """:func:`greedy_generate` through transformers' own ``generate`` (its cache, the applied pattern), stopped
    at the first stop string or end-of-text by the same rule."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    prompt = torch.tensor([ids], dtype=torch.long, device=hf_model.get_input_embeddings().weight.device)
    done: list[Generation] = []

    class StopAtAnswer(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[0, prompt.shape[1]:].tolist()
            g = _ended(tokenizer, new, len(new), stop, eos_id) if new else None
            if g is not None and not done:
                done.append(g)
            return torch.full((input_ids.shape[0],), g is not None, dtype=torch.bool, device=input_ids.device)

    out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                            do_sample=False, num_beams=1, stopping_criteria=StoppingCriteriaList([StopAtAnswer()]),
                            eos_token_id=None, pad_token_id=0)
    if done:
        return done[0]
    new = out[0, prompt.shape[1]:].tolist()
    return Generation(tokenizer.decode(new), new, len(new), "length")


def make_engine(model, pattern: Pattern | str | None, max_len: int):
    """An engine for one request at a time; prefill chunks bound the memory of the indexer logits."""
    from ..engine import Engine

    return Engine(model, pattern, max_batch=1, max_len=max_len, chunk=2048)


def run_sample(model, tokenizer, sample: Sample, pattern: Pattern | str | None = None, draft: bool = True,
               eos_id: int | None = None, engine=None) -> dict:
    """Answer every turn of ``sample`` greedily (on ``engine`` when given, else by recomputing); each turn's
    answer (cut at its stop string) stays in the context before the next turn's query. Returns the outputs,
    the score and the work done."""
    ids = tokenizer.encode(sample.prompt).ids
    outputs, new_tokens, forwards = [], 0, 0
    for turn in range(sample.turns):
        if turn:
            ids = ids + tokenizer.encode(outputs[-1]).ids + tokenizer.encode(sample.followups[turn - 1]).ids
        if engine is not None:
            g = greedy_generate_cached(engine, tokenizer, ids, sample.max_new_tokens, sample.stop, eos_id)
        elif not isinstance(model, DSAForCausalLM):  # a transformers model, its pattern applied
            g = greedy_generate_transformers(model, tokenizer, ids, sample.max_new_tokens, sample.stop, eos_id)
        else:
            g = greedy_generate(model, tokenizer, ids, sample.max_new_tokens, pattern, sample.stop, eos_id, draft)
        outputs.append(g.text)
        new_tokens += len(g.ids)
        forwards += g.forwards
    return {"outputs": outputs, "score": score(sample, outputs), "new_tokens": new_tokens, "forwards": forwards}


# ------------------------------------------------------------------------------------------ perplexity
def parse_ppl_spec(spec: str) -> tuple[str, list[str]]:
    """``[NAME=]PATH[,PATH...]`` -> (name, paths); the name defaults to the first path's file name."""
    name, _, rest = spec.partition("=") if "=" in spec else ("", "", spec)
    paths = [p for p in rest.split(",") if p]
    if not paths:
        raise DataError(f"--ppl-data {spec!r} names no file")
    if not name:
        name = Path(paths[0]).name.split(".")[0]
    return name, paths


def ppl_windows(paths: list[str], tokenizer, seq_len: int, num_windows: int, vocab_size: int) -> torch.Tensor:
    """``num_windows`` windows of ``seq_len`` tokens, evenly spaced over the files' non-overlapping windows."""
    windows = torch.cat([token_windows(p, seq_len, tokenizer, vocab_size=vocab_size) for p in paths])
    pick = np.unique(np.linspace(0, windows.shape[0] - 1, min(num_windows, windows.shape[0])).round().astype(int))
    return windows[torch.from_numpy(pick)]


# ------------------------------------------------------------------------------------------- the suite
@dataclass
class EvalOptions:
    model: str
    patterns: list[Pattern | None] = field(default_factory=lambda: [None])  # None: the model's own pattern
    tasks: list[str] | None = None  # None: all families
    lengths: list[int] = field(default_factory=lambda: [1024])
    samples: int = 10
    haystack: str | None = None  # None: the built-in synthetic corpus; "noise"; or a file / directory
    ppl_data: list[str] = field(default_factory=list)  # [NAME=]PATH[,PATH...]
    ppl_windows: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    decode: str = "cache"  # cache (the engine) | recompute (full forward per step)
    fp32_dot: str = "ieee"  # fp32 products of the GPU kernels (ops.triton_support.FP32_DOTS)
    draft: bool = True  # recompute only: verify context drafts (same tokens, fewer forwards)
    progress: bool = True
    command: str = ""
    backend: str = "auto"  # native | hf | auto (the transformers class where the native model does not cover it)
    ops: str = "auto"  # the native model's ops backend
    diagnose: bool = False  # per sample: each layer's recall of the answer's tokens, the teacher-forced answer
    progress_file: str | None = None  # what is done so far (``--out`` + .partial), see :class:`Progress`
    resume: bool = False  # continue from progress_file, written by a stopped run of the same evaluation


SAVE_EVERY_S = 15.0  # the progress file is rewritten at most this often, and whenever a row or the run ends
# options that decide what an evaluation computes: a run resumes only the progress of one that agrees on all
SIGNATURE = ("model", "tasks", "lengths", "samples", "haystack", "ppl_data", "ppl_windows", "seed", "device",
             "dtype", "decode", "draft", "backend", "ops", "diagnose")


class Progress:
    """What an evaluation has finished (every scored sample's record, every perplexity set's window losses),
    rewritten atomically beside the report at most every :data:`SAVE_EVERY_S` seconds, at the end of each
    row and when the run is interrupted, so that a run stopped part way (a time limit, a lost machine) loses
    at most those seconds, and ``resume`` continues it where it stopped."""

    def __init__(self, path: str | None, signature: dict, resume: bool):
        self.path = Path(path) if path else None
        self.signature = json.loads(json.dumps(signature))  # as it reads back from the file
        self.samples: dict[tuple, dict] = {}
        self.ppl: dict[str, list[float]] = {}
        if self.path is not None and resume and self.path.exists():
            state = json.loads(self.path.read_text())
            theirs = state.get("signature", {})
            differ = sorted(k for k in set(theirs) | set(self.signature) if theirs.get(k) != self.signature.get(k))
            if differ:
                raise TaskError(f"{self.path} is the progress of another evaluation (it differs in "
                                f"{', '.join(differ)}): run that command again, or delete the file to start over")
            self.samples = {(r["pattern"], r["length"], r["family"], r["index"]): r for r in state["samples"]}
            self.ppl = state["ppl"]
        self.resumed = {"samples": len(self.samples), "ppl_sets": len(self.ppl)}
        self._saved_at = -math.inf

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self._saved_at < SAVE_EVERY_S):
            return
        self._saved_at = now
        state = {"signature": self.signature, "samples": list(self.samples.values()), "ppl": self.ppl}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda p: p.write_text(json.dumps(state) + "\n"))


def run_eval(opt: EvalOptions) -> dict:
    """Generate the samples once per length, then score every pattern on the same samples, and measure
    perplexity on the same windows. Returns the report (what ``indexcache eval`` writes as JSON)."""
    from ..analysis.needles import diagnose_sample, summarise

    t_start = time.time()
    families = parse_families(opt.tasks)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    info = model_info(opt.model)
    too_long = [L for L in opt.lengths if L > info.max_position_embeddings]
    if too_long:
        raise TaskError(f"--lengths {too_long} exceed the model's max_position_embeddings "
                        f"{info.max_position_embeddings}")
    if opt.decode not in ("cache", "recompute"):
        raise TaskError(f"unknown decode mode {opt.decode!r} (choose from cache, recompute)")
    if opt.fp32_dot not in FP32_DOTS:
        raise TaskError(f"unknown fp32 dot {opt.fp32_dot!r} (choose from {', '.join(FP32_DOTS)})")
    if not families and not opt.ppl_data:
        raise TaskError("nothing to evaluate: --tasks none measures perplexity only, so give --ppl-data too")
    # the engine decodes under CUDA graphs, which the FP8 layers are not yet checked in: FP8 is dequantised
    opened = open_model(opt.model, info, opt.backend, dtypes[opt.dtype], opt.device, ops=opt.ops, verbose=False,
                        keep_fp8=False)
    runner, model = opened.runner, opened.model
    patterns = [opened.start if s is None else info.parse_pattern(s) for s in opt.patterns]
    for p in patterns:
        runner.validate(p)  # fail before any work when a pattern needs indexers the model lacks
    tok = load_tokenizer(opt.model)
    ppl_sets = [parse_ppl_spec(s) for s in opt.ppl_data]
    hay = Haystack(opt.haystack) if families else None

    samples: dict[int, list[Sample]] = {}
    windows: dict[tuple[str, int], torch.Tensor] = {}
    skipped: list[dict] = []
    for L in opt.lengths:
        samples[L] = []
        for fam in families:
            try:
                samples[L] += [make_sample(fam, tok, L, i, opt.seed, hay) for i in range(opt.samples)]
            except TooShortError as e:  # one family that cannot fit must not sink the others
                skipped.append({"family": fam, "length": L, "reason": str(e)})
                if opt.progress:
                    print(f"indexcache: skipping {fam} at {L} tokens: {e}", file=sys.stderr)
        for name, paths in ppl_sets:
            windows[name, L] = ppl_windows(paths, tok, L, opt.ppl_windows, info.vocab_size)
    if not ppl_sets and not any(samples.values()):
        raise TaskError(f"no task family fits --lengths {' '.join(map(str, opt.lengths))}: "
                        + "; ".join(s["reason"] for s in skipped))

    eos = info.raw.get("eos_token_id", (info.raw.get("text_config") or {}).get("eos_token_id"))
    eos_id = eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None
    # the longest context any turn can reach: the prompt and followups plus every turn's answer, re-encoded
    # (a byte that is not valid UTF-8 on its own decodes to U+FFFD, which encodes back to up to 3 tokens)
    everything = [s for ss in samples.values() for s in ss]
    max_len = max((s.num_tokens + s.turns * (3 * s.max_new_tokens + 8) for s in everything), default=0) + 16
    results, records = [], []
    row_scores: dict[tuple[str, int], dict[str, list[float]]] = {}
    hf = opened.backend == "hf"
    signature = {k: getattr(opt, k) for k in SIGNATURE} | {"patterns": [str(p) for p in patterns]}
    if opt.fp32_dot != "ieee":  # named only when it is not the default, so older progress files still resume
        signature["fp32_dot"] = opt.fp32_dot
    progress = Progress(opt.progress_file, signature, opt.resume)
    if opt.progress and any(progress.resumed.values()):
        print(f"indexcache: resuming {progress.resumed['samples']} scored samples and {progress.resumed['ppl_sets']} "
              f"perplexity sets from {opt.progress_file}", file=sys.stderr)
    previous_dot = set_fp32_dot(opt.fp32_dot)  # the GPU kernels' fp32 products, for this evaluation only
    try:
        for pat in patterns:
            engine = None
            if hf:
                from ..integrations.transformers import apply_pattern

                apply_pattern(model.hf, pat, drop_shared_indexers=False)  # fixed for every generation cache below
            for L in opt.lengths:
                t0 = time.time()
                row: dict = {"pattern": str(pat), "num_full": pat.num_full, "length": L, "ppl": {}, "ppl_ci95": {},
                             "tasks": {}}
                for name, _ in ppl_sets:
                    done = f"{pat} {L} {name}"
                    losses = progress.ppl.get(done)
                    if losses is None:
                        losses = lm_window_losses(runner, windows[name, L], pat, progress=opt.progress,
                                                  desc=f"ppl {name} {L}")
                        progress.ppl[done] = losses
                        progress.save()
                    row["ppl"][name] = math.exp(sum(losses) / len(losses))
                    row["ppl_ci95"][name] = [math.exp(v) for v in mean_ci(losses)]  # over the windows
                scores: dict[str, list[float]] = {f: [] for f in families}
                diagnoses: dict[str, list[dict]] = {}
                bar = tqdm(samples[L], desc=f"{_short(pat)} {L}", unit="sample", disable=not opt.progress, leave=False)
                for s in bar:
                    bar.set_postfix_str(s.family, refresh=False)
                    key = (str(pat), L, s.family, s.index)
                    rec = progress.samples.get(key)
                    if rec is not None and rec["answers"] != s.answers:
                        raise TaskError(f"{opt.progress_file}: sample {s.family} {s.index} at {L} tokens does not "
                                        "match the one drawn now (the data or the generators changed): delete it "
                                        "to start over")
                    if rec is None:
                        if engine is None and not hf and opt.decode == "cache":  # built once there is work for it
                            engine = make_engine(model, pat, max_len)
                        r = run_sample(model.hf if hf else model, tok, s, pat, opt.draft, eos_id, engine)
                        rec = {"pattern": str(pat), "length": L, "family": s.family, "index": s.index,
                               "score": r["score"], "outputs": r["outputs"], "answers": s.answers,
                               "num_tokens": s.num_tokens, "new_tokens": r["new_tokens"], "forwards": r["forwards"],
                               "needles": [[n.char_start, n.char_end, n.token_start, n.token_end] for n in s.needles],
                               "depths": s.meta.get("depths")}
                        if opt.diagnose:
                            rec["diagnosis"] = diagnose_sample(runner, tok, s, pat)
                        progress.samples[key] = rec
                        progress.save()
                    scores[s.family].append(rec["score"])
                    records.append(rec)
                    if opt.diagnose:
                        diagnoses.setdefault(s.family, []).append(rec["diagnosis"])
                bar.close()
                if opt.diagnose:
                    row["diagnosis"] = {f: summarise(v) for f, v in diagnoses.items()}
                row["tasks"] = {f: 100 * sum(v) / len(v) for f, v in scores.items() if v}
                row["average"] = sum(row["tasks"].values()) / len(row["tasks"]) if row["tasks"] else None
                row.update(score_intervals(scores))
                row["seconds"] = round(time.time() - t0, 2)
                row_scores[str(pat), L] = scores
                results.append(row)
                progress.save(force=True)
    except BaseException:  # an interruption (Ctrl-C, SIGTERM under a time limit) or a failure keeps what is done
        progress.save(force=True)
        raise
    finally:
        set_fp32_dot(previous_dot)
    compare_with_all_full(results, row_scores)
    return {
        "command": opt.command, "model": opt.model, "device": opt.device, "dtype": opt.dtype, "seed": opt.seed,
        **({"fp32_dot": opt.fp32_dot} if opt.dtype == "float32" and opt.device.startswith("cuda") else {}),
        "samples_per_task": opt.samples, "lengths": opt.lengths, "tasks": families,
        "haystack": hay.name if hay else None, "ppl_data": dict(ppl_sets), "ppl_windows": opt.ppl_windows,
        "backend": opened.backend, "architecture": info.architecture,
        "decoding": "greedy, " + ("transformers' generate with the pattern applied" if hf else
                                  "cached (engine)" if opt.decode == "cache" else
                                  "recomputed, context drafts verified" if opt.draft else "recomputed"),
        "chance": {str(L): {f: {k: 100 * v for k, v in c.items()} for f, c in chance_levels(samples[L]).items()}
                   for L in opt.lengths if samples[L]},
        "skipped": skipped, "notes": notes(info, opt.lengths), "results": results, "samples": records,
        "seconds": round(time.time() - t_start, 2),
        **({"resumed": {**progress.resumed, "from": opt.progress_file}} if any(progress.resumed.values()) else {}),
    }


def score_intervals(scores: dict[str, list[float]]) -> dict:
    """95% bootstrap intervals over the samples (x100, like the scores): per family, and for the average
    of the families (each family resampled within itself)."""
    kept = {f: v for f, v in scores.items() if v}
    if not kept:
        return {}
    return {"tasks_ci95": {f: [100 * x for x in mean_ci(v)] for f, v in kept.items()},
            "average_ci95": [100 * x for x in average_ci(kept)], "sample_counts": {f: len(v) for f, v in kept.items()}}


def compare_with_all_full(results: list[dict], row_scores: dict[tuple[str, int], dict[str, list[float]]]) -> None:
    """Each row's task average minus the all-Full row's at the same length, paired over the same samples,
    with its 95% interval and whether it is within noise (only where the run scored all Full too)."""
    for r in results:
        full = "F" * len(r["pattern"])
        base = row_scores.get((full, r["length"]))
        mine = row_scores.get((r["pattern"], r["length"]))
        if base is None or mine is None or r["pattern"] == full or not any(mine.values()):
            continue
        d = paired_difference(mine, base)
        r["minus_all_full"] = {"average": 100 * d["difference"], "ci95": [100 * x for x in d["ci95"]],
                               "within_noise": d["within_noise"]}


def notes(info, lengths: list[int]) -> list[str]:
    """What a reader of the table must know: where every query keeps all it sees, patterns cannot matter."""
    short = [L for L in lengths if L <= info.first_restrictive_query]
    if not short:
        return []
    return [f"at {', '.join(map(str, short))} tokens (a query keeps {info.describe_selection()}) every query keeps "
            "all the tokens it sees, so patterns cannot change the scores or perplexity there"]


def _short(p: Pattern) -> str:
    s = str(p)
    return s if len(s) <= 20 else s[:17] + "..."


def format_table(report: dict) -> str:
    """One table per length: a row per pattern, columns PPL per data set, each task family, and the task
    average (scores x100); the last row gives the chance level of a uniform pick among in-prompt candidates."""
    lines: list[str] = []
    for L in report["lengths"]:
        rows = [r for r in report["results"] if r["length"] == L]
        ppl_names = list(report["ppl_data"])
        fams = report["tasks"]
        heads = ["pattern", "Full"] + [f"ppl:{n}" for n in ppl_names] + fams \
            + (["avg", "avg 95% CI", "vs all Full (paired 95% CI)"] if fams else [])
        table = []
        for r in rows:
            cells = [r["pattern"], str(r["num_full"])] + [f"{r['ppl'][n]:.2f}" for n in ppl_names]
            cells += [f"{r['tasks'][f]:.1f}" if f in r["tasks"] else "-" for f in fams]
            cells += [f"{r['average']:.1f}" if r["average"] is not None else "-"] if fams else []
            if fams:
                ci = r.get("average_ci95")
                cells.append(f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "-")
                d = r.get("minus_all_full")
                cells.append("" if d is None else f"{d['average']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]"
                             + (" (noise)" if d["within_noise"] else ""))
            table.append(cells)
        ch = report["chance"].get(str(L))
        if ch:
            copy = [f"{ch[f]['copy_chance']:.1f}" if f in ch else "-" for f in fams]
            avg = sum(c["copy_chance"] for c in ch.values()) / len(ch)
            table.append(["in-prompt guess", ""] + [""] * len(ppl_names) + copy + [f"{avg:.1f}", "", ""])
        widths = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(heads)]
        what = (f", {report['samples_per_task']} samples per task (scores x100; intervals: 95% bootstrap over the "
                "samples)") if fams else ""
        lines.append(f"\ncontext {L} tokens{what}")
        for c in [heads, *table]:
            cells = [x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths, strict=True))]
            lines.append("  ".join(cells))
        for r in rows:
            for fam, d in (r.get("diagnosis") or {}).items():
                lines.append(diagnosis_line(r["pattern"], fam, d))
        for sk in report.get("skipped", []):
            if sk["length"] == L:
                lines.append(f"  - {sk['family']} skipped: {sk['reason']}")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def diagnosis_line(pattern: str, family: str, d: dict) -> str:
    """One line of ``--diagnose``: the teacher-forced answer (its first token and all of them, under the pattern
    and, where measured, with dense attention) and, per layer, the share of the answer's tokens in the
    selection at the answer row (x100)."""
    recall = d.get("answer_recall") or {}
    per_layer = " ".join(f"{100 * v:.0f}" for _, v in sorted(recall.items(), key=lambda kv: int(kv[0])))
    kept = (f"; the whole answer kept in every layer in {d['answer_kept_everywhere']} of "
            f"{d['samples_with_answer_in_prompt']}" if d.get("samples_with_answer_in_prompt") else "")
    dense = (f" (dense attention: first {100 * d['dense_first_token_correct']:.0f}%, all "
             f"{100 * d['dense_token_accuracy']:.1f}%)" if "dense_token_accuracy" in d else "")
    return (f"  - {_short(Pattern.parse(pattern))} {family}: answer tokens ranked first: the first "
            f"{100 * d['first_token_correct']:.0f}%, all {100 * d['token_accuracy']:.1f}%{dense}, NLL {d['nll']:.2f}; "
            f"answer recall by layer: {per_layer or '-'}{kept}")


def command_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["indexcache", *argv])


__all__ = ["EvalOptions", "Generation", "command_line", "format_table", "greedy_generate", "greedy_generate_cached",
           "make_engine", "parse_ppl_spec", "ppl_windows", "run_eval", "run_sample"]
