"""Why budget pruning loses points on the 48-class article task (issue 18, item 4), tested with several calibration
samples: is it the Fisher estimate, the refit's ridge, the calibration data, or the limit of a layer-wise refit?

Same task and teacher as bench/many_class.py. Each diagnosis changes one thing and runs with calibration seeds 0, 1
and 2 by default (the table gives how many ran: the clearly-worse variants were left at one); the table gives the
mean accuracy change against the teacher and the spread over seeds:

- ``default``: the library's default, which for this many classes is the Fisher of the model's own predictive
  distribution, J^T (diag(p) - p p^T) J (slimformer.gradients.model_fisher_probe_loss; one Gaussian probe per
  example); every row marked ``empirical`` uses Kwon et al.'s Fisher of the labels' cross-entropy instead, the
  default before (those rows were measured then);
- ``fisher: temperature 2``: the Fisher's loss is the cross-entropy of logits / 2 (times 2), so that the
  training examples the converged teacher is sure of (mean top probability 0.996 on its training questions, 100%
  training accuracy) still give gradients;
- ``fisher: logit probe``: J^T J of the logits (all logit directions alike);
- ``units chosen by the refit``: each layer keeps as many heads and neurons as the Fisher search gives it, but
  the ones the least-squares refit can best do without go (``FlopsBudget(unit_choice="refit")``: structured
  OBS on the pruned model's own inputs, as in ZipLM) instead of the Fisher's rearranged choice;
- ``neuron Fisher x 2``: the neurons' Fisher doubled before the search (``neuron_weight=2``): more neurons and
  fewer heads kept at the same FLOPs (the facts a many-class task reads are thought to sit in FFN neurons);
- ``GN Fisher: 4 probes per example``: the calibration batches seen four times by the default (model) Fisher, each
  time with fresh probes: a less noisy estimate of the same Fisher (the refit is unchanged by the repeats);
- ``calibration: 6144 examples``: three times the default calibration sample (128 questions per class instead of
  43; short questions give the FFN refit few tokens per unknown);
- ``refit ridge x0.1`` / ``x10``: the least-squares refit's damping (default 1e-2 of the Gram's mean diagonal);
- ``calibration: + 1 masked copy``: the calibration sample followed by a copy of it with 15% of its tokens
  masked (the augmentation that helps distillation below), so that the Fisher and the refit also see inputs the
  teacher is less sure of;
- ``calibration on dev (oracle)``: the Fisher and the refit computed on the dev questions themselves, the ones
  scored: what better calibration data could at most buy (not a method: it sees the test set);
- ``refit tokens weighted by sensitivity``: the least-squares refit weighs each calibration token by the squared
  gradient of the Fisher's loss at its sub-layer output (``FlopsBudget(token_weighting=1)``; 0.5: half that,
  half uniform), so that the tokens the prediction depends on are reconstructed first;
- ``+ logit KD``: the default pruned model then distilled from the teacher for 2 epochs on the training questions
  (slimformer.distill, KL at temperature 2; what ``slimformer compress --recover kd`` runs); ``masked copies``:
  each training question also seen twice with 15% of its tokens masked (``--masked-copies 2``), the teacher's
  predictions on them as targets.

The Fisher and ridge diagnoses patch the library's loss / refit for the run (they are experiments, not options).
Writes ``bench/results/many_class_diagnosis.{json,md}``; rows already there are kept (``--redo`` runs them again).

    python bench/many_class_diagnosis.py [--diagnoses default,...] [--seeds 0,1,2] [--fractions 0.5,0.4]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import slimformer
import slimformer.budget.fisher as budget_fisher
import slimformer.budget.method as budget_method
import slimformer.gradients as gradients_module
from common import RESULTS, machine, markdown_table, teacher_summary, write_results
from many_class import RECIPE, TASK, load_data, task_files
from slimformer.distill.pipeline import DistillConfig
from slimformer.importance import importance_sample
from slimformer.train import TrainConfig
from teachers import build_teacher, teacher_dir

EMPIRICAL = {"fisher": "empirical"}
DIAGNOSES = {
    "default": {},
    "fisher: empirical (the default before)": EMPIRICAL,
    "fisher: temperature 2": {**EMPIRICAL, "fisher_loss": "temperature"},
    "fisher: logit probe": {**EMPIRICAL, "fisher_loss": "logit-probe"},
    "units chosen by the refit": {"unit_choice": "refit"},
    "units chosen by the refit (empirical Fisher)": {**EMPIRICAL, "unit_choice": "refit"},
    "neuron Fisher x 2": {"neuron_weight": 2.0},
    "GN Fisher: 4 probes per example": {"probes": 4},
    "calibration: 6144 examples (128 per class)": {"calibration_examples": 6144},
    "refit ridge x0.1": {**EMPIRICAL, "damping": 1e-3},
    "refit ridge x10": {**EMPIRICAL, "damping": 1e-1},
    "calibration on dev (oracle)": {**EMPIRICAL, "calibration": "dev"},
    "calibration: + 1 masked copy": {**EMPIRICAL, "masked_copies": 1},
    "refit tokens weighted by sensitivity (x1)": {"token_weighting": 1.0},
    "refit tokens weighted by sensitivity (x0.5)": {"token_weighting": 0.5},
    "+ logit KD (2 epochs)": {**EMPIRICAL, "kd_epochs": 2.0},
    "+ logit KD (2 epochs; 2 masked copies)": {**EMPIRICAL, "kd_epochs": 2.0, "masked_copies": 2},
}
MAX_LENGTH = 64
NAME = "many_class_diagnosis"


def probe_loss(logits: torch.Tensor, probe: torch.Tensor, reduction: str) -> torch.Tensor:
    total = (logits * probe).sum()
    return total if reduction == "sum" else total / logits.shape[0]


def fisher_loss(kind: str | None):
    """The empirical Fisher's loss replaced for the run (slimformer.gradients.task_loss is what gate_gradients
    calls)."""
    if kind is None:
        return nullcontext()
    generator = torch.Generator().manual_seed(0)

    def loss(logits, labels, regression, reduction="mean"):
        logits = logits.float()
        if kind == "temperature":  # x 2 keeps the gradients' scale comparable; the ranking does not depend on it
            return 2.0 * F.cross_entropy(logits / 2.0, labels.to(logits.device).long(), reduction=reduction)
        probe = torch.randn(logits.shape, generator=generator).to(logits)
        return probe_loss(logits, probe, reduction)

    return mock.patch.object(gradients_module, "task_loss", loss)


def refit_damping(damping: float | None):
    """The refit's ridge strength replaced for the run."""
    if damping is None:
        return nullcontext()
    patched = functools.partial(budget_method.reconstruct_weights, damping=damping)
    return mock.patch.object(budget_method, "reconstruct_weights", patched)


