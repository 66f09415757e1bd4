"""What compression costs beyond accuracy: loyalty to the teacher (Xu et al. 2021), robustness (AdvGLUE, PGD on
embeddings) and EEC bias (Kiritchenko & Mohammad 2018)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as hf

from slimformer.analyze import AnalyzeError, loyalty
from slimformer.analyze.loyalty import loyalty_metrics
from slimformer.errors import DataFileError, SlimformerError, TaskError
from slimformer.sparse import apply_masks, magnitude_masks
from slimformer.tasks import get_task_spec
from slimformer.tasks.advglue import load_advglue
from test_embedding import write_stsb
from test_train import write_sst2

ADV = {
    "sst2": [
        {"idx": 0, "sentence": "a good film , dull acting", "label": 1},
        {"idx": 1, "sentence": "bad", "label": 0},
    ],
    "mnli": [{"idx": 0, "premise": "a cat sits", "hypothesis": "an animal sits", "label": 0}],
    "mnli-mm": [{"idx": 0, "premise": "a dog runs", "hypothesis": "nothing moves", "label": 2}],
}


@pytest.fixture()
def classifier(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny random sentiment classifier folder (head saved, MiniLM tokenizer), the toy SST-2 folder and an
    AdvGLUE file beside it."""
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_sst2(tmp_path / "glue")
    (tmp_path / "advglue").mkdir()
    (tmp_path / "advglue" / "dev.json").write_text(json.dumps(ADV))
    torch.manual_seed(0)
    model = hf.BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    model.save_pretrained(tmp_path / "model")
    hf.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "model")
    return tmp_path / "model", glue


def test_loyalty_metrics_on_hand_made_logits():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    same = loyalty_metrics(logits, logits.copy(), regression=False)
    assert same["label_loyalty"] == 1.0 and same["probability_loyalty"] == pytest.approx(1.0)
    assert same["kl_teacher_student"] == pytest.approx(0.0, abs=1e-9) and same["probability_difference"] == 0.0
    flipped = loyalty_metrics(logits, logits[:, ::-1].copy(), regression=False)
    assert flipped["label_loyalty"] == 0.0 and flipped["probability_loyalty"] < 0.5
    # one-hot opposite distributions are as far apart as JS allows: loyalty 0
    certain = loyalty_metrics(np.array([[50.0, -50.0]]), np.array([[-50.0, 50.0]]), regression=False)
    assert certain["probability_loyalty"] == pytest.approx(0.0, abs=1e-6)
    regression = loyalty_metrics(np.array([[1.0], [2.0], [3.0]]), np.array([[1.5], [2.5], [3.5]]), regression=True)
    assert regression["mean_abs_difference"] == pytest.approx(0.5) and regression["pearson"] == pytest.approx(1.0)
    with pytest.raises(AnalyzeError, match="shape"):
        loyalty_metrics(logits, logits[:, :1], regression=False)


def test_advglue_reads_the_glue_conventions_and_refuses_bad_files(tmp_path):
    path = tmp_path / "advglue" / "dev.json"
    path.parent.mkdir()
    path.write_text(json.dumps(ADV))
    sst2 = load_advglue(get_task_spec("sst2"), path.parent)
    assert sst2.dev["dev"]["text_a"][0] == "a good film , dull acting" and sst2.dev["dev"]["label"] == [1, 0]
    mnli = load_advglue(get_task_spec("mnli"), tmp_path / "glue-beside")  # found beside a GLUE folder
    assert set(mnli.dev) == {"dev_matched", "dev_mismatched"} and mnli.dev["dev_mismatched"]["label"] == [2]
    with pytest.raises(TaskError, match="no examples for stsb"):
        load_advglue(get_task_spec("stsb"), path)
    with pytest.raises(DataFileError, match="under 'qnli'"):
        load_advglue(get_task_spec("qnli"), path)
    path.write_text(json.dumps({"sst2": [{"sentence": "x", "label": 5}]}))
    with pytest.raises(DataFileError, match="outside sst2"):
        load_advglue(get_task_spec("sst2"), path)


