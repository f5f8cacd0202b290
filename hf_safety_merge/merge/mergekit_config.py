"""Read mergekit-style merge configs (`merge_method`, `base_model`, `models:` with `parameters`)
as `SafetyMergeConfig` fields, for the methods both tools share. The mapping is documented in
docs/merging.md ("Coming from mergekit").

```yaml
merge_method: ties            # task_arithmetic | ties | dare_linear | dare_ties (+ enchtable, safe_lora)
base_model: org/aligned       # -> task_reference (the task model before fine-tuning)
models:
  - model: me/my-finetune     # -> task_model ("base+adapter" -> task_adapter, "repo@rev" -> revision)
    parameters: {weight: 1.0, density: 0.5}
  - model: ./safety_vector    # the safety vector (a vector folder, or named by `safety_vector:`)
    parameters: {weight: 1.0, density: 0.5}
dtype: bfloat16               # -> dtype (out_dtype wins)
```

Layer 4 (docs/architecture.md): imports `errors` and the method registry (each method class names its mergekit
spellings); `SafetyMergeConfig.from_dict` calls it with its field names.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..errors import ConfigError, did_you_mean


def mergekit_methods() -> dict[str, tuple[str, dict[str, Any]]]:
    """mergekit `merge_method` -> (our method, the parameters it fixes), from each registered method
    class's `mergekit_names`."""
    from ..methods.base import method_classes

    return {mk: (c.name, dict(fixed)) for c in method_classes() for mk, fixed in c.mergekit_names.items()}


def _mergekit_normalize(mk_method: str) -> bool:
    """mergekit's `normalize` for a merge_method (TIES divides by the agreeing count; the others are sums)."""
    from ..methods.base import get_method_class

    return get_method_class(mergekit_methods()[mk_method][0]).mergekit_normalize


_MERGEKIT_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_UNSUPPORTED = {
    "slices": "layer slicing (frankenmerges) is not a safety merge",
    "tokenizer": "the tokenizer is copied from the task model",
    "chat_template": "the chat template is copied from the task model",
}
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def is_mergekit_config(d: Any) -> bool:
    return isinstance(d, dict) and "merge_method" in d


def _split_ref(ref: Any, where: str) -> tuple[str, str | None, str | None]:
    """mergekit's `model` syntax: `repo[@revision][+adapter]` -> (model, revision, adapter)."""
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: `model` must be a path or Hub repo id, got {ref!r}")
    adapter = None
    if "+" in ref and not Path(ref).exists():
        ref, adapter = ref.split("+", 1)
    rev = None
    if "@" in ref and not Path(ref).exists():
        ref, rev = ref.rsplit("@", 1)
    return ref, rev, adapter


def _is_vector_folder(ref: str) -> bool:
    return (Path(ref).expanduser() / "safety_vector_config.json").is_file()


def check_mergekit_keys(d: dict[str, Any], config_fields: Collection[str], source: str = "config") -> None:
    """Refuse mergekit keys we do not support and, when `config_fields` (our own keys) are given,
    any key that is neither a mergekit key nor one of them."""
    ours = set(config_fields)
    for k in d:
        if k in _UNSUPPORTED:
            raise ConfigError(f"{source}: mergekit key {k!r} is not supported ({_UNSUPPORTED[k]})")
        if ours and k not in _MERGEKIT_KEYS and k not in ours:
            raise ConfigError(f"{source}: unknown key {k!r}{did_you_mean(k, _MERGEKIT_KEYS | ours)} in a mergekit-style "
                              f"config; mergekit keys: {sorted(_MERGEKIT_KEYS)}")


