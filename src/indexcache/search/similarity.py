"""The similarity-based baseline of the paper's Appendix C, and its exact dynamic programme.

S[i, j] (i > j) is the cosine similarity between layer i's core-attention output with its own
indices and with layer j's indices, both on the original (all-Full) model's inputs to layer i,
averaged over the queries that see more than ``index_topk`` tokens (for the others the two coincide).
For a number M of Full layers the DP finds the pattern that maximises the sum over Shared layers of
S[l, source(l)], the tail after the last Full layer included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SearchError
from ..pattern import FULL, SHARED, Pattern
from ..runner import NativeRunner, as_runner


@torch.no_grad()
def similarity_matrix(runner: NativeRunner, batches: Sequence[torch.Tensor], progress: bool = True) -> torch.Tensor:
    """Lower-triangular [N, N] matrix (1 on the diagonal, 0 above): one all-Full pass per batch through the
    layer runner, with every layer's attention re-run on each earlier layer's selection."""
    runner = as_runner(runner)
    cfg = runner.config
    n = runner.num_layers
    if len(runner.indexer_layers) != n:
        raise SearchError("the similarity baseline needs an indexer on every layer (an all-Full model)")
    full = Pattern.all_full(n)
    sims = torch.zeros(n, n, dtype=torch.float64)
    count = 0
    for ids in tqdm(batches, desc="similarity", unit="batch", disable=not progress, leave=False):
        S = ids.shape[1]
        far = torch.arange(S, device=runner.device) >= cfg.index_topk  # queries that see more than index_topk tokens
        if not far.any():
            raise SearchError(f"sequences of {S} tokens are not longer than index_topk={cfg.index_topk}")
        state = runner.start(ids)
        history: list[torch.Tensor] = []
        for i in range(n):
            own, (ref, *others) = runner.attention_outputs(state, i, history)
            for j, other in enumerate(others):
                sims[i, j] += float(F.cosine_similarity(ref[:, far], other[:, far], dim=-1).sum())  # on the host
            history.append(own)
            state, _ = runner.run(state, full, i, i + 1)
        count += int(far.sum()) * ids.shape[0]
    sims /= count
    sims += torch.eye(n, dtype=torch.float64)
    return sims


def similarity_score(sims: torch.Tensor, pattern: Pattern) -> float:
    return float(sum(sims[i, pattern.source_layer(i)] for i in pattern.shared_layers))


def similarity_dp(sims: torch.Tensor, num_full: int, forced_full: Sequence[int] = ()) -> tuple[Pattern, float]:
    """The pattern with ``num_full`` Full layers (layer 0 and ``forced_full`` among them) maximising
    the summed similarity of Shared layers to their source; exact O(N^2 M) DP."""
    s = sims.tolist()
    n = len(s)
    forced = sorted({0, *forced_full})
    if not len(forced) <= num_full <= n:
        raise SearchError(f"num_full must be between {len(forced)} and {n}, got {num_full}")
    # block[j][i]: similarity of layers j+1 .. i-1 sharing layer j's indices (i = next Full or n)
    block = [[0.0] * (n + 1) for _ in range(n)]
    for j in range(n):
        acc = 0.0
        for i in range(j + 1, n + 1):
            block[j][i] = acc
            if i < n:
                acc += s[i][j]
    is_forced = [False] * (n + 1)
    for f in forced:
        is_forced[f] = True
    neg = float("-inf")
    # dp[m][i]: best score of layers 0..i-1 with m Full layers, the last of them at i
    dp = [[neg] * n for _ in range(num_full + 1)]
    back = [[-1] * n for _ in range(num_full + 1)]
    dp[1][0] = 0.0
    for m in range(2, num_full + 1):
        for i in range(1, n):
            for j in range(i - 1, -1, -1):
                if dp[m - 1][j] > neg and dp[m - 1][j] + block[j][i] > dp[m][i]:
                    dp[m][i], back[m][i] = dp[m - 1][j] + block[j][i], j
                if is_forced[j]:
                    break  # a forced Full layer cannot lie strictly inside a block
    best, last = neg, -1
    for i in range(n):
        if dp[num_full][i] == neg or any(is_forced[k] for k in range(i + 1, n)):
            continue
        total = dp[num_full][i] + block[i][n]
        if total > best:
            best, last = total, i
    if last < 0:
        raise SearchError("no pattern satisfies the forced-Full layers with that many Full layers")
    chars = [SHARED] * n
    m, i = num_full, last
    while i >= 0:
        chars[i] = FULL
        i, m = back[m][i], m - 1
    return Pattern("".join(chars), origin=f"similarity DP, {num_full} Full"), best
