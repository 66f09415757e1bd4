"""The one gate-gradient loop: its summed mode (importance) and per-example mode (budget Fisher) agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_inputs, tiny_model
from slimformer.errors import SlimformerError
from slimformer.gradients import gate_gradients, model_fisher_probe_loss
from slimformer.prune import PruningPlan, plan_gates


def batches(n: int, size: int, seq: int = 9, classes: int = 3):
    return [{**tiny_inputs(batch=size, seq=seq, seed=s), "labels": torch.arange(size) % classes} for s in range(n)]


def one_example_batches(data):
    return [{k: v[row : row + 1] for k, v in batch.items()} for batch in data for row in range(len(batch["labels"]))]


def groups(result):
    return {"heads": result.heads, "neurons": result.neurons, "mlps": [result.mlps]}


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_with_one_example_per_batch_both_modes_agree(family):
    model = tiny_model(family)
    singles = one_example_batches(batches(n=2, size=3))
    per_example = gate_gradients(model, singles, per_example=True, progress=False)
    squared = gate_gradients(model, singles, square=True, progress=False)
    absolute = gate_gradients(model, singles, progress=False)
    assert per_example.n_examples == squared.n_examples == absolute.n_examples == 6
    assert per_example.heads[0].shape == (6, 4) and per_example.mlps.shape == (6, 2)
    nonzero = 0
    for name, rows in groups(per_example).items():
        for layer, grads in enumerate(rows):
            fisher = (grads.double() ** 2).sum(0).numpy()
            np.testing.assert_allclose(fisher, groups(squared)[name][layer], rtol=1e-5, atol=1e-12, err_msg=name)
            summed = grads.double().abs().sum(0).numpy()
            np.testing.assert_allclose(summed, groups(absolute)[name][layer], rtol=1e-5, atol=1e-12, err_msg=name)
            nonzero += int((fisher > 0).sum())
    assert nonzero > 20  # the comparison is not between zeros


def test_per_example_gradients_sum_to_the_batch_gradient():
    """The batch-mean loss is the sum of the per-example losses over the batch size."""
    model = tiny_model("bert")
    data = batches(n=1, size=4)
    per_example = gate_gradients(model, data, per_example=True, progress=False)
    mean = gate_gradients(model, data, progress=False)
    for name, rows in groups(per_example).items():
        for layer, grads in enumerate(rows):
            batch_gradient = grads.double().sum(0).abs().numpy() / 4
            np.testing.assert_allclose(batch_gradient, groups(mean)[name][layer], rtol=1e-4, atol=1e-10)


def test_fixed_masks_give_zero_in_both_modes_and_the_model_is_restored():
    model = tiny_model("bert")
    full = PruningPlan.keep_all(model)
    plan = PruningPlan(
        layout=full.layout,
        kept_heads=[[0, 1], [0, 1, 2, 3]],
        kept_neurons=[list(range(64)), list(range(0, 64, 2))],
        model_type="bert",
    )
    base = plan_gates(model, plan)
    singles = one_example_batches(batches(n=1, size=3))
    per_example = gate_gradients(model, singles, per_example=True, base=base, progress=False)
    squared = gate_gradients(model, singles, square=True, base=base, progress=False)
    assert torch.all(per_example.heads[0][:, 2:] == 0) and np.all(squared.heads[0][2:] == 0)
    assert torch.all(per_example.neurons[1][:, 1::2] == 0) and np.all(squared.neurons[1][1::2] == 0)
    assert np.all(squared.heads[0][:2] > 0) and np.all(squared.neurons[1][::2] > 0)
    np.testing.assert_allclose((per_example.heads[0].double() ** 2).sum(0).numpy(), squared.heads[0], rtol=1e-5)
    assert not model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_labels_are_needed_unless_label_free():
    model = tiny_model("bert")
    unlabelled = [tiny_inputs(batch=2)]
    with pytest.raises(SlimformerError, match="no labels"):
        gate_gradients(model, unlabelled, progress=False)
    assert gate_gradients(model, unlabelled, label_free=True, per_example=True, progress=False).n_examples == 2
    regression = tiny_model("bert", num_labels=1)
    with pytest.raises(SlimformerError, match="classification"):
        gate_gradients(regression, unlabelled, label_free=True, progress=False)
    assert all(p.requires_grad for p in model.parameters())  # restored after the error too


def probe_covariance(logits_row: torch.Tensor, regression: bool, draws: int = 200_000) -> torch.Tensor:
    """The covariance of the probe loss's gradient in the logits, over ``draws`` copies of one example."""
    logits = logits_row.repeat(draws, 1).requires_grad_(True)
    loss = model_fisher_probe_loss(logits, regression, torch.Generator().manual_seed(0), reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits)
    return grad.T @ grad / draws


def test_model_fisher_probe_has_the_softmax_curvature_as_its_covariance():
    # the gradient in the logits is A r with A A^T = diag(p) - p p^T, so masks' gradients (J^T A r) have
    # covariance J^T (diag(p) - p p^T) J: the Fisher of the model's own distribution
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]], dtype=torch.float64)
    p = logits.softmax(-1)[0]
    torch.testing.assert_close(probe_covariance(logits, False), torch.diag(p) - torch.outer(p, p), atol=5e-3, rtol=0)
    # a sure prediction gives (nearly) no curvature, as the model's own distribution says
    sure = torch.tensor([[30.0, 0.0, 0.0]], dtype=torch.float64)
    assert probe_covariance(sure, False).abs().max() < 1e-9
    # a regression head's unit Gaussian: identity curvature
    torch.testing.assert_close(probe_covariance(torch.tensor([[0.3]]), True), torch.ones(1, 1), atol=1e-2, rtol=0)


def test_model_fisher_needs_no_labels_and_unknown_kinds_are_refused():
    model = tiny_model("bert")
    unlabelled = [{k: v for k, v in batch.items() if k != "labels"} for batch in batches(n=2, size=3)]
    with pytest.raises(SlimformerError, match="no labels"):
        gate_gradients(model, unlabelled, per_example=True, progress=False)
    result = gate_gradients(model, unlabelled, per_example=True, fisher="model", progress=False)
    assert result.n_examples == 6 and all(bool(h.abs().sum() > 0) for h in result.heads)
    # not the labels' gradients: the probe replaces the loss
    labelled = gate_gradients(model, batches(n=2, size=3), per_example=True, progress=False)
    assert not torch.allclose(result.heads[0], labelled.heads[0])
    with pytest.raises(SlimformerError, match="Unknown fisher"):
        gate_gradients(model, unlabelled, fisher="exact", progress=False)