def calibration_copies(copies: int | None):
    """The budget pruner's calibration sample followed by ``copies`` copies of it with 15% of the tokens masked."""
    if not copies:
        return nullcontext()
    patched = functools.partial(importance_sample, masked_copies=copies)
    return mock.patch.object(budget_fisher, "importance_sample", patched)


def repeated_sample(times: int | None):
    """The calibration sample's batches repeated: each repeat draws its own probes, so the model Fisher averages
    ``times`` probes per example; the refit's solution is unchanged (its sums and ridge scale alike)."""
    if not times:
        return nullcontext()

    def patched(*args, **kwargs):
        sample = importance_sample(*args, **kwargs)
        sample.batches = list(sample.batches) * times
        return sample

    return mock.patch.object(budget_fisher, "importance_sample", patched)


def run(diagnosis: str, fraction: float, seed: int, data, dev_data) -> dict:
    settings = DIAGNOSES[diagnosis]
    config = slimformer.FlopsBudget(
        fraction,
        seed=seed,
        unit_choice=settings.get("unit_choice"),
        fisher=settings.get("fisher"),
        neuron_weight=settings.get("neuron_weight"),
        calibration_examples=settings.get("calibration_examples", 2048),
        token_weighting=settings.get("token_weighting", 0.0),
    )
    calibration = dev_data if settings.get("calibration") == "dev" else data
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with (
            fisher_loss(settings.get("fisher_loss")),
            refit_damping(settings.get("damping")),
            calibration_copies(settings.get("masked_copies") if "kd_epochs" not in settings else None),
            repeated_sample(settings.get("probes")),
        ):
            result = slimformer.prune(
                str(teacher_dir(TASK)), config, calibration, max_length=MAX_LENGTH, progress=False, out=f"{tmp}/pruned"
            )
        row = {"pruned_score": result.score}
        if "kd_epochs" in settings:
            distilled = slimformer.distill(
                str(teacher_dir(TASK)),
                f"{tmp}/pruned",
                f"{tmp}/distilled",
                data,
                config=TrainConfig(
                    max_length=MAX_LENGTH,
                    epochs=settings["kd_epochs"],
                    learning_rate=1e-4,
                    warmup_steps=50,
                    group_by_length=True,
                    seed=seed,
                ),
                distill_config=DistillConfig(
                    alpha=1.0, temperature=2.0, masked_copies=settings.get("masked_copies", 0)
                ),
                progress=False,
                overwrite=True,
            )
            row["score"] = distilled.score
        else:
            row["score"] = result.score
    return {
        "diagnosis": diagnosis,
        "fraction": fraction,
        "seed": seed,
        "settings": settings,
        **row,
        "seconds": round(time.perf_counter() - started, 1),
    }


