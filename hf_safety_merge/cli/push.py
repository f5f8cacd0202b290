"""`hf-safety-merge push REPO_ID [LOCAL_PATH] [PATH_IN_REPO]`: one atomic commit (or a PR), like `hf upload`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._common import options


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    pu = subparsers.add_parser(
        "push", help="push an already-merged folder to the Hub as one commit (or a PR), like `hf upload`",
        description="Push every file of LOCAL_PATH to REPO_ID in one atomic commit (the files uploaded first, then one "
        "create_commit), with `hf upload`'s arguments. Token: --token, HF_TOKEN or `hf auth login`. The old order "
        "`push FOLDER REPO_ID` still works (deprecated).",
        epilog="examples:\n  hf-safety-merge push me/my-finetune-safe ./patched --create-pr\n"
        "  hf-safety-merge push me/my-finetune-safe ./patched --exclude '*.bin' --commit-message 'safety patch'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pu.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repo, e.g. me/my-finetune-safe (created if missing)")
    pu.add_argument("local_path", metavar="LOCAL_PATH", nargs="?", default=None,
                    help="the folder to push (default: the current folder)")
    pu.add_argument("path_in_repo", metavar="PATH_IN_REPO", nargs="?", default=None,
                    help="where in the repo the files go (default: the repo root)")
    pu.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    pu.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    pu.add_argument("--commit-message", help="the commit message (default: a summary of what is pushed)")
    pu.add_argument("--commit-description", help="the commit (or pull request) description")
    pu.add_argument("--message", help=argparse.SUPPRESS)  # deprecated spelling of --commit-message
    pu.add_argument("--revision", help="branch to commit to (default main)")
    pu.add_argument("--token", help="a Hub token with write access (default: HF_TOKEN or `hf auth login`)")
    pu.add_argument("--include", nargs="*", help="glob patterns of files to push (default: all)")
    pu.add_argument("--exclude", nargs="*", help="glob patterns of files not to push")
    pu.set_defaults(func=run)
    return pu


def _paths(args: argparse.Namespace) -> tuple[str, str]:
    """(repo_id, local_path) in `hf upload` order; the old `push FOLDER REPO_ID` order still
    works, with a deprecation note."""
    first, second = args.repo_id, args.local_path
    if second is not None and Path(first).is_dir() and not Path(second).exists():
        print(f"note: `hf-safety-merge push FOLDER REPO_ID` is deprecated; use `hf upload`'s order: "
              f"hf-safety-merge push {second} {first}", file=sys.stderr)
        return second, first
    return first, second if second is not None else "."


def run(args: argparse.Namespace) -> int:
    from ..io.hub import push_folder

    repo_id, local = _paths(args)
    message = args.commit_message
    if args.message is not None:
        print("note: --message is deprecated; use --commit-message (as `hf upload`)", file=sys.stderr)
        message = message or args.message
    info = push_folder(local, repo_id, commit_message=message,
                       **options(args, "private", "create_pr", "commit_description", "revision", "token",
                                 "path_in_repo", "include", "exclude"))
    pr = getattr(info, "pr_url", None)
    print(f"pushed {local} to {repo_id} as one commit: {pr or getattr(info, 'commit_url', '')}")
    return 0
