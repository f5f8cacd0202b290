"""`python -m hf_safety_merge.cli`: the `hf-safety-merge` command."""

import sys

from . import main

sys.exit(main())
