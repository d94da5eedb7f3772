"""Publish a converted folder to the Hugging Face Hub with huggingface_hub's own API.

Nothing is sent until a token is found and the folder passes ``validate_folder``. The local
folder is only read: when the card still names the model by the local placeholder, the upload
goes from a temporary view of links whose README.md names the Hub repo instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from converter import __version__
from converter.errors import ConversionError
from converter.hub.card import render_model_card
from converter.hub.card.snippets import LOCAL_MODEL_REF
from converter.hub.ids import HUB_ID, check_base_model
from converter.hub.validate import validate_folder
from transmla_vllm.checkpoint_format import CARD_FILE

log = logging.getLogger(__name__)
# Above this, huggingface_hub 1.x's resumable multi-commit ``upload_large_folder`` is used where
# it exists; huggingface_hub 2.x dropped it because ``upload_folder`` itself streams large folders
# in several commits over Xet.
LARGE_FOLDER_BYTES = 5 * 10**9


def resolve_token(token: str | None = None) -> str:
    """The token to write with: ``token``, else HF_TOKEN, else the saved login.

    Cheap and offline, so callers can check it before hours of conversion.
    """
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ConversionError(
            "no Hugging Face token found: pass --token, set HF_TOKEN, or log "
            "in once with `hf auth login` (the token needs write access)"
        )
    return token


def check_repo_id(repo_id: str) -> None:
    if not HUB_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ConversionError(
            f"--repo-id {repo_id!r} is not a Hub model id: use OWNER/NAME "
            "(letters, digits, '-', '_', '.')"
        )


def refusal(folder: Path, problems: list[str]) -> str:
    """One sentence listing every problem, numbered so each can be found in a long message."""
    items = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
    return (
        f"refusing to upload {folder}: {len(problems)} problem(s) would make it a broken "
        f"checkpoint on the Hub: {items}"
    )


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    is_offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)
    return bool(is_offline()) or flag.upper() in ("1", "ON", "YES", "TRUE")


@contextmanager
def upload_view(folder: Path, repo_id: str, base_model: str | None = None) -> Iterator[Path]:
    """``folder`` itself, or a temporary mirror of links whose card names ``repo_id`` instead of
    the local placeholder (so the Hub card's usage snippets are copy-paste ready) and, when
    given, ``base_model`` as the source (so the Hub links the conversion to it)."""
    card = folder / CARD_FILE
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if base_model:
        text = str(render_model_card(folder, base_model=base_model))
    elif LOCAL_MODEL_REF not in text:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="transmla-upload-") as tmp:
        view = Path(tmp) / folder.name
        view.mkdir()
        for path in sorted(folder.rglob("*")):
            target = view / path.relative_to(folder)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if path == card:
                target.write_text(text.replace(LOCAL_MODEL_REF, repo_id), encoding="utf-8")
                continue
            try:
                target.symlink_to(path.resolve())
            except OSError:  # no symlinks (some Windows setups): copy instead
                shutil.copy2(path, target)
        yield view


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _describe(exc: BaseException, token: str) -> str:
    """A one-line reason, with the token scrubbed should a server ever echo it."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        detail = exc.server_message or exc.response.reason_phrase or ""
        text = f"HTTP {status}" + (f" ({detail.strip().splitlines()[0]})" if detail else "")
        if status == 401:
            text += "; the Hub rejected the token: check --token / HF_TOKEN or `hf auth login`"
        elif status == 403:
            text += "; the token may not write there: use a token with write access"
    else:
        lines = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        cause = exc.__cause__
        if cause is not None and str(cause).strip() != str(exc).strip():
            text += f" <- {_describe(cause, token)}"  # "Error while uploading 'x'" <- HTTP 507
    return text.replace(token, "***") if token else text


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    exist_ok: bool = True,
    base_model: str | None = None,
) -> str:
    """Validate ``folder``, create ``repo_id`` (a model repo) and upload the folder; return the
    repo URL.

    ``private`` only applies when the repo is created (False keeps the namespace default);
    ``revision`` is a branch, created from main when absent; ``exist_ok=False`` refuses to
    upload into an existing repo; ``base_model`` (a Hub id) names the source in the uploaded
    card. The endpoint is HF_ENDPOINT when set.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    check_repo_id(repo_id)
    if base_model is not None:
        check_base_model(base_model)
    token = resolve_token(token)
    if _offline():
        raise ConversionError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it")
    problems = validate_folder(folder)
    if problems:
        raise ConversionError(refusal(folder, problems))
    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token)
    step = "creating the repository"
    try:
        url = api.create_repo(
            repo_id, private=True if private else None, exist_ok=exist_ok, repo_type="model"
        )
        if revision and revision != "main":
            step = f"creating branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = "uploading the files"
        with upload_view(folder, repo_id, base_model) as view:
            size = _folder_bytes(view)
            log.info("uploading %s (%.2f GB) to %s", folder, size / 1e9, url)
            _upload(api, view, repo_id, revision=revision, private=private, size=size)
    except HfHubHTTPError as exc:
        if step.startswith("creating the repo") and exc.response.status_code == 409:
            raise ConversionError(
                f"{repo_id} already exists on {api.endpoint}; pass "
                "--exist-ok (exist_ok=True) to upload into it (same-named "
                "files are replaced)"
            ) from exc
        raise ConversionError(_fail(folder, repo_id, step, exc, token)) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConversionError(_fail(folder, repo_id, step, exc, token)) from exc
    except Exception as exc:  # transport errors of huggingface_hub's HTTP client
        if type(exc).__module__.split(".")[0] not in ("httpx", "httpx2", "requests"):
            raise
        reason = _fail(folder, repo_id, step, exc, token)
        raise ConversionError(
            f"{reason} (could not talk to {api.endpoint}: check the network and HF_ENDPOINT)"
        ) from exc
    log.info("uploaded to %s", url)
    return str(url)


def _fail(folder: Path, repo_id: str, step: str, exc: BaseException, token: str) -> str:
    return (
        f"uploading {folder} to {repo_id} failed while {step}: {_describe(exc, token)}; "
        "the local folder is unchanged and running the same command again skips what the "
        "Hub already holds"
    )


def _upload(
    api: Any, folder: Path, repo_id: str, *, revision: str | None, private: bool, size: int
) -> None:
    large = getattr(api, "upload_large_folder", None)
    if size > LARGE_FOLDER_BYTES and large is not None:
        # keeps its resume state in <folder>/.cache/huggingface/: the one write into the folder
        large(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            private=True if private else None,
        )
        return
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        commit_message=f"Upload TransMLA checkpoint (transmla-vllm {__version__})",
    )
