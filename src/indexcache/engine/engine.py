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

Selection and attention go through ``ops``: the Triton kernels on CUDA (``backend="triton"``) or their
plain-PyTorch references (``backend="torch"``, any device), with the same flat API.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.dsa import Context, DSAForCausalLM, MoE
from ..model.rope import Rope
from ..pattern import Pattern

# ----------------------------------------------------------------------------------------- ops


class TorchOps:
    """Selection and sparse attention with the plain-PyTorch references (tests, CPU)."""

    name = "torch"

    def prefill_select(self, q, w, k, ke, topk):
        from ..ops.reference import mqa_logits_ref, topk_ref

        ks = torch.zeros_like(ke)
        return topk_ref(mqa_logits_ref(q, k, w, ks, ke), topk, ks, ke)

    def prefill_attend(self, q, kv, idx, scale, d_v):
        from ..ops.reference import sparse_mla_ref

        return sparse_mla_ref(q, kv, idx, scale, d_v)[0]

    def decode_select(self, q, w, k_cache, lengths, topk):
        from ..ops.reference import mqa_logits_ref, topk_ref

        B, T = k_cache.shape[:2]
        zero = torch.zeros(1, dtype=torch.int32, device=q.device)
        rows = [mqa_logits_ref(q[b : b + 1], k_cache[b], w[b : b + 1], zero, lengths[b : b + 1]) for b in range(B)]
        return topk_ref(torch.cat(rows), topk, torch.zeros_like(lengths), lengths)

    def decode_attend(self, q, kv_cache, idx, scale, d_v):
        from ..ops.reference import sparse_mla_ref

        return torch.stack([sparse_mla_ref(q[b : b + 1], kv_cache[b], idx[b : b + 1], scale, d_v)[0][0]
                            for b in range(q.shape[0])])


class TritonOps:
    """Selection and sparse attention on the Triton kernels."""

    name = "triton"

    def prefill_select(self, q, w, k, ke, topk):
        from ..ops.kernels.indexer import mqa_logits
        from ..ops.kernels.topk import topk as select

        ks = torch.zeros_like(ke)
        return select(mqa_logits(q, k, w, ks, ke), topk, ks, ke)

    def prefill_attend(self, q, kv, idx, scale, d_v):
        from ..ops.kernels.sparse_mla import sparse_mla

        return sparse_mla(q, kv, idx, scale, d_v)[0]

    def decode_select(self, q, w, k_cache, lengths, topk):
        from ..ops.kernels.indexer import mqa_logits_decode
        from ..ops.kernels.topk import topk as select

        logits = mqa_logits_decode(q, k_cache, w, lengths)
        return select(logits, topk, torch.zeros_like(lengths), lengths)

    def decode_attend(self, q, kv_cache, idx, scale, d_v):
        from ..ops.kernels.sparse_mla import sparse_mla_decode

        return sparse_mla_decode(q, kv_cache, idx, scale, d_v)[0]


# ----------------------------------------------------------------------------------------- MoE
class StaticMoE:
    """The model's MoE with shapes that do not depend on the routing, so a decode step can be captured
    in a CUDA graph. The experts' weights are stacked once (the modules then view the stacked tensors, so
    nothing is stored twice). Few (token, slot) pairs: gather the chosen experts' weights; many: run
    every expert on every token and keep the chosen ones. Slots are summed in the model's order."""

    def __init__(self, moe: MoE):
        self.moe = moe
        self.E = len(moe.experts)
        with torch.no_grad():
            for name in ("gate_proj", "up_proj", "down_proj"):
                stacked = torch.stack([getattr(e, name).weight.detach() for e in moe.experts])
                setattr(self, name, stacked)
                for i, e in enumerate(moe.experts):
                    getattr(e, name).weight = torch.nn.Parameter(stacked[i], requires_grad=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.moe.gate(flat)  # [N, k]
        N, k = idx.shape
        if N * k < self.E:
            sel = idx.flatten()
            xs = flat.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N*k, hidden, 1]
            h = F.silu(torch.bmm(self.gate_proj[sel], xs)) * torch.bmm(self.up_proj[sel], xs)
            y = torch.bmm(self.down_proj[sel], h).view(N, k, -1)
            routed = (y * weights.unsqueeze(-1)).to(flat.dtype)
        else:
            routed = flat.new_zeros(N, k, shape[-1])
            for e, expert in enumerate(self.moe.experts):
                y = expert(flat).unsqueeze(1) * weights.unsqueeze(-1)  # [N, k, hidden]
                routed = torch.where((idx == e).unsqueeze(-1), y.to(flat.dtype), routed)
        return (routed.sum(1) + self.moe.shared_experts(flat)).view(shape)


