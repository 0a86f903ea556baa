"""mnpo: iterative Nash preference optimisation (MNPO, TD/HT-MNPO) and online NLHF (EGPO family).

Importing the package is cheap on purpose: every heavy dependency (torch, transformers, vllm,
deepspeed) is imported inside the module that needs it. The Python API's names are attributes
resolved on first use (module `__getattr__`), so `import mnpo` and `mnpo --help` import none of them:

    from mnpo import MNPOConfig, MNPOTrainer
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it, imported when the name is first read.
_LAZY = {
    "MNPOConfig": "mnpo.offline.config",
    "MNPOTrainer": "mnpo.offline.trainer",
    "OnlineConfig": "mnpo.online.config",
    "to_trl_pairs": "mnpo.data.formats",
    "to_mnpo_pairs": "mnpo.data.formats",
}
__all__ = ["MNPOConfig", "MNPOTrainer", "OnlineConfig", "__version__", "to_mnpo_pairs", "to_trl_pairs"]

if TYPE_CHECKING:  # for type checkers and IDEs; never run
    from mnpo.data.formats import to_mnpo_pairs, to_trl_pairs
    from mnpo.offline.config import MNPOConfig
    from mnpo.offline.trainer import MNPOTrainer
    from mnpo.online.config import OnlineConfig


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mnpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
