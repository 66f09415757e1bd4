"""Does a sentiment model score the same sentence differently when only a person's gender or race changes? The
Equity Evaluation Corpus test (Kiritchenko & Mohammad 2018, "Examining Gender and Race Bias in Two Hundred
Sentiment Analysis Systems").

The EEC has 8,640 sentences from 11 templates ("<person> feels <emotion word>.") filled with person words (names
typical of African-American or European-American people, and gendered noun phrases such as "my sister" / "my
brother") and emotion words (anger, fear, joy, sadness, or none). For every template and emotion word, the
model's mean probability of the positive class over the female sentences is compared with that over the male
ones (and African-American names with European ones, over the sentences with names): one paired difference per
template x emotion word. Reported, overall and per emotion: the mean difference (female - male, African-American -
European) in points of probability, its 95% confidence interval and the two-sided paired t-test's p-value, as the
EEC paper does; and a plot of the per-emotion gaps.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from slimformer.analyze.common import REPORT_FILE, AnalyzeError, load_analysis_model, model_name, results_folder
from slimformer.errors import DataFileError
from slimformer.models import LoadedModel
from slimformer.tasks import get_task_spec
from slimformer.tasks.data import find_shared_file

EEC_DIR_ENV = "EEC_DIR"
EEC_FILE = "Equity-Evaluation-Corpus.csv"
_COLUMNS = ("Sentence", "Template", "Person", "Gender", "Race", "Emotion", "Emotion word")
# (column, group compared, reference group)
COMPARISONS = {"gender": ("Gender", "female", "male"), "race": ("Race", "African-American", "European")}


def find_eec_file(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The EEC CSV: ``path`` itself, in it, in ``eec/`` beside the GLUE folder (the default data layout) or in
    ``$EEC_DIR``."""
    return find_shared_file(path, EEC_DIR_ENV, "eec", EEC_FILE)


def read_eec(path: str | os.PathLike[str] | None = None) -> list[dict[str, str]]:
    found = find_eec_file(path)
    if found is None:
        raise AnalyzeError(
            f"The Equity Evaluation Corpus ({EEC_FILE}) was not found: pass --eec-file, put it in eec/ beside the "
            f"GLUE folder, or set ${EEC_DIR_ENV}."
        )
    with open(found, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataFileError(found, f"is not the EEC: it lacks the column(s) {', '.join(missing)}")
        rows = list(reader)
    if not rows:
        raise DataFileError(found, "has no sentences")
    return rows


def paired_gaps(rows: list[dict[str, str]], scores: np.ndarray, column: str, group: str, reference: str):
    """Per (template, emotion word) cell: mean score of ``group`` minus that of ``reference``; and each cell's
    emotion."""
    sums: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: {group: [], reference: []})
    emotions: dict[tuple[str, str], str] = {}
    for row, score in zip(rows, scores, strict=True):
        value = row[column]
        if value in (group, reference):
            key = (row["Template"], row["Emotion word"])
            sums[key][value].append(float(score))
            emotions[key] = row["Emotion"] or "none"
    cells = [(key, np.mean(v[group]) - np.mean(v[reference])) for key, v in sums.items() if v[group] and v[reference]]
    return np.asarray([gap for _, gap in cells]), [emotions[key] for key, _ in cells]


def gap_statistics(gaps: np.ndarray) -> dict[str, Any]:
    """Mean gap, its 95% t-interval and the paired t-test's p-value (the gap is a paired difference)."""
    n = len(gaps)
    if n < 2:
        return {"mean": float(gaps.mean()) if n else None, "ci95": None, "p_value": None, "pairs": n}
    mean, sem = float(gaps.mean()), float(gaps.std(ddof=1) / np.sqrt(n))
    half = float(stats.t.ppf(0.975, n - 1) * sem)
    p_value = float(stats.ttest_1samp(gaps, 0.0).pvalue) if sem > 0 else (1.0 if mean == 0 else 0.0)
    return {"mean": mean, "ci95": [mean - half, mean + half], "p_value": p_value, "pairs": n}


