"""Why a task sample fails: did each layer's selection keep the tokens the answer must be copied from, and
does the model rank the answer first when it is given?

At the row that predicts the first answer token (the prompt's last), each layer attends only to its top-k
(a Shared layer to the nearest Full layer's). The **answer recall** of a layer is the share of the
answer's own tokens in the prompt (the needle's value, everywhere the needle writes it) that its selection
holds; the **needle recall** the same for the whole inserted needle. Teacher-forced on the target, the
**token accuracy** is the share of the target's tokens ranked first (and whether the first one is: the
step that has to find the needle; the later ones can copy from the answer's own start), and the NLL
their mean loss. On this package's model the same rows are also read with dense attention (every layer
attends to all it sees), which is what the selections approximate. A sample whose selections keep the
answer but whose model does not rank it first failed at copying; one whose selections dropped it, while
dense attention answers, failed at selection, which is also what sharing can cause.
"""

from __future__ import annotations

import torch

from ..evals.tasks import Sample, token_span
from ..pattern import Pattern
from ..runner import LayerRunner, LayerState, NativeRunner


def answer_sources(sample: Sample, tokenizer, offsets: list[tuple[int, int]] | None = None
                   ) -> tuple[list[int], list[int]]:
    """(the prompt tokens of the first answer wherever a needle writes it out, every needle's tokens), from
    the prompt's token ``offsets`` (encoded here when not given). The answer is searched for inside the
    needles only; a family whose answer no needle spells out (counted or aggregated answers) gets an empty
    first list."""
    offsets = offsets if offsets is not None else tokenizer.encode(sample.prompt).offsets
    needle_tok: list[int] = []
    answer_tok: list[int] = []
    answer = sample.answers[0] if sample.answers else ""
    for n in sample.needles:
        needle_tok += range(n.token_start, n.token_end)
        at = sample.prompt.find(answer, n.char_start, n.char_end) if answer else -1
        while at >= 0:  # every place the needle writes it (passkey's states the key twice)
            answer_tok += range(*token_span(offsets, at, at + len(answer)))
            at = sample.prompt.find(answer, at + len(answer), n.char_end)
    return sorted(set(answer_tok)), sorted(set(needle_tok))


@torch.no_grad()
def diagnose_sample(runner: LayerRunner, tokenizer, sample: Sample, pattern: Pattern) -> dict:
    """One forward of the prompt plus the first turn's target under ``pattern``: per layer that selects, the
    answer and needle recall at the answer row; the target's token accuracy and mean NLL."""
    enc = tokenizer.encode(sample.prompt)
    prompt = enc.ids
    target = tokenizer.encode(sample.targets[0]).ids
    ids = torch.tensor([prompt + target], dtype=torch.long)
    state, chosen = runner.run(runner.start(ids), pattern, 0, runner.num_layers, selections=True)
    row = len(prompt) - 1  # predicts the first answer token
    rows = slice(row, row + len(target))
    # the head on the target's rows only (the residual is [B, S, hidden] for both runners)
    logits = runner.logits(LayerState(state.hidden[:, rows], state.carry, state.extra))[0].float()
    gold = torch.tensor(target, device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, gold)
    out = {"first_token_correct": bool(logits[0].argmax() == gold[0]),
           "token_accuracy": float((logits.argmax(-1) == gold).float().mean()), "nll": float(nll)}
    if isinstance(runner, NativeRunner):  # the same rows with every layer attending to all it sees
        model = runner.model
        ctx = model.make_context(ids.shape[1], dense=True)
        h, _ = model.forward_layers(model.model.embed_tokens(ids.to(runner.device)), ctx, pattern)
        dense = model.head(h[:, rows])[0].float()  # the head on the target's rows only
        out.update(dense_first_token_correct=bool(dense[0].argmax() == gold[0]),
                   dense_token_accuracy=float((dense.argmax(-1) == gold).float().mean()))
    answer_tok, needle_tok = answer_sources(sample, tokenizer, enc.offsets)
    answer_recall, needle_recall = {}, {}
    for layer, sel in sorted(chosen.items()):
        if sel is None:
            continue
        kept = set(sel[0, row].tolist()) - {-1}
        if answer_tok:
            answer_recall[layer] = sum(t in kept for t in answer_tok) / len(answer_tok)
        if needle_tok:
            needle_recall[layer] = sum(t in kept for t in needle_tok) / len(needle_tok)
    return {**out, "answer_recall": answer_recall, "needle_recall": needle_recall, "answer_tokens": len(answer_tok),
            "needle_tokens": len(needle_tok)}


def summarise(diagnoses: list[dict]) -> dict:
    """Per layer, the mean answer and needle recall over samples (where the sample has them); the mean token
    accuracy and NLL; and how many samples had every layer keep the whole answer."""
    if not diagnoses:
        return {}
    out: dict = {"samples": len(diagnoses)}
    for key in ("first_token_correct", "token_accuracy", "nll", "dense_first_token_correct", "dense_token_accuracy"):
        if all(key in d for d in diagnoses):
            out[key] = sum(float(d[key]) for d in diagnoses) / len(diagnoses)
    for key in ("answer_recall", "needle_recall"):
        layers = sorted({int(k) for d in diagnoses for k in d[key]})
        per = {}
        for layer in layers:
            vals = [d[key][layer] if layer in d[key] else d[key].get(str(layer)) for d in diagnoses]
            vals = [v for v in vals if v is not None]
            per[layer] = sum(vals) / len(vals)
        out[key] = per
    with_answer = [d for d in diagnoses if d["answer_recall"]]
    out["answer_kept_everywhere"] = sum(min(d["answer_recall"].values()) == 1.0 for d in with_answer)
    out["samples_with_answer_in_prompt"] = len(with_answer)
    return out


__all__ = ["answer_sources", "diagnose_sample", "summarise"]
