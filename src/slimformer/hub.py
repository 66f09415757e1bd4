"""Push a model folder to the Hugging Face hub, with its model card pointing at the repo it lands in.

Uploading is ``huggingface_hub``'s job (``HfApi.create_repo`` and one ``create_commit`` with every file of the
folder); slimformer only checks the folder first, rewrites the card's loading lines with the hub id, and turns the
hub's failures (offline mode, no network, no token, no permission) into one clear message.
"""

from __future__ import annotations

import os
from pathlib import Path

from slimformer.card import CARD_FILE, render_card
from slimformer.errors import ModelLoadError, SlimformerError
from slimformer.folders import MANIFEST, weight_files
from slimformer.models import hub_offline


class HubError(SlimformerError):
    """The hub could not take the upload."""


def push_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload every file of the model ``folder`` to the hub model repo ``repo_id`` (created if missing) in one
    commit, with ``README.md`` rendered for ``repo_id``; returns the commit's URL."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not weight_files(folder):
        raise ModelLoadError(f"{folder} is not a model folder (it needs config.json and safetensors weights).")
    if "/" not in repo_id or repo_id.count("/") > 1 or not all(repo_id.split("/")):
        raise HubError(f"--repo-id {repo_id!r} must look like 'user-or-org/model-name'.")
    if hub_offline():
        raise HubError("Cannot push: Hugging Face offline mode is on (HF_HUB_OFFLINE=1). Unset it and try again.")
    from huggingface_hub import CommitOperationAdd, HfApi

    card = render_card(folder, location=repo_id).encode()
    operations = [CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card)]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative != CARD_FILE and not relative.startswith("."):
            operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=str(path)))
    api = HfApi(token=token)
    message = commit_message or f"Upload {folder.name} ({MANIFEST} and model card by slimformer)"
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations=operations, commit_message=message, repo_type="model")
    except Exception as error:  # the hub raises many kinds (HTTP, connection, auth, offline): one message
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise HubError(
            f"Pushing {folder} to {repo_id} failed: {reason}. Check the network, that you are logged in "
            "(`hf auth login` or --token / $HF_TOKEN) and may write to that repo."
        ) from error
    return str(getattr(commit, "commit_url", commit))


__all__ = ["HubError", "push_to_hub"]
