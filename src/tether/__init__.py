"""tether: policy optimization that stays stable, safe and robust.

The math lives in :mod:`tether.catalogue` (pure functions behind a registry); the worlds
(language models, control) call it from thin training loops.
"""

from tether.errors import TetherError

__all__ = ["TetherError", "__version__"]
__version__ = "0.1.0"
