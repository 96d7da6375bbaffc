"""Differentially private training (DP-SGD). Importing this package imports opacus.

    from eqlightning.privacy import DifferentialPrivacy
    trainer = lightning.Trainer(callbacks=[DifferentialPrivacy(target_epsilon=8.0)], ...)

Layout: :mod:`.engine` (model, optimizer, loader -> private ones; used by the callback, the benchmarks and code
outside Lightning), :mod:`.mechanisms` (how per-sample gradients are computed: ``fused``, ``hooks``, ``functorch``;
one file each), :mod:`.accounting` (the ledger), :mod:`.sampling` (Poisson loaders with resumable streams),
:mod:`.optimizer` (clipping and noise), :mod:`.callback` (Lightning orchestration), :mod:`.ema`, :mod:`.validation`.
Importing it also registers eqlightning's layer rules with Opacus's own ``GradSampleModule``.
"""

from . import opacus_rules  # noqa: F401  (registers the layer rules with Opacus)
from .accounting import ACCOUNTANTS, PrivacyLedger, calibrate_noise
from .callback import DifferentialPrivacy
from .ema import WeightEMA
from .engine import PerSampleGradients, PrivateTraining, make_private
from .mechanisms import Mechanism, create_mechanism, list_mechanisms, register_mechanism
from .optimizer import make_private_optimizer
from .sampling import LogicalBatchSampler, PoissonSampler, PrivateDataLoader, poisson_loader
from .validation import DPCompatibilityError, check_dp_compatible, dp_incompatible_layers

__all__ = ["DifferentialPrivacy", "PrivacyLedger", "calibrate_noise", "ACCOUNTANTS", "WeightEMA", "make_private",
           "PerSampleGradients", "PrivateTraining", "Mechanism", "register_mechanism", "list_mechanisms",
           "create_mechanism", "make_private_optimizer", "poisson_loader", "PoissonSampler", "LogicalBatchSampler",
           "PrivateDataLoader", "check_dp_compatible", "dp_incompatible_layers", "DPCompatibilityError"]
