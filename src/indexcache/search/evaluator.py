"""Mean LM loss of a pattern on fixed calibration batches, reusing every prefix already computed.

The hidden state (and the top-k indices carried along) entering layer ``j`` depends only on the
pattern of layers ``< j``. So states are cached under the key ``pattern[:j]``, and a pattern is
evaluated from the longest cached prefix. In the greedy search a candidate that flips layer ``l``
starts at layer ``l``, and after a commit the prefix cache of the winning candidate is reused. Results
are bit-identical to full forward passes: the same ops run on the same inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import DataError
from ..lm import next_token_nll
from ..model.dsa import DSAForCausalLM
from ..pattern import Pattern

State = list[tuple[torch.Tensor, torch.Tensor | None]]  # per batch: (hidden, carried indices)


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
    """Runs this package's model; a subclass can run another implementation of the same layers by
    overriding ``_select``, ``_run_layer`` and ``_nll`` (see ``search.hf_backend``)."""

    def __init__(self, model: DSAForCausalLM, batches: list[torch.Tensor], cache_bytes: int = 2 << 30,
                 reuse: bool = True):
        self.model = model
        self._init_cache(model.config.num_hidden_layers, batches, model.device, cache_bytes, reuse)
        self.ctx = model.make_context(self.batches[0].shape[1])
        self._pattern: Pattern | None = None
        with torch.no_grad():
            self._embedded: State = [(model.model.embed_tokens(b), None) for b in self.batches]

    def _init_cache(self, n_layers: int, batches: list[torch.Tensor], device, cache_bytes: int, reuse: bool) -> None:
        if not batches:
            raise DataError("no calibration batches")
        self.n_layers = n_layers
        self.batches = [b.to(device) for b in batches]
        self.reuse = reuse
        self.cache_bytes = cache_bytes
        self.counters = Counters()
        self._cache: OrderedDict[str, State] = OrderedDict()
        self._cache_size = 0
        seq = self.batches[0].shape[1]
        if any(b.shape[1] != seq for b in self.batches):
            raise DataError("all calibration batches must have the same sequence length")

    # ------------------------------------------------------------------------------- cache
    @staticmethod
    def _nbytes(state: State) -> int:
        # carried indices are often shared with neighbouring states; counting them every time errs on the safe side
        return sum(t.numel() * t.element_size() for pair in state for t in pair if t is not None)

    def _store(self, key: str, state: State) -> None:
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

    def _lookup(self, pat: str) -> tuple[int, State]:
        if self.reuse:
            for j in range(self.n_layers, 0, -1):
                state = self._cache.get(pat[:j])
                if state is not None:
                    self._cache.move_to_end(pat[:j])
                    return j, state
        return 0, self._embedded

    def prune(self, keep) -> None:
        """Drop cached prefixes for which ``keep(key)`` is false (e.g. no longer reachable)."""
        for key in [k for k in self._cache if not keep(k)]:
            self._cache_size -= self._nbytes(self._cache.pop(key))

    # ---------------------------------------------------------------------------- evaluate
    def _select(self, pat: str) -> None:
        """Make ``pat`` the pattern the next layers run with (validated against the model's indexers)."""
        self._pattern = self.model.runnable_pattern(pat)
        self.ctx.pattern = self._pattern

    def _run_layer(self, i: int, state: State) -> State:
        layer = self.model.model.layers[i]
        return [layer(h, self.ctx, self._pattern.is_full(i), carry) for h, carry in state]

    def _nll(self, h: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
        return next_token_nll(self.model.head(h), ids)

    @torch.no_grad()
    def loss(self, pattern: Pattern | str) -> float:
        """Mean next-token cross-entropy (nats) over all calibration tokens."""
        pat = str(Pattern.parse(pattern))
        self._select(pat)
        start, state = self._lookup(pat)
        for i in range(start, self.n_layers):
            state = self._run_layer(i, state)
            if i + 1 < self.n_layers:
                self._store(pat[: i + 1], state)
        total, count = 0.0, 0
        for (h, _), ids in zip(state, self.batches, strict=True):
            nll, n = self._nll(h, ids)
            total += nll
            count += n
        n_b = len(self.batches)
        self.counters.evaluations += 1
        self.counters.layer_forwards += (self.n_layers - start) * n_b
        self.counters.naive_layer_forwards += self.n_layers * n_b
        return total / count