# ----------------------------------------------------------------------------------------- cache
@dataclass
class CacheSpec:
    latent_dim: int  # kv_lora_rank + qk_rope_head_dim
    index_dim: int
    num_layers: int
    num_full: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        el = torch.tensor([], dtype=self.dtype).element_size()
        return el * (self.num_layers * self.latent_dim + self.num_full * self.index_dim)

    @property
    def latent_bytes_per_token(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size() * self.num_layers * self.latent_dim

    @property
    def index_bytes_per_token(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size() * self.num_full * self.index_dim


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
    ):
        self.model = model.eval()
        cfg = model.config
        self.cfg = cfg
        self.pattern = model.runnable_pattern(pattern)
        self.device = model.device
        self.dtype = model.dtype
        if backend is None:
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.ops = TritonOps() if backend == "triton" else TorchOps()
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self.max_batch, self.max_len, self.chunk = max_batch, max_len, chunk
        self.topk = cfg.index_topk
        L = cfg.num_hidden_layers
        self.spec = CacheSpec(cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.index_head_dim, L,
                              len(self.pattern.full_layers), self.dtype)
        dev = self.device
        self.latent = [torch.zeros(max_batch, max_len, self.spec.latent_dim, dtype=self.dtype, device=dev)
                       for _ in range(L)]
        # indexer keys only where an indexer runs
        self.index_k = {i: torch.zeros(max_batch, max_len, cfg.index_head_dim, dtype=self.dtype, device=dev)
                        for i in self.pattern.full_layers}
        self.lengths = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.rope_table = Rope(cfg, torch.arange(max_len, device=dev), self.dtype)
        self.static_moe = {i: StaticMoE(layer.mlp) for i, layer in enumerate(model.model.layers)
                           if isinstance(layer.mlp, MoE)}
        self._graphs: dict[int, tuple] = {}
        self.timer = None  # optional callable(name) -> context manager, for the indexer's share of time

    # ------------------------------------------------------------------------------ helpers
    @property
    def cache_bytes_per_token(self) -> int:
        return self.spec.bytes_per_token

    def reset(self) -> None:
        self.lengths.zero_()
        self._graphs.clear()

    def _ctx(self, positions: torch.Tensor) -> Context:
        return Context(rope=self.rope_table.at(positions), positions=positions, slots=positions,
                       scoring=self.model.scoring)

    def _timed(self, name: str):
        if self.timer is None:
            from contextlib import nullcontext

            return nullcontext()
        return self.timer(name)

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
                outs.append(self.model.head(h))
            last = h[-1:]
        self.lengths[slot] = P
        return torch.cat(outs) if all_logits else self.model.head(last)[0]

    def _prefill_chunk(self, slot: int, ids: torch.Tensor, p0: int) -> torch.Tensor:
        model = self.model
        p1 = p0 + ids.shape[0]
        positions = torch.arange(p0, p1, device=self.device)
        ke = (positions + 1).to(torch.int32)
        ctx = self._ctx(positions)
        h = model.model.embed_tokens(ids)[None]  # [1, C, hidden]
        idx = None
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            qr, q, kv = attn.latents(x, ctx)
            self.latent[i][slot, p0:p1] = kv[0]
            if self.pattern.is_full(i):
                with self._timed("indexer"):
                    iq, iw, ik = attn.indexer.project(x, qr, ctx)
                    self.index_k[i][slot, p0:p1] = ik[0]
                    idx = self.ops.prefill_select(iq[0], iw[0] * attn.indexer.softmax_scale,
                                                  self.index_k[i][slot, :p1], ke, self.topk)
            with self._timed("attention"):
                out = self.ops.prefill_attend(q[0], self.latent[i][slot, :p1], idx, attn.softmax_scale, attn.kv_lora)
            h = h + attn.project_out(out)[None]
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h[0]

    # ------------------------------------------------------------------------------- decode
    def _decode_eager(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        B = tokens.shape[0]
        pos = self.lengths[:B].long()
        lengths = self.lengths[:B] + 1
        rows = torch.arange(B, device=self.device)
        ctx = self._ctx(pos)
        h = model.model.embed_tokens(tokens)[None]  # [1, B, hidden]: the B new tokens side by side
        idx = None
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            qr, q, kv = attn.latents(x, ctx)
            self.latent[i][rows, pos] = kv[0]
            if self.pattern.is_full(i):
                with self._timed("indexer"):
                    iq, iw, ik = attn.indexer.project(x, qr, ctx)
                    self.index_k[i][rows, pos] = ik[0]
                    idx = self.ops.decode_select(iq[0], iw[0] * attn.indexer.softmax_scale, self.index_k[i][:B],
                                                 lengths, self.topk)
            with self._timed("attention"):
                out = self.ops.decode_attend(q[0], self.latent[i][:B], idx, attn.softmax_scale, attn.kv_lora)
            h = h + attn.project_out(out)[None]
            hn = layer.post_attention_layernorm(h)
            h = h + (self.static_moe[i](hn) if i in self.static_moe else layer.mlp(hn))
        self.lengths[:B] += 1
        return model.head(h)[0]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step for requests 0..B-1 (token ids [B]); returns logits [B, V]."""
        B = tokens.shape[0]
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"decode batch {B} outside [1, {self.max_batch}]")
        tokens = tokens.to(self.device)
        if not self.cuda_graphs or self.timer is not None:
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


__all__ = ["Engine", "TorchOps", "TritonOps", "StaticMoE", "sample", "CacheSpec"]
