"""Where a model (or a LoRA file) comes from: a local path or a Hugging Face repo id."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from ideogram4_mlx.config import CheckpointError
from ideogram4_mlx.errors import Ideo4Error, InputError

DEFAULT_REPO = "ideogram-ai/ideogram-4-fp8"
# What the pipeline reads: the text-encoder, DiT and VAE folders plus the tokenizer. The
# unconditional DiT is read only by a step whose guidance is not 1 (Ideogram4Pipeline.check).
REQUIRED_FILES = (
    "transformer/config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
    "vae/config.json",
)
ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "text_encoder/*",
    "transformer/*",
    "unconditional_transformer/*",
    "vae/*",
]
# Connection failures of huggingface_hub's HTTP stacks (httpx, httpx2, requests, sockets),
# matched by class name so none of those libraries has to be importable.
NETWORK_ERRORS = ("TransportError", "ConnectionError", "Timeout", "TimeoutError")


def check_components(components, valid: tuple[str, ...]) -> tuple[str, ...]:
    """Selected sub-folder names (a name, a list, or None for all), in ``valid``'s order."""
    if components is None:
        return valid
    components = (components,) if isinstance(components, str) else tuple(components)
    unknown = [c for c in components if c not in valid]
    if unknown:
        raise InputError(f"unknown component(s) {unknown}; valid components: {', '.join(valid)}")
    return tuple(c for c in valid if c in components)


class ModelAccessError(Ideo4Error, RuntimeError):
    """The Hub refused the download (gated or private repo, missing token) or could not be
    reached with no complete copy in the cache."""


def check_checkpoint_dir(path: Path) -> Path:
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{path} is not an Ideogram 4 checkpoint folder: {missing[0]} is missing "
            f"(expected the layout of {DEFAULT_REPO})"
        )
    return path


# What to do without the Hub: a copy on disk, or a synthetic checkpoint to try the tool.
LOCAL_HINT = (
    "With a copy on disk, pass its folder instead of the repo id "
    "(ideo4-mlx generate --model LOCAL_FOLDER, ideo4-mlx convert LOCAL_FOLDER DST); to try "
    "the tool without the weights, ideo4-mlx synth /tmp/ideo4-tiny --preset tiny writes a "
    "tiny checkpoint to generate from (README: Quick start)"
)


def access_message(repo_id: str) -> str:
    return (
        f"access to {repo_id} was refused: the model is gated. Request access on "
        f"https://huggingface.co/{repo_id}, then run `hf auth login` or set HF_TOKEN. " + LOCAL_HINT
    )


def offline_message(repo_id: str, error: BaseException) -> str:
    cause = error.__cause__ or error  # huggingface_hub wraps the connection error
    detail = (str(cause).splitlines() or [""])[0][:200]
    reason = f"{type(cause).__name__}: {detail}" if detail else type(cause).__name__
    gated = (
        f"{repo_id} is gated" if repo_id == DEFAULT_REPO else f"if {repo_id} is gated or private"
    )
    return (
        f"could not reach the Hugging Face Hub to download {repo_id} ({reason}), and the "
        "cache holds no complete copy. Check the connection (and that HF_HUB_OFFLINE is not "
        f"set); {gated}: request access on https://huggingface.co/{repo_id}, then run "
        "`hf auth login` or set HF_TOKEN. " + LOCAL_HINT
    )


def is_network_error(error: BaseException) -> bool:
    if isinstance(error, LocalEntryNotFoundError):  # offline and not (fully) cached
        return True
    return any(c.__name__ in NETWORK_ERRORS for c in type(error).__mro__)


def download(
    repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None
) -> Path:
    """Download the files the pipeline needs (or ``allow_patterns``); a refusal, or no
    connection and no cached copy, becomes a ``ModelAccessError`` saying what to do, a name
    the Hub would refuse an ``InputError``."""
    patterns = ALLOW_PATTERNS if allow_patterns is None else allow_patterns
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except HFValidationError as e:  # huggingface_hub checks the name before any request
        raise InputError(f"{repo_id}: no such folder, and not a valid repo id ({e})") from None
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise ModelAccessError(access_message(repo_id)) from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelAccessError(access_message(repo_id)) from e
        raise
    except Exception as e:
        if is_network_error(e):
            raise ModelAccessError(offline_message(repo_id, e)) from e
        raise


