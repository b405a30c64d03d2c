"""tunix's ``PeftTrainer`` with a zeroth-order step (optional: needs tunix).

``PeftTrainer(model, hz.mezo(...), config)`` fails: its step takes gradients
with ``nnx.value_and_grad`` and calls ``optimizer.update(model, grads)``, so
the estimator never sees the loss. :class:`ZOPeftTrainer` replaces only the
step, through the trainer's public ``create_train_step_fn``: the loop, data
sharding, evaluation, metrics, checkpoints and LoRA detection are tunix's.
The step is :func:`hizoo_jax.nnx_zo_step` on ``optimizer`` (built by the
trainer with ``wrt=nnx.LoRAParam`` when the model has LoRA, else
``nnx.Param``).

Not imported by ``import hizoo_jax``; tested against google-tunix 0.1.7.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

try:
  from tunix.sft import peft_trainer
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      "hizoo_jax.tunix_trainer needs google-tunix: pip install "
      "'hizoo_jax[tunix]'.") from e

from hizoo_jax.flax_utils import nnx_zo_step


class ZOPeftTrainer(peft_trainer.PeftTrainer):
  """A ``tunix.sft.peft_trainer.PeftTrainer`` whose step is zeroth-order.

  Use as ``PeftTrainer``, with an optimizer from :func:`hizoo_jax.hizoo`,
  :func:`hizoo_jax.hizoo_l` or :func:`hizoo_jax.mezo` (or a chain holding
  one). The step logs the estimator's loss (HiZOO: L(theta); MeZO: the mean
  of L(theta +/- mu z)); the logged ``grad_norm`` is ``|g|``, the absolute
  projected gradient (l+ - l-) / (2 mu), since no gradient is formed.

  Example (``model``: a tunix NNX model; ``train_ds``: an iterable of dicts
  of ``loss_fn``'s keyword arguments)::

    from hizoo_jax.tunix_trainer import ZOPeftTrainer
    config = peft_trainer.TrainingConfig(eval_every_n_steps=100,
                                         max_steps=1000)
    trainer = ZOPeftTrainer(model, hz.mezo(1e-6, mu=1e-3), config)
    trainer.with_loss_fn(loss_fn).train(train_ds)
  """

  def __init__(self, model, optimizer, training_config, *args, **kwargs):
    if training_config.gradient_accumulation_steps is not None:
      raise ValueError(
          "gradient_accumulation_steps wraps the optimizer in "
          "optax.MultiSteps, which does not pass the loss to a zeroth-order "
          "estimator: use num_queries= on the estimator (several "
          "perturbations a step) or a larger batch instead.")
    super().__init__(model, optimizer, training_config, *args, **kwargs)

  def with_loss_fn(self, loss_fn: Callable[..., Any], has_aux: bool = False):
    """``loss_fn(model, **inputs) -> scalar``; ``has_aux`` is not supported.

    The estimator evaluates the loss at perturbed points, so an auxiliary
    output would belong to none of them.
    """
    if has_aux:
      raise ValueError(
          "ZOPeftTrainer needs a loss_fn returning a scalar (has_aux=False):"
          " the zeroth-order step evaluates it only at perturbed points.")
    return super().with_loss_fn(loss_fn, has_aux=False)

  def create_train_step_fn(self) -> Callable:
    """``train_step(model, optimizer, inputs) -> (loss, None, |g|)``."""

    def train_step(model, optimizer, inputs):
      kwargs = self.gen_model_input_fn(inputs)
      zo = nnx_zo_step(optimizer, model, self.loss_fn, **kwargs)
      return zo.loss, None, jnp.abs(zo.projected_grad)

    return train_step
