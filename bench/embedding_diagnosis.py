"""Why label-free budget pruning keeps STS-B but loses retrieval (issue 14): all-MiniLM-L6-v2 at one FLOPs budget,
the same pipeline as bench/embeddings.py (probe Fisher of the embeddings, Kwon et al. 2022's search and
rearrangement, layer-wise least-squares refit) with one thing changed per row:

- ``fisher scale alpha``: each layer's head and neuron Fisher divided by the layer's total to the power alpha
  before the search (1: the default for embedding models, each layer's Fisher summing to 1; 0: the global Fisher);
- ``neuron Fisher x w``: the neurons' Fisher multiplied by w before the search (``FlopsBudget(neuron_weight=w)``;
  0.5 became the default for embedding models from these rows): the refit recovers more of a pruned FFN's error
  than of pruned attention's, which the Fisher of the unrefitted masks does not know;
- ``refit-aware``: each unit's Fisher multiplied by the fraction of its output that the least-squares refit could
  not rebuild from the other units of its sub-layer (the optimal brain surgeon's saliency, Hassibi & Stork 1993, as
  ZipLM uses it per structure: one over the unit's diagonal entry of the inverse Gram of the dense model's
  activations, per head the Schur complement of its context block), per unit, its square root, or each layer's
  mean per part (a data-driven neuron weight);
- ``units chosen by the refit``: the search's number of heads and neurons per layer, but the ones each sub-layer's
  least-squares refit can best do without go, chosen greedily on the pruned model's own inputs (structured OBS as
  in ZipLM; ``FlopsBudget(unit_choice="refit")``) instead of the Fisher's rearranged choice;
- ``calibration``: the default mix (half STS-B train sentences, 3/8 held-out SQuAD questions, 1/8 held-out
  paragraphs), held-out SQuAD texts only (3/4 questions, 1/4 paragraphs: the retrieval domain, no STS-B), or twice
  as many texts of the default mix.

Each row reports STS-B dev Spearman, retrieval nDCG@10 on the held-out articles, and nDCG@10 with one side encoded
by the dense model (pruned queries against dense passages, and the other way round), with the mean cosine between
the pruned and dense embeddings of the queries and of the passages: which side of the search loses. The Fisher
of one calibration set is measured once and shared by its rows. Rows already in the results file are kept.

    PYTHONPATH=src:bench python bench/embedding_diagnosis.py --budget 0.5
    PYTHONPATH=src:bench python bench/embedding_diagnosis.py --model mpnet --seeds 0 \
        --rows "neuron weight 1|neuron Fisher x 0.5"
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch

from common import RESULTS, machine, markdown_table, write_results
from embeddings import calibration_texts, model_source, split_articles, text_task
from slimformer.arch import layer_views
from slimformer.budget.fisher import MaskGradients, calibration_mask_gradients, fisher_autocast
from slimformer.budget.method import fisher_loss, last_layer_rows
from slimformer.budget.search import UnitCosts, rearrange, search_masks
from slimformer.budget.tune import reconstruct_weights
from slimformer.evaluation import PASSAGE_TOKENS, EmbeddingEvaluator, encode
from slimformer.gradients import model_inputs
from slimformer.models import load_model
from slimformer.prune.apply import remove
from slimformer.prune.plan import Layout
from slimformer.tasks import load_task
from slimformer.tasks.metrics import retrieval_metrics, sts_metrics

NAME = "embedding_diagnosis"
CHOSEN_HALF = "units chosen by the refit, neuron Fisher x 0.5"
# (row name, calibration, number of texts, fisher scale alpha, neuron Fisher weight, calibration seed[, saliency])
ROWS = [
    ("neuron weight 1 (each layer's Fisher sums to 1; the default before)", "default", 2048, 1.0, 1.0, 0),
    ("fisher scale alpha 0.75", "default", 2048, 0.75, 1.0, 0),
    ("fisher scale alpha 0.5", "default", 2048, 0.5, 1.0, 0),
    ("global Fisher (alpha 0)", "default", 2048, 0.0, 1.0, 0),
    ("neuron Fisher x 0.5 (the default now)", "default", 2048, 1.0, 0.5, 0),
    ("neuron Fisher x 0.25", "default", 2048, 1.0, 0.25, 0),
    ("neuron Fisher x 2", "default", 2048, 1.0, 2.0, 0),
    ("calibration: SQuAD texts only", "squad", 2048, 1.0, 1.0, 0),
    ("calibration: 4,096 texts", "default", 4096, 1.0, 1.0, 0),
    *[
        (f"{name}, calibration seed {seed}", "default", 2048, 1.0, weight, seed)
        for seed in (1, 2)
        for name, weight in (("neuron weight 1", 1.0), ("neuron Fisher x 0.5 (the default now)", 0.5))
    ],
    ("refit-aware Fisher: x unexplained fraction per unit", "default", 2048, 1.0, 1.0, 0, "unit"),
    ("refit-aware Fisher: x its square root", "default", 2048, 1.0, 1.0, 0, "sqrt"),
    ("refit-aware Fisher: x its layer mean per part", "default", 2048, 1.0, 1.0, 0, "layer"),
    (CHOSEN_HALF, "default", 2048, 1.0, 0.5, 0, "choose"),
    ("units chosen by the refit, neuron weight 1", "default", 2048, 1.0, 1.0, 0, "choose"),
    *[(f"{CHOSEN_HALF}, calibration seed {seed}", "default", 2048, 1.0, 0.5, seed, "choose") for seed in (1, 2)],
]


def calibration_set(kind: str, n: int, sts, texts: dict[str, list[str]], seed: int = 0) -> list[str]:
    if kind == "default":
        return calibration_texts(sts, texts, n, seed=seed)
    rng = np.random.default_rng(seed)
    questions = [texts["questions"][i] for i in rng.permutation(len(texts["questions"]))[: 3 * n // 4]]
    paragraphs = [texts["paragraphs"][i] for i in rng.permutation(len(texts["paragraphs"]))[: n - len(questions)]]
    return questions + paragraphs


def scaled(fisher: list[np.ndarray], totals: list[float], alpha: float) -> list[np.ndarray]:
    return [f / total**alpha if total > 0 else f for f, total in zip(fisher, totals, strict=True)]


def activation_grams(model, batches) -> dict[str, list[torch.Tensor]]:
    """Per layer, the Gram (float64) over all real tokens of the attention output projection's input (the heads'
    contexts) and of the FFN down projection's input (the neurons' activations), a constant column appended: the
    refit fits the bias too."""
    views = layer_views(model)
    grams: dict[str, list] = {"attention": [None] * len(views), "ffn": [None] * len(views)}
    real_tokens = {}

    def hook(index: int, part: str):
        def record(module, args):
            x = args[0][real_tokens["mask"]].double()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
            previous = grams[part][index]
            grams[part][index] = x.T @ x if previous is None else previous + x.T @ x

        return record

    handles = [v.attn_out.register_forward_pre_hook(hook(v.index, "attention")) for v in views]
    handles += [v.ffn_down.register_forward_pre_hook(hook(v.index, "ffn")) for v in views]
    try:
        with torch.inference_mode():
            for batch in batches:
                inputs = model_inputs(batch, torch.device("cpu"))
                real_tokens["mask"] = inputs["attention_mask"].bool()
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def unexplained_fractions(model, grams, damping: float = 1e-2) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer, each head's and each neuron's fraction of output energy outside the span of the other units'
    (the refit's ridge, ``damping`` times the mean diagonal, included)."""
    heads, neurons = [], []
    for view in layer_views(model):
        c = grams["attention"][view.index]
        c = c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
        inverse = torch.linalg.inv(c)
        weight = view.attn_out.weight.detach().double()
        fractions = []
        for h in range(view.num_heads):
            block = slice(h * view.head_size, (h + 1) * view.head_size)
            residual = torch.linalg.inv(inverse[block, block])  # the Schur complement: what the others cannot explain
            w = weight[:, block]
            fractions.append(float(torch.trace(w @ residual @ w.T) / torch.trace(w @ c[block, block] @ w.T)))
        heads.append(np.array(fractions))
        g = grams["ffn"][view.index]
        g = g + damping * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
        neurons.append((1.0 / (g.diagonal() * torch.linalg.inv(g).diagonal()))[:-1].numpy())
    return heads, neurons