def mergekit_to_dict(d: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """The `SafetyMergeConfig` fields of a mergekit-style config (see the module docstring).
    Other keys (`SafetyMergeConfig` fields such as `safety_vector`, `output_dir`,
    `task_model_hub_id`) pass through unchanged; `SafetyMergeConfig.from_dict` checks them first
    (`check_mergekit_keys`), so this module needs nothing from `config`."""
    check_mergekit_keys(d, (), source)
    mk_method = d["merge_method"]
    methods = mergekit_methods()
    if mk_method not in methods:
        raise ConfigError(f"{source}: merge_method {mk_method!r} has no safety-merge equivalent"
                          f"{did_you_mean(str(mk_method), methods)}; supported: {sorted(methods)}")
    method, fixed = methods[mk_method]
    out: dict[str, Any] = {k: v for k, v in d.items() if k not in _MERGEKIT_KEYS and k != "method"}
    out["method"] = method
    glob = dict(d.get("parameters") or {})
    if not isinstance(glob, dict):
        raise ConfigError(f"{source}: `parameters` must be a mapping")
    if "int8_mask" in glob:
        glob.pop("int8_mask")  # a memory option of mergekit; tensors here are never masked in int8
    if "normalize" in glob:
        norm = glob.pop("normalize")
        if norm is not _mergekit_normalize(mk_method):
            raise ConfigError(f"{source}: parameters.normalize = {norm!r} is not available for {mk_method}: "
                              f"{'TIES always normalises' if mk_method == 'ties' else 'this method is a weighted sum'} "
                              "here (peft.utils.merge_utils); remove it")
    # the inputs
    base = d.get("base_model")
    if base is not None:
        ref, rev, adapter = _split_ref(base, f"{source}: base_model")
        if adapter:
            raise ConfigError(f"{source}: base_model {base!r}: a LoRA adapter on the base model is not supported")
        out.setdefault("task_reference", ref)
        if rev:
            out.setdefault("task_reference_revision", rev)
    models = d.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, dict) and "model" in m for m in models):
        raise ConfigError(f"{source}: `models` must be a list of entries with a `model` key")
    vec_ref = out.get("safety_vector")
    task_entries: list[dict[str, Any]] = []
    vec_entries: list[dict[str, Any]] = []
    for i, m in enumerate(models):
        extra = set(m) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"{source}: models[{i}]: unknown key(s) {sorted(extra)}; an entry has `model` and `parameters`")
        ref, _, _ = _split_ref(m["model"], f"{source}: models[{i}]")
        (vec_entries if (ref == vec_ref or (vec_ref is None and _is_vector_folder(ref))) else task_entries).append(m)
    if len(vec_entries) > 1 or (vec_ref is None and not vec_entries):
        raise ConfigError(f"{source}: name exactly one safety vector: a `models:` entry that is a safety-vector folder, "
                          "or the key `safety_vector: <folder or repo id>`")
    if len(task_entries) != 1:
        raise ConfigError(f"{source}: `models:` must list exactly one task model (the fine-tune to patch) besides the "
                          f"safety vector, got {len(task_entries)}")
    task = task_entries[0]
    ref, rev, adapter = _split_ref(task["model"], f"{source}: models")
    if adapter:
        out["task_model"], out["task_adapter"] = ref, adapter
        if rev:
            out.setdefault("task_model_revision", rev)
    else:
        out["task_model"] = ref
        if rev:
            out.setdefault("task_model_revision", rev)
    if vec_entries:
        vref, vrev, _ = _split_ref(vec_entries[0]["model"], f"{source}: models")
        out["safety_vector"] = vref
        if vrev:
            out.setdefault("safety_vector_revision", vrev)
    tp = {**{k: v for k, v in glob.items() if k in ("weight", "density")}, **dict(task.get("parameters") or {})}
    vp = {**{k: v for k, v in glob.items() if k in ("weight", "density")},
          **dict((vec_entries[0].get("parameters") or {}) if vec_entries else {})}
    rest = {k: v for k, v in glob.items() if k not in ("weight", "density")}
    params: dict[str, Any] = dict(fixed)
    params.update(_model_parameters(method, mk_method, tp, vp, source))
    params.update(rest)
    out["parameters"] = params
    dt = d.get("out_dtype", d.get("dtype"))
    if dt is not None:
        if dt not in _DTYPES:
            raise ConfigError(f"{source}: dtype {dt!r} is not one of {sorted(_DTYPES)}")
        out["dtype"] = _DTYPES[dt]
    tok = d.get("tokenizer_source")
    if tok not in (None, "base", "model") and tok != task["model"]:
        raise ConfigError(f"{source}: tokenizer_source {tok!r}: the tokenizer is always copied from the task model")
    return out


def _model_parameters(method: str, mk_method: str, tp: dict[str, Any], vp: dict[str, Any], source: str) -> dict[str, Any]:
    """mergekit's per-model parameters (task model `tp`, safety vector `vp`) as our method's, by the
    method class's `mergekit_model_parameters`."""
    from ..methods.base import get_method_class

    mapping = get_method_class(method).mergekit_model_parameters
    if not mapping:
        if tp or vp:
            raise ConfigError(f"{source}: {mk_method} has no per-model parameters; put its parameters "
                              "(e.g. beta, gamma, lam) under the top-level `parameters`")
        return {}
    out: dict[str, Any] = {}
    task_keys = {"weight"} if "task.weight" in mapping else set()
    if "density" in mapping:
        task_keys.add("density")
    if set(tp) - task_keys - {"weight"} or ("task.weight" not in mapping and tp.get("weight", 1.0) != 1.0):
        raise ConfigError(f"{source}: {mk_method} keeps the task model whole (weight 1.0"
                          f"{'' if 'density' in mapping else ', no density'}); got task parameters {tp}")
    vec_keys = {"weight"} if "vector.weight" in mapping else set()
    if "density" in mapping:
        vec_keys.add("density")
    for k in set(vp) - vec_keys:
        raise ConfigError(f"{source}: model parameter {k!r} has no equivalent for {mk_method}; use "
                          f"{', '.join(sorted(vec_keys)) or 'the top-level `parameters`'}")
    if "weight" in tp and "task.weight" in mapping:
        out[mapping["task.weight"]] = tp["weight"]
    if "weight" in vp:
        out[mapping["vector.weight"]] = vp["weight"]
    dens = {x["density"] for x in (tp, vp) if "density" in x}
    if len(dens) > 1:
        raise ConfigError(f"{source}: density differs between the task model and the safety vector {sorted(dens)}; "
                          "one density applies to both here")
    if dens:
        out[mapping["density"]] = dens.pop()
    return out


def parse_out_shard_size(value: str) -> str | int:
    """mergekit's `--out-shard-size` (bytes with K/M/B suffixes: 5B = 5e9) as a max_shard_size;
    sizes with a unit of ours ("5GB", "500MiB") pass through."""
    s = value.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "B": 10**9}
    if s and s[-1] in mult and s[:-1].replace(".", "", 1).isdigit():
        return int(float(s[:-1]) * mult[s[-1]])
    return value
