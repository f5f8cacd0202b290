"""The ``patch`` policy: a repaired copy of the final model, written by the merge engine
(EnchTable or RESTA = task arithmetic) from the model the run just trained and a safety vector.

This is the only module of the monitor that imports the merge engine (layer 5)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["patch_trained_model"]


def patch_trained_model(
    trained: str | os.PathLike[str],
    safety_vector: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    method: str = "enchtable",
    parameters: Mapping[str, Any] | None = None,
    reference: str | os.PathLike[str] | None = None,
    adapter_base: str | os.PathLike[str] | None = None,
) -> Any:
    """Merge ``safety_vector`` into a trained model folder and write the result to ``output_dir``.

    Args:
        trained: the saved model folder, or (with ``adapter_base``) a saved LoRA adapter folder.
        method: ``enchtable`` or ``task_arithmetic`` (RESTA).
        parameters: the method's parameters (default: the method's own defaults).
        reference: the model before fine-tuning (EnchTable's ``tau``); not needed for a LoRA
            adapter (tau is the adapter's update) nor for task arithmetic.
        adapter_base: the base model a LoRA adapter was trained on.

    Returns:
        the engine's :class:`~hf_safety_merge.merge.MergeResult`.
    """
    from ..merge import merge
    from ..merge.config import SafetyMergeConfig

    params = dict(parameters or {})
    if adapter_base is not None:
        cfg = SafetyMergeConfig(task_model=str(adapter_base), task_adapter=str(trained), safety_vector=str(safety_vector),
                                method=method, parameters=params, output_dir=str(output_dir), overwrite=True)
    else:
        if method == "enchtable" and reference is None:
            raise ConfigError("patch policy: EnchTable needs the model before fine-tuning (patch_reference); "
                              "or use patch_method='task_arithmetic'")
        cfg = SafetyMergeConfig(task_model=str(trained), task_reference=None if reference is None else str(reference),
                                safety_vector=str(safety_vector), method=method, parameters=params,
                                output_dir=str(output_dir), overwrite=True)
    result = merge(cfg, progress=False)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return result