def refit_aware(grads: MaskGradients, fractions, mode: str) -> MaskGradients:
    """The gradients scaled so that every Fisher entry is multiplied by the unit's unexplained fraction (``unit``),
    its square root (``sqrt``) or its layer's mean per part (``layer``)."""

    def factor(f: np.ndarray) -> np.ndarray:
        return {"unit": f, "sqrt": np.sqrt(f), "layer": np.full_like(f, f.mean())}[mode]

    def scale(gradients, parts):
        return [g * torch.tensor(np.sqrt(factor(f)), dtype=g.dtype) for g, f in zip(gradients, parts, strict=True)]

    heads, neurons = fractions
    return MaskGradients(heads=scale(grads.heads, heads), neurons=scale(grads.neurons, neurons))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).mean())


class Embeddings:
    """Every text the scores need, encoded once per model."""

    def __init__(self, tokenizer, sts, retrieval) -> None:
        self.sts = EmbeddingEvaluator(tokenizer, sts)
        self.retrieval = EmbeddingEvaluator(tokenizer, retrieval)

    def __call__(self, model) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            first, second = (encode(model, *part) for part in self.sts.splits["dev"])
            return {
                "sts_a": first,
                "sts_b": second,
                "queries": encode(model, *self.retrieval.splits["dev"][0]),
                "passages": encode(model, *self.retrieval.corpus),
            }