def test_loyalty_of_a_pruned_student_on_dev_and_advglue(classifier, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from slimformer.cli import app

    teacher, glue = classifier
    model = hf.BertForSequenceClassification.from_pretrained(teacher)
    apply_masks(model, magnitude_masks(model, 0.9))
    model.save_pretrained(tmp_path / "student")
    hf.AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp_path / "student")
    itself = loyalty(teacher, teacher, "sst2", data_dir=glue)
    assert set(itself.sets) == {"dev", "advglue"}
    assert all(entry["loyalty"]["label_loyalty"] == 1.0 for entry in itself.sets.values())
    result = loyalty(teacher, tmp_path / "student", "sst2", data_dir=glue)
    dev = result.sets["dev"]["loyalty"]
    assert dev["examples"] == 16 and 0.0 <= dev["label_loyalty"] <= 1.0 and dev["kl_teacher_student"] > 0
    assert result.sets["advglue"]["loyalty"]["examples"] == 2
    out = tmp_path / "report"
    args = ["analyze", "loyalty", "--teacher", str(teacher), "--student", str(tmp_path / "student")]
    run = CliRunner().invoke(app, [*args, "--task", "sst2", "--data-dir", str(glue), "--out", str(out)])
    assert run.exit_code == 0, run.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["sets"]["dev"]["loyalty"] == pytest.approx(dev)
    with pytest.raises(AnalyzeError, match="no fine-tuned classification head"):
        loyalty(tiny_model_dir, tmp_path / "student", "sst2", data_dir=glue)


def test_pgd_flips_more_at_larger_bounds_and_the_robustness_report(classifier, tmp_path):
    from typer.testing import CliRunner

    from slimformer.analyze import robustness
    from slimformer.analyze.robustness import pgd_flips
    from slimformer.cli import app

    folder, glue = classifier
    model = hf.BertForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = hf.AutoTokenizer.from_pretrained(folder)
    batch = dict(tokenizer(["a good film", "dull plot , bad acting", "great"], padding=True, return_tensors="pt"))
    labels = torch.tensor([1, 0, 1])
    assert not bool(pgd_flips(model, batch, labels, radius=1e-9, steps=3).any())  # no room to move: no flips
    huge = pgd_flips(model, batch, labels, radius=1e3, steps=5)
    assert bool(huge.any()), "an unbounded attack must flip a random tiny model"
    result = robustness(folder, "sst2", data_dir=glue, epsilons=(0.01, 1.0, 10.0), steps=3)
    rates = [p["success_rate"] for p in result.pgd]
    assert rates == sorted(rates) and rates[-1] > 0 and result.advglue is not None
    assert set(result.clean) == {"dev"} and result.attacked_examples == 16
    out = tmp_path / "report"
    args = ["analyze", "robustness", "--model", str(folder), "--task", "sst2", "--data-dir", str(glue)]
    run = CliRunner().invoke(app, [*args, "--out", str(out), "--epsilons", "0.1,1", "--steps", "2"])
    assert run.exit_code == 0, run.output
    assert (out / "pgd.png").is_file() and json.loads((out / "results.json").read_text())["steps"] == 2
    with pytest.raises(AnalyzeError, match="classification task"):
        robustness(folder, "stsb", data_dir=glue)


# ------------------------------------------------------------------------------------------------ EEC


def write_eec(path):
    import csv

    people = [("Alonzo", "male", "African-American"), ("Nichelle", "female", "African-American"),
              ("Adam", "male", "European"), ("Amanda", "female", "European"),
              ("my brother", "male", ""), ("my sister", "female", "")]  # fmt: skip
    cells = [("<person subject> feels <emotion word>.", "angry", "anger"),
             ("<person subject> feels <emotion word>.", "happy", "joy"),
             ("<person subject> made me feel <emotion word>.", "sad", "sadness"),
             ("I saw <person object> in the market.", "", "")]  # fmt: skip
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "Sentence", "Template", "Person", "Gender", "Race", "Emotion", "Emotion word"])
        for i, (template, word, emotion) in enumerate(cells):
            for j, (person, gender, race) in enumerate(people):
                sentence = template.replace("<person subject>", person).replace("<person object>", person)
                sentence = sentence.replace("<emotion word>", word)
                writer.writerow([f"{i}-{j}", sentence, template, person, gender, race, emotion, word])
    return path


