"""The layer-runner protocol: run decoder layers ``[a, b)`` of a model on these states under this pattern,
and return the states and the per-layer selections.

Everything that compares patterns sits above it once: the prefix-reusing loss loop of the search
(:mod:`indexcache.search.evaluator`), the greedy search and its distributed candidate split, the overlap
analysis, the similarity baseline and perplexity. Two implementations: :class:`NativeRunner` (this
package's model, on the ops backend it is set to, so on a GPU the search runs the Triton kernels) and
:class:`indexcache.integrations.transformers.TransformersRunner` (a transformers model with the pattern
applied). A new architecture enters through transformers' own class and that runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .lm import head_nll_chunked, head_nll_rows
from .model.dsa import Context, DSAForCausalLM, Trace
from .ops.sparse_mla import mla_attention
from .pattern import Pattern


@dataclass
class LayerState:
    """The residual stream of one batch entering a layer, and what it carries along."""

    hidden: torch.Tensor  # [B, S, hidden] (or the architecture's own layout of the residual)
    carry: torch.Tensor | None = None  # the selection a following Shared layer reuses
    extra: object = None  # per-batch constants of the runner (transformers: the decoder layers' keyword arguments)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.carry) if t is not None)


@runtime_checkable
class LayerRunner(Protocol):
    num_layers: int  # decoder layers
    slots: list[int]  # the decoder layer of each pattern position (the layers that own an indexer)
    indexer_layers: list[int]  # pattern positions with a trained indexer: a pattern may make only these Full

    @property
    def device(self) -> torch.device: ...

    def validate(self, pattern: Pattern) -> Pattern:
        """Refuse a pattern this model cannot run (wrong length, a Full layer without an indexer)."""

    def start(self, ids: torch.Tensor) -> LayerState:
        """The state entering layer 0 for token ids [B, S]."""

    def run(self, state: LayerState, pattern: Pattern, start: int, end: int,
            selections: bool = False) -> tuple[LayerState, dict[int, torch.Tensor]]:
        """Layers ``start .. end-1``; with ``selections``, what each of them attended with ([B, S, K])."""

    def nll(self, state: LayerState, ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token cross-entropy of the final state, and the number of predicted tokens."""

    def nll_rows(self, state: LayerState, ids: torch.Tensor) -> tuple[list[float], int]:
        """The same per row of the batch (each calibration window's own), and the tokens predicted per row."""

    def logits(self, state: LayerState) -> torch.Tensor:
        """The logits [B, S, V] of the final state."""


