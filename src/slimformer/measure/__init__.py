"""Measure a model: parameters, analytic FLOPs, latency and size on disk.

``flops(model).encoder`` is the number pruning budgets refer to; see :func:`flops` for what is counted.
"""

from slimformer.measure.base import MeasureError
from slimformer.measure.disk import DiskSize, model_size_on_disk, size_on_disk
from slimformer.measure.flops import FlopCounts, encoder_flops, flops, layer_flops, linear_flops, shape_flops
from slimformer.measure.latency import LatencyStats, measure_latency, random_inputs
from slimformer.measure.params import ParamCounts, count_parameters
from slimformer.measure.report import (
    format_measurements,
    measure_model,
    measurement_rows,
    measurements_table,
    model_summary,
)

__all__ = [
    "DiskSize",
    "FlopCounts",
    "LatencyStats",
    "MeasureError",
    "ParamCounts",
    "count_parameters",
    "encoder_flops",
    "flops",
    "format_measurements",
    "layer_flops",
    "linear_flops",
    "measure_latency",
    "measure_model",
    "measurement_rows",
    "measurements_table",
    "model_size_on_disk",
    "model_summary",
    "random_inputs",
    "shape_flops",
    "size_on_disk",
]
