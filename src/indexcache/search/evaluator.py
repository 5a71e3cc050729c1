"""Mean LM loss of a pattern on fixed calibration batches, reusing every prefix already computed.

The hidden state (and the selection carried along) entering layer ``j`` depends only on the pattern of
layers ``< j``. So states are cached under the key ``pattern[:j]``, and a pattern is evaluated from the
longest cached prefix. In the greedy search a candidate that flips layer ``l`` starts at layer ``l``, and
after a commit the prefix cache of the winning candidate is reused. Results are bit-identical to full
forward passes: the same ops run on the same inputs. The layers run through a
:class:`~indexcache.runner.LayerRunner`, so this loop serves every model the runners cover.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..pattern import Pattern
from ..runner import LayerRunner, LayerState, as_runner

State = list[LayerState]  # one per calibration batch


@dataclass
class Counters:
    evaluations: int = 0
    layer_forwards: int = 0  # decoder-layer forwards actually run (per batch)
    naive_layer_forwards: int = 0  # what full forward passes would have run

    def as_dict(self) -> dict:
        ratio = self.layer_forwards / self.naive_layer_forwards if self.naive_layer_forwards else None
        return {"evaluations": self.evaluations, "layer_forwards": self.layer_forwards,
                "naive_layer_forwards": self.naive_layer_forwards, "ratio_vs_naive": ratio}


class LossEvaluator:
    """``LossEvaluator(runner_or_model, batches).loss(pattern)``: the prefix cache, the loss loop and the
    work counters, over any :class:`LayerRunner` (this package's model is wrapped in a NativeRunner)."""

    def __init__(self, runner, batches: list[torch.Tensor], cache_bytes: int = 2 << 30, reuse: bool = True):
        if not batches:
            raise DataError("no calibration batches")
        seq = batches[0].shape[1]
        if any(b.shape[1] != seq for b in batches):
            raise DataError("all calibration batches must have the same sequence length")
        self.runner: LayerRunner = as_runner(runner)
        self.n_layers = self.runner.num_layers
        # decoder layers [0, j) cover the pattern positions whose layer is below j
        self._covered = [sum(1 for layer in self.runner.slots if layer < j) for j in range(self.n_layers + 1)]
        self.batches = [b.to(self.runner.device) for b in batches]
        self.reuse = reuse
        self.cache_bytes = cache_bytes
        self.counters = Counters()
        self._cache: OrderedDict[tuple[int, str], State] = OrderedDict()  # (layers run, pattern prefix)
        self._cache_size = 0
        self._embedded: State | None = None
        self.on_layer: Callable[[int], None] | None = None  # called after every layer-forward (progress)

    # ------------------------------------------------------------------------------- cache
    @staticmethod
    def _nbytes(state: State) -> int:
        # carried selections are often shared with neighbouring states; counting them every time errs on the safe side
        return sum(s.nbytes() for s in state)

    def _store(self, key: tuple[int, str], state: State) -> None:
        if not self.reuse or key in self._cache:
            return
        size = self._nbytes(state)
        if size > self.cache_bytes:
            return
        while self._cache and self._cache_size + size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)  # least recently used first
            self._cache_size -= self._nbytes(old)
        self._cache[key] = state
        self._cache_size += size

    def _key(self, pattern: str, j: int) -> tuple[int, str]:
        """The cache key of the state entering decoder layer ``j``: it depends on the pattern of the layers
        below j only."""
        return j, pattern[: self._covered[j]]

    def _lookup(self, pattern: str) -> tuple[int, State]:
        if self.reuse:
            for j in range(self.n_layers, 0, -1):
                key = self._key(pattern, j)
                state = self._cache.get(key)
                if state is not None:
                    self._cache.move_to_end(key)
                    return j, state
        if self._embedded is None:  # the embeddings, kept: every evaluation from layer 0 starts here
            self._embedded = [self.runner.start(b) for b in self.batches]
        return 0, self._embedded

    def prune(self, keep: Callable[[str], bool]) -> None:
        """Drop cached states whose pattern prefix ``keep(prefix)`` rejects (e.g. no longer reachable)."""
        for key in [k for k in self._cache if not keep(k[1])]:
            self._cache_size -= self._nbytes(self._cache.pop(key))

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
            if i + 1 < self.n_layers:
                self._store(self._key(key, i + 1), state)
        total, count = 0.0, 0
        for s, ids in zip(state, self.batches, strict=True):
            nll, n = self.runner.nll(s, ids)
            total += nll
            count += n
        n_b = len(self.batches)
        self.counters.evaluations += 1
        self.counters.layer_forwards += (self.n_layers - start) * n_b
        self.counters.naive_layer_forwards += self.n_layers * n_b
        return total / count


@torch.no_grad()
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


__all__ = ["Counters", "LossEvaluator", "State", "lm_loss"]
