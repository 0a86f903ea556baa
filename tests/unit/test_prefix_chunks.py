"""prefix_chunk_num (algorithms.md 2.4): each generation's prefixes end inside its own tokens.

Ends are floor(L/2) + k * ceil((L - floor(L/2)) / K), k = 1..K, clamped to L, with L the generation's
own length (non-pad tokens), not the padded width of the batch.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch

from mnpo.generation.mixture import completion_texts
from mnpo.online.rollout import Rollout
from mnpo.online.trainer import OnlineNLHFTrainer
from mnpo.training.losses import prefix_chunk_online_ipo_loss, prefix_masks

PAD, EOS = 0, 99


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_prefix_masks_end_at_each_rows_own_length():
    mask = _mask([10, 7, 3, 0], width=12)
    ends = [m.sum(-1).tolist() for m in prefix_masks(mask, 2)]
    # L=10: 5 + k*3 -> 8, 10 | L=7: 3 + k*2 -> 5, 7 | L=3: 1 + k*1 -> 2, 3 | L=0: 0, 0
    assert ends == [[8, 5, 2, 0], [10, 7, 3, 0]]
    ends = [m.sum(-1).tolist() for m in prefix_masks(mask, 3)]
    # L=10: 5 + k*2 -> 7, 9, 11->10 | L=7: 3 + k*2 -> 5, 7, 9->7 | L=3: 1 + k*1 -> 2, 3, 4->3
    assert ends == [[7, 5, 2, 0], [9, 7, 3, 0], [10, 7, 3, 0]]
    for m in prefix_masks(mask, 3):  # prefixes: a run of ones from position 0, inside the row's tokens
        assert torch.equal(m, _mask(m.sum(-1).tolist(), 12))
    assert torch.equal(prefix_masks(mask, 1)[0], mask)


class _Tokenizer:
    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == EOS))


def test_online_loss_judges_and_scores_each_generations_own_prefixes():
    # y has 16 tokens, y' has 8, both padded to width 16. With K = 2, y's prefixes end at 12, 16 and
    # y''s at 6, 8 (the padded width would have cut y' at 12, i.e. not at all).
    y = torch.tensor([list(range(11, 26)) + [EOS]])
    y_other = torch.tensor([list(range(31, 38)) + [EOS] + [PAD] * 8])
    masks = [_mask([16], 16), _mask([8], 16)]
    judged = []
    trainer = OnlineNLHFTrainer.__new__(OnlineNLHFTrainer)
    trainer.args = SimpleNamespace(alg="oipo2", normalize_logprobs=True, prefix_chunk_num=2, beta=0.1)
    trainer.tokenizer = _Tokenizer()
    trainer.sampler = SimpleNamespace(stop_ids=[EOS])
    trainer._metrics = defaultdict(list)
    # Per-token log-probs: y scores -1 everywhere; position t of y' scores -(t + 1), so the mean over
    # its first n tokens is -(n + 1) / 2.
    policy = [torch.full((1, 16), -1.0), -torch.arange(1.0, 17.0)[None, :]]
    reference = [torch.zeros(1, 16), torch.zeros(1, 16)]
    trainer._logps = lambda model, prompt_ids, completions, masks: (policy, reference)

    def judge(prompts, first, second):
        judged.append((first[0], second[0]))
        return torch.tensor([0.5])

    trainer._judge = judge
    texts = [completion_texts(trainer.tokenizer, y, masks[0]), completion_texts(trainer.tokenizer, y_other, masks[1])]
    batch = Rollout(["p"], [[1, 2]], [y, y_other], masks, texts)
    loss = trainer.compute_online_loss(None, batch)
    words = [" ".join(map(str, range(11, 23))), " ".join(map(str, range(11, 26)))]
    assert judged == [(words[0], "31 32 33 34 35 36"), (words[1], "31 32 33 34 35 36 37")]
    # Target P - 1/2 = 0, reference 0: loss per chunk = (ell(y) - ell(y'))^2 = (-1 + (n + 1) / 2)^2 with
    # n = 6, then 8 tokens of y'.
    assert torch.allclose(loss, torch.tensor(((-1 + 3.5) ** 2 + (-1 + 4.5) ** 2) / 2))


def test_prefix_chunk_loss_by_hand():
    # One prompt, K = 2 chunks. Per-token log-probs: y = [-1, -2, -3, -4], y' = [-2, -2, -2, -2] (all 4 tokens
    # real); the reference scores 0 except y's last token (-1).
    policy = (torch.tensor([[-1.0, -2.0, -3.0, -4.0]]), torch.full((1, 4), -2.0))
    reference = (torch.tensor([[0.0, 0.0, 0.0, -1.0]]), torch.zeros(1, 4))
    full = _mask([4], 4)
    chunks = list(zip(prefix_masks(full, 2), prefix_masks(full, 2)))  # ends 3, 4 for both
    targets = [torch.tensor([0.1]), torch.tensor([-0.2])]
    beta = 0.5
    # mean: chunk 1: ell(y) = -2, ell(y') = -2, ref 0, 0 -> (0 - 0.1 / 0.5)^2 = 0.04
    #       chunk 2: ell(y) = -2.5, ell(y') = -2, ell_ref(y) = -0.25 -> (-0.5 + 0.25 + 0.4)^2 = 0.0225
    loss = prefix_chunk_online_ipo_loss(policy, reference, chunks, targets, beta=beta)
    assert torch.allclose(loss, torch.tensor([(0.04 + 0.0225) / 2]))
    # sum: chunk 1: -6 - (-6) - 0.2 -> 0.04; chunk 2: (-10 + 8) - (-1) + 0.4 = -0.6 -> 0.36
    loss = prefix_chunk_online_ipo_loss(policy, reference, chunks, targets, beta=beta, reduction="sum")
    assert torch.allclose(loss, torch.tensor([(0.04 + 0.36) / 2]))
    # One chunk (K = 1) of the whole completions is the plain online IPO loss.
    one = prefix_chunk_online_ipo_loss(policy, reference, [(full, full)], targets[1:], beta=beta)
    assert torch.allclose(one, torch.tensor([0.0225]))
