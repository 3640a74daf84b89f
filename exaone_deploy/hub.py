"""Checkpoints named by a Hugging Face Hub id (``ORG/NAME``), resolved to a local snapshot directory.

``huggingface_hub.snapshot_download`` does the work, so everything its users expect holds here: the standard
cache (``HF_HOME``, ``HF_HUB_CACHE``; files shared between revisions as blobs), ``HF_TOKEN`` (or a stored
login) for gated repos, offline mode (``HF_HUB_OFFLINE=1``: served from the cache, never the network),
``revision`` (branch, tag or commit). Only what export needs is downloaded: the root's safetensors weights and
index, its JSON files (config, generation config, tokenizer) and the chat template; never pickled weights,
GGUF or ONNX files, nor sub-folders (``original/``, ``onnx/``, ...).

Errors are one line naming the repo id (:class:`~exaone_deploy.checkpoint.CheckpointError`): absent from the
cache offline, unknown or gated repo, unknown revision, Hub unreachable.

Alternatives rejected: our own HTTP client (the cache layout, resumable downloads, auth and offline rules
are the Hub client's contract; a copy would drift), and ``local_dir`` downloads (a second copy of every file
beside the shared cache).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

__all__ = ["ALLOW_PATTERNS", "IGNORE_PATTERNS", "is_repo_id", "snapshot", "snapshot_origin"]

log = logging.getLogger(__name__)

ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "chat_template.jinja"]
IGNORE_PATTERNS = [
    "*/*",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.pkl",
    "*.gguf",
    "*.onnx",
    "*.onnx_data",
    "*.h5",
    "*.msgpack",
]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_repo_id(name: str | Path) -> bool:
    """True for a string shaped like ``ORG/NAME`` that is not an existing local path."""
    s = str(name)
    return (
        isinstance(name, str)
        and _REPO_ID.fullmatch(s) is not None
        and ".." not in s
        and not s.endswith(".git")
        and not Path(s).exists()
    )


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (default: main), downloading what is missing."""
    from .checkpoint import CheckpointError

    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: no such local directory; to fetch it from the Hugging Face Hub install "
            "huggingface-hub (pip install 'exaone-deploy[export]')"
        ) from None
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    log.info("resolving %s on the Hugging Face Hub", where)
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS
        )
    except hf_errors.RevisionNotFoundError:
        raise CheckpointError(f"{where}: revision not found on the Hugging Face Hub") from None
    except hf_errors.GatedRepoError:
        raise CheckpointError(f"{where}: gated repo; accept its terms on huggingface.co and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"{where}: no such local directory, and no such repo on the Hugging Face Hub (private repos need HF_TOKEN)"
        ) from None
    except hf_errors.LocalEntryNotFoundError as e:  # IncompleteSnapshotError (huggingface_hub 2.x) included
        from huggingface_hub import constants

        reason = (
            "not in the Hugging Face cache and HF_HUB_OFFLINE=1"
            if constants.HF_HUB_OFFLINE
            else "the Hugging Face Hub is unreachable and the cache does not hold it"
        )
        detail = " (incomplete snapshot)" if type(e).__name__ == "IncompleteSnapshotError" else ""
        raise CheckpointError(f"{where}: {reason}{detail} (cache: {constants.HF_HUB_CACHE})") from None
    except (hf_errors.HfHubHTTPError, hf_errors.HFValidationError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: cannot fetch from the Hugging Face Hub ({first})") from None
    return Path(path)


def snapshot_origin(path: str | Path) -> dict[str, str] | None:
    """``{"repo_id": "ORG/NAME", "revision": COMMIT}`` for a snapshot directory of the Hub cache
    (``.../models--ORG--NAME/snapshots/COMMIT``, what :func:`snapshot` returns), else None. Bundle manifests record
    it as their source (a bare directory name there would be a commit hash)."""
    parts = Path(path).parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    org_name = parts[-3][len("models--") :].split("--", 1)  # Hub names never hold "--"
    return {"repo_id": "/".join(org_name), "revision": parts[-1]} if len(org_name) == 2 else None
