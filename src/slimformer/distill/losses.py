"""Distillation losses: logits (Hinton et al. 2015), sentence embeddings (Reimers & Gurevych 2020), hidden states and
attention distributions (TinyBERT, Jiao et al. 2020; attention as distributions compared with KL as in MiniLM,
Wang et al. 2020).

Every loss only looks at real tokens: padded positions are masked out with the attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def logit_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float, regression: bool
) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened class distributions, times T^2 so that its gradients
    keep their size as T changes (Hinton et al. 2015); for regression, the mean squared error to the teacher's
    predictions."""
    if regression:
        return F.mse_loss(student_logits.squeeze(-1).float(), teacher_logits.squeeze(-1).float())
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def embedding_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """The squared distance between the student's and the teacher's sentence embeddings, averaged over sentences:
    the MSE objective of sentence-transformers' model distillation (Reimers & Gurevych 2020, "Making Monolingual
    Sentence Embeddings Multilingual using Knowledge Distillation"), summed over dimensions instead of averaged so
    that its size does not shrink with the width (for unit vectors it is 2 - 2 cos)."""
    difference = student_embeddings.float() - teacher_embeddings.float()
    return difference.pow(2).sum(dim=-1).mean()


def hidden_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]],
    attention_mask: torch.Tensor,
    projections: nn.ModuleList | None = None,
) -> torch.Tensor:
    """Mean squared error between mapped hidden states over real tokens, summed over ``pairs`` of
    (student index, teacher index) into the models' ``hidden_states`` tuples (0 = embeddings). A student narrower
    than its teacher is projected up by ``projections[k]`` for pair k (TinyBERT's learned W_h)."""
    valid = attention_mask.bool()
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for k, (s, t) in enumerate(pairs):
        student = student_hidden[s][valid].float()
        if projections is not None:
            student = projections[k](student)
        total = total + F.mse_loss(student, teacher_hidden[t][valid].float())
    return total


def attention_log_probs(
    query: torch.Tensor, key: torch.Tensor, num_heads: int, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Per-head attention log-probabilities ``[batch, heads, queries, keys]`` from the outputs of the query and
    key projections (``[batch, seq, heads * head_size]``), with padded keys excluded. Recomputing them here
    (instead of asking the model for its attention weights) works with any attention kernel and sees no
    attention dropout."""
    batch, seq, width = query.shape
    head_size = width // num_heads
    q = query.view(batch, seq, num_heads, head_size).transpose(1, 2).float()
    k = key.view(batch, seq, num_heads, head_size).transpose(1, 2).float()
    scores = q @ k.transpose(-1, -2) * head_size**-0.5
    pad = ~attention_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(pad, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def attention_loss(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions of matching heads, averaged over heads and real
    query positions. Both inputs are ``[batch, heads, queries, keys]`` with the same number of heads."""
    valid_keys = attention_mask.bool()[:, None, None, :]
    teacher_probs = teacher_log_probs.exp()
    kl = (teacher_probs * (teacher_log_probs - student_log_probs)).masked_fill(~valid_keys, 0.0).sum(-1)
    valid_queries = attention_mask.bool()[:, None, :].expand_as(kl)
    return kl[valid_queries].mean()
