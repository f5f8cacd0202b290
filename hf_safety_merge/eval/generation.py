"""Batched, resumable generation.

Requests are rendered with the tokenizer's chat template (an optional system prompt, the user
message, the generation prompt, then an optional assistant-turn ``prefill``), left-padded, and
generated greedily in batches.  Every finished batch is appended to a JSONL file and flushed, so
an interrupted run loses at most one batch; a rerun with the same file skips every finished row
(each row carries a key of everything that determines its output, so a stale file is detected
instead of silently mixed).  Batches are formed from the *whole* request list (sorted by prompt
length), not from what is left, so a resumed run batches exactly as an uninterrupted one and
writes the same final file.

Backends (:mod:`hf_safety_merge.eval.backends`, re-exported here): :class:`TransformersBackend`
(default) and :class:`VLLMBackend` (when ``vllm`` is importable). A backend with
``generate_unordered`` (a server: :class:`~hf_safety_merge.eval.openai_backend.OpenAIBackend`)
gets every pending request at once and each row is saved as it arrives (flushed at least every
``batch_size`` rows or 2 s); requests that failed after their retries are left out of the file
and reported in one :class:`~hf_safety_merge.eval.backends.GenerationError` line, so a rerun
generates only those.

:class:`GenerationRequest` / :class:`GenerationSettings` live in
:mod:`hf_safety_merge.eval.generation_config` and :func:`load_model` in
:mod:`hf_safety_merge.eval.loading` (both re-exported here). Layer 2 (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .backends import Backend, GenerationError, TransformersBackend, VLLMBackend, vllm_available
from .generation_config import GenerationRequest, GenerationSettings
from .loading import _model_name, load_model

__all__ = [
    "GenerationRequest",
    "GenerationSettings",
    "Generator",
    "TransformersBackend",
    "VLLMBackend",
    "load_model",
    "read_jsonl",
    "render_prompt",
    "vllm_available",
]

logger = logging.getLogger(__name__)


_warned_no_template: set[int] = set()


def render_prompt(tokenizer: Any, prompt: str, prefill: str = "", system_prompt: str | None = None) -> str:
    """The text the model sees: chat template with the generation prompt, then ``prefill``.

    Tokenizers without a chat template get ``"User: ...\\nAssistant:"`` (and a one-time warning).
    """
    if getattr(tokenizer, "chat_template", None):
        messages: list[dict[str, str]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        if id(tokenizer) not in _warned_no_template:
            logger.warning("tokenizer has no chat template; using a plain 'User:/Assistant:' format")
            _warned_no_template.add(id(tokenizer))
        sys_part = f"{system_prompt}\n\n" if system_prompt else ""
        text = f"{sys_part}User: {prompt}\nAssistant:"
        if prefill:
            text += " "
    return str(text) + prefill


def read_jsonl(path: str | os.PathLike[str], *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL file.

    A last line without its newline is an interrupted write: it is kept when it is complete
    JSON, dropped otherwise; with ``repair`` the file is fixed in place (the fragment cut, or the
    missing newline added) so that appending can go on.  A corrupt *complete* line raises
    :class:`ConfigError` naming the file and line.
    """
    p = Path(path)
    if not p.exists():
        return []
    raw = p.read_bytes()
    *complete, tail = raw.split(b"\n")
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{p}: line {i} is not valid JSON ({e}); delete or fix the file") from e
        if not isinstance(row, dict):
            raise ConfigError(f"{p}: line {i} is not a JSON object")
        rows.append(row)
    if tail.strip():
        try:
            row = json.loads(tail)
            ok = isinstance(row, dict)
        except ValueError:
            ok = False
        if ok:
            rows.append(row)
            if repair:
                with p.open("ab") as f:
                    f.write(b"\n")
        else:
            logger.warning("%s: dropping a truncated last line (interrupted write)", p)
            if repair:
                with p.open("r+b") as f:
                    f.truncate(len(raw) - len(tail))
    return rows


