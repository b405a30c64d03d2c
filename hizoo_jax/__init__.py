"""hizoo_jax: Hessian-informed zeroth-order optimizers (HiZOO, HiZOO-L, MeZO).

Optax gradient transformations that fine-tune without a backward pass.
"""

from hizoo_jax.alias import hizoo, hizoo_l, mezo
from hizoo_jax.curvature import FactoredHessian
from hizoo_jax.estimator import (
    Perturbation,
    PerturbationProbe,
    ZOState,
    find_state,
    scale_by_hizoo,
    scale_by_mezo,
    step_noise,
)

__version__ = "0.1.0"

__all__ = [
    "FactoredHessian",
    "Perturbation",
    "PerturbationProbe",
    "ZOState",
    "find_state",
    "hizoo",
    "hizoo_l",
    "mezo",
    "scale_by_hizoo",
    "scale_by_mezo",
    "step_noise",
]
