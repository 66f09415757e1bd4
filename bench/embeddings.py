"""Sentence-embedding models pruned to a FLOPs budget without labels (issue 14): all-MiniLM-L6-v2 and
all-mpnet-base-v2, dense vs label-free budget pruning (Kwon et al. 2022's search on the probe Fisher of the
embeddings + the least-squares refit), scored on STS-B dev (Spearman of cosine similarity) and on SQuAD dev as a
retrieval set, with measured latency.

The dense models are the published sentence-transformers checkpoints, used as they are (they are the converged
models here: nothing is fine-tuned). SQuAD dev is split by article (seeded): the questions of 24 articles against
those articles' paragraphs are the retrieval test; the other 24 articles give unlabelled texts. Calibration (no
labels): ``--calibration`` texts, half STS-B train sentences, 3/8 held-out questions, 1/8 held-out paragraphs, read
up to 256 tokens. Distillation (``--kd-budgets``, ``--layer-students``): the student imitates the dense model's
embeddings of every STS-B train sentence and every held-out question and paragraph (``--kd-extra``: and more
unlabelled text from our other data, CoNLL-2003 news, MRPC, CoLA, SST-2). No text scored is ever seen before.
Models are cached under runs/bench/embeddings/ (rerunning resumes); latency is measured for all variants of a
model, PyTorch and int8 runtimes alike, in one interleaved run.

    PYTHONPATH=src:bench python bench/embeddings.py --models minilm-l6 --budgets 0.6,0.5,0.4,0.3
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np

import slimformer
from common import RESULTS, RUNS, glue_dir, machine, markdown_table, write_results
from slimformer.budget.method import EMBEDDING_TOKEN_WEIGHTING
from slimformer.evaluation import PASSAGE_TOKENS, evaluate_model
from slimformer.measure import count_parameters, flops
from slimformer.models import load_model
from slimformer.report import interleaved_latency
from slimformer.tasks import TaskData, load_task
from slimformer.tasks.data import split_texts

MPNET_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "models" / "all-mpnet-base-v2.sh"
OUT = RUNS / "embeddings"


def model_source(name: str) -> str:
    """``minilm-l6`` as it is; ``mpnet``: the folder that ../shared/models/all-mpnet-base-v2.sh assembles."""
    if name != "mpnet":
        return name
    printed = subprocess.run(["bash", str(MPNET_SCRIPT)], check=True, capture_output=True, text=True).stdout
    return printed.strip().splitlines()[-1]


def split_articles(data: TaskData, seed: int = 0) -> tuple[TaskData, dict[str, list[str]]]:
    """SQuAD dev split by article: half of the 48 articles (seeded) are the retrieval test set (their questions
    against their paragraphs), the other half give unlabelled calibration / distillation texts (questions and
    paragraphs), so that no text a model is pruned or trained on is ever scored."""
    from slimformer.tasks.retrieval import find_squad_file

    articles = json.loads(find_squad_file(None).read_text())["data"]
    order = np.random.default_rng(seed).permutation(len(articles))
    held_out = {articles[i]["title"] for i in order[: len(articles) // 2]}
    test_contexts = {p["context"] for a in articles if a["title"] not in held_out for p in a["paragraphs"]}
    corpus, dev = data.splits["corpus"], data.splits["dev"]
    chosen = [i for i, text in enumerate(corpus["text_a"]) if text in test_contexts]
    new_index = {old: new for new, old in enumerate(chosen)}
    rows = [i for i, label in enumerate(dev["label"]) if label in new_index]
    questions = dev.select(rows).map(lambda row: {"label": new_index[row["label"]]})
    test = TaskData(
        spec=data.spec,
        splits={"dev": questions, "corpus": corpus.select(chosen)},
        source=f"{data.source} ({len(articles) - len(held_out)} of {len(articles)} articles)",
    )
    calibration = [a for a in articles if a["title"] in held_out]
    texts = {
        "paragraphs": [p["context"] for a in calibration for p in a["paragraphs"]],
        "questions": [q["question"] for a in calibration for p in a["paragraphs"] for q in p["qas"]],
    }
    return test, texts


EXTRA_SOURCES = ("conll", "mrpc", "cola", "sst2")
PASSAGE_WORDS = 160  # CoNLL documents cut into passages of about a SQuAD paragraph's length


def _detokenize(tokens: list[str]) -> str:
    """Whitespace-tokenized text (CoNLL, MRPC) closer to running text: no space before punctuation and clitics."""
    text = " ".join(tokens)
    text = re.sub(r" ([.,;:!?%)\]}]|'s|n't|'re|'ve|'ll|'d|'m)(?=\s|$)", r"\1", text)
    return re.sub(r"([(\[{$]) ", r"\1", text)


def conll_texts(folder: Path) -> list[str]:
    """CoNLL-2003's English training news (Reuters, 1996): every sentence, and every document cut into passages
    of whole sentences up to about ``PASSAGE_WORDS`` words."""
    documents: list[list[list[str]]] = []
    sentence: list[str] = []
    for line in [*(folder / "eng.train").read_text(encoding="utf-8").splitlines(), ""]:
        if line.startswith("-DOCSTART-"):
            documents.append([])
        elif not line.strip():
            if sentence and documents:
                documents[-1].append(sentence)
            sentence = []
        else:
            sentence.append(line.split(" ")[0])
    texts = [_detokenize(s) for doc in documents for s in doc if len(s) >= 4]
    for doc in documents:
        passage: list[str] = []
        for s in doc:
            if passage and len(passage) + len(s) > PASSAGE_WORDS:
                texts.append(_detokenize(passage))
                passage = []
            passage += s
        if len(passage) >= 20:
            texts.append(_detokenize(passage))
    return texts


@functools.cache  # read once per set: the distillation rows and the results' note both ask
def extra_texts(names: tuple[str, ...]) -> list[str]:
    """Unlabelled texts from our other data, none of it from SQuAD or STS-B: ``conll`` (news sentences and
    passages), ``mrpc`` (news sentences), ``cola`` (linguistics examples), ``sst2`` (movie-review sentences and
    phrases of 6 words or more)."""
    texts: list[str] = []
    for name in names:
        if name == "conll":
            texts += conll_texts(glue_dir().parent / "conll2003")
            continue
        folder, columns = {"mrpc": ("MRPC", (3, 4)), "cola": ("CoLA", (3,)), "sst2": ("SST-2", (0,))}[name]
        with (glue_dir() / folder / "train.tsv").open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        if name != "cola":
            rows = rows[1:]  # a header row
        found = [row[c] for row in rows for c in columns if len(row) > c]
        if name == "sst2":
            found = [t for t in found if len(t.split()) >= 6]
        texts += [_detokenize(t.split()) if name == "mrpc" else t for t in found]
    return list(dict.fromkeys(texts))  # unique, in order


def extra_note(names: tuple[str, ...]) -> str:
    return f"; '(+ {', '.join(names)})': plus {len(extra_texts(names)):,} texts of those (`--kd-extra`)"


def text_task(sts: TaskData, texts: list[str], name: str) -> TaskData:
    """STS-B with ``texts`` as its training split: label-free calibration / distillation sentences, scored on the
    STS-B dev set."""
    from datasets import Dataset

    train = Dataset.from_dict({"text_a": texts, "label": [-1.0] * len(texts)})
    return TaskData(spec=sts.spec, splits={"train": train, "dev": sts.splits["dev"]}, source=name)


def calibration_texts(sts: TaskData, squad: dict[str, list[str]], n: int, seed: int = 0) -> list[str]:
    """``n`` texts: half STS-B train sentences, three eighths held-out SQuAD questions, one eighth held-out SQuAD
    paragraphs (long: they carry most of the tokens), each drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    sentences = split_texts(sts.train)

    def draw(pool: list[str], k: int) -> list[str]:
        return [pool[i] for i in rng.permutation(len(pool))[:k]]

    return [*draw(sentences, n // 2), *draw(squad["questions"], 3 * n // 8), *draw(squad["paragraphs"], n // 8)]


def scores(model, tokenizer, sts: TaskData, retrieval: TaskData) -> dict:
    started = time.perf_counter()
    sts_metrics = evaluate_model(model, tokenizer, sts, progress=False)["dev"]
    retrieval_metrics = evaluate_model(model, tokenizer, retrieval, progress=False)["dev"]
    return {
        "sts_spearman": sts_metrics["spearman_cosine"],
        "ndcg@10": retrieval_metrics["ndcg@10"],
        "recall@10": retrieval_metrics["recall@10"],
        "mrr@10": retrieval_metrics["mrr@10"],
        "eval_seconds": round(time.perf_counter() - started, 1),
    }


def pruned_variant(
    name: str, source: str, budget: float, calibration: TaskData, args, fisher_scale: str = "layer"
) -> tuple[object, dict]:
    """The model pruned to ``budget`` of the encoder FLOPs (cached), and its pruning report."""
    folder = pruned_folder(name, budget, args, fisher_scale)
    if not folder.is_dir():
        slimformer.prune(
            source,
            slimformer.FlopsBudget(budget, calibration_examples=args.calibration, fisher_scale=fisher_scale),
            calibration,
            out=folder,
            max_length=PASSAGE_TOKENS,
            evaluate=False,
            progress=True,
        )
    report = json.loads((folder / "metrics.json").read_text())
    return load_model(folder).model, report


def pruned_folder(name: str, budget: float, args, fisher_scale: str = "layer") -> Path:
    # named by the refit's default token weighting too: a model cached before it changed is not taken for today's
    weighting = f"-tw{EMBEDDING_TOKEN_WEIGHTING:g}" if EMBEDDING_TOKEN_WEIGHTING else ""
    return OUT / f"{name}-flops{budget:g}-cal{args.calibration}-{fisher_scale}{weighting}"


def distilled_variant(
    teacher: str,
    student: str,
    label: str,
    sts: TaskData,
    args,
    epochs: float,
    hidden_weight: float = 0.0,
    extra: tuple[str, ...] = (),
) -> tuple[object, dict]:
    """``student`` (a pruned folder, or a layer spec such as ``every:2``) trained for ``epochs`` to imitate
    ``teacher``'s embeddings of the distillation texts (``sts``'s training split, which holds the ``extra``
    sources named in the cache folder; cached); ``hidden_weight`` > 0 adds TinyBERT's hidden-state loss over every
    token of the mapped layers (every layer for a pruned student)."""
    from slimformer.distill import DistillConfig, distill
    from slimformer.train import TrainConfig

    folder = OUT / (
        f"{label}-kd{epochs:g}ep"
        + (f"-hidden{hidden_weight:g}" if hidden_weight else "")
        + ("-" + "-".join(extra) if extra else "")
    )
    if not folder.is_dir():
        config = TrainConfig(
            epochs=epochs,
            learning_rate=args.kd_lr,
            batch_size=32,
            max_length=PASSAGE_TOKENS,
            group_by_length=True,  # long paragraphs batched together: far less padding
            save_steps=500,
        )
        settings = DistillConfig(hidden_weight=hidden_weight)
        distill(
            teacher, student, sts, folder, config=config, distill_config=settings, evaluate_before=False, progress=True
        )
    report = json.loads((folder / "metrics.json").read_text())
    return load_model(folder).model, report


# int8 kinds: row suffix and quantization settings
INT8_KINDS = {
    "onnxruntime": (" + int8", {"runtime": "onnxruntime", "mode": "dynamic"}),
    "onnxruntime-outliers": (" + int8 (fp32 outliers)", {"runtime": "onnxruntime", "mode": "dynamic"}),
    "openvino": (" + int8 (OpenVINO)", {"runtime": "openvino", "mode": "static"}),
}


def int8_variant(model, tokenizer, label: str, kind: str, calibration: TaskData, args):
    """int8 of ``model`` (cached), run by the runtime: dynamic on ONNX Runtime (``onnxruntime-outliers``: the
    linear layers whose inputs' max / RMS exceeds ``--fp32-outliers`` on 256 calibration texts kept in fp32);
    static on OpenVINO (NNCF, ranges from 256 calibration texts). Calibration texts are read up to 256 tokens, as
    the passages are."""
    from slimformer.deploy.runtime import load_artifact_folder

    settings = dict(INT8_KINDS[kind][1])
    tag = "" if kind == "onnxruntime" else f"-{kind}"  # the plain kind keeps the cache folders of earlier runs
    if kind == "onnxruntime-outliers":
        settings["fp32_outlier_ratio"] = args.fp32_outliers
        tag += f"{args.fp32_outliers:g}"
    folder = OUT / f"{label}-int8{tag}"
    if not folder.is_dir():
        slimformer.quantize(model, slimformer.Quantize(**settings), calibration, out=folder, tokenizer=tokenizer,
                            max_length=PASSAGE_TOKENS, evaluate=False, measure=False, progress=False)  # fmt: skip
    return load_artifact_folder(folder, threads=2).model


SCORE_FIELDS = ("sts_spearman", "ndcg@10", "recall@10", "mrr@10", "eval_seconds")


def run_model(
    name: str, args, sts: TaskData, retrieval: TaskData, texts: dict, previous: dict[str, dict] | None = None
) -> list[dict]:
    """Every variant of model ``name``: scored (or, with ``--reuse-scores``, its scores taken from ``previous``,
    the last results' rows by variant: the models are cached, so their scores do not change) and timed."""
    previous = previous or {}
    source = model_source(name)
    dense = load_model(source, "stsb-embed")
    calibration = text_task(sts, calibration_texts(sts, texts, args.calibration), "calibration texts")
    sentences = split_texts(sts.train)
    base = [*sentences, *texts["questions"], *texts["paragraphs"]]
    training = {extra: text_task(sts, [*base, *extra_texts(extra)], "distillation texts") for extra in args.kd_extra}
    variants = {"dense": (dense.model, None)}
    for budget in args.budgets:
        variants[f"flops {budget:g}"] = pruned_variant(name, source, budget, calibration, args)
    for budget in args.global_budgets:
        variants[f"flops {budget:g} (global Fisher)"] = pruned_variant(
            name, source, budget, calibration, args, fisher_scale="global"
        )
    students = []  # (row label, student for distill, cache label)
    for budget in args.kd_budgets:
        folder = pruned_folder(name, budget, args)
        if not folder.is_dir():
            pruned_variant(name, source, budget, calibration, args)
        students.append((f"flops {budget:g}", str(folder), folder.name))
    students += [(f"layers {spec}", spec, f"{name}-{spec.replace(':', '')}") for spec in args.layer_students]
    for row_label, student, cache_label in students:
        for epochs in args.kd_epochs:
            for hidden_weight in args.kd_hidden_weights:
                for extra in args.kd_extra:
                    suffix = f" {epochs:g} ep" if len(args.kd_epochs) > 1 else ""  # named only when several ran
                    suffix += f" (hidden x {hidden_weight:g})" if hidden_weight else ""
                    suffix += f" (+ {', '.join(extra)})" if extra else ""
                    variants[f"{row_label} + KD{suffix}"] = distilled_variant(
                        source, student, cache_label, training[extra], args, epochs, hidden_weight, extra
                    )
    for kind in args.int8:
        for label in [label for label in variants if " + int8" not in label]:
            model = variants[label][0]
            slug = f"{name}-{label.replace(' ', '').replace(':', '').replace('+', '-')}"
            int8 = int8_variant(model, dense.tokenizer, slug, kind, calibration, args)
            variants[label + INT8_KINDS[kind][0]] = (int8, variants[label][1])
    rows = []
    base_flops = flops(dense.model, seq_len=128).encoder
    for label, (model, report) in variants.items():
        source_model = variants[label.split(" + int8")[0]][0]
        pruned = bool(report) and report["command"] == "prune"
        row = {
            "model": name,
            "variant": label,
            "calibration_texts": args.calibration,
            "params": count_parameters(source_model).total,
            "encoder_flops_kept": flops(source_model, seq_len=128).encoder / base_flops,
            "prune_seconds": report["seconds"]["total"] if pruned else None,
            "neuron_weight": report["details"].get("neuron_weight") if pruned else None,
            "train_seconds": report["seconds"].get("train") if report and report["command"] == "distill" else None,
        }
        if label.endswith(INT8_KINDS["onnxruntime-outliers"][0]):
            row["fp32_outlier_ratio"] = args.fp32_outliers
        earlier = previous.get(label, {})
        if args.reuse_scores and earlier and earlier.get("fp32_outlier_ratio") == row.get("fp32_outlier_ratio"):
            row.update({field: earlier[field] for field in SCORE_FIELDS if field in earlier})
        else:
            row.update(scores(model, dense.tokenizer, sts, retrieval))
        print(json.dumps(row), flush=True)
        rows.append(row)
    models = {label: model for label, (model, _) in variants.items()}
    for key, batch, seq in (("32x128", 32, 128), ("1x32", 1, 32)):
        timing = interleaved_latency(
            models, batch_size=batch, seq_len=seq, threads=args.threads, rounds=args.rounds, repeats=args.repeats
        )
        for row in rows:
            row[f"ms_{key}"] = timing[row["variant"]]["median_ms"]
            row[f"speedup_{key}"] = timing["speedup"].get(row["variant"], 1.0)
    dense_row = rows[0]
    for row in rows:
        row["sts_kept"] = row["sts_spearman"] / dense_row["sts_spearman"]
        row["ndcg_kept"] = row["ndcg@10"] / dense_row["ndcg@10"]
    return rows


def epochs_note(args, rows: list[dict]) -> str:
    """The distillation epochs the rows name (a run with several names them in its labels, "KD 3 ep"), else this
    run's."""
    import re

    named = sorted({float(m.group(1)) for r in rows if (m := re.search(r"KD (\d+(?:\.\d+)?) ep", r["variant"]))})
    return " or ".join(f"{e:g}" for e in (named or args.kd_epochs))


def calibration_note(rows: list[dict]) -> str:
    """How many calibration texts each model was pruned with."""
    sizes = {r["model"]: r.get("calibration_texts", 2048) for r in rows}
    if len(set(sizes.values())) == 1:
        return f"{next(iter(sizes.values()))}"
    return " / ".join(f"{size} ({model})" for model, size in sizes.items())


def _series(variant: str) -> str:
    """Which curve a variant belongs to: the kind of model, fp32 (PyTorch) or int8 (ONNX Runtime or OpenVINO)."""
    runtime = " int8" + variant.split(" + int8", 1)[1] if " + int8" in variant else ""
    if variant.startswith("dense"):
        return "dense" + runtime
    if variant.startswith("layers"):
        return "layers + KD" + runtime
    if "KD" in variant:
        return "pruned + KD" + runtime
    if "global" in variant:
        return "pruned, global Fisher" + runtime
    return "pruned (no training)" + runtime


def pareto_plot(rows: list[dict], path: Path) -> None:
    """Per model a row of two panels (STS-B, retrieval): % of the dense score against measured speedup, a curve per
    kind of variant (dashed: int8), the legend beside the row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    figure, grid = plt.subplots(len(names), 2, figsize=(13, 4 * len(names)), squeeze=False)
    panels = (("sts_kept", "STS-B Spearman"), ("ndcg_kept", "retrieval nDCG@10"))
    for axes, name in zip(grid, names, strict=True):
        mine = [r for r in rows if r["model"] == name]
        for axis, (metric, title) in zip(axes, panels, strict=True):
            for series in dict.fromkeys(_series(r["variant"]) for r in mine):
                points = sorted((r["speedup_32x128"], 100 * r[metric]) for r in mine if _series(r["variant"]) == series)
                style = "--" if " int8" in series else "-"
                axis.plot(*zip(*points, strict=True), "o" + style, label=series, markersize=5)
            axis.axhline(99, color="grey", linestyle=":", linewidth=1)
            axis.set_xlabel("measured speedup over dense fp32, batch 32 x 128 (2 threads)")
            axis.set_ylabel(f"% of the dense {title}")
            axis.set_title(f"{name}: {title}")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm-l6", help="minilm-l6 and/or mpnet, comma-separated")
    parser.add_argument("--budgets", default="0.6,0.5,0.4,0.3")
    parser.add_argument("--calibration", type=int, default=2048, help="calibration sentences (STS-B train)")
    parser.add_argument(
        "--global-budgets", default="", help="budgets also pruned with the global Fisher scale, for comparison"
    )
    parser.add_argument("--kd-budgets", default="", help="FLOPs budgets also recovered by embedding distillation")
    parser.add_argument("--layer-students", default="", help="layer-reduction baselines with KD, e.g. every:2,every:3")
    parser.add_argument("--kd-epochs", default="1", help="distillation epochs, comma-separated: a row for each")
    parser.add_argument("--kd-lr", type=float, default=1e-4)
    parser.add_argument(
        "--kd-extra",
        default="none",
        help="sets of more unlabelled distillation texts from our other data, comma-separated, a row for each; a "
        f"set joins sources with '+' ({', '.join(EXTRA_SOURCES)}), 'none' is the base texts alone",
    )
    parser.add_argument(
        "--kd-hidden-weights",
        default="0",
        help="weights of TinyBERT's hidden-state loss added to the embedding distillation, comma-separated: a row "
        "for each (0: embeddings only)",
    )
    parser.add_argument(
        "--int8",
        nargs="?",
        const="onnxruntime",
        default="",
        help="also every variant as int8 of these kinds (comma-separated; alone: onnxruntime, dynamic; "
        "onnxruntime-outliers: dynamic, outlier inputs kept fp32; openvino: static, NNCF)",
    )
    parser.add_argument(
        "--fp32-outliers", type=float, default=100.0, help="max / RMS above which onnxruntime-outliers keeps fp32"
    )
    parser.add_argument(
        "--reuse-scores",
        action="store_true",
        help="keep the scores of variants already in the results file (cached models) and only time them again",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--name", default="embeddings", help="results file stem: another name keeps a run beside the main table"
    )
    args = parser.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    args.kd_budgets = [float(b) for b in args.kd_budgets.split(",") if b]
    args.kd_epochs = [float(e) for e in args.kd_epochs.split(",") if e]
    args.kd_extra = [tuple(n for n in names.split("+") if n and n != "none") for names in args.kd_extra.split(",")]
    if unknown := {n for names in args.kd_extra for n in names} - set(EXTRA_SOURCES):
        parser.error(f"--kd-extra: unknown source(s) {', '.join(sorted(unknown))}; choose from {EXTRA_SOURCES}")
    args.kd_hidden_weights = [float(w) for w in args.kd_hidden_weights.split(",") if w]
    args.global_budgets = [float(b) for b in args.global_budgets.split(",") if b]
    args.layer_students = [spec for spec in args.layer_students.split(",") if spec]
    args.int8 = [runtime for runtime in args.int8.split(",") if runtime]
    if unknown := set(args.int8) - set(INT8_KINDS):
        parser.error(f"--int8: unknown kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(INT8_KINDS)}")
    sts = load_task("stsb-embed")
    retrieval, texts = split_articles(load_task("squad-retrieval"))
    previous_file = args.results_dir / f"{args.name}.json"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else {}
    rows = [r for r in previous.get("rows", []) if r["model"] not in models]
    for name in models:
        earlier = {r["variant"]: r for r in previous.get("rows", []) if r["model"] == name}
        rows += run_model(name, args, sts, retrieval, texts, earlier)
    headers = [
        "model", "variant", "params (M)", "FLOPs kept", "STS-B Spearman", "% kept", "nDCG@10", "% kept",
        "recall@10", "ms 32x128", "speedup", "ms 1x32", "speedup", "pruning s",
    ]  # fmt: skip
    table = [
        [
            r["model"], r["variant"], f"{r['params'] / 1e6:.1f}", f"{100 * r['encoder_flops_kept']:.0f}%",
            f"{100 * r['sts_spearman']:.2f}", f"{100 * r['sts_kept']:.1f}", f"{100 * r['ndcg@10']:.2f}",
            f"{100 * r['ndcg_kept']:.1f}", f"{100 * r['recall@10']:.2f}", f"{r['ms_32x128']:.0f}",
            f"{r['speedup_32x128']:.2f}x", f"{r['ms_1x32']:.1f}", f"{r['speedup_1x32']:.2f}x",
            "" if r["prune_seconds"] is None else f"{r['prune_seconds']:.0f}",
        ]
        for r in rows
    ]  # fmt: skip
    markdown = (
        "# Sentence-embedding models pruned without labels\n\n"
        "Label-free budget pruning (`slimformer prune --task stsb-embed --budget-flops F`): probe Fisher of the "
        "head / neuron masks under the embedding-distillation objective, Kwon et al.'s mask search and "
        "rearrangement (each layer's Fisher scaled to sum 1, the default for embedding models; '(global Fisher)': "
        "compared as it is; the neurons' Fisher weighed 0.5 against the heads', the default for embedding models "
        "refit by least squares), and the layer-wise least-squares refit to the dense model's own sub-layer "
        "outputs; no labels, no training. '+ KD': then embedding distillation from the dense model "
        "(`slimformer distill --task stsb-embed`, squared embedding distance, "
        f"{epochs_note(args, rows)} epochs, lr {args.kd_lr:g}); "
        "'(hidden x W)': plus W x TinyBERT's hidden-state loss (MSE of every token's hidden state at the mapped "
        "layers, every layer for a pruned student); "
        "'layers every:K + KD': the sentence-transformers baseline, every K-th layer kept, then the same "
        "distillation. '+ int8': dynamic int8 on ONNX Runtime; '(fp32 outliers)': the same with the linear layers "
        f"whose input's largest value exceeds {args.fp32_outliers:g}x its RMS on 256 calibration texts kept in "
        "fp32 (`slimformer quantize --fp32-outliers`); '(OpenVINO)': static int8 on OpenVINO (NNCF, activation "
        "ranges from 256 calibration texts); each scored and timed through its runtime. "
        "Dense models: the published sentence-transformers checkpoints (all-MiniLM-L6-v2, all-mpnet-base-v2), "
        "used as they are."
        "\n\n"
        "Data: SQuAD v1.1 dev is split by article (seeded). Retrieval test: the questions of 24 articles against "
        "those articles' paragraphs (passages read up to 256 tokens). Calibration: "
        f"{calibration_note(rows)} unlabelled texts (half STS-B train sentences, 3/8 questions and 1/8 paragraphs "
        "of the other 24 articles); distillation: all STS-B train sentences and all questions and paragraphs of "
        "those 24 articles"
        + "".join(extra_note(names) for names in args.kd_extra if names)
        + ". No scored text is seen before scoring. STS-B: Spearman of the cosine similarity on the "
        "full dev set (1,500 pairs). Latency: every variant of a model in one interleaved run "
        f"({args.rounds} rounds x {args.repeats} timed runs, medians), {args.threads} threads, a runtime's "
        "session open only for its turn (idle ONNX Runtime sessions spin-wait and slowed the model being timed); "
        "speedup over the dense PyTorch fp32 model. FLOPs: encoder FLOPs at 128 tokens.\n\n"
        + markdown_table(headers, table)
        + f"\n![Pareto]({args.name}.png)\n"
    )
    data = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k not in ("results_dir", "name")}}
    data["rows"] = rows
    write_results(args.name, data, markdown, args.results_dir)
    pareto_plot(rows, args.results_dir / f"{args.name}.png")


if __name__ == "__main__":
    main()
