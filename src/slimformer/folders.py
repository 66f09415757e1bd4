# TEMPORARY shim until the rooms branch lands (do not commit)
from slimformer.prune.saving import read_manifest, save_pruned

__all__ = ["read_manifest", "save_model_folder"]


def save_model_folder(model, tokenizer, out_dir, *, plan=None, task=None, extra=None, json_files=None, overwrite=False):
    return save_pruned(
        model,
        tokenizer,
        out_dir,
        plan=plan,
        extra={**(extra or {}), "task": task},
        json_files=json_files,
        overwrite=overwrite,
    )
