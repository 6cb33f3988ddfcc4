"""huggingface_hub's errors, translated into StoreErrors that say what to do.

The library raises typed errors (its ``huggingface_hub.errors``, httpx2's transport errors
and a plain OSError for a short file); ``translate`` maps each to our message and hint,
looking the error's classes up in ``TABLE`` from the most specific one. Every error class
the library defines is either in ``TABLE`` or in ``NOT_RAISED`` (inference, uploads, DDUF,
cache scans: nothing a download reaches), and a test holds the two to the library's list,
so a class a new release adds has to be placed before the pin can move.

No message quotes a request's headers: the token never reaches an error or a log.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

import httpx2
from huggingface_hub import errors as hf

from appliance.errors import StoreError

OFFLINE_HINT = (
    "Sites without Internet access: set HF_ENDPOINT to an on-prem Hub mirror, or install from "
    "a copy of the checkpoint with `appliance model add NAME --from PATH|URL`."
)
_RESUMES = "files already downloaded are kept, so running the command again resumes."


@dataclass(frozen=True)
class Context:
    """What a message needs to name: the model, its repo and revision, where, with a token?"""

    name: str
    repo: str
    revision: str
    endpoint: str
    has_token: bool

    @property
    def page(self) -> str:
        return f"{self.endpoint}/{self.repo}"


Translator = Callable[[Context, BaseException], StoreError]


def _status(exc: BaseException) -> int:
    return exc.response.status_code if isinstance(exc, hf.HfHubHTTPError) else 0


def _offline(c: Context, exc: BaseException) -> StoreError:
    return StoreError(
        f"HF_HUB_OFFLINE is set, so {c.name} cannot be downloaded from the Hub "
        f"({c.endpoint}, a mirror included).",
        hint="Unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE), or install a local copy with "
        f"`appliance model add {c.name} --from PATH|URL` (a plain HTTP directory).",
    )


def _unreachable(c: Context, exc: BaseException) -> StoreError:
    return StoreError(
        f"Cannot reach {c.endpoint} to download {c.repo}@{c.revision}: {exc}.",
        hint=f"This host needs HTTPS access to the Hub; {_RESUMES} {OFFLINE_HINT}",
    )


def _needs_token(c: Context, exc: BaseException) -> StoreError:
    return StoreError(
        f"{c.repo} on {c.endpoint} needs a Hugging Face access token (HTTP {_status(exc)}): "
        "it is gated or private.",
        hint=f"Accept the model's license at {c.page} with your account, create a read token "
        f"at {c.endpoint}/settings/tokens, then set HF_TOKEN to it (or run `hf auth login`) "
        "and run this again.",
    )


def _gated(c: Context, exc: BaseException) -> StoreError:
    if not c.has_token:
        return _needs_token(c, exc)
    return StoreError(
        f"The Hugging Face token has no access to {c.repo} (HTTP {_status(exc)}).",
        hint=f"Accept the model's license (or request access) at {c.page} with the account "
        "the token belongs to, wait for approval if the publisher reviews requests, then run "
        "this again.",
    )


def _repo_not_found(c: Context, exc: BaseException) -> StoreError:
    private = "" if c.has_token else " A private repo answers this way too: set HF_TOKEN."
    return StoreError(
        f"{c.repo} was not found on {c.endpoint} (HTTP {_status(exc)}).",
        hint="Check the repo in the catalog's sources (models.toml); if HF_ENDPOINT points at "
        f"a mirror, make sure the mirror carries {c.repo}.{private}",
    )


def _disabled(c: Context, exc: BaseException) -> StoreError:
    return StoreError(
        f"{c.repo} is disabled on {c.endpoint}: its files cannot be downloaded.",
        hint="Pick another source for this precision in the catalog (models.toml), or "
        "install a copy you have with `--from PATH|URL`.",
    )


def _revision(c: Context, exc: BaseException) -> StoreError:
    return StoreError(
        f"{c.repo} has no revision {c.revision!r} on {c.endpoint}.",
        hint="Fix the revision in the catalog's sources (models.toml), or update the mirror.",
    )


def _entry(c: Context, exc: BaseException) -> StoreError:
    url = exc.response.url if isinstance(exc, hf.HfHubHTTPError) else "a file"
    return StoreError(
        f"{c.repo} lists {url} but {c.endpoint} does not serve it.",
        hint="The mirror looks incomplete; update it, or use --from PATH|URL.",
    )


def _http(c: Context, exc: BaseException) -> StoreError:
    code = _status(exc)
    if code in (401, 403) and not c.has_token:
        return _needs_token(c, exc)
    if code == 401:
        return StoreError(
            f"{c.endpoint} rejected the Hugging Face token (HTTP 401) while downloading {c.repo}.",
            hint="The token in HF_TOKEN, HUGGING_FACE_HUB_TOKEN or the huggingface token file "
            f"is invalid or expired; create a new read token at {c.endpoint}/settings/tokens "
            "and set HF_TOKEN to it.",
        )
    if code == 403:
        return _gated(c, exc)
    said = getattr(exc, "server_message", None)
    return StoreError(
        f"{c.endpoint} answered HTTP {code} while downloading {c.repo}"
        + (f": {said}" if said else "."),
        hint=f"Try again later; {_RESUMES}",
    )


def _not_a_hub(c: Context, exc: BaseException) -> StoreError:
    return StoreError(
        f"{c.endpoint} does not answer like a Hugging Face Hub: {exc}",
        hint="Check HF_ENDPOINT (or the --from URL): it must be the Hub or a mirror of its "
        "API, reached without a proxy that rewrites headers. " + OFFLINE_HINT,
    )


def lost(c: Context, exc: BaseException) -> StoreError:
    return StoreError(
        f"Lost {c.endpoint} while downloading {c.repo}@{c.revision}: {exc}",
        hint=f"Check this host's access to the Hub; {_RESUMES}",
    )


def _xet(c: Context, exc: BaseException) -> StoreError:
    return StoreError(
        f"The Xet transfer of {c.repo} from {c.endpoint} failed: {exc}",
        hint=f"Run the command again ({_RESUMES}); HF_HUB_DISABLE_XET=1 falls back to plain "
        "HTTPS downloads.",
    )


def _invalid(c: Context, exc: BaseException) -> StoreError:
    return StoreError(
        f"huggingface_hub refuses {c.repo}@{c.revision}: {exc}",
        hint="Fix the repo or revision in the catalog's sources (models.toml).",
    )


def _token_exchange(c: Context, exc: BaseException) -> StoreError:
    return StoreError(
        f"HF_OIDC_RESOURCE is set, but no Hugging Face token could be obtained with it: {exc}",
        hint="Unset HF_OIDC_RESOURCE outside a CI system that issues OIDC tokens, or set "
        "HF_TOKEN instead.",
    )


def _os(c: Context, exc: BaseException) -> StoreError:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(
            f"The model store's disk filled up while downloading {c.repo}: {exc}",
            hint=f"Free space there or move the store (store.root in appliance.toml); {_RESUMES}",
        )
    return StoreError(
        f"Downloading {c.repo}@{c.revision} from {c.endpoint} failed: {exc}",
        hint=f"Run the command again; {_RESUMES}",
    )


# Looked up along the error's MRO, so a subclass listed here wins over its base.
TABLE: dict[type[BaseException], Translator] = {
    hf.OfflineModeIsEnabled: _offline,
    hf.GatedRepoError: _gated,
    hf.RepositoryNotFoundError: _repo_not_found,
    hf.DisabledRepoError: _disabled,
    hf.RevisionNotFoundError: _revision,
    hf.RemoteEntryNotFoundError: _entry,
    hf.EntryNotFoundError: _entry,
    # snapshot_download's answer when the Hub went away after the listing.
    hf.LocalEntryNotFoundError: lost,
    hf.IncompleteSnapshotError: lost,
    hf.BadRequestError: _http,
    hf.HfHubHTTPError: _http,
    hf.FileMetadataError: _not_a_hub,
    hf.XetDownloadError: _xet,
    hf.HFValidationError: _invalid,
    hf.OIDCError: _token_exchange,
    httpx2.TransportError: _unreachable,
    # A short file after the library's own retries, or a write that failed.
    OSError: _os,
}

# Defined by huggingface_hub.errors, never raised by repo_info, list_repo_tree or
# snapshot_download without dry_run, token=True, a job, a bucket, an upload or inference.
NOT_RAISED: frozenset[str] = frozenset(
    {
        "BucketBatchError", "BucketNotFoundError", "CLIError", "CLIExtensionInstallError",
        "CacheNotFound", "CachedRepoTreeNotFoundError", "ConfirmationError",
        "CorruptedCacheException", "DDUFCorruptedFileError", "DDUFError", "DDUFExportError",
        "DDUFInvalidEntryNameError", "DeviceCodeError", "DryRunError", "FileDuplicationError",
        "GenerationError", "HfUriError", "IncompleteGenerationError", "InferenceEndpointError",
        "InferenceEndpointTimeoutError", "InferenceTimeoutError", "JobNotFoundError",
        "LocalTokenNotFoundError", "NotASafetensorsRepoError", "OverloadedError",
        "RevisionResolutionError", "SafetensorsParsingError", "SandboxCommandError",
        "SandboxError", "StrictDataclassClassValidationError", "StrictDataclassDefinitionError",
        "StrictDataclassError", "StrictDataclassFieldValidationError", "TextGenerationError",
        "UnknownError", "ValidationError",
    }
)  # fmt: skip


def translate(context: Context, exc: BaseException) -> StoreError | None:
    """Our StoreError for ``exc``; None for errors that are not the library's (bugs)."""
    for cls in type(exc).__mro__:
        if cls in TABLE:
            return TABLE[cls](context, exc)
    return None
