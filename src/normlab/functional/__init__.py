"""Every normalization method as a function of tensors (no module state).

One file per family: :mod:`normlab.functional.core` holds the shared arithmetic
(:func:`normalize`, :func:`update_running_`, input checks) and the batch and
per-sample norms. Everything is re-exported here, so ``normlab.functional.batch_norm``
is the name to use.
"""

from normlab.functional.core import (
    batch_norm,
    batch_renorm,
    channel_layer_norm,
    check_input,
    group_norm,
    instance_norm,
    layer_norm,
    normalize,
    renorm_limits,
    rms_norm,
    update_running_,
)
from normlab.functional.mixture import (
    attention_weights,
    attentive_norm,
    switchable_norm,
    switchable_weights,
)
from normlab.functional.online import (
    activation_clamp,
    layer_scaling,
    linear_scan,
    online_norm,
    online_norm_step,
)

__all__ = [
    "batch_norm",
    "batch_renorm",
    "renorm_limits",
    "layer_norm",
    "channel_layer_norm",
    "rms_norm",
    "instance_norm",
    "group_norm",
    "normalize",
    "update_running_",
    "check_input",
    "switchable_norm",
    "switchable_weights",
    "attentive_norm",
    "attention_weights",
    "online_norm",
    "online_norm_step",
    "linear_scan",
    "layer_scaling",
    "activation_clamp",
]