class NativeRunner:
    """:class:`LayerRunner` over this package's model, on its ops backend (``model.set_backend``)."""

    def __init__(self, model: DSAForCausalLM):
        self.model = model
        self.config = model.config
        self.num_layers = model.config.num_hidden_layers
        self.slots = list(range(self.num_layers))
        self.indexer_layers = model.indexer_layers
        self._contexts: dict[int, Context] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def validate(self, pattern: Pattern) -> Pattern:
        return self.model.runnable_pattern(pattern)

    def _ctx(self, seq_len: int) -> Context:
        if seq_len not in self._contexts:  # the RoPE tables of one length, built once
            self._contexts[seq_len] = self.model.make_context(seq_len)
        return self._contexts[seq_len]

    @torch.no_grad()
    def start(self, ids: torch.Tensor) -> LayerState:
        return LayerState(self.model.model.embed_tokens(ids.to(self.device)))

    @torch.no_grad()
    def run(self, state: LayerState, pattern: Pattern, start: int, end: int,
            selections: bool = False) -> tuple[LayerState, dict[int, torch.Tensor]]:
        ctx = self._ctx(state.hidden.shape[1])
        ctx.pattern = pattern
        ctx.trace = Trace(indices=True, layers=set(range(start, end))) if selections else None
        h, carry = state.hidden, state.carry
        try:
            for i in range(start, end):
                h, carry = self.model.model.layers[i](h, ctx, pattern.is_full(i), carry)
            chosen = {i: r.indices for i, r in ctx.trace.records.items()} if selections else {}
        finally:
            ctx.trace = None
        return LayerState(h, carry, state.extra), chosen

    @torch.no_grad()
    def nll(self, state: LayerState, ids: torch.Tensor) -> tuple[float, int]:
        return head_nll_chunked(self.model.head, state.hidden, ids.to(self.device), self.config.vocab_size)

    @torch.no_grad()
    def nll_rows(self, state: LayerState, ids: torch.Tensor) -> tuple[list[float], int]:
        return head_nll_rows(self.model.head, state.hidden, ids.to(self.device), self.config.vocab_size)

    @torch.no_grad()
    def logits(self, state: LayerState) -> torch.Tensor:
        return self.model.head(state.hidden)

    @torch.no_grad()
    def attention_outputs(self, state: LayerState, layer: int,
                          index_sets: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Layer ``layer``'s own selection on ``state`` (its input), and its core-attention output (per-head
        values before ``o_proj``, [B, S, H*dv]) with that selection and with each of ``index_sets``: what
        the similarity baseline compares."""
        ctx = self._ctx(state.hidden.shape[1])
        block = self.model.model.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(state.hidden)
        qr, q, kv = attn.latents(x, ctx)
        own, _ = attn.indexer(x, qr, ctx)
        cores = []
        for idx in [own, *index_sets]:
            out, _, _ = mla_attention(q, kv, attn.softmax_scale, attn.kv_lora, indices=idx, q_pos=ctx.slots,
                                      budget_bytes=ctx.budget_bytes)
            w_uv = attn.kv_b_proj.weight.view(attn.n_heads, attn.dn + attn.dv, attn.kv_lora)[:, attn.dn :]
            cores.append(torch.einsum("bshc,hvc->bshv", out.float(), w_uv.float()).flatten(2))
        return own, cores


@dataclass
class OpenedModel:
    """A model opened for the pattern commands: its runner, what was loaded, and how it runs."""

    runner: LayerRunner
    model: object  # DSAForCausalLM (native) or integrations.transformers.HFSearchModel
    backend: str  # "native" or "hf"
    ops: str  # the native model's ops backend ("torch" / "triton"); "torch" for transformers
    start: Pattern  # the checkpoint's own pattern: Full exactly where trained indexers ship (or as its config says)


def resolve_backend(backend: str, native_covers: bool, architecture: str, device_map: str | None = None,
                    tp: int = 1) -> str:
    """``auto``: this package's model where it covers the architecture (and the model is not split), else
    transformers' class."""
    from .errors import SearchError

    if backend not in ("auto", "native", "hf"):
        raise SearchError(f"unknown backend {backend!r} (auto, native or hf)")
    if backend == "auto":
        backend = "native" if native_covers and device_map is None and tp == 1 else "hf"
    if tp > 1 and backend != "hf":
        raise SearchError("--tp shards a transformers model with its tensor-parallel plan: it needs --backend hf")
    if backend == "native" and not native_covers:
        raise SearchError(f"the native model covers DeepSeek-V3.2 and GLM-5.x, not {architecture}: "
                          "use --backend hf (or auto)")
    if device_map is not None and backend != "hf":
        raise SearchError("--device-map spreads a transformers model: it needs --backend hf")
    return backend


def native_ops(model: DSAForCausalLM, ops: str) -> str:
    """The ops backend of the native model: ``auto`` takes the kernels on CUDA when the model's shapes suit
    them, else the plain ops."""
    if ops != "auto":
        return ops
    from .ops.backends import default_backend, get_backend

    name = default_backend(model.device)
    cfg = model.config
    if name == "triton" and not get_backend("triton").supports(
            cfg.index_n_heads, cfg.index_head_dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank):
        return "torch"
    return name


def open_model(path, info, backend: str = "auto", dtype: torch.dtype = torch.float32, device: str = "cpu",
               scoring: str = "exact", ops: str = "auto", device_map: str | None = None, world: int = 1,
               verbose: bool = True, tp: int = 1, keep_fp8: bool | None = None) -> OpenedModel:
    """Load ``path`` (whose :class:`~indexcache.architectures.ModelInfo` is ``info``) for the runner-based
    commands: this package's model on its ops backend, or the model's transformers class (``tp`` > 1:
    sharded by transformers' tensor-parallel plan). ``keep_fp8``: a block-FP8 checkpoint stays FP8 in the
    native model (default: on CUDA)."""
    chosen = resolve_backend(backend, info.spec.native, info.architecture, device_map, tp)
    if chosen == "hf":
        from .integrations.transformers import load_hf_for_search

        m = load_hf_for_search(str(path), dtype=dtype, device=device, device_map=device_map, scoring=scoring,
                               world=world, tp=tp)
        return OpenedModel(m.runner(), m, "hf", "torch", m.pattern)
    from .checkpoint import load_model

    model = load_model(path, dtype=dtype, device=device, scoring=scoring, verbose=verbose, keep_fp8=keep_fp8)
    used = native_ops(model, ops)
    model.set_backend(used)
    return OpenedModel(NativeRunner(model), model, "native", used, model.pattern)


def as_runner(model) -> LayerRunner:
    """A runner for a model: this package's model gets a :class:`NativeRunner`; a runner is returned as is."""
    if isinstance(model, DSAForCausalLM):
        return NativeRunner(model)
    if isinstance(model, LayerRunner):
        return model
    raise TypeError(f"no layer runner for {type(model).__name__}")


__all__ = ["LayerRunner", "LayerState", "NativeRunner", "OpenedModel", "as_runner", "native_ops", "open_model",
           "resolve_backend"]
