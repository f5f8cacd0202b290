"""Batched, resumable generation.

Requests are rendered with the tokenizer's chat template (an optional system prompt, the user
message, the generation prompt, then an optional assistant-turn ``prefill``), left-padded, and
generated greedily in batches.  Every finished batch is appended to a JSONL file and flushed, so
an interrupted run loses at most one batch; a rerun with the same file skips every finished row
(each row carries a key of everything that determines its output, so a stale file is detected
instead of silently mixed).  Batches are formed from the *whole* request list (sorted by prompt
length), not from what is left, so a resumed run batches exactly as an uninterrupted one and
writes the same final file.

Backends: :class:`TransformersBackend` (default) and :class:`VLLMBackend` (when ``vllm`` is
importable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError

__all__ = [
    "GenerationConfig",
    "GenerationRequest",
    "Generator",
    "TransformersBackend",
    "VLLMBackend",
    "load_model",
    "read_jsonl",
    "render_prompt",
    "vllm_available",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: a unique ``id``, the user message, an optional assistant ``prefill``."""

    id: str
    prompt: str
    prefill: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class GenerationConfig:
    """How to generate.

    Attributes:
        max_new_tokens: tokens generated per response.
        batch_size: prompts per forward pass.
        do_sample: False = greedy (the default, reproducible).
        temperature, top_p: sampling settings (used only with ``do_sample``).
        system_prompt: an optional system message.
        sort_by_length: batch prompts of similar length together (less padding).
        backend: ``"transformers"``, ``"vllm"`` or ``"auto"`` (vLLM when installed and the model
            is a path).
        seed: torch seed set before sampling.
        max_batch_tokens: with it, a batch holds at most ``batch_size`` rows *and* at most this
            many tokens (rows x (longest prompt + ``max_new_tokens``)), so short prompts go in
            large batches and long ones (jailbreak preambles) in small ones. None: ``batch_size``
            rows always.
        prefix_cache_min_tokens: prompts that share an opening of at least this many tokens
            (e.g. one jailbreak preamble wrapped around many requests) have its key/value cache
            computed once per model and reused in every batch (transformers backend; 0: off).
            The result is the same computation up to floating-point rounding
            (benchmarks/bench_generation.py measures the speed-up and the agreement).
    """

    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    system_prompt: str | None = None
    sort_by_length: bool = True
    backend: str = "transformers"
    seed: int = 0
    prefix_cache_min_tokens: int = 64
    max_batch_tokens: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"GenerationConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in ("transformers", "vllm", "auto"):
            raise ConfigError(f"GenerationConfig.backend must be transformers, vllm or auto, got {self.backend!r}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ConfigError(f"GenerationConfig.max_batch_tokens must be >= 1 or None, got {self.max_batch_tokens}")
        if self.prefix_cache_min_tokens < 0:
            raise ConfigError(f"GenerationConfig.prefix_cache_min_tokens must be >= 0, got {self.prefix_cache_min_tokens}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change a response (part of each row's key)."""
        fp: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "system": self.system_prompt}
        if self.do_sample:
            fp.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return fp


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


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


class Backend(Protocol):
    """Generates continuations of rendered prompt texts."""

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def generate_batch(self, texts: Sequence[str], config: GenerationConfig) -> list[tuple[str, int]]:
        """``(continuation text, number of generated tokens)`` per prompt text."""
        ...


class TransformersBackend:
    """Left-padded batched ``model.generate`` with transformers, with a shared-prefix cache.

    :meth:`plan_prefixes` (called by :class:`Generator` with every prompt of a run) finds the
    openings that many prompts share; each is run through the model once and its key/value cache
    is kept. A batch then starts from those caches, assembled row by row and left-padded inside
    the cache, so only the rest of each prompt is computed: ``[pad, prefix_i | pad, rest_i]``
    with the pads masked, which gives every token the position and the attention it has in the
    plain left-padded batch ``[pad, prefix_i, rest_i]``.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ConfigError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._prefix_len: dict[str, int] = {}
        self._prefix_kv: dict[tuple[int, ...], list[tuple[Any, Any]]] = {}
        self.stats = {"prefix_tokens_reused": 0, "prefixes_computed": 0}

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        # The chat template already holds BOS when the model needs one.
        add_special = not bool(getattr(self.tokenizer, "chat_template", None))
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=add_special)["input_ids"]]

    def _encode(self, texts: Sequence[str]) -> Any:
        add_special = not bool(getattr(self.tokenizer, "chat_template", None))
        return self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self._ids(texts)]

    def plan_prefixes(self, texts: Sequence[str], min_tokens: int) -> None:
        """Record, per prompt text, the length of the opening it shares with other prompts
        (at least ``min_tokens`` tokens, always leaving one token of its own)."""
        self._prefix_len = {}
        if min_tokens <= 0 or len(texts) < 2 or getattr(self.model.config, "is_encoder_decoder", False):
            return
        uniq = sorted(set(texts))
        ids = dict(zip(uniq, self._ids(uniq)))
        order = sorted(uniq, key=lambda t: ids[t])

        def lcp(a: list[int], b: list[int]) -> int:
            n = min(len(a), len(b))
            i = 0
            while i < n and a[i] == b[i]:
                i += 1
            return i

        links = [lcp(ids[order[i]], ids[order[i + 1]]) for i in range(len(order) - 1)]
        # each prompt: the longest opening it shares with a neighbour in sorted order; an opening
        # that extends a shorter chosen one by fewer than min_tokens tokens reuses the shorter one
        # (one preamble with requests that begin alike stays one cache)
        want = {}
        for i, t in enumerate(order):
            n = max(links[i - 1] if i > 0 else 0, links[i] if i < len(links) else 0)
            if n >= min_tokens:
                want[t] = min(n, len(ids[t]) - 1)
        chosen: list[tuple[int, ...]] = []
        for t in sorted(want, key=lambda t: want[t]):
            p = tuple(ids[t][: want[t]])
            for c in chosen:
                if len(p) - len(c) < min_tokens and p[: len(c)] == c:
                    p = c
                    break
            else:
                chosen.append(p)
            self._prefix_len[t] = len(p)

    def _prefix_cache(self, prefix: tuple[int, ...], keep: bool = True) -> list[tuple[Any, Any]]:
        import torch

        kv = self._prefix_kv.get(prefix)
        if kv is None:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([prefix], device=self.model.device), use_cache=True)
            kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            if keep:
                self._prefix_kv[prefix] = kv
                self.stats["prefixes_computed"] += 1
        return kv

    def _generate_kwargs(self, config: GenerationConfig) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = dict(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                                      pad_token_id=self.tokenizer.pad_token_id)
        if config.do_sample:
            torch.manual_seed(config.seed)
            kwargs.update(temperature=config.temperature, top_p=config.top_p)
        else:
            # Greedy: neutralise sampling defaults from the model's generation_config.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def generate_batch(self, texts: Sequence[str], config: GenerationConfig) -> list[tuple[str, int]]:
        import torch

        kwargs = self._generate_kwargs(config)
        plens = [self._prefix_len.get(t, 0) for t in texts]
        with torch.inference_mode():
            if config.prefix_cache_min_tokens and any(plens):
                out, start = self._generate_with_prefixes(texts, plens, kwargs, config.prefix_cache_min_tokens)
            else:
                enc = self._encode(texts).to(self.model.device)
                out = self.model.generate(**enc, **kwargs)
                start = enc["input_ids"].shape[1]
        results: list[tuple[str, int]] = []
        for seq in out[:, start:].tolist():
            n = len(seq)
            for i, t in enumerate(seq):
                if t in self.eos_ids:
                    n = i
                    break
            results.append((self.tokenizer.decode(seq[:n], skip_special_tokens=True), n))
        return results

    def _generate_with_prefixes(self, texts: Sequence[str], plens: list[int], kwargs: dict[str, Any],
                                min_tokens: int) -> tuple[Any, int]:
        import torch
        from transformers import DynamicCache

        dev = self.model.device
        pad = int(self.tokenizer.pad_token_id)
        ids = self._ids(texts)
        # a long prompt that shares no opening is cached on its own (a batch of one, not kept), so
        # that the batch's uncached part stays short
        own = {i for i, (x, p) in enumerate(zip(ids, plens)) if not p and len(x) > min_tokens}
        plens = [len(x) - 1 if i in own else p for i, (x, p) in enumerate(zip(ids, plens))]
        pre = [tuple(x[:p]) for x, p in zip(ids, plens)]
        rest = [x[p:] for x, p in zip(ids, plens)]
        lp, lr = max(plens), max(len(r) for r in rest)
        kvs = [self._prefix_cache(p, keep=i not in own) if p else None for i, p in enumerate(pre)]
        ref = next(kv for kv in kvs if kv is not None)
        layers = []
        for li, (k0, v0) in enumerate(ref):
            ks, vs = [], []
            for kv, p in zip(kvs, plens):
                k = k0.new_zeros((1, k0.shape[1], lp, k0.shape[3]))
                v = v0.new_zeros((1, v0.shape[1], lp, v0.shape[3]))
                if kv is not None:
                    k[:, :, lp - p:] = kv[li][0]
                    v[:, :, lp - p:] = kv[li][1]
                ks.append(k)
                vs.append(v)
            layers.append((torch.cat(ks), torch.cat(vs)))
        cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        input_ids = torch.full((len(texts), lp + lr), pad, dtype=torch.long)
        mask = torch.zeros((len(texts), lp + lr), dtype=torch.long)
        for i, (x, p, r) in enumerate(zip(pre, plens, rest)):
            input_ids[i, lp - p:lp] = torch.tensor(x, dtype=torch.long) if p else input_ids[i, lp - p:lp]
            mask[i, lp - p:lp] = 1
            input_ids[i, lp + lr - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, lp + lr - len(r):] = 1
        self.stats["prefix_tokens_reused"] += sum(p for i, p in enumerate(plens) if i not in own)
        out = self.model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), cache=cache, **kwargs)
        return out, lp + lr


class VLLMBackend:
    """vLLM offline inference (``vllm.LLM``); prompts are passed as rendered text."""

    def __init__(self, model_path: str, tokenizer: Any, **llm_kwargs: Any) -> None:
        if not vllm_available():
            raise ConfigError("backend 'vllm' requested but vllm is not installed (pip install vllm)")
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, **llm_kwargs)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def generate_batch(self, texts: Sequence[str], config: GenerationConfig) -> list[tuple[str, int]]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=config.max_new_tokens,
            temperature=config.temperature if config.do_sample else 0.0,
            top_p=config.top_p if config.do_sample else 1.0,
            seed=config.seed,
        )
        outs = self.llm.generate(list(texts), params, use_tqdm=False)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs]


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
        model: a transformers causal LM (or None with ``backend=VLLMBackend(...)``).
        tokenizer: its tokenizer (chat template used when present).
        config: a :class:`GenerationConfig`.
        model_name: recorded in each row and used in the resume key.
        backend: an explicit backend (default: :class:`TransformersBackend`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: GenerationConfig | None = None,
        *,
        model_name: str | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.config = config or GenerationConfig()
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
        batches = self.plan_batches(requests)
        plan = getattr(self.backend, "plan_prefixes", None)
        if plan is not None:
            plan([self.render(r) for r in requests if r.id not in done], self.config.prefix_cache_min_tokens)
        pending_total = sum(1 for r in requests if r.id not in done)
        bar = _progress(pending_total, desc or f"generate {self.model_name}", enabled=progress and pending_total > 0)
        t0 = time.perf_counter()
        n_tokens = 0
        n_new_rows = 0
        fh = path.open("a", encoding="utf-8") if path is not None else None
        try:
            for batch in batches:
                todo = [requests[i] for i in batch if requests[i].id not in done]
                if not todo:
                    continue
                if max_rows is not None and n_new_rows >= max_rows:
                    break
                texts = [self.render(r) for r in todo]
                outs = self.backend.generate_batch(texts, self.config)
                new_rows = []
                for req, (resp, n) in zip(todo, outs):
                    row = {
                        "id": req.id,
                        "model": self.model_name,
                        "prompt": req.prompt,
                        "prefill": req.prefill,
                        "response": resp,
                        "n_new_tokens": n,
                        "key": keys[req.id],
                        **{k: v for k, v in req.meta.items() if k not in ("id", "prompt", "response")},
                    }
                    done[req.id] = row
                    new_rows.append(row)
                    n_tokens += n
                n_new_rows += len(new_rows)
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


def _model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", "") or getattr(model, "name_or_path", "")
    return str(name) if name else type(model).__name__


def load_model(
    model: Any,
    tokenizer: Any = None,
    *,
    dtype: str | None = "float32",
    device: str = "cpu",
    revision: str | None = None,
) -> tuple[Any, Any, str]:
    """``(model, tokenizer, name)`` from a loaded model or a local folder / Hub id."""
    if isinstance(model, (str, os.PathLike)):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ref = str(model)
        local = Path(ref).expanduser()
        if not local.exists() and (ref.startswith((".", "/", "~")) or ref.count("/") > 1 or not ref.strip()):
            raise ConfigError(f"model {ref!r}: no such local folder ({local.resolve()})")
        if local.is_dir() and not (local / "config.json").is_file():
            raise ConfigError(f"model {ref!r}: the folder has no config.json; is it a model folder?")
        if local.is_dir() and tokenizer is None and not any(
            (local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        ):
            raise ConfigError(
                f"model {ref!r}: the folder has no tokenizer (tokenizer.json / tokenizer_config.json); save it with "
                "tokenizer.save_pretrained(folder), or pass tokenizer=..."
            )
        torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else "auto"
        where = "" if local.exists() else f" ({ref!r} is not a local folder; it was read as a Hub repo id)"
        try:
            auto: Any = AutoModelForCausalLM
            m = auto.from_pretrained(ref, dtype=torch_dtype, revision=revision).to(device).eval()
            tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(ref, revision=revision)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot load model {ref!r}{where}: {first}") from e
        name = getattr(m.config, "name_or_path", "") or ref
        if Path(ref).exists():
            name = Path(ref).resolve().name
        return m, tok, str(name)
    if tokenizer is None:
        raise ConfigError("a loaded model needs its tokenizer (pass tokenizer=...)")
    return model, tokenizer, _model_name(model)
