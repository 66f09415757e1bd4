"""Run by test_ddp.py, under ``torchrun`` or as one plain process: slimformer's own ``finetune`` / ``distill`` for
each job of a JSON list, after which every process saves the weights it ended with and the Trainer's per-step
logs to ``<job's dump folder>/rank<R>.pt``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py JOBS.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


class DumpAtEnd(TrainerCallback):
    """Keeps the Trainer's per-step logs (loss, grad_norm) and saves them with this process's final weights."""

    def __init__(self, dump_dir: str | Path) -> None:
        self.dump_dir = Path(dump_dir)
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            self.logs.append({k: float(v) for k, v in logs.items()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        dump = {
            "weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "logs": self.logs,
            "world_size": args.world_size,
            "steps": state.global_step,
        }
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        torch.save(dump, self.dump_dir / f"rank{args.process_index}.pt")


def run(job: dict[str, Any]) -> None:
    """``job``: mode ("finetune" or "distill"), model (the teacher for distill), student (distill), train_file,
    dev_file, out, dump, batch_size (per process), max_steps, save_steps."""
    from slimformer.distill import distill
    from slimformer.tasks import load_custom_task
    from slimformer.train import TrainConfig, finetune

    data = load_custom_task(job["train_file"], job["dev_file"], text_columns=["text"], name="toy")
    config = TrainConfig(
        max_length=16,
        batch_size=job["batch_size"],
        max_steps=job["max_steps"],
        learning_rate=1e-3,
        save_steps=job["save_steps"],
        logging_steps=1,
    )
    callbacks = [DumpAtEnd(job["dump"])]
    if job["mode"] == "finetune":
        finetune(job["model"], data, job["out"], config=config, callbacks=callbacks)
    else:
        distill(job["model"], job["student"], data, job["out"], config=config, callbacks=callbacks, progress=False)


if __name__ == "__main__":
    for each in json.loads(Path(sys.argv[1]).read_text()):
        run(each)
