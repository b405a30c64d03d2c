"""hizoo_jax: zeroth-order optimizers (HiZOO, HiZOO-L, MeZO, FZOO).

Optax gradient transformations that fine-tune without a backward pass, a
memory-lean training step, sharding and checkpoint helpers, LoRA and Flax
integrations. Flax and orbax-checkpoint are optional: they are imported when
a function that needs them is called.
"""

from hizoo_jax import lora
from hizoo_jax.alias import fzoo, hizoo, hizoo_l, mezo
from hizoo_jax.core.fzoo import FZOOState, probe_noise, scale_by_fzoo
from hizoo_jax.checkpoint import (
    CheckpointError,
    all_steps,
    restore_checkpoint,
    save_checkpoint,
)
from hizoo_jax.core.paper_rule import FactoredHessian
from hizoo_jax.core.signed_rule import GroupedStats
from hizoo_jax.estimator import scale_by_hizoo, scale_by_mezo
from hizoo_jax.inspection import curvature_tree, step_noise
from hizoo_jax.flax_utils import (
    cast_floating,
    linen_zo_step,
    nnx_value_fn,
    nnx_zo_step,
)
from hizoo_jax.lora import lora_init, lora_merge
from hizoo_jax.masking import MaskedTailState, masked_chain
from hizoo_jax.skipping import chain
from hizoo_jax.precision import (
    MasterWeightsState,
    master_weights,
    stochastic_rounding,
    warn_on_rounding,
)
from hizoo_jax.sharding import abstract_state, init_sharded, state_shardings
from hizoo_jax.train_step import make_train_step
from hizoo_jax.zo_state import (
    Perturbation,
    PerturbationProbe,
    ZOState,
    find_state,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FZOOState",
    "FactoredHessian",
    "GroupedStats",
    "MaskedTailState",
    "MasterWeightsState",
    "Perturbation",
    "PerturbationProbe",
    "ZOState",
    "abstract_state",
    "all_steps",
    "cast_floating",
    "chain",
    "curvature_tree",
    "find_state",
    "fzoo",
    "hizoo",
    "hizoo_l",
    "init_sharded",
    "linen_zo_step",
    "lora",
    "lora_init",
    "lora_merge",
    "make_train_step",
    "masked_chain",
    "master_weights",
    "mezo",
    "nnx_value_fn",
    "nnx_zo_step",
    "probe_noise",
    "restore_checkpoint",
    "save_checkpoint",
    "scale_by_fzoo",
    "scale_by_hizoo",
    "scale_by_mezo",
    "state_shardings",
    "step_noise",
    "stochastic_rounding",
    "warn_on_rounding",
]