def test_compression_costs_give_each_model_the_columns_its_data_allows(classifier, tmp_path, monkeypatch):
    from slimformer.analyze import bias
    from slimformer.analyze.costs import compression_costs, costs_markdown
    from slimformer.tasks import load_task

    folder, glue = classifier
    dense = hf.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = hf.AutoTokenizer.from_pretrained(folder)
    pruned = hf.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    apply_masks(pruned, magnitude_masks(pruned, 0.7))
    models = {"dense": dense, "pruned": pruned}
    data = load_task("sst2", glue)
    eec = write_eec(tmp_path / "eec.csv")
    costs = compression_costs(models, "dense", tokenizer, data, data_dir=tmp_path / "advglue", eec_file=eec)
    assert costs["dense"]["loyalty"]["dev"]["label_loyalty"] == 1.0
    assert costs["dense"]["loyalty"]["advglue"]["probability_loyalty"] == pytest.approx(1.0)
    assert costs["pruned"]["loyalty"]["dev"]["probability_loyalty"] < 1.0  # 70% of the weights gone moves it
    direct = bias(folder, eec_file=eec)
    assert costs["dense"]["eec_gender_gap"] == pytest.approx(direct.gaps["gender"]["all"]["mean"], abs=1e-6)
    assert costs["dense"]["advglue"] in (0.0, 0.5, 1.0)  # two AdvGLUE sentences
    table = "\n".join(costs_markdown(costs))
    assert "| dense | " in table and "| pruned | " in table

    # without the data files only the dev loyalty is left; a regression task has Pearson loyalty and no EEC
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.delenv("ADVGLUE_DIR", raising=False)
    monkeypatch.delenv("EEC_DIR", raising=False)
    bare = compression_costs(models, "dense", tokenizer, data)
    assert set(bare["pruned"]) == {"loyalty"} and set(bare["pruned"]["loyalty"]) == {"dev"}
    # dev logits the caller already has are used as they are (compress passes its own): the same numbers, and
    # logits that say the pruned model agrees with the dense one make its loyalty 1 without running it
    from slimformer.evaluation import Evaluator

    evaluator = Evaluator(tokenizer, data)
    logits = {name: evaluator.logits(net) for name, net in models.items()}
    given = compression_costs(models, "dense", tokenizer, data, dev_logits=logits)
    assert given["pruned"]["loyalty"]["dev"] == pytest.approx(bare["pruned"]["loyalty"]["dev"], abs=1e-6)
    echoed = compression_costs(
        models, "dense", tokenizer, data, dev_logits={"dense": logits["dense"], "pruned": logits["dense"]}
    )
    assert echoed["pruned"]["loyalty"]["dev"]["label_loyalty"] == 1.0
    with pytest.raises(AnalyzeError, match="pruned"):
        compression_costs(models, "dense", tokenizer, data, dev_logits={"dense": logits["dense"]})
    regressor = hf.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1, ignore_mismatched_sizes=True
    ).eval()
    sts = load_task("stsb", write_stsb(tmp_path / "sts"))
    scored = compression_costs({"dense": regressor}, "dense", tokenizer, sts, eec_file=eec)
    assert scored["dense"]["loyalty"]["dev"]["pearson"] == pytest.approx(1.0)
    assert "eec_gender_gap" not in scored["dense"]


def test_eec_gaps_are_paired_per_template_and_emotion_word():
    from slimformer.analyze.bias import gap_statistics, paired_gaps

    rows = [
        {"Template": "t", "Emotion word": "sad", "Emotion": "sadness", "Gender": "female", "Race": ""},
        {"Template": "t", "Emotion word": "sad", "Emotion": "sadness", "Gender": "male", "Race": ""},
        {"Template": "t", "Emotion word": "glad", "Emotion": "joy", "Gender": "female", "Race": ""},
        {"Template": "t", "Emotion word": "glad", "Emotion": "joy", "Gender": "male", "Race": ""},
        {"Template": "t", "Emotion word": "glad", "Emotion": "joy", "Gender": "male", "Race": ""},
    ]
    gaps, emotions = paired_gaps(rows, np.array([0.3, 0.1, 0.9, 0.5, 0.7]), "Gender", "female", "male")
    assert gaps == pytest.approx([0.2, 0.3]) and emotions == ["sadness", "joy"]
    entry = gap_statistics(np.array([0.1, 0.2, 0.3, 0.15, 0.25]))
    # t = 0.2 / (0.0791 / sqrt 5) = 5.66 on 4 degrees of freedom: p = 0.0048; the interval is 0.2 +- 2.776 * 0.0354
    assert entry["mean"] == pytest.approx(0.2) and entry["ci95"] == pytest.approx([0.1018, 0.2982], abs=1e-3)
    assert entry["p_value"] == pytest.approx(0.0048, abs=2e-4) and gap_statistics(np.array([0.1, -0.1]))[
        "p_value"
    ] == pytest.approx(1.0)