def _row_key(model_name: str, req: GenerationRequest, fingerprint: Mapping[str, Any]) -> str:
    blob = json.dumps([model_name, req.prompt, req.prefill, dict(fingerprint)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class Generator:
    """Generate responses for many requests, batched and resumable.

    Args:
        model: a transformers causal LM (or None with an explicit ``backend``).
        tokenizer: its tokenizer (chat template used when present).
        config: a :class:`GenerationSettings`.
        model_name: recorded in each row and used in the resume key.
        backend: an explicit backend (default: :class:`TransformersBackend`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: GenerationSettings | None = None,
        *,
        model_name: str | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.config = config or GenerationSettings()
        self.config.validate()
        self.tokenizer = tokenizer
        self.model_name = model_name or _model_name(model)
        if backend is None:
            if model is None:
                raise ConfigError("Generator needs a model or a backend")
            backend = TransformersBackend(model, tokenizer)
        self.backend = backend

    def render(self, req: GenerationRequest) -> str:
        return render_prompt(self.tokenizer, req.prompt, req.prefill, self.config.system_prompt)

    def plan_batches(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Batches of request indices over the *whole* list (longest prompts first when
        ``sort_by_length``), independent of which rows are already done."""
        order = list(range(len(requests)))
        budget = self.config.max_batch_tokens
        lengths: list[int] = []
        if (self.config.sort_by_length or budget) and len(requests) > 1:
            lengths = self.backend.count_tokens([self.render(r) for r in requests])
        if self.config.sort_by_length and lengths:
            order.sort(key=lambda i: (-lengths[i], i))
        bs = self.config.batch_size
        if not budget or not lengths:
            return [order[i:i + bs] for i in range(0, len(order), bs)]
        # at most batch_size rows, and rows x (longest prompt + new tokens) <= max_batch_tokens
        batches: list[list[int]] = []
        cur: list[int] = []
        longest = 0
        for i in order:
            n = max(longest, lengths[i])
            if cur and (len(cur) + 1 > bs or (len(cur) + 1) * (n + self.config.max_new_tokens) > budget):
                batches.append(cur)
                cur, n = [], lengths[i]
            cur.append(i)
            longest = n
        if cur:
            batches.append(cur)
        return batches

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        output_path: str | os.PathLike[str] | None = None,
        *,
        progress: bool = True,
        desc: str | None = None,
        on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
        max_rows: int | None = None,
    ) -> list[dict[str, Any]]:
        """Generate a response for every request; return the rows in request order.

        With ``output_path``, finished rows are read from the file and skipped, new rows are
        appended batch by batch, and when all rows are done the file is rewritten in request
        order (atomically).  ``on_batch`` is called with each batch's new rows after they are
        written; ``max_rows`` stops after about that many new rows (both for partial runs).
        """
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ConfigError(f"duplicate generation request id {dup!r}")
        fp = self.config.fingerprint()
        keys = {r.id: _row_key(self.model_name, r, fp) for r in requests}
        done: dict[str, dict[str, Any]] = {}
        path = Path(output_path) if output_path is not None else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            for row in read_jsonl(path, repair=True):
                rid = str(row.get("id"))
                if rid in keys:
                    if row.get("key") != keys[rid]:
                        raise ConfigError(
                            f"{path}: row {rid!r} was generated with another model, prompt or "
                            "generation settings; use a new output file or delete this one"
                        )
                    done[rid] = row
        pending_total = sum(1 for r in requests if r.id not in done)
        bar = _progress(pending_total, desc or f"generate {self.model_name}", enabled=progress and pending_total > 0)
        t0 = time.perf_counter()
        n_tokens = 0
        n_new_rows = 0

        def make_row(req: GenerationRequest, resp: str, n: int) -> dict[str, Any]:
            return {
                "id": req.id,
                "model": self.model_name,
                "prompt": req.prompt,
                "prefill": req.prefill,
                "response": resp,
                "n_new_tokens": n,
                "key": keys[req.id],
                **{k: v for k, v in req.meta.items() if k not in ("id", "prompt", "response")},
            }

        def emit(new_rows: list[dict[str, Any]]) -> None:
            nonlocal n_tokens, n_new_rows
            n_new_rows += len(new_rows)
            n_tokens += sum(int(r["n_new_tokens"]) for r in new_rows)
            if fh is not None:
                fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new_rows))
                fh.flush()
                os.fsync(fh.fileno())
            if bar is not None:
                el = max(time.perf_counter() - t0, 1e-9)
                bar.update(len(new_rows))
                bar.set_postfix(tok_s=f"{n_tokens / el:.1f}", rows_s=f"{n_new_rows / el:.2f}")
            if on_batch is not None:
                on_batch(new_rows)

        unordered = getattr(self.backend, "generate_unordered", None)
        fh = path.open("a", encoding="utf-8") if path is not None else None
        try:
            if unordered is not None:
                # a server backend: every pending request at once (the server batches them), each
                # row saved as it arrives; failed requests are left for a rerun
                todo = [r for r in requests if r.id not in done]
                if max_rows is not None:
                    todo = todo[:max_rows]
                failures: list[Any] = []
                chunk: list[dict[str, Any]] = []
                last = time.perf_counter()
                for i, res in unordered([self.render(r) for r in todo], self.config):
                    if isinstance(res, tuple):
                        row = make_row(todo[i], res[0], res[1])
                        done[todo[i].id] = row
                        chunk.append(row)
                    else:
                        failures.append(res)
                    if chunk and (len(chunk) >= self.config.batch_size or time.perf_counter() - last > 2.0):
                        emit(chunk)
                        chunk, last = [], time.perf_counter()
                if chunk:
                    emit(chunk)
                if failures:
                    kept = f"{len(todo) - len(failures)} responses saved in {path}; a rerun resumes" if path is not None else "no output file, nothing kept"
                    raise GenerationError(f"{len(failures)} of {len(todo)} generation requests failed ({kept}); first: {failures[0].message}")
            else:
                batches = self.plan_batches(requests)
                plan = getattr(self.backend, "plan_prefixes", None)
                if plan is not None:
                    plan([self.render(r) for r in requests if r.id not in done], self.config.prefix_cache_min_tokens)
                for batch in batches:
                    todo = [requests[i] for i in batch if requests[i].id not in done]
                    if not todo:
                        continue
                    if max_rows is not None and n_new_rows >= max_rows:
                        break
                    outs = self.backend.generate_batch([self.render(r) for r in todo], self.config)
                    new_rows = []
                    for req, (resp, n) in zip(todo, outs):
                        row = make_row(req, resp, n)
                        done[req.id] = row
                        new_rows.append(row)
                    emit(new_rows)
        finally:
            if fh is not None:
                fh.close()
            if bar is not None:
                bar.close()
        self.last_stats = {
            "new_rows": n_new_rows,
            "new_tokens": n_tokens,
            "seconds": time.perf_counter() - t0,
            "resumed_rows": len(requests) - pending_total,
        }
        rows = [done[r.id] for r in requests if r.id in done]
        if path is not None and len(rows) == len(requests):
            _write_jsonl_atomic(path, rows)
        return rows


def _write_jsonl_atomic(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True)
