"""Negative evidence on prefixes: how many evaluated failures passed through each prefix of a completion, and the
proposal distribution that discounts what they cover.

A completion is a path in the tree of token prefixes. Every evaluated failure is evidence against each prefix on its
path: give each prefix's success rate a Beta prior worth `k` pseudo-counts and the posterior predictive weight of a
prefix that `n` failures went through is `k / (k + n)`. Sampling the generator with each next token's probability
multiplied by that weight (then renormalised) moves proposals out of the part of the tree the failures have covered
and into the generator's untried branches. A prefix with no failure keeps the generator's probability, so nothing
leaves the generator's support; a heavily tried branch is only discounted, never forbidden. Repeated over rounds with
a fixed generator, the visits of a node's children settle near the square root of the generator's probabilities (a
tempering of the tree, bounded): the evidence spreads the search without the drift of repeated self-distillation.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor


class PrefixEvidence:
    r"""Counts of evaluated failures per `(prompt, completion prefix)`, kept as a trie over token ids.

    A node is `[count, children]`: `count` failures went through the prefix ending at this node, `children` maps the
    next token id to its node.
    """

    def __init__(self):
        self._roots: dict[str, list] = {}
        self.failures = 0

    def add(self, prompt_text: str, completion_ids: list[int]) -> None:
        """Record one evaluated failure: every prefix of its completion (EOS included) gains one count."""
        node = self._roots.setdefault(prompt_text, [0, {}])
        node[0] += 1
        for token in completion_ids:
            node = node[1].setdefault(int(token), [0, {}])
            node[0] += 1
        self.failures += 1

    def root(self, prompt_text: str) -> list | None:
        return self._roots.get(prompt_text)

    def _walk(self, prompt_text: str, tokens: list[int]):
        """The nodes of the prefixes of `tokens`, shortest first, as far as failures went through them."""
        node = self._roots.get(prompt_text)
        for token in tokens:
            node = None if node is None else node[1].get(int(token))
            if node is None:
                return
            yield node

    def count(self, prompt_text: str, prefix: list[int]) -> int:
        """Failures whose completion starts with `prefix` (0 if none)."""
        if not prefix:
            root = self._roots.get(prompt_text)
            return 0 if root is None else root[0]
        nodes = list(self._walk(prompt_text, prefix))
        return nodes[-1][0] if len(nodes) == len(prefix) else 0

    def tried_depth(self, prompt_text: str, completion_ids: list[int]) -> int:
        """How many leading tokens of a completion lie on prefixes some failure went through."""
        return sum(1 for _ in self._walk(prompt_text, completion_ids))


class EvidenceLogitsProcessor(LogitsProcessor):
    r"""
    Adds `log(k / (k + n))` to the logit of every next token whose prefix `n` evaluated failures went through.

    Args:
        evidence (`PrefixEvidence`): the failure counts.
        prompt_texts (`list[str]`): the ledger key of each row's prompt.
        prompt_width (`int`): the (left-padded) prompt length: generated tokens start at this column.
        pseudo_count (`float`): `k`, the prior's weight per prefix (smaller discounts more).
    """

    def __init__(self, evidence: PrefixEvidence, prompt_texts: list[str], prompt_width: int, pseudo_count: float):
        self.width = prompt_width
        self.log_k = math.log(pseudo_count)
        self.k = pseudo_count
        self.nodes = [evidence.root(p) for p in prompt_texts]
        self.discounted = 0  # next-token choices that were discounted (a sign the evidence acts)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.width:  # follow each row down the trie by the token it just generated
            last = input_ids[:, -1].tolist()
            self.nodes = [None if node is None else node[1].get(token) for node, token in zip(self.nodes, last)]
        for i, node in enumerate(self.nodes):
            if node is None or not node[1]:
                continue
            tokens = list(node[1])
            counts = torch.tensor([node[1][t][0] for t in tokens], dtype=scores.dtype, device=scores.device)
            index = torch.tensor(tokens, device=scores.device)
            scores[i, index] += self.log_k - torch.log(self.k + counts)
            self.discounted += 1
        return scores


def tried_positions(targets: torch.Tensor, mask: torch.Tensor, prompt_texts: list[str], evidence: PrefixEvidence,
                    pseudo_count: float):
    r"""
    The completion positions whose prefix evaluated failures continued from, with what the evidence does there.

    Yields `(i, t, children, discount)` for row `i`, position `t`: the next tokens failures took after this prefix
    (`LongTensor`) and `log(k / (k + n))` of each (float64). Positions no failure went through are not yielded (the
    proposal distribution is the generator's there); nothing here is vocabulary-sized.
    """
    targets, mask = targets.tolist(), mask.bool().tolist()
    log_k = math.log(pseudo_count)
    tried = {}  # id(node) -> (its tried children, log(k / (k + n)) of each)
    for i, prompt in enumerate(prompt_texts):
        node = evidence.root(prompt)
        for t, token in enumerate(targets[i]):
            if node is None or not mask[i][t]:
                break
            if node[1]:
                if id(node) not in tried:
                    children = list(node[1])
                    counts = torch.tensor([node[1][v][0] for v in children], dtype=torch.float64)
                    tried[id(node)] = (torch.tensor(children), log_k - torch.log(pseudo_count + counts))
                yield (i, t, *tried[id(node)])
            node = node[1].get(token)


def discounted_log_probs(log_probs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, prompt_texts: list[str],
                         evidence: PrefixEvidence, pseudo_count: float) -> torch.Tensor:
    r"""
    The evidence-discounted proposal distribution `log pi(. | c, y_<t)` at every completion position of given
    completions: the generator's next-token log-probabilities plus `log(k / (k + n))` on each tried next token,
    renormalised over the vocabulary (what [`EvidenceLogitsProcessor`] samples from).

    Args:
        log_probs (`torch.Tensor` of shape `(N, C, V)`): the generator's next-token log-probabilities at each
            completion position.
        targets (`torch.Tensor` of shape `(N, C)`): the completion tokens (they say which prefix each position is).
        mask (`torch.Tensor` of shape `(N, C)`): 1 on completion tokens.
        prompt_texts (`list[str]`): each row's prompt key.
        evidence (`PrefixEvidence`), pseudo_count (`float`): as in [`EvidenceLogitsProcessor`].

    Returns:
        `torch.Tensor` of shape `(N, C, V)` (float64, on the CPU): positions outside `mask` hold the generator's own.
        At a large vocabulary use [`discounted_token_log_probs`] or [`discounted_top_k`], which keep no such tensor.
    """
    adjusted = log_probs.detach().double().cpu().clone()
    for i, t, children, discount in tried_positions(targets, mask, prompt_texts, evidence, pseudo_count):
        adjusted[i, t, children] += discount
        adjusted[i, t] -= torch.logsumexp(adjusted[i, t], 0)
    return adjusted


def discounted_token_log_probs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                               prompt_texts: list[str], evidence: PrefixEvidence,
                               pseudo_count: float) -> torch.Tensor:
    r"""
    `log pi` of each completion token under the evidence-discounted proposal distribution, from the generator's
    logits, with no second vocabulary-sized tensor: where failures continued from a prefix, the token gains its own
    `log(k / (k + n))` and every token loses `log Z`, with `Z = 1 - sum over the tried children v of
    q(v) (1 - k / (k + n_v))` (the discounted mass, which only the tried children's probabilities change).

    Args:
        logits (`torch.Tensor` of shape `(N, C, V)`): the generator's logits at each completion position.
        Other arguments as in [`discounted_log_probs`].

    Returns:
        `torch.Tensor` of shape `(N, C)` (float64, on the CPU): 0 outside `mask`.
    """
    lse = torch.logsumexp(logits.float(), -1)
    token = (torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1).float() - lse).double().cpu()
    for i, t, children, discount in tried_positions(targets, mask, prompt_texts, evidence, pseudo_count):
        child_log_q = (logits[i, t, children.to(logits.device)].float() - lse[i, t]).double().cpu()
        log_z = torch.log1p(-(child_log_q.exp() * -torch.expm1(discount)).sum())
        token[i, t] += discount[children == int(targets[i, t])].sum() - log_z
    return token * mask.cpu().double()


def discounted_top_k(log_probs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, prompt_texts: list[str],
                     evidence: PrefixEvidence, pseudo_count: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The `k` most probable next tokens of the proposal distribution at every completion position, and their `log pi`:
    the generator's own where no failure went through the prefix; where failures did, the discounted distribution
    (one position's row at a time), its tried children first (they are what the evidence moves mass off), then the
    most probable of the rest.

    Arguments as in [`discounted_log_probs`] (`pseudo_count` 0: no evidence); returns `(log_pi, ids)`, both
    `(N, C, k)`, on the device of `log_probs` (float32 and int64).
    """
    values, ids = log_probs.detach().topk(k, dim=-1)
    discount_tried_top_k(values, ids, lambda i, t: log_probs[i, t], targets, mask, prompt_texts, evidence,
                         pseudo_count)
    return values, ids


def discount_tried_top_k(values: torch.Tensor, ids: torch.Tensor, row_log_probs, targets: torch.Tensor,
                         mask: torch.Tensor, prompt_texts: list[str], evidence: PrefixEvidence, pseudo_count: float):
    r"""[`discounted_top_k`]'s evidence, in place: at each position failures went through, `values` and `ids` become
    the discounted distribution's tried children first, then the most probable of the rest. `row_log_probs(i, t)`
    gives the generator's next-token log-probabilities at row `i`, position `t` (whole, or made for that position
    alone when a micro-batch's logits are made in chunks)."""
    if not pseudo_count > 0:
        return
    k = values.shape[-1]
    for i, t, children, discount in tried_positions(targets, mask, prompt_texts, evidence, pseudo_count):
        children, discount = children[:k].to(values.device), discount[:k].to(values.device)
        row = row_log_probs(i, t).detach().double().clone()
        row[children] += discount
        row -= torch.logsumexp(row, 0)
        rest = row.clone()
        rest[children] = -math.inf
        top_rest = rest.topk(k - len(children)).indices
        ids[i, t] = torch.cat([children, top_rest])
        values[i, t] = row[ids[i, t]].to(values.dtype)


def proposal_log_probs(log_probs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, prompt_texts: list[str],
                       evidence: PrefixEvidence, pseudo_count: float) -> torch.Tensor:
    r"""
    Exact `log pi(y|c)` of completions under the evidence-discounted proposal distribution: at each position the
    generator's next-token probabilities times `k / (k + n)`, renormalised over the vocabulary.

    Arguments as in [`discounted_log_probs`]; returns a `(N,)` float64 tensor.
    """
    discounted = discounted_log_probs(log_probs, targets, mask, prompt_texts, evidence, pseudo_count)
    token = torch.gather(discounted, 2, targets.cpu().long().unsqueeze(-1)).squeeze(-1)
    return (token * mask.cpu().double()).sum(1)
