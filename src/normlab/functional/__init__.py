"""Every normalization method as a function of tensors (no module state).

One file per family: :mod:`normlab.functional.core` holds the batch and per-sample
norms as their papers write them, :mod:`normlab.functional.mixture` the Switchable and
Attentive mixtures, :mod:`normlab.functional.online` Online Normalization.
:mod:`normlab.functional.common` holds what they share (:func:`normalize`,
:func:`update_running_`, input checks), and :mod:`normlab.functional.fastpath` the
dispatch to torch's own CPU kernels where they are as accurate, with the accuracy
note. Everything is re-exported here, so ``normlab.functional.batch_norm``
is the name to use.
"""

from normlab.functional.common import check_input, normalize, update_running_
from normlab.functional.core import (
    batch_norm,
    batch_renorm,
    channel_layer_norm,
    group_norm,
    instance_norm,
    layer_norm,
    renorm_limits,
    rms_norm,
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
