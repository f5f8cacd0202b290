"""The Space's toy models: built by :mod:`hf_safety_merge.toy_models` (installed with the
package, so `hf-safety-merge demo --quick` uses the same ones)."""

from hf_safety_merge.toy_models import *  # noqa: F403
from hf_safety_merge.toy_models import __all__  # noqa: F401