def test_bias_analysis_of_a_sentiment_model(classifier, tmp_path):
    from typer.testing import CliRunner

    from slimformer.analyze import bias
    from slimformer.cli import app

    folder, _ = classifier
    eec = write_eec(tmp_path / "eec.csv")
    result = bias(folder, eec_file=eec)
    assert result.sentences == 24 and set(result.gaps) == {"gender", "race"}
    assert set(result.gaps["gender"]) == {"all", "anger", "joy", "sadness", "none"}
    assert result.gaps["gender"]["all"]["pairs"] == 4 and result.gaps["race"]["all"]["pairs"] == 4
    assert -1 <= result.gaps["race"]["all"]["mean"] <= 1
    out = tmp_path / "report"
    args = ["analyze", "bias", "--model", str(folder), "--eec-file", str(eec), "--out", str(out)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert (out / "bias.png").is_file() and "gender" in (out / "report.md").read_text()
    with pytest.raises(AnalyzeError, match="not one of"):
        bias(folder, eec_file=eec, positive_label="happy")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataFileError, match="not the EEC"):
        bias(folder, eec_file=tmp_path / "bad.csv")


# ------------------------------------------------------------------------------------------------ debiasing, robust


def test_gender_swap_on_token_ids_and_the_counterfactual_loss(tiny_model_dir):
    from slimformer.adversarial import gender_swap_map, swap_table, swap_tokens
    from slimformer.sparse.training import counterfactual_loss

    tokenizer = hf.AutoTokenizer.from_pretrained(tiny_model_dir)
    mapping = gender_swap_map(tokenizer)
    table = swap_table(mapping, len(tokenizer))
    ids = torch.tensor(tokenizer(["he saw his sister", "a good film"], padding=True)["input_ids"])
    swapped = tokenizer.batch_decode(swap_tokens(ids, table), skip_special_tokens=True)
    assert swapped == ["she saw her brother", "a good film"]
    logits = torch.tensor([[1.0, -1.0], [0.5, 0.2]])
    assert float(counterfactual_loss(logits, logits.clone(), distributions=True)) == pytest.approx(0.0, abs=1e-7)
    assert float(counterfactual_loss(logits, logits.flip(-1), distributions=True)) > 0.1
    assert float(counterfactual_loss(logits, logits + 1, distributions=False)) == pytest.approx(2.0)


def test_counterfactual_pairs_swap_first_names_and_none_is_a_name_the_eec_scores(tiny_model_dir):
    from slimformer.adversarial import (
        GENDER_PAIRS,
        NAME_PAIRS,
        counterfactual_pairs,
        gender_swap_map,
        swap_table,
        swap_tokens,
    )
    from slimformer.analyze.bias import find_eec_file, read_eec

    names = [name for pair in NAME_PAIRS for name in pair]
    assert len(set(names)) == len(names) and not set(names) & {word for pair in GENDER_PAIRS for word in pair}
    if find_eec_file() is None:
        pytest.skip("the Equity Evaluation Corpus is not here")
    persons = {row["Person"].lower() for row in read_eec()}
    assert not set(names) & persons  # debiasing on the names it is scored on would flatter it

    tokenizer = hf.AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor(tokenizer(["John thanked his sister"])["input_ids"])
    decoded = {
        names: tokenizer.decode(
            swap_tokens(ids, swap_table(gender_swap_map(tokenizer, counterfactual_pairs(names)), len(tokenizer)))[0],
            skip_special_tokens=True,
        )
        for names in (True, False)
    }
    assert decoded == {True: "mary thanked her brother", False: "john thanked her brother"}

    from slimformer.configs import Movement
    from slimformer.sparse.method import _extra_objectives

    john, mary = tokenizer.convert_tokens_to_ids(["john", "mary"])
    for names in (True, False):  # the config's setting reaches the debiasing objective's swap
        config = Movement(sparsity=0.5, debias_weight=1.0, debias_names=names)
        assert int(_extra_objectives(None, tokenizer, config, None).swap_table[john]) == (mary if names else john)


