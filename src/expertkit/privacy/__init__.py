"""expertkit.privacy: differentially private fine-tuning on Opacus, and DP-Flat.

* ``dp-sgd`` / ``dp-adamw`` (registered optimizers; ``expertkit train --dp``): DP-SGD with
  Poisson sampling, per-example clipping and Gaussian noise, accounted by Opacus's RDP or PRV
  accountant, the noise calibrated to a target ε (:mod:`expertkit.privacy.methods`).
* DP-Flat's parts, composable: weight perturbation from privatised gradients, flatness-guided
  sparse prefix tuning, weight distillation from a non-DP teacher trained on public data
  (:mod:`~expertkit.privacy.wrappers`, :mod:`~expertkit.privacy.prefix`).
* :func:`epsilon_spent`, :func:`calibrate` (accounting), :func:`top_eigenvalue` (sharpness),
  :func:`privacy_split` (public / private data), :func:`loss_threshold_mia` (membership inference).
* :func:`expertkit.privacy.recipe.train_private`: a whole DP-Flat run (behind the ``dp_train``
  pipeline stage and ``experiments/dp_flat.py``).

See docs/privacy.md.
"""

from expertkit.privacy import methods  # noqa: F401 - registers dp-sgd and dp-adamw
from expertkit.privacy.accounting import PrivacyBudgetError, calibrate, epsilon_spent
from expertkit.privacy.config import DPAdamWParams, DPParams, DPSGDParams
from expertkit.privacy.dp import PrivateOptimizer
from expertkit.privacy.mia import MiaResult, auc_from_losses, example_losses, loss_threshold_mia
from expertkit.privacy.sharpness import top_eigenvalue
from expertkit.privacy.split import PrivacySplit, privacy_split
from expertkit.privacy.wrappers import WeightDistillation, WeightPerturbation

__all__ = [
    "DPAdamWParams",
    "DPParams",
    "DPSGDParams",
    "MiaResult",
    "PrivacySplit",
    "PrivacyBudgetError",
    "PrivateOptimizer",
    "WeightDistillation",
    "WeightPerturbation",
    "auc_from_losses",
    "calibrate",
    "epsilon_spent",
    "example_losses",
    "loss_threshold_mia",
    "privacy_split",
    "top_eigenvalue",
]
