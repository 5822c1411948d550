"""Publishing to the Hugging Face Hub: checks first, then one commit of a freshly written folder."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from ivtrainer.errors import IVTrainerError

__all__ = [
    "HubError",
    "NoTokenInArgsMixin",
    "check_push_target",
    "check_trainer_push",
    "looks_like_path",
    "push_folder",
    "split_revision",
]


def looks_like_path(name: str) -> bool:
    """True for a string that can only be a local path, never a Hub id (``org/name``): a mistyped
    folder must fail as one instead of becoming a download."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def split_revision(name: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``: wherever ivtrainer takes a Hub id it takes a
    revision (branch, tag or commit) this way. Repo ids cannot contain ``@``; an existing local
    path is never split."""
    from pathlib import Path

    if "@" not in name or Path(name).expanduser().exists() or looks_like_path(name.split("@", 1)[0]):
        return name, None
    repo, revision = name.rsplit("@", 1)
    return repo, revision or None


class HubError(IVTrainerError, ValueError):
    """Pushing cannot start: no repo id or no token."""


def check_push_target(repo_id: str | None, token: str | None = None) -> str:
    """The token to push with; raises HubError naming the fix if the repo id or token is missing."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise HubError("pushing needs a repo id such as 'your-name/model-name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"invalid repo id {repo_id!r}: {str(exc).splitlines()[0]}") from None
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass token=...")
    return token


def check_trainer_push(args, token: str | None = None) -> None:
    """For ivtrainer's trainers: the repo id the Trainer would push to (``hub_model_id``, else the
    output folder's name) and a token must exist, checked before any training."""
    from pathlib import Path

    check_push_target(args.hub_model_id or Path(args.output_dir).absolute().name, token or args.hub_token)


def push_folder(
    write: Callable[[Path], object],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload with ivtrainer",
) -> str:
    """Check the repo id and token, let ``write(folder)`` fill a temporary folder, upload it as one
    commit (creating the model repo if needed) and return the commit URL."""
    from huggingface_hub import HfApi

    token = check_push_target(repo_id, token)
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, repo_type="model", commit_message=commit_message
        )
    return commit.commit_url if hasattr(commit, "commit_url") else str(commit)


class NoTokenInArgsMixin:
    """Trainer mixin: the ``training_args.bin`` that ``Trainer`` pickles next to the weights (and
    ``push_to_hub`` uploads) is written without ``hub_token``."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        if args.hub_token and args.should_save:
            import copy
            import os

            import torch
            from transformers.trainer import TRAINING_ARGS_NAME

            redacted = copy.copy(args)
            redacted.hub_token = None
            torch.save(redacted, os.path.join(output_dir or args.output_dir, TRAINING_ARGS_NAME))
