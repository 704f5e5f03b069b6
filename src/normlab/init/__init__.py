"""Initialization schemes for networks without activation normalization.

Weight Normalization (Salimans & Kingma 2016; Arpit, Campos & Bengio 2019):

- :func:`data_dependent_init_`: per-unit mean 0 / std 1 pre-activations on an init batch.
- :func:`arpit_init_`: orthogonal ``v``, zero bias and the variance-preserving gains ``g``.
- :func:`arpit_warmup`: the paper's quadratic learning-rate warm-up (an ``LRScheduler``).

Self-normalizing networks (Klambauer et al. 2017): :func:`lecun_normal_`.

Fixup (Zhang, Dauphin & Ma 2019): :func:`fixup_param_groups` (scalar biases and
multipliers at lr/10); the Fixup initialisation itself is done by
:func:`normlab.models.fixup_resnet`.
"""

from normlab.init.fixup import fixup_param_groups
from normlab.init.selfnorm import lecun_normal_
from normlab.init.weightnorm import (
    ARPIT_ROLE_GAINS,
    ArpitWarmup,
    arpit_init_,
    arpit_warmup,
    data_dependent_init_,
)

__all__ = [
    "ARPIT_ROLE_GAINS",
    "ArpitWarmup",
    "arpit_init_",
    "arpit_warmup",
    "data_dependent_init_",
    "fixup_param_groups",
    "lecun_normal_",
]
