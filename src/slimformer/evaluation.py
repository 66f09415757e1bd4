# TEMPORARY shim until the rooms branch lands (do not commit)
from slimformer.train import evaluate, evaluate_model, headline_score, predict

__all__ = ["evaluate", "evaluate_model", "headline_score", "predict"]