def scores(pruned: dict[str, np.ndarray], dense: dict[str, np.ndarray], gold_sts, relevant) -> dict:
    def ndcg(queries, passages) -> float:
        return retrieval_metrics(queries, passages, relevant)["ndcg@10"]

    return {
        "sts_spearman": sts_metrics(pruned["sts_a"], pruned["sts_b"], gold_sts)["spearman_cosine"],
        "ndcg@10": ndcg(pruned["queries"], pruned["passages"]),
        "ndcg@10 pruned queries": ndcg(pruned["queries"], dense["passages"]),
        "ndcg@10 pruned passages": ndcg(dense["queries"], pruned["passages"]),
        "cosine queries": mean_cosine(pruned["queries"], dense["queries"]),
        "cosine passages": mean_cosine(pruned["passages"], dense["passages"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="", help="only the rows whose names start with one of these (|-separated)")
    parser.add_argument("--seeds", default="", help="only the rows of these calibration seeds (e.g. 0,1)")
    parser.add_argument("--render", action="store_true", help="only write the markdown again from the JSON")
    parser.add_argument(
        "--latency",
        action="store_true",
        help="only time the model pruned with neuron weight 1 against 0.5 (and the dense model), interleaved",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / f"{NAME}.json"
    done = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if args.render:
        write_results(NAME, done, render(done))
        return
    if args.latency:
        done.setdefault("latency", {})[args.model] = neuron_weight_latency(args)
        write_results(NAME, done, render(done))
        return
    rows = [r for r in done["rows"] if r["budget"] == args.budget and r["model"] == args.model]
    finished = {r["row"] for r in rows}

    sts = load_task("stsb-embed")
    retrieval, texts = split_articles(load_task("squad-retrieval"))
    dense = load_model(model_source(args.model), "stsb-embed")
    model, tokenizer = dense.model, dense.tokenizer
    embed = Embeddings(tokenizer, sts, retrieval)
    gold_sts, relevant = embed.sts.gold["dev"], embed.retrieval.gold["dev"]
    reference = embed(model)
    dense_scores = scores(reference, reference, gold_sts, relevant)
    layout = Layout.of(model)
    costs = UnitCosts.flops(layout, 128)
    gradients = {}
    wanted = [prefix for prefix in args.rows.split("|") if prefix]
    seeds = {int(seed) for seed in args.seeds.split(",") if seed}
    fractions = {}
    for name, kind, n, alpha, neuron_weight, seed, *saliency in ROWS:
        if name in finished or (wanted and not any(name.startswith(prefix) for prefix in wanted)):
            continue
        if seeds and seed not in seeds:
            continue
        if (kind, n, seed) not in gradients:
            calibration = text_task(sts, calibration_set(kind, n, sts, texts, seed), f"{kind} calibration texts")
            gradients[(kind, n, seed)] = calibration_mask_gradients(
                model,
                tokenizer,
                calibration,
                n_examples=n,
                batch_size=32,
                max_length=PASSAGE_TOKENS,
                seed=seed,
                progress=True,
                autocast=fisher_autocast(model, "auto"),
            )
        grads, sample = gradients[(kind, n, seed)]
        choose = saliency == ["choose"]
        if saliency and not choose:
            if (kind, n, seed) not in fractions:
                fractions[(kind, n, seed)] = unexplained_fractions(model, activation_grams(model, sample.batches))
            grads = refit_aware(grads, fractions[(kind, n, seed)], saliency[0])
        heads, neurons = grads.head_fisher(), grads.neuron_fisher()
        totals = [float(h.sum() + f.sum()) for h, f in zip(heads, neurons, strict=True)]
        plan = search_masks(
            layout,
            scaled(heads, totals, alpha),
            [neuron_weight * f for f in scaled(neurons, totals, alpha)],
            args.budget,
            costs,
            model_type=model.config.model_type,
        )
        if not choose:
            plan = rearrange(plan, grads.heads, grads.neurons)
        pruned = copy.deepcopy(model)
        started = time.perf_counter()
        report = reconstruct_weights(
            pruned, plan, sample.batches, last_layer_rows=last_layer_rows(model), choose_units=choose
        )
        plan = report.plan
        refit_seconds = time.perf_counter() - started
        remove(pruned, plan)
        row = {
            "row": name,
            "model": args.model,
            "budget": args.budget,
            "calibration": kind,
            "calibration_texts": n,
            "calibration_seed": seed,
            "fisher_scale_alpha": alpha,
            "neuron_fisher_weight": neuron_weight,
            "refit_aware_saliency": saliency[0] if saliency and not choose else None,
            "unit_choice": "refit" if choose else "fisher",
            "heads_per_layer": [len(k) for k in plan.kept_heads],
            "neurons_per_layer": [len(k) for k in plan.kept_neurons],
            "fisher_loss_estimate": fisher_loss(grads, plan),
            "relative_error_tuned": [round(layer["relative_error_tuned"], 4) for layer in report.layers],
            "refit_seconds": round(refit_seconds, 1),
            **scores(embed(pruned), reference, gold_sts, relevant),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        others = [r for r in done["rows"] if not (r["budget"] == args.budget and r["model"] == args.model)]
        done = {
            **done,
            "machine": machine(),
            "dense": {**done.get("dense", {}), args.model: dense_scores},
            "rows": others + rows,
        }
        write_results(NAME, done, render(done))
    write_results(NAME, done, render(done))


def neuron_weight_latency(args) -> dict:
    """Milliseconds of the dense model and of the models pruned through the front door with neuron weight 1 and
    0.5 (default calibration, seed 0), timed in one interleaved run at three shapes."""
    import slimformer
    from slimformer.report import interleaved_latency

    sts = load_task("stsb-embed")
    _, texts = split_articles(load_task("squad-retrieval"))
    calibration = text_task(sts, calibration_texts(sts, texts, 2048), "calibration texts")
    dense = load_model(model_source(args.model), "stsb-embed")
    models = {"dense": dense.model}
    for weight in (1.0, 0.5):
        models[f"neuron weight {weight:g}"] = slimformer.prune(
            copy.deepcopy(dense.model),
            slimformer.FlopsBudget(args.budget, neuron_weight=weight),
            calibration,
            tokenizer=dense.tokenizer,
            max_length=PASSAGE_TOKENS,
            evaluate=False,
            measure=False,
            progress=False,
        ).model
    timings = {"threads": args.threads, "budget": args.budget}
    for batch, length in ((32, 128), (1, 32), (32, 256)):
        timed = interleaved_latency(models, batch_size=batch, seq_len=length, threads=args.threads, rounds=3, repeats=5)
        timings[f"{batch}x{length}"] = {name: timed[name]["median_ms"] for name in models}
        print(batch, length, timings[f"{batch}x{length}"], flush=True)
    return timings


def render(data: dict) -> str:
    table = []
    for r in data["rows"]:
        base = data["dense"][r["model"]]
        table.append(
            [
                r["model"],
                f"{r['budget']:.0%}",
                r["row"],
                " ".join(str(h) for h in r["heads_per_layer"]),
                " ".join(str(n) for n in r["neurons_per_layer"]),
                f"{100 * r['sts_spearman']:.2f} ({100 * r['sts_spearman'] / base['sts_spearman']:.1f}%)",
                f"{100 * r['ndcg@10']:.2f} ({100 * r['ndcg@10'] / base['ndcg@10']:.1f}%)",
                f"{100 * r['ndcg@10 pruned queries']:.2f}",
                f"{100 * r['ndcg@10 pruned passages']:.2f}",
                f"{r['cosine queries']:.3f} / {r['cosine passages']:.3f}",
            ]
        )
    summary = []
    for model in data["dense"]:
        for label, prefix in (
            ("neuron weight 1", "neuron weight 1"),
            ("neuron weight 0.5", "neuron Fisher x 0.5"),
            ("neuron weight 0.5, units chosen by the refit", CHOSEN_HALF),
        ):
            same = [
                r for r in data["rows"] if r["model"] == model and r["row"].startswith(prefix) and r["budget"] == 0.5
            ]
            if len(same) > 1:
                sts = statistics.mean(100 * r["sts_spearman"] for r in same)
                ndcg = statistics.mean(100 * r["ndcg@10"] for r in same)
                heads = statistics.mean(sum(r["heads_per_layer"]) for r in same)
                summary.append(
                    f"{model}, {label}: STS-B {sts:.2f}, nDCG@10 {ndcg:.2f}, {heads:.0f} heads kept (mean of "
                    f"{len(same)} calibration seeds)"
                )
    dense = "; ".join(
        f"{m}: STS-B {100 * s['sts_spearman']:.2f}, nDCG@10 {100 * s['ndcg@10']:.2f}" for m, s in data["dense"].items()
    )
    return (
        "# Why label-free budget pruning keeps STS-B but loses retrieval\n\n"
        "Label-free budget pruning of the published sentence-transformers checkpoint (the dense model is the "
        f"converged one: {dense}), one thing changed per row (bench/embedding_diagnosis.py says what each does); "
        "retraining-free, one run per row (calibration seed 0 unless the row says), the data split of "
        "bench/embeddings.py (retrieval: "
        "held-out SQuAD articles' questions against their paragraphs; calibration texts from the other articles "
        "and STS-B train). 'pruned queries': nDCG@10 of the pruned model's question embeddings against the dense "
        "model's passage embeddings ('pruned passages' the other way round); 'cosine': mean cosine between the "
        "pruned and dense embeddings of the questions / passages. Fisher precision: `auto` (bfloat16 on this "
        "CPU).\n\n"
        + markdown_table(
            [
                "model",
                "FLOPs",
                "row",
                "heads per layer",
                "neurons per layer",
                "STS-B Spearman (% kept)",
                "nDCG@10 (% kept)",
                "pruned queries",
                "pruned passages",
                "cosine q / p",
            ],
            table,
        )
        + ("\nOver calibration seeds: " + "; ".join(summary) + ".\n" if summary else "")
        + "".join(
            f"\nLatency of {model} pruned to {timing['budget']:.0%} of the FLOPs, ms (median, one "
            f"interleaved run, {timing['threads']} threads): "
            + "; ".join(
                f"{shape}: " + ", ".join(f"{name} {ms:.1f}" for name, ms in cells.items())
                for shape, cells in timing.items()
                if shape not in ("threads", "budget")
            )
            + ".\n"
            for model, timing in data.get("latency", {}).items()
        )
    )


if __name__ == "__main__":
    main()