@dataclass
class BiasResult:
    """Gender and race gaps in the positive-class probability, overall and per emotion."""

    model: str
    positive_label: str
    sentences: int
    gaps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": "bias", **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        out = results_folder(out_dir, self.to_dict())
        (out / REPORT_FILE).write_text(self.markdown())
        self.plot(out / "bias.png")
        return out

    def markdown(self) -> str:
        lines = [
            f"# Gender and race gaps of `{self.model}` on the Equity Evaluation Corpus",
            "",
            f"Mean difference in P({self.positive_label}) between sentences that differ only in the person, in points "
            "(female - male; African-American - European names), per template x emotion word, with 95% CIs and "
            f"paired t-test p-values; {self.sentences} sentences.",
            "",
            "| comparison | emotion | gap (points) | 95% CI | p | pairs |",
            "|---|---|---|---|---|---|",
        ]
        for comparison, by_emotion in self.gaps.items():
            for emotion, entry in by_emotion.items():
                ci = entry["ci95"]
                interval = f"[{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]" if ci else ""
                p_value = "" if entry["p_value"] is None else f"{entry['p_value']:.3g}"
                lines.append(
                    f"| {comparison} | {emotion} | {entry['mean'] * 100:+.2f} | {interval} | {p_value} | "
                    f"{entry['pairs']} |"
                )
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> Path:
        from matplotlib.figure import Figure

        from slimformer.plots import save_png_atomic

        figure = Figure(figsize=(7, 3.5))
        for index, (comparison, by_emotion) in enumerate(self.gaps.items()):
            axes = figure.add_subplot(1, len(self.gaps), index + 1)
            names = list(by_emotion)
            means = [by_emotion[n]["mean"] * 100 for n in names]
            errors = [
                (by_emotion[n]["mean"] - by_emotion[n]["ci95"][0]) * 100 if by_emotion[n]["ci95"] else 0 for n in names
            ]
            axes.bar(range(len(names)), means, yerr=errors, capsize=3, color="tab:purple")
            axes.axhline(0, color="black", linewidth=0.8)
            axes.set_xticks(range(len(names)), names, rotation=30)
            axes.set_title(f"{comparison} gap")
            axes.set_ylabel("points of P(positive)")
        figure.tight_layout()
        return save_png_atomic(figure, path)


def bias(
    model: str | os.PathLike[str] | LoadedModel,
    *,
    eec_file: str | os.PathLike[str] | None = None,
    task: str = "sst2",
    positive_label: str | int = "positive",
    max_length: int = 64,
    batch_size: int = 64,
    embedding: bool | None = None,
) -> BiasResult | AssociationResult:
    """The EEC gender and race gaps of a sentiment classifier fine-tuned on ``task`` (default SST-2); the positive
    class is ``positive_label`` (a label name of the task, or its index). For a sentence-embedding model
    (``embedding``; by default when the folder was saved as one) the association test of :func:`embedding_bias`."""
    import torch
    from datasets import Dataset

    from slimformer.embedding import is_sentence_embedder
    from slimformer.evaluation import predict
    from slimformer.models import resolve_model_source, saved_as_embedder

    if embedding is None:
        if isinstance(model, LoadedModel):
            embedding = is_sentence_embedder(model.model)
        else:
            source, local = resolve_model_source(str(model))
            embedding = local and saved_as_embedder(source)
    if embedding:
        return embedding_bias(model, eec_file=eec_file, max_length=max_length, batch_size=batch_size)

    spec = get_task_spec(task)
    if spec.is_regression or spec.is_embedding:
        raise AnalyzeError(f"The EEC test needs a sentiment classifier; {spec.name} does not have classes.")
    names = [str(n) for n in (spec.label_names or [])]
    if isinstance(positive_label, int) or str(positive_label).isdigit():
        index = int(positive_label)
    elif str(positive_label) in names:
        index = names.index(str(positive_label))
    else:
        raise AnalyzeError(f"{positive_label!r} is not one of {spec.name}'s labels ({', '.join(names)}).")
    if not 0 <= index < spec.num_labels:
        raise AnalyzeError(f"Label index {index} is outside {spec.name}'s {spec.num_labels} classes.")
    rows = read_eec(eec_file)
    loaded = load_analysis_model(model, spec, require_head=True)
    encoded = loaded.tokenizer([r["Sentence"] for r in rows], truncation=True, max_length=max_length)
    logits = predict(loaded.model, loaded.tokenizer, Dataset.from_dict(dict(encoded)), batch_size=batch_size,
                     progress=False)  # fmt: skip
    probability = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)[:, index].numpy()
    result = BiasResult(
        model=model_name(model), positive_label=names[index] if names else str(index), sentences=len(rows)
    )
    for comparison, (column, group, reference) in COMPARISONS.items():
        gaps, emotions = paired_gaps(rows, probability, column, group, reference)
        entry = {"all": gap_statistics(gaps)}
        for emotion in sorted(set(emotions)):
            entry[emotion] = gap_statistics(gaps[[e == emotion for e in emotions]])
        result.gaps[comparison] = entry
    return result


# ------------------------------------------------------------------------------------------------ embedding models

NEUTRAL_PERSON = "someone"