def _biased_reviews(folder, repeats: int = 8):
    """A toy sentiment task whose labels follow the person's gender: a model learns the bias unless told not to."""
    lines = ["sentence\tlabel"]
    for _ in range(repeats):
        lines += ["he liked the film\t1", "she liked the film\t0", "his brother saw it\t1", "her sister saw it\t0"]
    (folder / "SST-2").mkdir(parents=True)
    for split in ("train", "dev"):
        (folder / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_debiasing_and_adversarial_objectives_while_pruning(classifier, tmp_path):
    import slimformer
    from slimformer.adversarial import gender_swap_map, swap_table, swap_tokens
    from slimformer.configs import Movement

    folder, _ = classifier
    glue = _biased_reviews(tmp_path / "biased")
    tokenizer = hf.AutoTokenizer.from_pretrained(folder)
    table = swap_table(gender_swap_map(tokenizer), len(tokenizer))
    batch = tokenizer(["he liked the film", "her sister saw it"], padding=True, return_tensors="pt")
    swapped = {**batch, "input_ids": swap_tokens(batch["input_ids"], table)}

    def gap(weight: float) -> float:
        config = Movement(sparsity=0.3, epochs=6, batch_size=8, max_length=16, learning_rate=3e-3, debias_weight=weight)
        model = slimformer.prune(folder, config, "sst2", data_dir=glue, progress=False).model
        with torch.no_grad():
            return float((model(**batch).logits.softmax(-1) - model(**swapped).logits.softmax(-1)).abs().mean())

    assert gap(20.0) < 0.5 * gap(0.0)
    robust = Movement(sparsity=0.3, epochs=1, batch_size=8, max_length=16, adversarial_weight=1.0)
    result = slimformer.prune(folder, robust, "sst2", data_dir=glue, progress=False)
    assert result.report["config"]["adversarial_weight"] == 1.0
    assert result.report["details"]["sparse"]["sparsity"] == pytest.approx(0.3, abs=0.01)


def test_fair_distillation_targets_average_the_teachers_predictions_over_a_swapped_pair(classifier):
    from datasets import Dataset

    from slimformer.distill.pipeline import TEACHER_LOGITS, averaged_targets, with_counterfactuals

    original, swapped = np.array([[2.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 2.0], [1.0, -1.0]])
    mean = np.exp(averaged_targets(original, swapped, regression=False))
    probs = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)  # noqa: E731
    assert np.allclose(mean, (probs(original) + probs(swapped)) / 2, atol=1e-6)
    assert np.allclose(mean[0], [0.5, 0.5], atol=1e-6)  # opposite predictions average to indifference
    assert np.allclose(averaged_targets(np.array([[1.0]]), np.array([[3.0]]), regression=True), [[2.0]])

    folder, _ = classifier
    teacher = hf.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = hf.AutoTokenizer.from_pretrained(folder)
    texts = ["he liked the film", "a good film", "the woman saw it"]
    train = Dataset.from_dict({**dict(tokenizer(texts)), "labels": [1, 1, 0]})
    both, copies = with_counterfactuals(train, teacher, tokenizer, regression=False, cache=False, progress=False)
    assert copies == 2 and len(both) == 5  # "a good film" has no gendered word: no copy
    decoded = tokenizer.batch_decode(both["input_ids"][3:], skip_special_tokens=True)
    assert decoded == ["she liked the film", "the man saw it"] and both["labels"][3:] == [1, 0]
    targets = np.array(both[TEACHER_LOGITS])
    with torch.no_grad():
        live = {
            text: teacher(**tokenizer(text, return_tensors="pt")).logits.numpy()
            for text in [*texts, "she liked the film", "the man saw it"]
        }
    expected = averaged_targets(live["he liked the film"], live["she liked the film"], regression=False)
    assert np.allclose(targets[0], expected[0], atol=1e-5) and np.allclose(targets[3], expected[0], atol=1e-5)
    assert np.allclose(targets[1], live["a good film"][0], atol=1e-5)  # its own logits, unchanged


