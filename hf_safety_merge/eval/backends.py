"""Generation backends: left-padded batched ``model.generate`` with a shared-prefix key/value
cache (:class:`TransformersBackend`, the default), any OpenAI-compatible server
(:class:`~hf_safety_merge.eval.openai_backend.OpenAIBackend`; vLLM, SGLang, TGI, llama.cpp), a
vLLM server this library starts and stops itself (:mod:`hf_safety_merge.eval.engine`), and vLLM
in-process (:class:`VLLMBackend`, only where ``vllm`` imports in the same environment).
:class:`hf_safety_merge.eval.generation.Generator` drives them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError, SafetyMergeError

if TYPE_CHECKING:
    from .generation_config import GenerationSettings

__all__ = ["Backend", "GenerationError", "TransformersBackend", "VLLMBackend", "vllm_available"]


class GenerationError(SafetyMergeError, RuntimeError):
    """Generation failed (a server that cannot be reached, requests that failed after their
    retries); the message is one line naming the server and the cause."""


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class Backend(Protocol):
    """Generates continuations of rendered prompt texts."""

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def generate_batch(self, texts: Sequence[str], config: GenerationSettings) -> list[tuple[str, int]]:
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

    def _generate_kwargs(self, config: GenerationSettings) -> dict[str, Any]:
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

    def _grad_mode(self) -> Any:
        """The autograd mode generation runs under (subclasses on a training model: ``no_grad``)."""
        import torch

        return torch.inference_mode()

    def _prefix_cache_allowed(self) -> bool:
        """Whether batches may start from shared-prefix caches (not when ranks must stay in step)."""
        return True

    def generate_batch(self, texts: Sequence[str], config: GenerationSettings) -> list[tuple[str, int]]:
        kwargs = self._generate_kwargs(config)
        plens = [self._prefix_len.get(t, 0) for t in texts]
        with self._grad_mode():
            if config.prefix_cache_min_tokens and any(plens) and self._prefix_cache_allowed():
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
    """vLLM offline inference (``vllm.LLM``) in this process; prompts are passed as rendered text.

    vLLM pins its own torch and transformers, so it rarely shares an environment with this
    library; ``backend="vllm"`` therefore runs a vLLM *server* from vLLM's own environment
    (:class:`hf_safety_merge.eval.engine.VLLMEngine`). This class is for the rare setup where
    ``import vllm`` works here."""

    def __init__(self, model_path: str, tokenizer: Any, **llm_kwargs: Any) -> None:
        if not vllm_available():
            raise ConfigError("backend 'vllm' requested but vllm is not installed (pip install vllm)")
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, **llm_kwargs)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def generate_batch(self, texts: Sequence[str], config: GenerationSettings) -> list[tuple[str, int]]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=config.max_new_tokens,
            temperature=config.temperature if config.do_sample else 0.0,
            top_p=config.top_p if config.do_sample else 1.0,
            seed=config.seed,
        )
        outs = self.llm.generate(list(texts), params, use_tqdm=False)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs]
