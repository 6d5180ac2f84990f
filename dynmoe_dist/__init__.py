"""dynmoe_dist: distributed expert-parallel Mixture-of-Experts with dynamic experts."""

from . import _allocator  # noqa: F401  first: turns on torch's huge-page CPU allocation before torch allocates
from .errors import ConfigError, DynMoEError, NonFiniteError, ShapeError
from .layer import MoEAux, MoELayer

__version__ = "0.1.0"
__all__ = ["ConfigError", "DynMoEError", "MoEAux", "MoELayer", "NonFiniteError", "ShapeError", "__version__"]