def agreement(data, fraction: float = 0.5) -> dict:
    """How often the default pruned model (calibration seed 0) predicts what the teacher predicts, on 2,000
    training questions and on dev, and how sure the teacher is there: where the pruned model loses its teacher."""
    import numpy as np

    from slimformer.evaluation import predict
    from slimformer.models import load_model
    from slimformer.tasks import tokenize_task

    teacher = load_model(str(teacher_dir(TASK)), data.spec)
    pruned = slimformer.prune(
        str(teacher_dir(TASK)), slimformer.FlopsBudget(fraction), data, max_length=MAX_LENGTH, progress=False
    )
    tokenized = tokenize_task(data, teacher.tokenizer, max_length=MAX_LENGTH)
    found = {"fraction": fraction, "fisher": pruned.report["details"]["fisher"]}
    for split in ("train", "dev"):
        rows = tokenized[split].select(range(min(2000, len(tokenized[split]))))
        dense = predict(teacher.model.eval(), teacher.tokenizer, rows, progress=False)
        small = predict(pruned.model.eval(), teacher.tokenizer, rows, progress=False)
        labels = np.asarray(rows["labels"])
        top = torch.from_numpy(dense).softmax(-1).max(-1).values
        found[split] = {
            "examples": len(rows),
            "teacher_accuracy": float((dense.argmax(-1) == labels).mean()),
            "pruned_accuracy": float((small.argmax(-1) == labels).mean()),
            "agreement": float((dense.argmax(-1) == small.argmax(-1)).mean()),
            "teacher_mean_top_probability": float(top.mean()),
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diagnoses", default=",".join(DIAGNOSES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.5,0.4")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--redo", action="store_true", help="run the chosen diagnoses again (their old rows dropped)")
    parser.add_argument(
        "--name", default=NAME, help="results file stem: another name keeps a run (e.g. on another machine) apart"
    )
    parser.add_argument(
        "--agreement", action="store_true", help="also measure the default plan's agreement with the teacher"
    )
    args = parser.parse_args()
    chosen = [d.strip() for d in args.diagnoses.split(",") if d.strip()]
    unknown = [d for d in chosen if d not in DIAGNOSES]
    if unknown:
        raise SystemExit(f"Unknown diagnoses {unknown}; choose from {list(DIAGNOSES)}")
    data = load_data()
    build_teacher(TASK, data, RECIPE)
    teacher = teacher_summary(TASK, teacher_dir(TASK))
    _, dev = task_files()
    dev_data = slimformer.load_custom_task(dev, dev, text_columns=["text"], name=TASK)
    results_file = args.results_dir / f"{args.name}.json"
    saved = json.loads(results_file.read_text()) if results_file.is_file() else {}
    rows, agreed = saved.get("rows", []), saved.get("agreement")
    if args.agreement:
        agreed = agreement(data)
        print(agreed, flush=True)
    if args.redo:
        rows = [r for r in rows if r["diagnosis"] not in chosen]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for diagnosis in chosen:
            for fraction in [float(f) for f in args.fractions.split(",")]:
                if any(r["diagnosis"] == diagnosis and r["fraction"] == fraction and r["seed"] == seed for r in rows):
                    continue
                rows.append(run(diagnosis, fraction, seed, data, dev_data))
                print(rows[-1], flush=True)
                write(rows, teacher, args.results_dir, agreed, args.name)
    write(rows, teacher, args.results_dir, agreed, args.name)


