"""Training-free IndexCache: the paper's greedy layer search (Algorithm 1).

Start from all Full. At each step, tentatively flip every remaining Full layer (all but layer 0 and
forced-Full layers) to Shared, score each resulting pattern by mean LM loss on the same calibration
batches, and commit the lowest (ties: the lowest layer index). Continue to the requested number of
Full layers, or to the end, recording the nested trajectory.

- ``stages=P`` splits the layers into P contiguous blocks whose first layers stay Full; each step
  searches the blocks one after another and commits one flip per block (the paper's pipeline trick).
- State is written atomically after every step, and in a single process after every candidate too (the
  losses of the step under way); ``resume=True`` continues a killed run to the identical result, losing at
  most the candidate that was running.
- Under ``torchrun`` the candidates of each step are split across ranks and the losses all-gathered;
  every rank then makes the same choice.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..distributed import Dist
from ..errors import SearchError
from ..intervals import quantiles, resample_indices
from ..outputs import write_atomic
from ..pattern import SHARED, Pattern
from .evaluator import LossEvaluator


# ------------------------------------------------------------------------------------------ search
@dataclass
class Step:
    """One committed flip of the trajectory."""

    pattern: Pattern
    flipped: int | None
    loss: float
    confidence: dict | None = None  # :func:`step_confidence` of the flip (None: not measured)

    @property
    def num_full(self) -> int:
        return self.pattern.num_full

    def as_dict(self) -> dict:
        d = {"pattern": str(self.pattern), "num_full": self.num_full, "flipped": self.flipped, "loss": self.loss}
        if self.confidence is not None:
            d["confidence"] = self.confidence
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Step:
        return cls(Pattern.parse(d["pattern"]), d["flipped"], d["loss"], d.get("confidence"))


@dataclass
class GreedyResult:
    num_layers: int
    start_pattern: Pattern
    all_full_loss: float
    trajectory: list[Step] = field(default_factory=list)
    forced_full: list[int] = field(default_factory=list)
    stages: int = 1
    counters: dict = field(default_factory=dict)
    seconds: float = 0.0
    done: bool = False
    # the step under way (single process): {"pattern": the pattern it flips from, "losses": {position: loss},
    # "windows": {position: its mean loss per calibration window}}
    partial: dict | None = None

    def at(self, num_full: int) -> Step | None:
        """The trajectory entry with ``num_full`` Full layers (the start if it has that many)."""
        if self.start_pattern.num_full == num_full:
            return Step(self.start_pattern, None, self.all_full_loss)
        return next((e for e in self.trajectory if e.num_full == num_full), None)

    def as_dict(self) -> dict:
        d = dict(self.__dict__, start_pattern=str(self.start_pattern))
        d["trajectory"] = [e.as_dict() for e in self.trajectory]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GreedyResult:
        return cls(**dict(d, start_pattern=Pattern.parse(d["start_pattern"]),
                          trajectory=[Step.from_dict(e) for e in d["trajectory"]]))


def stage_starts(num_layers: int, stages: int) -> list[int]:
    """First layer of each of ``stages`` near-equal contiguous blocks."""
    if not 1 <= stages <= num_layers:
        raise SearchError(f"--stages must be between 1 and the {num_layers} layers, got {stages}")
    return sorted({round(b * num_layers / stages) for b in range(stages)})


def layer_forward_counts(pattern: Pattern, flips: int, slots: Sequence[int], n_layers: int, n_batches: int,
                         forced: Sequence[int] = (0,), replicas: int = 1, last_flip: int | None = None,
                         draws: int = 64, reuse_previous: bool = True, seed: int = 0,
                         flip_order: Sequence[int] | None = None) -> tuple[list[float], list[float]]:
    """How often each decoder layer runs in ``flips`` more greedy steps from ``pattern`` with prefix reuse,
    per model replica: ``(full, shared)``, where ``shared[l]`` counts the runs in which layer l reuses an
    earlier selection (a layer without an indexer counts as Full: it has one way to run).

    A candidate that flips position i was a candidate at the previous step too, with a pattern that differed
    only at the previous flip b; so it starts at the later of its own layer and b's (the cached states of
    its previous evaluation, or of the winner's), and runs from there to the last layer. Which layers the
    search will flip is not known: the counts are averaged over ``draws`` random flip orders (seeded, so the
    same every time; ``seed`` picks another set, ``draws=1`` a single order); ``flip_order`` counts one given
    order instead (a finished search's). ``reuse_previous=False``: a prefix cache too small to keep a step's
    states for the next, so every candidate starts at its own layer."""
    import random

    cands = [i for i in range(len(slots)) if pattern.is_full(i) and i not in forced]
    full, shared = [0.0] * n_layers, [0.0] * n_layers
    if not cands or flips <= 0:
        return full, shared
    position = {layer: j for j, layer in enumerate(slots)}
    rng = random.Random(seed)
    if flip_order is not None:
        draws = 1
    for _ in range(draws):
        left, prev, is_full = list(cands), last_flip, [pattern.is_full(j) for j in range(len(slots))]
        for step in range(min(flips, len(cands))):
            floor = slots[prev] if prev is not None and reuse_previous else 0
            starts = [0] * (n_layers + 1)  # candidates starting at each layer
            own = {}  # the layer where a candidate runs its own flip (Shared), if it runs it
            for i in left:
                start = max(slots[i], floor)
                starts[start] += 1
                if start == slots[i]:
                    own[slots[i]] = True
            running = 0
            for layer in range(n_layers):
                running += starts[layer]
                j = position.get(layer)
                if j is None or (is_full[j] and not own.get(layer)):
                    full[layer] += running
                elif is_full[j]:  # Full, except in the candidate that flips it
                    full[layer] += running - 1
                    shared[layer] += 1
                else:
                    shared[layer] += running
            prev = left.pop(left.index(flip_order[step]) if flip_order is not None else rng.randrange(len(left)))
            is_full[prev] = False
    scale = n_batches / draws / max(replicas, 1)
    return [f * scale for f in full], [x * scale for x in shared]


def estimate_layer_forwards(pattern: Pattern, flips: int, slots: Sequence[int], n_layers: int, n_batches: int,
                            forced: Sequence[int] = (0,), replicas: int = 1, last_flip: int | None = None,
                            draws: int = 64, reuse_previous: bool = True) -> int:
    """Layer-forwards that ``flips`` more greedy steps from ``pattern`` take with prefix reuse, per model
    replica (:func:`layer_forward_counts`, summed). The search's bar and ``indexcache plan`` both count
    with this."""
    full, shared = layer_forward_counts(pattern, flips, slots, n_layers, n_batches, forced, replicas, last_flip,
                                        draws, reuse_previous)
    return int(round(sum(full) + sum(shared)))


def greedy_search(
    evaluator: LossEvaluator,
    start: Pattern | None = None,
    target_full: int | None = None,
    stages: int = 1,
    forced_full: Sequence[int] = (),
    state_path: str | Path | None = None,
    resume: bool = False,
    fingerprint: dict | None = None,
    dist: Dist | None = None,
    progress: bool = True,
) -> GreedyResult:
    """Run Algorithm 1. ``start`` defaults to all Full (a checkpoint that ships indexers only on some
    layers starts from those). ``target_full=None`` runs to the end."""
    dist = dist or Dist()
    n = len(evaluator.runner.slots)  # pattern positions: the layers that own an indexer
    start_p = (Pattern.all_full(n) if start is None else start).validate(num_layers=n)
    blocks = stage_starts(n, stages)
    forced = sorted({0, *forced_full, *blocks})
    for f in forced:
        if not 0 <= f < n:
            raise SearchError(f"forced-Full layer {f} is outside the {n} layers")
        if not start_p.is_full(f):
            raise SearchError(f"layer {f} must stay Full but has no indexer in the starting pattern")
    min_full = len(forced)
    if target_full is not None and not min_full <= target_full <= start_p.num_full:
        raise SearchError(f"cannot reach {target_full} Full layers: between {min_full} (forced Full) and "
                          f"{start_p.num_full} (start) are possible")
    fp = dict(fingerprint or {}, start=str(start_p), stages=stages, forced=forced, target_full=target_full)
    state_path = Path(state_path) if state_path is not None else None

    t0 = time.time()
    result, prior = None, []
    if resume and state_path is not None and state_path.exists():
        try:
            saved = json.loads(state_path.read_text())
            same = saved.get("fingerprint") == fp
            result = GreedyResult.from_dict(saved["result"]) if same else None
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise SearchError(f"{state_path} is not a search state this version can read ({e})") from None
        if not same:
            raise SearchError(f"cannot resume: {state_path} was written by a search with other settings "
                              f"({fingerprint_diff(saved.get('fingerprint') or {}, fp)}); run with the same model, "
                              "data and options, or without --resume")
        prior = [result.counters]  # work done before the interruption still counts
        t0 -= result.seconds
    elif resume and dist.is_main:
        print(f"indexcache: --resume: no {state_path.name if state_path else 'search state'} in "
              f"{state_path.parent if state_path else 'the output directory'}; starting a new search", file=sys.stderr)
    if result is None:
        # evaluated (and counted) once: by the first model replica, all of whose tensor-parallel ranks take part
        first = evaluator.loss(start_p) if dist.group == 0 else None
        result = GreedyResult(num_layers=n, start_pattern=start_p, all_full_loss=dist.gather(first)[0],
                              forced_full=forced, stages=stages)

    current = result.trajectory[-1].pattern if result.trajectory else result.start_pattern
    goal = min_full if target_full is None else target_full
    remaining = current.num_full - goal
    # the bar counts layer-forwards (this process's share), so its rate and ETA hold however far into the
    # model a candidate's flip sits; what is left is estimated from the candidates' depths with prefix reuse
    slots, n_batches = evaluator.runner.slots, len(evaluator.batches)

    # a step stores each candidate's state entering every later layer; where the cache cannot hold them, the
    # next step's candidates start at their own layers
    step_states = sum(evaluator.n_layers - slots[i] for i in range(n) if current.is_full(i) and i not in forced)
    reuse = evaluator.holds(step_states)
    evaluator.spill_unprotected = reuse

    def forwards_left(pattern: Pattern, flips: int, last: int | None = None) -> int:
        return estimate_layer_forwards(pattern, flips, slots, evaluator.n_layers, n_batches, forced, dist.groups,
                                       last, reuse_previous=reuse)

    bar = tqdm(total=forwards_left(current, remaining), desc="greedy search", unit="layer-fwd",
               disable=not (progress and dist.is_main), dynamic_ncols=True)
    bar.set_postfix_str(f"flips {len(result.trajectory)}/{len(result.trajectory) + remaining}")
    evaluator.on_layer = bar.update

    def protect(pattern: Pattern) -> None:  # every candidate of the next step starts on this pattern's path
        evaluator.protected = lambda key, p=str(pattern): p.startswith(key[1])

    protect(current)

    def save() -> None:
        result.seconds = time.time() - t0
        result.counters = _sum_counters(prior + dist.gather(evaluator.counters.as_dict()))
        if state_path is not None and dist.is_main:
            state = {"fingerprint": fp, "result": result.as_dict()}
            write_atomic(state_path, lambda p: p.write_text(json.dumps(state, indent=2)))

    while remaining > 0:
        bounds = list(zip(blocks, blocks[1:] + [n], strict=True))
        for lo, hi in bounds:
            if remaining == 0:
                break
            cands = [i for i in range(lo, hi) if current.is_full(i) and i not in forced]
            if not cands:
                continue
            mine = dist.split(cands)
            scores = _step_losses(evaluator, current, mine, result, save if dist.world == 1 else None)
            scores = [s for part in dist.gather(scores) for s in part]
            best_layer, best_loss, _ = min(scores, key=lambda t: (t[1], t[0]))
            confidence = step_confidence(scores, best_layer)
            current = current.with_layer(best_layer, SHARED)
            protect(current)
            result.partial = None
            remaining -= 1
            result.trajectory.append(Step(current, best_layer, best_loss, confidence))
            bar.total = bar.n + forwards_left(current, remaining, best_layer)
            bar.set_postfix_str(f"flips {len(result.trajectory)}/{len(result.trajectory) + remaining}, "
                                f"Full {current.num_full}, loss {best_loss:.4f}, flipped {best_layer}")
            bar.refresh()
            evaluator.prune(lambda key, p=str(current): _reachable(key, p, forced))
        save()
    bar.close()
    evaluator.on_layer = evaluator.protected = None
    evaluator.spill_unprotected = True
    if not result.done:  # a finished state read back by --resume stays as it is (its baselines included)
        result.done = True
        save()
    return result


def _step_losses(evaluator: LossEvaluator, current: Pattern, cands: Sequence[int], result: GreedyResult,
                 save=None) -> list[tuple[int, float, list[float] | None]]:
    """The loss of flipping each candidate of ``current``, with its mean loss per calibration window: those
    a resumed state already holds are read back, and with ``save`` the state is written after each new one."""
    done, windows = {}, {}
    if result.partial is not None and result.partial.get("pattern") == str(current):
        done = {int(k): v for k, v in result.partial["losses"].items()}
        windows = {int(k): v for k, v in (result.partial.get("windows") or {}).items()}
    out = []
    for i in cands:
        if i not in done:
            done[i] = evaluator.loss(current.with_layer(i, SHARED))
            windows[i] = list(evaluator.last_window_losses)
            if save is not None:
                result.partial = {"pattern": str(current), "losses": {str(k): v for k, v in done.items()},
                                  "windows": {str(k): v for k, v in windows.items()}}
                save()
        out.append((i, done[i], windows.get(i)))
    return out


def step_confidence(scores: Sequence[tuple[int, float, list[float] | None]], committed: int,
                    resamples: int = 1000, seed: int = 0) -> dict:
    """How firmly a step's data pick its flip: a bootstrap over the calibration windows (the same resampled
    windows for every candidate, as the search scores them all on the same windows).

    ``margin``: the runner-up's loss minus the committed flip's, on all windows, with its 95% interval over
    the resamples; ``stays``: how often the committed flip is still the lowest; ``picked``: how often each
    candidate is, where more than one ever is; ``within_noise``: the interval reaches zero (the runner-up
    could as well be the better flip)."""
    import torch

    order = sorted(scores, key=lambda t: t[0])  # by layer: argmin's first index is the search's tie-break
    if len(order) < 2:
        return {"windows": len(order[0][2] or []) if order else 0, "candidates": len(order),
                "note": "one candidate: nothing to choose"}
    runner_up = min((t for t in order if t[0] != committed), key=lambda t: (t[1], t[0]))
    best = next(t for t in order if t[0] == committed)
    out = {"runner_up": runner_up[0], "margin": runner_up[1] - best[1], "candidates": len(order)}
    if any(t[2] is None for t in order) or len(best[2]) < 2:
        out.update(windows=len(best[2] or []), note="fewer than two calibration windows: no bootstrap")
        return out
    losses = torch.tensor([t[2] for t in order], dtype=torch.float64)  # [candidates, windows]
    W = losses.shape[1]
    means = losses[:, resample_indices(W, resamples, seed)].mean(-1)  # [candidates, resamples]
    layers = [t[0] for t in order]
    ib, ir = layers.index(committed), layers.index(runner_up[0])
    lo, hi = quantiles(means[ir] - means[ib])
    won = torch.bincount(means.argmin(0), minlength=len(order))
    out.update(windows=W, resamples=resamples, margin_ci95=[lo, hi], stays=float(won[ib]) / resamples,
               picked={str(layers[k]): float(won[k]) / resamples for k in range(len(order)) if won[k]},
               within_noise=lo <= 0.0)
    return out


def fingerprint_diff(saved: dict, now: dict) -> str:
    """``key: saved -> now`` for every setting that differs (long values shortened)."""

    def short(v) -> str:
        t = json.dumps(v)
        return t if len(t) <= 40 else t[:37] + "..."

    keys = [k for k in dict.fromkeys([*saved, *now]) if saved.get(k) != now.get(k)]
    return "; ".join(f"{k}: {short(saved.get(k))} then, {short(now.get(k))} now" for k in keys) or "unreadable"


def _reachable(key: str, pattern: str, forced: Sequence[int]) -> bool:
    """Can a prefix ``key`` still be needed: it differs from ``pattern`` by at most one further flip."""
    diff = [i for i, (a, b) in enumerate(zip(key, pattern, strict=False)) if a != b]
    return len(diff) == 0 or (len(diff) == 1 and key[diff[0]] == SHARED and diff[0] not in forced)


def _sum_counters(parts: list[dict]) -> dict:
    keys = ("evaluations", "layer_forwards", "naive_layer_forwards", "host_hits", "spilled")
    out = {k: sum(p.get(k, 0) for p in parts) for k in keys}  # states saved before the host tier lack its keys
    out["ratio_vs_naive"] = out["layer_forwards"] / out["naive_layer_forwards"] if out["naive_layer_forwards"] else None
    return out
