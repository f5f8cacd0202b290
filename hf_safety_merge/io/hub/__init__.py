"""Hub integration: resolve references (local paths or repo ids), read remote checkpoints
header-first, and push folders as one atomic commit (or a pull request).

Remote checkpoints are validated from their safetensors headers, fetched with HTTP range
requests, before any weight is downloaded; shards are then downloaded one by one, only when a
tensor in them is first needed, into the regular HF cache. `HF_HUB_OFFLINE=1` works from the
cache. Tokens come from the usual places (`HF_TOKEN`, `hf auth login`) and never appear in
errors, logs or cards.

Faults: every Hub call is retried a bounded number of times on transient failures (HTTP 408,
429, 5xx, dropped or refused connections, timeouts) with exponential back-off and jitter,
honouring `Retry-After`; a 4xx answer is final. Downloads resume a partial file with a Range
request and are checked against the Hub's sha256 (LFS files) or git oid (other files). After the
last try, one line names the repo, the endpoint and the cause (docs/hub.md, "Faults").

Modules: `errors` (HubError, redaction), `retry` (retried calls), `download` (verified,
resumable downloads), `resolve` (repo ids, local folders, commits), `remote` (`HubCheckpoint`,
`open_checkpoint`), `push` (`push_folder`, one atomic commit). Layer 1 (docs/architecture.md):
may import only `errors` and `validation`.
"""

from .download import download_file
from .errors import HubError
from .push import check_push_target, push_folder
from .remote import HubCheckpoint, open_checkpoint, open_remote
from .resolve import AUX_PATTERNS, is_repo_id, resolve_checkpoint, resolve_commit
from .retry import HUB_BACKOFF_S, HUB_MAX_WAIT_S, HUB_TRIES, RETRY_STATUS

__all__ = [
    "AUX_PATTERNS",
    "HUB_BACKOFF_S",
    "HUB_MAX_WAIT_S",
    "HUB_TRIES",
    "RETRY_STATUS",
    "HubCheckpoint",
    "HubError",
    "check_push_target",
    "download_file",
    "is_repo_id",
    "open_checkpoint",
    "open_remote",
    "push_folder",
    "resolve_checkpoint",
    "resolve_commit",
]
