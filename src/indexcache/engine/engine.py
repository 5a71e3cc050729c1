"""Long-context inference for DSA models with IndexCache: caches, chunked prefill, batched decode.

The engine runs the model's own modules (norms, MLA projections, indexer projections, MoE) and replaces
only what a forward over the whole sequence cannot give: the caches, and attention and selection against
them.

* **Caches**: one latent row ``[c_kv | k_rope]`` per token for every layer (MLA's absorbed form), and an
  indexer-K cache **only for Full layers**: a Shared layer reuses the indices of the Full layer before it,
  so it never scores and never needs keys. ``Engine.cache_bytes_per_token`` counts both.
* **Chunked prefill**: a prompt is processed ``chunk`` tokens at a time. A query at position p scores the
  cached keys [0, p] (its causal window), so chunking changes nothing but the memory of the logits.
* **Decode**: one token per request, requests of different lengths in one batch; the step (projections,
  cache writes, indexer scoring, top-k, sparse attention, MoE) is free of host synchronisation, so on CUDA
  it is captured once in a CUDA graph and replayed.

Prefill and decode run one layer step (:meth:`Engine._layer`) and differ only in where they write the
caches and what the selection and attention read. Both go through the ops registry
(:mod:`indexcache.ops.backends`): the Triton kernels on CUDA (``backend="triton"``) or their plain-PyTorch
references (``backend="torch"``, any device), with the same flat API. The MoE is the model's own, on the
engine's backend (the grouped-GEMM kernel on ``triton``), run in its graph-safe mode for decode; building
an engine never changes the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.dsa import Context, DSAForCausalLM, MoE
from ..model.rope import Rope
from ..ops.backends import check_backend, default_backend, get_backend
from ..ops.common import DEFAULT_BUDGET_BYTES
from ..ops.fp8 import act_quant
from ..ops.indexer import indexer_topk, indexer_topk_fused
from ..pattern import Pattern

# From how many keys a prefill chunk's selection runs fused (indexer_topk_fused: the [rows, keys] logits never
# written). None: never. On the H200 the fused path lost at every measured length, 0.49x at 8K keys to 0.89x
# at 128K for a chunk of 4096 queries (results/kernels/h200/moe_topk_fused.json), so no crossover is set.
FUSED_TOPK_FROM_KEYS: int | None = None


# ----------------------------------------------------------------------------------------- cache
@dataclass
class CacheSpec:
    latent_dim: int  # kv_lora_rank + qk_rope_head_dim
    index_dim: int
    num_layers: int
    num_full: int
    dtype: torch.dtype
    index_fp8: bool = False  # indexer keys in e4m3 with one fp32 scale per token (DeepSeek's layout)

    @property
    def bytes_per_token(self) -> int:
        return self.latent_bytes_per_token + self.index_bytes_per_token

    @property
    def latent_bytes_per_token(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size() * self.num_layers * self.latent_dim

    @property
    def index_bytes_per_token(self) -> int:
        per_key = self.index_dim + 4 if self.index_fp8 else torch.tensor([], dtype=self.dtype).element_size() \
            * self.index_dim
        return self.num_full * per_key


class Engine:
    """``Engine(model, pattern, max_batch, max_len)``; ``prefill(slot, ids)``, ``decode(tokens)``,
    ``generate(prompts, ...)``."""

    def __init__(
        self,
        model: DSAForCausalLM,
        pattern: Pattern | str | None = None,
        max_batch: int = 1,
        max_len: int = 4096,
        chunk: int = 4096,
        backend: str | None = None,
        cuda_graphs: bool | None = None,
        fp8_index_cache: bool | None = None,
        fused_topk_from: int | None = FUSED_TOPK_FROM_KEYS,
        select_budget_bytes: int = DEFAULT_BUDGET_BYTES,
    ):
        self.model = model.eval()
        cfg = model.config
        self.cfg = cfg
        self.pattern = model.runnable_pattern(pattern)
        self.device = model.device
        self.dtype = model.dtype
        backend = backend or default_backend(self.device)
        check_backend(backend, self.device)
        self.ops = get_backend(backend)
        # prefill chunks whose windows reach this many keys select through the fused indexer + top-k (it
        # needs the backend's candidates kernel); decode keeps the unfused, graph-safe path
        self.fused_topk_from = fused_topk_from if self.ops.indexer_candidates is not None else None
        # the prefill selection scores a chunk's queries in pieces whose [rows, keys] logits fit this budget:
        # at 200K keys the default leaves about 160 rows a piece, one top-k program per row
        if select_budget_bytes <= 0:
            raise ValueError(f"select_budget_bytes must be positive, got {select_budget_bytes}")
        self.select_budget_bytes = select_budget_bytes
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self.max_batch, self.max_len, self.chunk = max_batch, max_len, chunk
        self.topk = cfg.index_topk
        L = cfg.num_hidden_layers
        # DeepSeek's fp8 indexer (default: when the model scores in fp8): its Hadamard-rotated, e4m3 keys are
        # cached as e4m3 bytes with one power-of-two scale per token, a third of a bf16 cache's bytes
        self.fp8_index = (model.scoring == "fp8") if fp8_index_cache is None else fp8_index_cache
        if self.fp8_index and cfg.index_head_dim > 128:
            raise ValueError("the fp8 indexer cache keeps one scale per token: index_head_dim must be <= 128")
        self.scoring = "fp8" if self.fp8_index else model.scoring
        self.spec = CacheSpec(cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.index_head_dim, L,
                              len(self.pattern.full_layers), self.dtype, self.fp8_index)
        dev = self.device
        self.latent = [torch.zeros(max_batch, max_len, self.spec.latent_dim, dtype=self.dtype, device=dev)
                       for _ in range(L)]
        # indexer keys only where an indexer runs
        key_dtype = torch.float8_e4m3fn if self.fp8_index else self.dtype
        self.index_k = {i: torch.zeros(max_batch, max_len, cfg.index_head_dim, dtype=key_dtype, device=dev)
                        for i in self.pattern.full_layers}
        self.index_scale = {i: torch.ones(max_batch, max_len, dtype=torch.float32, device=dev)
                            for i in self.pattern.full_layers} if self.fp8_index else {}
        self.lengths = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.rope_table = Rope(cfg, torch.arange(max_len, device=dev), self.dtype)
        self._graphs: dict[int, tuple] = {}
        self.timer = None  # optional callable(name, layer) -> context manager, for the indexer's share of time
        # a list: every selection the Full layers make is appended to it, in order, on the host (decode then
        # runs eagerly, as with a timer); for comparing selections, e.g. fp8 against exact scoring
        self.selections: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------------------ helpers
    @property
    def cache_bytes_per_token(self) -> int:
        return self.spec.bytes_per_token

    def reset(self) -> None:
        self.lengths.zero_()
        self._graphs.clear()

    def context(self, positions: torch.Tensor) -> Context:
        """The forward context of new tokens at ``positions`` (RoPE rows of the engine's table)."""
        return Context(rope=self.rope_table.at(positions), positions=positions, slots=positions,
                       scoring=self.scoring, backend=self.ops.name)

    def _timed(self, name: str, layer: int):
        if self.timer is None:
            from contextlib import nullcontext

            return nullcontext()
        return self.timer(name, layer)

    # ------------------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, slot: int, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Prefill request ``slot`` with token ids [P] in chunks; returns the last token's logits [V]
        (or all [P, V] with ``all_logits``)."""
        P = ids.shape[0]
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} outside [0, {self.max_batch})")
        if P == 0 or P > self.max_len:
            raise ValueError(f"prompt length {P} must be in [1, {self.max_len}] (the engine's max_len)")
        ids = ids.to(self.device)
        outs = []
        last = None
        for p0 in range(0, P, self.chunk):
            p1 = min(P, p0 + self.chunk)
            h = self._prefill_chunk(slot, ids[p0:p1], p0)
            if all_logits:
                outs.append(self.model.head(h, self.ops.name))
            last = h[-1:]
        self.lengths[slot] = P
        return torch.cat(outs) if all_logits else self.model.head(last, self.ops.name)[0]

    def _layer(self, i: int, h: torch.Tensor, ctx: Context, idx: torch.Tensor | None, write: Callable,
               select: Callable, attend: Callable, graph_safe: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoder layer on the new tokens h [1, n, hidden]: ``write(cache, i, rows)`` stores their latent
        and (Full layers) indexer-key rows, ``select(i, q, w)`` picks indices from the indexer cache,
        ``attend(i, q, idx)`` attends over the latent cache. ``idx`` is carried in from the Full layer before."""
        layer = self.model.model.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(h, self.ops.name)
        qr, q, kv = attn.latents(x, ctx)
        write(self.latent[i], kv[0])
        if self.pattern.is_full(i):
            with self._timed("indexer", i):
                iq, iw, ik = attn.indexer.project(x, qr, ctx)
                if self.fp8_index:  # the keys are e4m3 values times power-of-two scales: exact in this form
                    k8, k_scale = act_quant(ik[0], ik.shape[-1], "ue8m0")
                    write(self.index_k[i], k8)
                    write(self.index_scale[i], k_scale[..., 0])
                else:
                    write(self.index_k[i], ik[0])
                idx = select(i, iq[0], iw[0] * attn.indexer.softmax_scale)
        with self._timed("attention", i):
            out = attend(i, q[0], idx)
        h = h + attn.project_out(out)[None]
        mlp_in = layer.post_attention_layernorm(h, self.ops.name)
        return h + layer.mlp(mlp_in, graph_safe=graph_safe, backend=self.ops.name), idx

    def select_indices(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, ke: torch.Tensor,
                       trim: bool, ke_host: torch.Tensor | None = None,
                       k_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Top-k of new queries q [n,H,D] (gates w [n,H], softmax scale folded in) against indexer caches
        k [G,T,D] (e4m3 with per-token ``k_scale`` [G,T] in the fp8 cache), windows [0, ke); ``trim=False``
        keeps shapes static (CUDA graphs)."""
        if k_scale is not None:  # e4m3 queries, one scale per head folded into its gate
            q, q_scale = act_quant(q, q.shape[-1], "ue8m0")
            w = w * q_scale[..., 0]
        if trim and self.fused_topk_from is not None and k.shape[1] >= self.fused_topk_from:
            idx = indexer_topk_fused(q, k, w, torch.zeros_like(ke), ke, self.topk, backend=self.ops,
                                     k_scale=k_scale, index_dtype=torch.int32)
        else:  # int32, as the top-k writes them and sparse attention reads them: no casts in the step
            idx = indexer_topk(q, k, w, torch.zeros_like(ke), ke, self.topk, backend=self.ops, trim=trim,
                               ke_host=ke_host, k_scale=k_scale, index_dtype=torch.int32,
                               budget_bytes=self.select_budget_bytes)
        if self.selections is not None:
            self.selections.append(idx.cpu())
        return idx

    def _scales(self, i: int, rows) -> torch.Tensor | None:
        return self.index_scale[i][rows] if self.fp8_index else None

    @torch.no_grad()
    def warm_up(self, length: int, slot: int = 0, seed: int = 0) -> float:
        """Compile the kernel variants that a prefill of ``length`` tokens runs, before anything is timed or
        served; returns the seconds it took. Kernels specialise on the key count (the top-k changes its
        schedule and sample size with the row length), so the first long prefill of a process would
        otherwise compile them on its way, once per new variant: at 200K keys that once added 72 s to the
        first Full layer of a 132 s prefill. Random tokens run every chunk of a ``length``-token prompt
        through the first layers only (:meth:`warm_up_layers`: a Full, a Shared and an MoE layer, as far as
        the pattern and the model have them), a few percent of a whole prefill; request ``slot`` is left
        empty."""
        if not 0 < length <= self.max_len:
            raise ValueError(f"warm-up length {length} must be in [1, {self.max_len}] (the engine's max_len)")
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} outside [0, {self.max_batch})")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(0, self.cfg.vocab_size, (length,), generator=gen).to(self.device)
        layers = self.warm_up_layers()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        selections, self.selections = self.selections, None  # the warm-up's selections are nobody's
        t0 = time.perf_counter()
        try:
            for p0 in range(0, length, self.chunk):
                self._prefill_chunk(slot, ids[p0 : p0 + self.chunk], p0, layers=layers)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            self.selections = selections
            self.lengths[slot] = 0
        return time.perf_counter() - t0

    def warm_up_layers(self) -> int:
        """How many leading layers :meth:`warm_up` runs: through the first Full layer, the first Shared
        layer and the first MoE layer, where the pattern and the model have one."""
        firsts = [self.pattern.full_layers[0]]
        if self.pattern.shared_layers:
            firsts.append(self.pattern.shared_layers[0])
        moe = [i for i, layer in enumerate(self.model.model.layers) if isinstance(layer.mlp, MoE)]
        if moe:
            firsts.append(moe[0])
        return max(firsts) + 1

    def _prefill_chunk(self, slot: int, ids: torch.Tensor, p0: int, layers: int | None = None) -> torch.Tensor:
        p1 = p0 + ids.shape[0]
        positions = torch.arange(p0, p1, device=self.device)
        ke = (positions + 1).to(torch.int32)

        def write(cache: torch.Tensor, rows: torch.Tensor) -> None:
            cache[slot, p0:p1] = rows

        ke_host = torch.arange(p0 + 1, p1 + 1, dtype=torch.int32)

        def select(i: int, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return self.select_indices(q, w, self.index_k[i][slot : slot + 1, :p1], ke, trim=True, ke_host=ke_host,
                                       k_scale=self._scales(i, (slice(slot, slot + 1), slice(0, p1))))

        def attend(i: int, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            attn = self.model.model.layers[i].self_attn
            return self.ops.sparse_mla(q, self.latent[i][slot : slot + 1, :p1], idx, attn.softmax_scale,
                                       attn.kv_lora)[0]

        h = self.model.model.embed_tokens(ids)[None]  # [1, C, hidden]
        ctx, idx = self.context(positions), None
        for i in range(self.cfg.num_hidden_layers if layers is None else layers):
            h, idx = self._layer(i, h, ctx, idx, write, select, attend, graph_safe=False)
        return h[0]

    # ------------------------------------------------------------------------------- decode
    def _decode_eager(self, tokens: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        pos = self.lengths[:B].long()
        lengths = self.lengths[:B] + 1
        rows = torch.arange(B, device=self.device)

        def write(cache: torch.Tensor, new: torch.Tensor) -> None:
            cache[rows, pos] = new

        def select(i: int, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return self.select_indices(q, w, self.index_k[i][:B], lengths, trim=False,  # no host sync: graph-safe
                                       k_scale=self._scales(i, slice(0, B)))

        def attend(i: int, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            attn = self.model.model.layers[i].self_attn
            return self.ops.sparse_mla(q, self.latent[i][:B], idx, attn.softmax_scale, attn.kv_lora)[0]

        h = self.model.model.embed_tokens(tokens)[None]  # [1, B, hidden]: the B new tokens side by side
        ctx, idx = self.context(pos), None
        for i in range(self.cfg.num_hidden_layers):
            h, idx = self._layer(i, h, ctx, idx, write, select, attend, graph_safe=True)
        self.lengths[:B] += 1
        return self.model.head(h, self.ops.name)[0]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step for requests 0..B-1 (token ids [B]); returns logits [B, V]."""
        B = tokens.shape[0]
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"decode batch {B} outside [1, {self.max_batch}]")
        tokens = tokens.to(self.device)
        if not self.cuda_graphs or self.timer is not None or self.selections is not None:
            return self._decode_eager(tokens)
        if B not in self._graphs:
            self._graphs[B] = self._capture(B)
        graph, static_tokens, static_logits = self._graphs[B]
        static_tokens.copy_(tokens)
        graph.replay()
        return static_logits.clone()

    def _capture(self, B: int):
        static_tokens = torch.zeros(B, dtype=torch.long, device=self.device)
        saved = self.lengths.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (compiles kernels) outside the capture
            for _ in range(2):
                self._decode_eager(static_tokens)
                self.lengths.copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = self._decode_eager(static_tokens)
        self.lengths.copy_(saved)  # capturing runs no kernels; the warm-up wrote only beyond every length
        return graph, static_tokens, static_logits

    # ------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        prompts: list[torch.Tensor],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | None = None,
        seed: int = 0,
        on_token=None,
    ) -> list[list[int]]:
        """Prefill every prompt (one slot each), then decode them together. ``on_token(step, tokens)``
        is called after each step with the new tokens [B] (streaming)."""
        B = len(prompts)
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"{B} prompts but max_batch is {self.max_batch}")
        longest = max(p.shape[0] for p in prompts)
        if longest + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds max_len {self.max_len}")
        self.reset()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        logits = torch.stack([self.prefill(b, p) for b, p in enumerate(prompts)])
        out: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        for step in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, top_k, gen)
            for b, t in enumerate(tok.tolist()):
                if not finished[b]:
                    out[b].append(t)
                    finished[b] = eos_token_id is not None and t == eos_token_id
            if on_token is not None:
                on_token(step, tok)
            if all(finished) or step == max_new_tokens - 1:
                break
            logits = self.decode(tok)
        return out


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else softmax(logits / T) restricted
    to the top_k most likely tokens (0 = all) and to the smallest set whose probability reaches top_p."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    x = logits.float() / temperature
    if top_k > 0:
        kth = x.topk(min(top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep the first token that crosses top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return torch.multinomial(x.softmax(dim=-1), 1, generator=generator).squeeze(-1)


__all__ = ["Engine", "sample", "CacheSpec"]