def cell(scores: list[float], teacher_score: float) -> str:
    if not scores:
        return ""
    changes = [(s - teacher_score) * 100 for s in scores]
    spread = f" ± {statistics.stdev(changes):.2f}" if len(changes) > 1 else ""
    return f"{statistics.mean(changes):+.2f}{spread} (n={len(changes)})"


def write(rows: list[dict], teacher: dict, results_dir: Path, agreed: dict | None = None, name: str = NAME) -> None:
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    table = []
    for diagnosis in [d for d in DIAGNOSES if any(r["diagnosis"] == d for r in rows)]:
        cells = [
            cell([r["score"] for r in rows if r["diagnosis"] == diagnosis and r["fraction"] == f], teacher["score"])
            for f in fractions
        ]
        table.append([diagnosis, *cells])
    markdown = (
        "# Why budget pruning loses points on the 48-class article task\n\n"
        f"SQuAD v1.1 dev questions labelled by article (48 classes), MiniLM-L6 teacher dev accuracy "
        f"{teacher['score'] * 100:.2f} (converged, best epoch {teacher['best_epoch']}; 100% on its training "
        "questions). Accuracy change against the teacher, mean ± standard deviation over calibration seeds "
        "(n runs); budget pruning with one thing changed per row, retraining-free except the KD rows "
        "(bench/many_class_diagnosis.py says what each row does). 2 threads; processor features: "
        f"{', '.join(machine().get('cpu_features', [])) or 'not recorded'}.\n\n"
        + markdown_table(["diagnosis", *[f"{f:.0%} FLOPs" for f in fractions]], table)
    )
    if agreed:
        train, dev = agreed["train"], agreed["dev"]
        markdown += (
            f"\nWhere the points go (the plan at {agreed['fraction']:.0%}, calibration seed 0, "
            f"{agreed.get('fisher', 'empirical')} Fisher): on "
            f"{train['examples']} training questions the teacher is {train['teacher_accuracy']:.1%} accurate with a "
            f"mean top probability of {train['teacher_mean_top_probability']:.3f}, and the pruned model agrees with "
            f"it on {train['agreement']:.1%} of them; on {dev['examples']} dev questions (teacher "
            f"{dev['teacher_accuracy']:.1%}, mean top probability {dev['teacher_mean_top_probability']:.3f}) on "
            f"{dev['agreement']:.1%}.\n"
        )
    results = {"machine": machine(), "teacher": teacher, "rows": rows, "agreement": agreed}
    write_results(name, results, markdown, results_dir)
    print(markdown)


if __name__ == "__main__":
    main()
