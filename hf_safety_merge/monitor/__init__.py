"""A safety monitor for any fine-tune: see safety erode while training runs, and act on it.

- :class:`SafetyMonitorCallback`: a ``transformers.TrainerCallback`` (so it works with every TRL
  trainer and with this library's AsFT, SafeKey and distillation trainers) that probes the model
  at the start, every ``steps`` steps and at the end, judges the responses, logs the unsafe rate,
  the over-refusal and the task score with 95% Wilson intervals through the trainer's logging, and
  applies a policy (``warn``, ``stop``, ``keep_safest``, ``patch``).
- :class:`SafetyMonitorConfig`: its settings.
- :func:`read_curve`, :func:`curve_table`, :func:`plot_curves`: a finished run's curve from its
  ``safety_monitor.json`` or ``trainer_state.json``.
- :func:`mcnemar_exact` / :func:`paired_change`: the paired test on the same probes.
- :func:`monitor_fine_tune`: the study's hook (a monitor with the study's probe settings).

Layer 5 (docs/architecture.md): imports ``eval`` and ``training`` (layer 2); only the ``patch``
policy (:mod:`.patch`) imports the merge engine (layer 4), and only when it runs.
"""

from .callback import SafetyMonitorCallback
from .config import PATCH_METHODS, POLICIES, SafetyMonitorConfig
from .curve import card_section, curve_table, plot_curves, read_curve, update_card
from .probes import ProbeSet, load_probes
from .stats import PairedChange, mcnemar_exact, paired_change
from .study import monitor_fine_tune

__all__ = [
    "PATCH_METHODS",
    "POLICIES",
    "PairedChange",
    "ProbeSet",
    "SafetyMonitorCallback",
    "SafetyMonitorConfig",
    "card_section",
    "curve_table",
    "load_probes",
    "mcnemar_exact",
    "monitor_fine_tune",
    "paired_change",
    "plot_curves",
    "read_curve",
    "update_card",
]
