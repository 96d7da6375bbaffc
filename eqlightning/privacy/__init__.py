"""Differentially private training (DP-SGD with Opacus). Importing this package imports opacus.

    from eqlightning.privacy import DifferentialPrivacy
    trainer = lightning.Trainer(callbacks=[DifferentialPrivacy(target_epsilon=8.0)], ...)

Importing it also registers exact per-sample gradient rules for eqlightning's layers with Opacus.
"""

from . import grad_samplers  # noqa: F401  (registers the per-sample gradient rules)
from .accounting import ACCOUNTANTS, PrivacyLedger, calibrate_noise
from .callback import DifferentialPrivacy
from .ema import WeightEMA
from .optimizer import make_private_optimizer
from .sampling import LogicalBatchSampler, poisson_loader
from .validation import DPCompatibilityError, check_dp_compatible, dp_incompatible_layers

__all__ = ["DifferentialPrivacy", "PrivacyLedger", "calibrate_noise", "ACCOUNTANTS", "WeightEMA",
           "make_private_optimizer", "poisson_loader", "LogicalBatchSampler", "check_dp_compatible",
           "dp_incompatible_layers", "DPCompatibilityError"]
