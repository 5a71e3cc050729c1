"""Mean LM loss of a pattern on fixed calibration batches, reusing every prefix already computed.

The hidden state (and the selection carried along) entering layer ``j`` depends only on the pattern of
layers ``< j``. So states are cached under the key ``pattern[:j]``, and a pattern is evaluated from the
longest cached prefix. In the greedy search a candidate that flips layer ``l`` starts at layer ``l``, and
after a commit the prefix cache of the winning candidate is reused. Results are bit-identical to full
forward passes: the same ops run on the same inputs. The layers run through a
:class:`~indexcache.runner.LayerRunner`, so this loop serves every model the runners cover.

Only the states entering a layer that owns an indexer are kept: two patterns first differ at such a
layer, so those are the only states a later evaluation can start from. They live in two tiers: up to
``cache_bytes`` on the model's device and, when a state is pushed out of it, up to ``host_bytes`` in
host memory, copied back when a lookup hits it (long calibration windows of a large model do not fit
the device's share). ``protected`` states are never pushed out: the search marks the states of the pattern
a step flips from, so that a full device tier turns away a candidate's states rather than the ones every
later candidate starts from.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import DataError, SearchError
from ..pattern import Pattern
from ..runner import LayerRunner, LayerState, as_runner

State = list[LayerState]  # one per calibration batch


@dataclass
class Counters:
    evaluations: int = 0
    layer_forwards: int = 0  # decoder-layer forwards actually run (per batch)
    naive_layer_forwards: int = 0  # what full forward passes would have run
    host_hits: int = 0  # evaluations that started from a state held in host memory
    spilled: int = 0  # states moved from the device to host memory

    def as_dict(self) -> dict:
        ratio = self.layer_forwards / self.naive_layer_forwards if self.naive_layer_forwards else None
        return {"evaluations": self.evaluations, "layer_forwards": self.layer_forwards,
                "naive_layer_forwards": self.naive_layer_forwards, "ratio_vs_naive": ratio,
                "host_hits": self.host_hits, "spilled": self.spilled}


def _moved(state: State, device: torch.device | str) -> State:
    """The state on ``device``; from page-locked host memory the copy is asynchronous (stream-ordered before
    the forward that reads it)."""
    def to(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=t.device.type == "cpu" and t.is_pinned())

    return [LayerState(to(s.hidden), None if s.carry is None else to(s.carry), s.extra) for s in state]


def _to_host(state: State) -> State:
    """The state copied to host memory: page-locked where it comes from a GPU, so that the copies out and back
    run at the link's speed, not the pageable path's, and without stalling the host (the copy is ordered on
    the stream before anything that reuses the device memory or reads the copy back)."""
    def host(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            return t.to("cpu")
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)

    return [LayerState(host(s.hidden), None if s.carry is None else host(s.carry), s.extra) for s in state]


class _Tier:
    """Least-recently-used states within a byte budget."""

    def __init__(self, budget: int):
        self.budget, self.size = budget, 0
        self.items: OrderedDict[tuple[int, str], State] = OrderedDict()

    def pop(self, key: tuple[int, str]) -> State | None:
        state = self.items.pop(key, None)
        if state is not None:
            self.size -= _nbytes(state)
        return state

    def put(self, key: tuple[int, str], state: State,
            protected: Callable[[tuple[int, str]], bool] | None = None) -> list[tuple[tuple[int, str], State]]:
        """Store ``state`` if it fits, pushing out the least recently used states that are not ``protected``;
        returns what had to leave, oldest first (``state`` itself when it cannot fit)."""
        size = _nbytes(state)
        over = self.size + size - self.budget
        if over > 0:
            victims = [k for k in self.items if protected is None or not protected(k)]  # oldest first
            freeable = 0
            for n, k in enumerate(victims):
                if freeable >= over:
                    victims = victims[:n]
                    break
                freeable += _nbytes(self.items[k])
            if freeable < over:
                return [(key, state)]
        else:
            victims = []
        out = [(k, self.pop(k)) for k in victims]
        self.items[key] = state
        self.size += size
        return out


def _nbytes(state: State) -> int:
    # carried selections are often shared with neighbouring states; counting them every time errs on the safe side
    return sum(s.nbytes() for s in state)


class LossEvaluator:
    """``LossEvaluator(runner_or_model, batches).loss(pattern)``: the prefix cache, the loss loop and the
    work counters, over any :class:`LayerRunner` (this package's model is wrapped in a NativeRunner)."""

    def __init__(self, runner, batches: list[torch.Tensor], cache_bytes: int = 2 << 30, reuse: bool = True,
                 host_bytes: int = 0, separate_host: bool | None = None):
        if not batches:
            raise DataError("no calibration batches")
        seq = batches[0].shape[1]
        if any(b.shape[1] != seq for b in batches):
            raise DataError("all calibration batches must have the same sequence length")
        self.runner: LayerRunner = as_runner(runner)
        self.n_layers = self.runner.num_layers
        # decoder layers [0, j) cover the pattern positions whose layer is below j
        self._covered = [sum(1 for layer in self.runner.slots if layer < j) for j in range(self.n_layers + 1)]
        self._kept = {layer for layer in self.runner.slots if layer > 0}  # where two patterns can first differ
        self.batches = [b.to(self.runner.device) for b in batches]
        self.reuse = reuse
        self.cache_bytes = cache_bytes
        # on CPU the two tiers are one (``separate_host`` keeps them apart, to exercise the spill)
        on_host = torch.device(self.runner.device).type == "cpu" if separate_host is None else not separate_host
        self._device = _Tier(cache_bytes + (host_bytes if on_host else 0))
        self._host = _Tier(0 if on_host else host_bytes)
        self.counters = Counters()
        self._embedded: State | None = None
        self.on_layer: Callable[[int], None] | None = None  # called after every layer-forward (progress)
        # states the device tier never pushes out (the greedy search: those on the path of the pattern a step
        # flips from, which every candidate of the step starts from)
        self.protected: Callable[[tuple[int, str]], bool] | None = None
        # whether states that are not protected go to the host tier when the device pushes them out (the
        # search turns it off where the tiers cannot hold a step's states for the next anyway)
        self.spill_unprotected = True
        self.last_window_losses: list[float] = []  # the last evaluation's mean loss per calibration window

    # ------------------------------------------------------------------------------- cache
    def state_bytes(self) -> int:
        """The size of one layer's states (every batch; the residual stream, the carried selection not
        included): what the cache budget must at least hold."""
        return sum(s.nbytes() for s in self._embedded_states())

    def holds(self, n_states: int) -> bool:
        """Whether the two tiers together can keep ``n_states`` more layers' states (every batch, with the
        selections they carry: sized as those already cached, or twice the residual stream before any is)."""
        if not self.reuse:
            return False
        cached = [*self._device.items.values(), *self._host.items.values()]
        per = sum(map(_nbytes, cached)) / len(cached) if cached else 2 * _nbytes(self._embedded_states())
        return n_states * per <= self._device.budget + self._host.budget

    def check_budget(self) -> None:
        """Refuse a cache that cannot hold one layer's states: every evaluation would run every layer."""
        need = self.state_bytes()
        have = self._device.budget + self._host.budget
        if self.reuse and need > have:
            raise SearchError(f"--cache-gb {self.cache_bytes / 2**30:g} (with {self._host.budget / 2**30:g} GiB of "
                              f"host memory) holds less than one layer's states, {need / 2**30:.2f} GiB for these "
                              f"calibration windows: give --cache-gb {need / 2**30 * 4:.1f} or more (a few layers), "
                              "or fewer/shorter windows")

    def _store(self, key: tuple[int, str], state: State) -> None:
        if not self.reuse or key in self._device.items or key in self._host.items:
            return
        for old_key, old in self._device.put(key, state, self.protected):
            if not self.spill_unprotected and not (self.protected and self.protected(old_key)):
                continue  # no later evaluation is counted on it: copying it out costs more than it saves
            if self._host.budget and _nbytes(old) <= self._host.budget:  # pushed out of the device: to the host
                self._host.put(old_key, _to_host(old))
                self.counters.spilled += 1

    def _key(self, pattern: str, j: int) -> tuple[int, str]:
        """The cache key of the state entering decoder layer ``j``: it depends on the pattern of the layers
        below j only."""
        return j, pattern[: self._covered[j]]

    def _embedded_states(self) -> State:
        if self._embedded is None:  # the embeddings, kept: every evaluation from layer 0 starts here
            self._embedded = [self.runner.start(b) for b in self.batches]
        return self._embedded

    def _lookup(self, pattern: str) -> tuple[int, State]:
        if self.reuse:
            for j in sorted(self._kept, reverse=True):
                key = self._key(pattern, j)
                state = self._device.items.get(key)
                if state is not None:
                    self._device.items.move_to_end(key)
                    return j, state
                state = self._host.pop(key)
                if state is not None:  # back to the device, where it becomes the most recent entry
                    self.counters.host_hits += 1
                    state = _moved(state, self.runner.device)
                    self._store(key, state)
                    return j, state
        return 0, self._embedded_states()

    def prune(self, keep: Callable[[str], bool]) -> None:
        """Drop cached states whose pattern prefix ``keep(prefix)`` rejects (e.g. no longer reachable)."""
        for tier in (self._device, self._host):
            for key in [k for k in tier.items if not keep(k[1])]:
                tier.pop(key)

    # ---------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def loss(self, pattern: Pattern) -> float:
        """Mean next-token cross-entropy (nats) over all calibration tokens."""
        self.runner.validate(pattern)
        key = str(pattern)
        start, state = self._lookup(key)
        for i in range(start, self.n_layers):
            state = [self.runner.run(s, pattern, i, i + 1)[0] for s in state]
            if self.on_layer is not None:
                self.on_layer(len(state))
            if i + 1 in self._kept:
                self._store(self._key(key, i + 1), state)
        total, count = 0.0, 0
        windows: list[float] = []  # each calibration window's mean loss, in window order (for a bootstrap)
        for s, ids in zip(state, self.batches, strict=True):
            rows, per_row = self.runner.nll_rows(s, ids)
            total += sum(rows)
            count += per_row * len(rows)
            windows += [r / per_row for r in rows]
        self.last_window_losses = windows
        n_b = len(self.batches)
        self.counters.evaluations += 1
        self.counters.layer_forwards += (self.n_layers - start) * n_b
        self.counters.naive_layer_forwards += self.n_layers * n_b
        return total / count


@torch.no_grad()
def lm_window_losses(model, windows: torch.Tensor, pattern: Pattern | None = None, progress: bool = True,
                     desc: str = "loss") -> list[float]:
    """Each window's mean cross-entropy (nats/token), one window per forward (what an interval over the
    windows resamples); with windows of one length their mean is :func:`lm_loss`."""
    runner = as_runner(model)
    pat = runner.validate(pattern if pattern is not None else model.pattern)
    out = []
    for i in tqdm(range(windows.shape[0]), desc=desc, unit="seq", disable=not progress, leave=False):
        ids = windows[i : i + 1].to(runner.device)
        state, _ = runner.run(runner.start(ids), pat, 0, runner.num_layers)
        nll, n = runner.nll(state, ids)
        out.append(nll / max(n, 1))
    return out


def lm_loss(model, windows: torch.Tensor, pattern: Pattern | None = None, batch_size: int = 1,
            progress: bool = True, desc: str = "loss") -> float:
    """Mean cross-entropy (nats/token) over every predicted position of every window, through the layer
    runner (``pattern`` None: the model's own)."""
    runner = as_runner(model)
    pat = runner.validate(pattern if pattern is not None else model.pattern)
    total, count = 0.0, 0
    bar = tqdm(total=windows.shape[0], desc=desc, unit="seq", disable=not progress, leave=False)
    for b0 in range(0, windows.shape[0], batch_size):
        ids = windows[b0 : b0 + batch_size].to(runner.device)
        state, _ = runner.run(runner.start(ids), pat, 0, runner.num_layers)
        nll, n = runner.nll(state, ids)
        total += nll
        count += n
        bar.update(ids.shape[0])
    bar.close()
    return total / max(count, 1)


__all__ = ["Counters", "LossEvaluator", "State", "lm_loss", "lm_window_losses"]