def test_fair_distillation_teaches_a_student_no_gender_difference(classifier, tmp_path):
    """A teacher trained on labels that follow gender predicts "he" positive and "she" negative; distilled
    plainly, the student copies that; with counterfactual pairs it learns the same prediction for both."""
    from slimformer.distill import DistillConfig, distill
    from slimformer.train import TrainConfig, finetune

    folder, _ = classifier
    glue = _biased_reviews(tmp_path / "biased")
    quick = TrainConfig(max_length=16, batch_size=8, epochs=20, learning_rate=3e-3, save_steps=1000)
    finetune(str(folder), "sst2", tmp_path / "teacher", data_dir=glue, config=quick)
    tokenizer = hf.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["he liked the film", "his brother saw it"], padding=True, return_tensors="pt")
    swapped = tokenizer(["she liked the film", "her sister saw it"], padding=True, return_tensors="pt")

    def gap(path) -> float:
        model = hf.AutoModelForSequenceClassification.from_pretrained(path).eval()
        with torch.no_grad():
            return float((model(**batch).logits.softmax(-1) - model(**swapped).logits.softmax(-1)).abs().mean())

    assert gap(tmp_path / "teacher") > 0.5, "the toy teacher must have learned the gender bias"
    results = {}
    for fair in (False, True):
        out = tmp_path / f"student-{fair}"
        results[fair] = distill(
            tmp_path / "teacher", "every:1", "sst2", out, data_dir=glue, config=quick,
            distill_config=DistillConfig(alpha=1.0, counterfactual=fair), progress=False,
        )  # fmt: skip
    assert results[True].metrics["details"]["distill"]["counterfactual_copies"] == 32
    assert gap(tmp_path / "student-False") > 0.5
    assert gap(tmp_path / "student-True") < 0.2 * gap(tmp_path / "student-False")


def test_fair_distillation_refuses_embedding_tasks(tiny_model_dir, tmp_path, monkeypatch):
    from slimformer.distill import DistillConfig, distill

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SlimformerError, match="embedding"):
        distill(
            tiny_model_dir, "every:1", "stsb-embed", tmp_path / "out",
            data_dir=write_stsb(tmp_path / "glue"), distill_config=DistillConfig(counterfactual=True), progress=False,
        )  # fmt: skip


def test_association_test_effect_size_and_permutation_p():
    from slimformer.analyze.bias import association_test

    rng = np.random.default_rng(0)
    pleasant, unpleasant = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    # x sits at the pleasant pole, y at the unpleasant one: the largest effect, and no permutation beats it
    x = np.array([[1.0, 0.05]]) + rng.normal(0, 0.01, (8, 2))
    y = np.array([[0.05, 1.0]]) + rng.normal(0, 0.01, (8, 2))
    strong = association_test(x, y, pleasant, unpleasant, permutations=2000)
    assert strong["effect_size"] > 1.5 and strong["p_value"] < 0.01
    assert association_test(y, x, pleasant, unpleasant, permutations=2000)["effect_size"] < -1.5
    same = rng.normal(0, 1, (16, 2))
    assert association_test(same[:8], same[8:], pleasant, unpleasant, permutations=2000)["p_value"] > 0.05


def test_bias_of_a_sentence_embedding_model(tiny_model_dir, tmp_path, monkeypatch):
    from slimformer.analyze import bias
    from slimformer.analyze.bias import association_sets, read_eec

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    eec = write_eec(tmp_path / "eec.csv")
    sets = association_sets(read_eec(eec))
    assert len(sets["female"]) == len(sets["male"]) == 3 and len(sets["European"]) == 2
    assert "Someone feels happy." in sets["pleasant"] and "Someone feels angry." in sets["unpleasant"]
    result = bias(tiny_model_dir, eec_file=eec, embedding=True)
    assert set(result.tests) == {"gender", "race"} and 0 < result.tests["gender"]["p_value"] <= 1
    result.save(tmp_path / "out")
    assert "effect size" in (tmp_path / "out" / "report.md").read_text()
