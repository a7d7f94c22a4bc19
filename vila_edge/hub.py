"""Model ids from the Hugging Face hub: `vila-edge build Efficient-Large-Model/NVILA-Lite-2B`.

Every command that takes a checkpoint folder also takes `org/name` or `org/name@revision`. An argument
that names an existing folder is always the folder. Otherwise a hub id is resolved by huggingface_hub
into its own cache, so everything its users know applies: `HF_HOME` / `HF_HUB_CACHE` say where,
`HF_HUB_OFFLINE=1` forbids the network, `HF_TOKEN` (or `hf auth login`) opens gated and private repos,
a cached snapshot is used when the hub cannot be reached, and the download shows the library's
progress bars. Only the files the loader reads are fetched (`NEEDED_FILES`): configs, tokenizer,
safetensors weights and TinyChat AWQ `*v2.pt` files; not `trainer_state.json`, `pytorch_model.bin`
duplicates, remote code or images.

huggingface_hub is imported only here, and only when a hub id is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vila_edge.errors import CheckpointError

if TYPE_CHECKING:
    from vila_edge.catalog import KnownCheckpoint

# org/name with the hub's own character set; "@revision" is a branch, tag or commit (may contain "/").
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]+))?$")

# fnmatch patterns (a "*" also crosses "/"): what vila_edge.checkpoint and the builder read.
NEEDED_FILES = (
    "*config.json",  # config.json, llm/config.json, tokenizer_config.json, preprocessor_config.json, ...
    "*.safetensors",
    "*.safetensors.index.json",
    "*tokenizer*",  # tokenizer.json, tokenizer.model
    "*vocab.json",
    "*merges.txt",
    "*special_tokens_map.json",
    "*added_tokens.json",
    "*.jinja",  # chat templates saved next to the tokenizer
    "*awq*v2.pt",  # TinyChat AWQ LLM weights (VILA1.5-*-AWQ)
)


@dataclass(frozen=True)
class HubId:
    repo: str  # "org/name"
    revision: str | None  # None: the default branch

    @property
    def name(self) -> str:
        return self.repo.split("/", 1)[1]

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(text: str) -> HubId | None:
    """`org/name[@revision]` -> HubId; anything else (a path, a preset name) -> None."""
    m = _HUB_ID.match(str(text))
    if m is None or ".." in m["repo"]:
        return None
    return HubId(m["repo"], m["revision"])


def snapshot_repo_name(folder: Path) -> str | None:
    """'NVILA-8B' for a huggingface_hub cache snapshot (.../models--org--NVILA-8B/snapshots/<commit>), else None.

    The loader names a checkpoint after its folder (the chat format is derived from the name, as upstream);
    a snapshot folder is named after a commit hash, so the repository's name stands in for it.
    """
    folder = Path(folder)
    repo_dir = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo_dir.startswith("models--") and repo_dir.count("--") >= 2:
        return repo_dir.split("--", 2)[2]
    return None


def _download_hint(hub: HubId) -> str:
    rev = f" --revision {hub.revision}" if hub.revision else ""
    return (f"on a machine with network run `hf download {hub.repo}{rev} --local-dir {hub.name}`, "
            f"copy {hub.name}/ here and pass that folder")


def download(hub: HubId, *, cache_dir: str | Path | None = None, patterns=NEEDED_FILES) -> Path:
    """The snapshot folder of `hub` in the huggingface_hub cache, fetching the needed files if missing.

    Every way this can fail becomes one CheckpointError line saying what to do.
    """
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{hub}: hub ids need the huggingface_hub package (pip install huggingface_hub); "
                              f"or {_download_hint(hub)}") from None
    from huggingface_hub import constants

    where = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
    try:
        path = snapshot_download(hub.repo, revision=hub.revision, cache_dir=cache_dir,
                                 allow_patterns=list(patterns))
    except hf_errors.HFValidationError as exc:
        why = " ".join(str(exc).split())
        raise CheckpointError(f"{hub}: no local folder of that name, and not a valid hub id ({why})") from None
    except hf_errors.GatedRepoError:
        raise CheckpointError(f"{hub}: the model is gated: accept its terms on huggingface.co/{hub.repo} and set "
                              f"HF_TOKEN (or run `hf auth login`)") from None
    except hf_errors.RevisionNotFoundError:
        raise CheckpointError(f"{hub}: revision {hub.revision!r} does not exist on the hub; pass a branch, tag or "
                              f"commit of {hub.repo}") from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(f"{hub}: no local folder of that name and no such model on the hub (a private one "
                              f"needs HF_TOKEN); pass a checkpoint folder or a hub id such as "
                              f"Efficient-Large-Model/NVILA-Lite-2B") from None
    except hf_errors.LocalEntryNotFoundError as exc:  # offline or unreachable, and not (fully) in the cache
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        what = ("the cached copy is incomplete" if type(exc).__name__ == "IncompleteSnapshotError"
                else f"not in the hub cache {where}")
        raise CheckpointError(f"{hub}: no local folder of that name, {what} and {offline}; "
                              f"{_download_hint(hub)}") from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise CheckpointError(f"{hub}: the hub answered HTTP {status}; try again later, or "
                              f"{_download_hint(hub)}") from None
    except OSError as exc:  # disk full, read-only cache, ...
        raise CheckpointError(f"{hub}: cannot write the hub cache {where} ({exc}); set HF_HOME to a writable "
                              f"folder") from None
    except Exception as exc:  # the HTTP client's own errors (a proxy refusing, a broken download)
        if not type(exc).__module__.startswith(("httpx", "httpcore")):
            raise
        raise CheckpointError(f"{hub}: download failed ({type(exc).__name__}: {exc}); check the network or proxy, or "
                              f"{_download_hint(hub)}") from None
    return Path(path)


@dataclass(frozen=True)
class Resolved:
    """A checkpoint argument after resolution."""

    path: Path  # the folder to load
    hub: HubId | None  # set when the argument was a hub id
    known: KnownCheckpoint | None  # the table entry of a known id

    @property
    def name(self) -> str:
        """What to call the model (default engine folder): the repository name, else the folder name."""
        return self.hub.name if self.hub else Path(self.path).resolve().name

    def overrides(self, token_order: str | None = None, splice: str | None = None,
                  chat_format: str | None = None) -> dict:
        """The user's overrides, filled in from the known-checkpoints table for a known id."""
        k = self.known
        return {"token_order": token_order or (k.token_order if k else None),
                "splice": splice or (k.splice if k else None),
                "chat_format": chat_format or (k.chat_format if k else None)}


def resolve_checkpoint(arg, *, cache_dir: str | Path | None = None) -> Resolved:
    """A checkpoint argument -> the folder to load. A folder wins; `org/name[@rev]` goes through the hub
    cache; anything else is returned as a path (the loader then says it is missing)."""
    path = Path(arg)
    hub = None if path.exists() else parse_hub_id(str(arg))
    if hub is None:
        return Resolved(path, None, None)
    from vila_edge.catalog import find_known

    known = find_known(hub.repo)
    if known is not None and not known.loadable:
        raise CheckpointError(f"{hub}: {known.notes}")
    return Resolved(download(hub, cache_dir=cache_dir, patterns=known.files if known else NEEDED_FILES), hub, known)
