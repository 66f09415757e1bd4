"""Perturbations of a model's input that the robustness analysis measures and robust training defends against.

* :func:`pgd_perturbation`: projected gradient ascent on the word embeddings (Madry et al. 2018, as FreeLB, Zhu et
  al. 2020, applies it to text): every token's embedding moves by at most ``radius`` (an L2 ball per token).
* :func:`gender_swap_map` / :func:`swap_tokens`: counterfactual inputs with gendered words exchanged (he <-> she,
  brother <-> sister, ...), done on token ids so that a batch is swapped without re-tokenizing; the word pairs are
  a short list kept here (after the counterfactual data augmentation of Lu et al. 2020 and Webster et al. 2020),
  and so are pairs of common first names, since a name carries gender as much as a pronoun does (the name-based
  counterfactual substitution of Maudslay et al. 2019, "It's All in the Name"); those are opt-in: swapping them
  while pruning SST-2 did not shrink the EEC's gap on its own names (bench/results/fairness.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

GENDER_PAIRS = (
    ("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"), ("men", "women"),
    ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"), ("son", "daughter"),
    ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"),
    ("husbands", "wives"), ("uncle", "aunt"), ("uncles", "aunts"), ("nephew", "niece"), ("king", "queen"),
    ("kings", "queens"), ("prince", "princess"), ("mr", "mrs"), ("sir", "madam"), ("gentleman", "lady"),
    ("gentlemen", "ladies"), ("boyfriend", "girlfriend"), ("dad", "mom"), ("daddy", "mommy"),
    ("grandfather", "grandmother"), ("grandson", "granddaughter"), ("male", "female"), ("masculine", "feminine"),
    ("actor", "actress"), ("actors", "actresses"), ("waiter", "waitress"), ("hero", "heroine"), ("groom", "bride"),
    ("monk", "nun"), ("stepfather", "stepmother"), ("businessman", "businesswoman"), ("chairman", "chairwoman"),
    ("spokesman", "spokeswoman"), ("guy", "gal"), ("lad", "lass"), ("papa", "mama"),
)  # fmt: skip

# Frequent US first names (male, female), paired in frequency order. None is a name of the Equity Evaluation
# Corpus, which scores the result (a test checks it); names that are also common words (mark, will, grace, ...)
# are left out, since swapping them would change meanings.
NAME_PAIRS = (
    ("john", "mary"), ("james", "patricia"), ("robert", "jennifer"), ("michael", "linda"), ("william", "elizabeth"),
    ("david", "barbara"), ("richard", "susan"), ("joseph", "jessica"), ("thomas", "sarah"), ("charles", "karen"),
    ("christopher", "lisa"), ("daniel", "betty"), ("matthew", "margaret"), ("anthony", "sandra"),
    ("kenneth", "deborah"), ("donald", "kimberly"), ("steven", "emily"), ("paul", "donna"), ("kevin", "michelle"),
    ("brian", "sharon"), ("george", "dorothy"), ("edward", "amy"), ("ronald", "angela"), ("timothy", "helen"),
    ("jason", "anna"), ("jeffrey", "brenda"), ("gary", "pamela"), ("eric", "nicole"), ("jonathan", "samantha"),
    ("stephen", "katherine"), ("larry", "emma"), ("scott", "rachel"), ("peter", "rebecca"), ("henry", "julia"),
    ("samuel", "laura"), ("benjamin", "victoria"), ("gregory", "christine"), ("patrick", "catherine"),
    ("raymond", "virginia"), ("dennis", "diane"), ("walter", "alice"), ("arthur", "judith"), ("albert", "jean"),
    ("tyler", "megan"), ("aaron", "olivia"), ("kyle", "sophia"), ("jacob", "julie"), ("nathan", "natalie"),
)  # fmt: skip


def counterfactual_pairs(names: bool = False) -> tuple[tuple[str, str], ...]:
    """The pairs a counterfactual swaps: the gendered words, and the first names too when ``names``."""
    return GENDER_PAIRS + NAME_PAIRS if names else GENDER_PAIRS


def gender_swap_map(tokenizer, pairs=GENDER_PAIRS) -> dict[int, int]:
    """Token id -> the id of its counterpart, for every pair whose two words are single tokens (in lower case,
    capitalised, and with a leading space for byte-level vocabularies). A word listed twice ("her") keeps its
    first counterpart."""
    mapping: dict[int, int] = {}
    for first, second in pairs:
        for a, b in ((first, second), (first.capitalize(), second.capitalize())):
            for prefix in ("", " "):
                ids_a = tokenizer(prefix + a, add_special_tokens=False)["input_ids"]
                ids_b = tokenizer(prefix + b, add_special_tokens=False)["input_ids"]
                if len(ids_a) == 1 and len(ids_b) == 1 and ids_a != ids_b:
                    mapping.setdefault(ids_a[0], ids_b[0])
                    mapping.setdefault(ids_b[0], ids_a[0])
    return mapping


def swap_table(mapping: dict[int, int], vocab_size: int) -> torch.Tensor:
    """A lookup table (id -> swapped id) for :func:`swap_tokens`."""
    table = torch.arange(vocab_size)
    for source, target in mapping.items():
        if source < vocab_size and target < vocab_size:
            table[source] = target
    return table


def swap_tokens(input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table.to(input_ids.device)[input_ids]


def embedding_scale(model: PreTrainedModel) -> float:
    """The mean L2 norm of the model's word-embedding vectors (the unit of the perturbation bounds)."""
    weight = model.get_input_embeddings().weight.detach()
    return float(weight.float().norm(dim=1).mean())


@contextmanager
def embedding_offset(model: PreTrainedModel, delta: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``delta`` (batch x tokens x width, zeroed where ``mask`` is 0) is added to the word
    embeddings of every forward pass."""
    weights = mask.unsqueeze(-1).to(delta.dtype)

    def add(module, args, output):
        return output + delta * weights

    handle = model.get_input_embeddings().register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def pgd_perturbation(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], labels: torch.Tensor, *, radius: float, steps: int
) -> torch.Tensor:
    """The word-embedding perturbation (within ``radius`` per token) that ``steps`` normalised gradient-ascent
    steps on the cross-entropy find; no parameter gradients are accumulated."""
    embeddings = model.get_input_embeddings()
    shape = (*batch["input_ids"].shape, embeddings.embedding_dim)
    delta = torch.zeros(shape, device=batch["input_ids"].device, requires_grad=True)
    step_size = 2.5 * radius / steps  # Madry et al.'s rule of thumb: the path can cross the ball and come back
    with embedding_offset(model, delta, batch["attention_mask"]):
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta += step_size * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                delta *= torch.clamp(radius / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12), max=1.0)
    return delta.detach()
