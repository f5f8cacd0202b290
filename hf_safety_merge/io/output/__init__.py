"""Writing an output folder so that nothing is ever half-written or lost.

- `check_output_dir` runs before any input is opened: the location is a folder (or can be
  created), is writable, is empty (or `overwrite`), and is not one of the inputs.
- `AtomicDir` writes into a hidden temporary folder beside the target and moves it into place
  only when everything was written; on any error, Ctrl-C or SIGTERM the temporary folder is
  removed and an existing target is left as it was. The result gets the permissions
  `save_pretrained` gives a folder (0777 minus the umask), not `mkdtemp`'s 0700.
- `terminate_as_interrupt` turns SIGTERM into an `Interrupted` exception in the main thread,
  so the same clean-up runs for `kill` as for Ctrl-C.
- Faults a `finally` cannot clean up (docs/reliability.md, "Faults"): each temporary folder
  holds a marker (`TMP_MARKER`: pid, process start, host), so that the next run into the same
  parent removes the folders of a process that was killed (`remove_stale_temporaries`);
  `OutputLock` (an `flock` on `.NAME.lock` beside the output) lets one writer at a time into an
  output folder; a disk that fills during a write becomes one `DiskSpaceError`
  (`is_disk_full`, `disk_full_error`), the temporary folder removed, the old output intact.
- `sha256_file` / `sha256_files`: streamed file hashes for the merge report and `--verify`.

Modules: `atomic` (`check_output_dir`, `AtomicDir`), `space` (free space, a full disk), `stale`
(markers, `remove_stale_temporaries`), `lock` (`OutputLock`), `hashes` (`sha256_file`),
`signals` (`Interrupted`, `terminate_as_interrupt`). Layer 1 (docs/architecture.md): may import
only `errors` and `validation`.
"""

from .atomic import AtomicDir, check_output_dir
from .hashes import HASH_CHUNK, sha256_file, sha256_files
from .lock import OutputLock
from .signals import Interrupted, terminate_as_interrupt
from .space import FREE_SPACE_MARGIN, check_free_space, disk_full_error, is_disk_full
from .stale import TMP_MARKER, remove_stale_temporaries

__all__ = [
    "FREE_SPACE_MARGIN",
    "HASH_CHUNK",
    "TMP_MARKER",
    "AtomicDir",
    "Interrupted",
    "OutputLock",
    "check_free_space",
    "check_output_dir",
    "disk_full_error",
    "is_disk_full",
    "remove_stale_temporaries",
    "sha256_file",
    "sha256_files",
    "terminate_as_interrupt",
]