def association_sets(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """SEAT-style sentence sets (May et al. 2019) built from the EEC's own templates: targets are the sentences of
    the four emotion-free templates with female / male persons and with African-American / European names;
    attributes are the emotion templates filled with a neutral person ("someone"), joy words as pleasant and
    anger, fear and sadness words as unpleasant."""
    sets: dict[str, list[str]] = defaultdict(list)
    attributes: dict[str, set[str]] = {"pleasant": set(), "unpleasant": set()}
    for row in rows:
        if not row["Emotion"]:
            sets[row["Gender"]].append(row["Sentence"])
            if row["Race"]:
                sets[row["Race"]].append(row["Sentence"])
            continue
        filled = row["Template"].replace("<person subject>", NEUTRAL_PERSON).replace("<person object>", NEUTRAL_PERSON)
        filled = filled.replace("<emotion word>", row["Emotion word"])
        filled = filled.replace("<emotional situation word>", row["Emotion word"]).replace(
            "himself/herself", "themselves"
        )
        filled = filled[0].upper() + filled[1:]
        attributes["pleasant" if row["Emotion"] == "joy" else "unpleasant"].add(filled)
    return {**{k: list(dict.fromkeys(v)) for k, v in sets.items()}, **{k: sorted(v) for k, v in attributes.items()}}


def association_test(
    x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, *, permutations: int = 10000, seed: int = 0
) -> dict[str, float]:
    """WEAT / SEAT effect size (Caliskan et al. 2017) of targets ``x`` vs ``y`` on attributes ``a`` vs ``b``
    (rows are unit-normalised embeddings) and the one-sided permutation p-value of the test statistic."""

    def unit(m: np.ndarray) -> np.ndarray:
        return m / np.linalg.norm(m, axis=1, keepdims=True).clip(1e-12)

    x, y, a, b = unit(x), unit(y), unit(a), unit(b)
    targets = np.concatenate([x, y])
    association = (targets @ a.T).mean(1) - (targets @ b.T).mean(1)
    n = len(x)
    statistic = association[:n].sum() - association[n:].sum()
    effect = (association[:n].mean() - association[n:].mean()) / association.std(ddof=1)
    rng = np.random.default_rng(seed)
    total = association.sum()
    exceed = 0
    for _ in range(permutations):
        chosen = rng.permutation(len(association))[:n]
        permuted = 2 * association[chosen].sum() - total
        exceed += permuted >= statistic
    return {
        "effect_size": float(effect),
        "p_value": float((exceed + 1) / (permutations + 1)),
        "targets": len(association),
    }


@dataclass
class AssociationResult:
    """SEAT-style effect sizes and permutation p-values of a sentence-embedding model."""

    model: str
    tests: dict[str, dict[str, float]] = field(default_factory=dict)
    sets: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": "bias", "kind": "sentence-embedding", "model": self.model, "seat": self.tests,
                "sets": self.sets}  # fmt: skip

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        out = results_folder(out_dir, self.to_dict())
        (out / REPORT_FILE).write_text(self.markdown())
        return out

    def markdown(self) -> str:
        lines = [
            f"# Sentence-level association test of `{self.model}` (EEC templates)",
            "",
            "Effect size (Caliskan et al. 2017, on sentences as SEAT does): how much closer the first group's "
            "sentences sit to pleasant than to unpleasant sentences, in pooled standard deviations; one-sided "
            "permutation p.",
            "",
            "| comparison | effect size | p |",
            "|---|---|---|",
        ]
        names = {"gender": "female vs male", "race": "African-American vs European names"}
        for comparison, test in self.tests.items():
            lines.append(
                f"| {names.get(comparison, comparison)} | {test['effect_size']:+.3f} | {test['p_value']:.3g} |"
            )
        return "\n".join(lines) + "\n"


def embedding_bias(
    model: str | os.PathLike[str] | LoadedModel,
    *,
    eec_file: str | os.PathLike[str] | None = None,
    permutations: int = 10000,
    max_length: int = 64,
    batch_size: int = 64,
    seed: int = 0,
) -> AssociationResult:
    """SEAT-style association tests of a sentence-embedding model on sentence sets from the EEC templates: female
    vs male and African-American vs European names, on pleasant vs unpleasant (a positive effect size: the first
    group sits closer to the pleasant sentences)."""
    from slimformer.embedding import is_sentence_embedder
    from slimformer.evaluation import encode, text_batches
    from slimformer.models import load_model

    loaded = model if isinstance(model, LoadedModel) else load_model(model, "stsb-embed")
    if not is_sentence_embedder(loaded.model):
        raise AnalyzeError("The association test needs a sentence-embedding model.")
    sets = association_sets(read_eec(eec_file))

    def embed(texts: list[str]) -> np.ndarray:
        batches, order = text_batches(loaded.tokenizer, texts, max_length=max_length, batch_size=batch_size)
        return encode(loaded.model, batches, order)

    vectors = {name: embed(texts) for name, texts in sets.items()}
    result = AssociationResult(model=model_name(model), sets={name: len(texts) for name, texts in sets.items()})
    for comparison, (_, group, reference) in COMPARISONS.items():
        result.tests[comparison] = association_test(
            vectors[group], vectors[reference], vectors["pleasant"], vectors["unpleasant"],
            permutations=permutations, seed=seed,
        )  # fmt: skip
    return result
