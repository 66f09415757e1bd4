"""Dissecting a model: which heads, layers and subnetworks matter, and how much attention attends.

* :func:`ablate` — Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?": the score with each
  head masked, with one head kept per layer, and without each layer's attention, FFN or whole layer.
* :func:`lottery` — Prasanna, Rogers & Rumshisky 2020, "When BERT Plays the Lottery, All Tickets Are Winning":
  s-pruning (heads + MLPs) and m-pruning (weight magnitude), then good / random / bad subnetworks re-fine-tuned
  from the pre-trained weights; survival heatmaps.
* :func:`stability` — the same paper's overlap (Jaccard) of surviving heads and MLPs across seeds and tasks,
  computed from the ``survivors.json`` of several lottery runs.
* :func:`papa` — Hassid et al. 2022, "How Much Does Attention Actually Attend?": attention replaced by constant
  patterns (the mean attention over a data sample) in none, half or all of the layers.
* :func:`loyalty` — Xu et al. 2021, "Beyond Preserved Accuracy": how often a compressed model predicts what its
  teacher predicts (label loyalty) and how close their distributions are (probability loyalty), on dev and AdvGLUE.
* :func:`bias` — the Equity Evaluation Corpus test (Kiritchenko & Mohammad 2018): gender and race gaps in a sentiment
  model's positive probability, per emotion, with confidence intervals and paired t-tests.
* :func:`gates` — Voita et al. 2019: head-only hard-concrete gates trained toward a rising share of heads removed;
  the order in which heads close, against Michel et al.'s importance.
* :func:`robustness` — accuracy on AdvGLUE (Wang et al. 2021) beside the clean one, and a PGD attack on the word
  embeddings (attack success rate per bound).

Each returns a small result dataclass with ``to_dict()`` and ``save(out_dir)`` (results.json, PNG plots and a
short report.md); ``slimformer analyze SUBCOMMAND`` runs them from the command line.
"""

from slimformer.analyze.ablate import AblateResult, ablate
from slimformer.analyze.bias import BiasResult, bias
from slimformer.analyze.common import AnalyzeError
from slimformer.analyze.gates import GatesResult, gates
from slimformer.analyze.lottery import LotteryResult, lottery
from slimformer.analyze.loyalty import LoyaltyResult, loyalty
from slimformer.analyze.magnitude import WeightMasks, magnitude_prune, magnitude_step, masked_weights
from slimformer.analyze.papa import AttentionPatterns, PapaResult, collect_patterns, constant_attention, papa
from slimformer.analyze.robustness import RobustnessResult, robustness
from slimformer.analyze.stability import StabilityResult, jaccard, stability
from slimformer.analyze.subnetworks import structured_subnetworks, weight_subnetworks
from slimformer.analyze.training import RetrainConfig

# The functions above share their names with the submodules that define them (the package attribute is the
# function); reach a submodule with importlib.import_module("slimformer.analyze.<name>").

__all__ = [
    "AblateResult",
    "AnalyzeError",
    "AttentionPatterns",
    "BiasResult",
    "GatesResult",
    "LotteryResult",
    "LoyaltyResult",
    "PapaResult",
    "RetrainConfig",
    "RobustnessResult",
    "StabilityResult",
    "WeightMasks",
    "ablate",
    "bias",
    "collect_patterns",
    "constant_attention",
    "gates",
    "jaccard",
    "lottery",
    "loyalty",
    "magnitude_prune",
    "magnitude_step",
    "masked_weights",
    "papa",
    "robustness",
    "stability",
    "structured_subnetworks",
    "weight_subnetworks",
]