def resolve_model(model: str | Path, revision: str | None = None) -> tuple[Path, str, str | None]:
    """``(folder, model id, revision)`` for a local folder or a ``owner/name`` repo id."""
    path = Path(model).expanduser()
    if path.exists():
        # absolute, so metadata replay works from any working directory
        return check_checkpoint_dir(path), str(path.resolve()), revision
    name = str(model)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{model}: no such folder, and not a Hugging Face repo id (owner/name)"
        )
    folder = check_checkpoint_dir(download(name, revision))
    # snapshot folders are named after the commit they hold
    return folder, name, revision or folder.name


def resolve_transformer(source: str | Path) -> tuple[Path, str]:
    """``(DiT folder, identity)`` for ``--transformer``: a DiT component folder (its
    ``config.json`` and weights, as a checkpoint's ``transformer/``), a checkpoint folder whose
    ``transformer/`` is taken, or a repo id of either layout (``owner/name``, or
    ``owner/name@REVISION``). The identity is what replays it: the absolute folder, or the repo
    id at the commit downloaded. Only that folder's config and weights are downloaded. A single
    file (a ``.gguf`` or ``.safetensors`` DiT, read with the checkpoint's config:
    ``dit_file``) comes back as it is, the file in place of the folder."""
    path = Path(source).expanduser()
    if path.is_file():
        return path, str(path.resolve())
    if path.exists():
        return dit_folder(path, str(source)), str(path.resolve())
    repo, _, revision = str(source).partition("@")
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise CheckpointError(
            f"--transformer {source}: no such folder, and not a Hugging Face repo id "
            "(owner/name or owner/name@REVISION)"
        )
    configs = download(repo, revision or None, ["config.json", "transformer/config.json"])
    inner = "transformer/" if (configs / "transformer" / "config.json").is_file() else ""
    # The chosen folder only: a repo may hold a whole checkpoint (patterns match across "/",
    # so a DiT at the root of a repo with other folders brings their files too).
    folder = download(repo, revision or None, [f"{inner}*.safetensors", f"{inner}*.json"])
    return dit_folder(folder, str(source)), f"{repo}@{folder.name}"


def dit_folder(path: Path, source: str) -> Path:
    """The DiT component folder at ``path``: ``path/transformer`` when it holds one, else
    ``path`` itself (a ``config.json`` beside the weights)."""
    for folder in (path / "transformer", path):
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(
        f"--transformer {source} holds no DiT: expected a config.json with its .safetensors "
        "(a checkpoint's transformer/ folder) or a checkpoint folder with transformer/"
    )


def resolve_file(source: str | Path, suffix: str = ".safetensors") -> Path:
    """A local file, or one file of a Hugging Face repo: ``owner/name`` (its only ``suffix``
    file) or ``owner/name/path/in/repo.safetensors``. Downloads into the Hub cache."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve()
    name = str(source)
    parts = name.split("/")
    if path.exists() or len(parts) < 2 or name.startswith((".", "/", "~")):
        kind = "is not a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{source} {kind}, and is not a Hugging Face repo id")
    repo, inner = "/".join(parts[:2]), "/".join(parts[2:])
    folder = download(repo, allow_patterns=[inner] if inner else [f"*{suffix}"])
    if inner:
        found = [folder / inner] if (folder / inner).is_file() else []
    else:
        found = sorted(folder.rglob(f"*{suffix}"))
    if len(found) != 1:
        listed = ", ".join(f"{repo}/{p.relative_to(folder)}" for p in found[:5]) or "none"
        raise FileNotFoundError(
            f"{source}: expected one {suffix} file in the repo, found {len(found)} ({listed}); "
            "name the file as owner/name/path/file" + suffix
        )
    return found[0]


def cached_files(file_name: str) -> list[Path]:
    """Files named ``file_name`` anywhere in the Hugging Face cache (no network)."""
    try:
        cache = scan_cache_dir()
    except Exception:  # no cache folder yet, or an unreadable one: nothing to find
        return []
    return [
        Path(f.file_path)
        for repo in cache.repos
        for revision in repo.revisions
        for f in revision.files
        if f.file_name == file_name
    ]
