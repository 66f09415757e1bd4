"""RoBERTa and XLM-RoBERTa: BERT's module layout; the classifier head is a two-layer block."""

from dataclasses import replace

from slimformer.arch.bert import SPEC as BERT

SPEC = replace(BERT, family="roberta", model_types=("roberta", "xlm-roberta"), head_inputs=("classifier.dense",))
