"""``docs/choosing.md``: which normalization to use, with the lab's evidence.

The page has two parts. What each method normalises, when to use it and when not, and
its costs are written by hand, here, as the data :data:`METHODS` (one dict per
method). The evidence is not typed: :func:`generate` fills it in from the JSON the lab
writes, the claim verdicts of a study (``claims.json``, from ``normlab study``) and the
speed ratios of a benchmark (the records of ``normlab bench --json``). Without them,
the evidence reads "not measured yet". The command::

    normlab docs --study normlab-study --bench bench.json --out docs/choosing.md

regenerates the page; edit this module, not the Markdown.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["METHODS", "load_claims", "load_bench", "bench_summary", "generate", "write"]

NOT_MEASURED = "not measured yet"

#: The hand-written part of docs/choosing.md, one entry per method, in page order.
#: Keys: ``title``, ``paper``, ``build`` (how to get it), ``normalises``, ``use``,
#: ``avoid``, ``costs``, ``portability`` (torch.compile / export / autocast notes),
#: ``claims`` (ids of the lab's claims about it), ``bench`` (its names in
#: ``normlab bench``), ``norms`` (its names in :func:`normlab.list_norms`, if any).
METHODS: dict[str, dict] = {
    "batch": {
        "title": "Batch Normalization",
        "paper": "Ioffe & Szegedy, 2015",
        "build": '`create_norm("bn", C)`, `normlab.nn.BatchNorm(C)`',
        "norms": ["batch"],
        "normalises": "each channel over the batch and every trailing dimension "
        "(N x H x W), with learned scale and shift; in eval, running averages of the "
        "batch statistics replace them.",
        "use": "convolutional and fully connected networks trained with batches of 16 "
        "or more samples per device (32 is the common default); the reference every "
        "other method is measured against. It allows higher learning rates and makes "
        "the initial weight scale matter less.",
        "avoid": "small or non-i.i.d. batches (below about 8 per device it degrades "
        "quickly: use GroupNorm, Batch Renorm or SyncBatchNorm), recurrent networks "
        "unrolled over time (see BN-LSTM), and whenever a sample's output must not "
        "depend on the rest of its batch in training.",
        "costs": "two reductions over the input in training plus the normalization "
        "itself; 2C parameters and 2C running statistics. Training and eval compute "
        "different functions, so a model can behave differently after `eval()`; "
        "a model trained with it can be folded into the preceding convolution for "
        "inference (`normlab.convert.fold_batchnorm`).",
        "portability": "compiles without graph break and exports in eval mode. "
        "`momentum=None` (cumulative average) reads the batch counter on the host: "
        "one graph break per call under torch.compile. A `mask` adds a host-side "
        "check (graph break). Under torch.compile the NaN guard of the running "
        "statistics still keeps non-finite batches out of them, but the "
        "RuntimeWarning naming the channels is only issued in eager mode. "
        "torch.func.vmap works in eval or with `track_running_stats=False`, not while "
        "running statistics are being updated.",
        "claims": ["bn_fewer_steps", "bn_higher_lr", "bn_init_scale", "bn_less_dropout",
                   "bn_conditioning", "internal_covariate_shift", "bn_small_batch"],
        "bench": ["BatchNorm", "BatchNorm+LeakyReLU"],
    },
    "batch_renorm": {
        "title": "Batch Renormalization",
        "paper": "Ioffe, 2017",
        "build": '`create_norm("brn", C)`, `normlab.nn.BatchRenorm(C, warmup="paper")`',
        "norms": ["batch_renorm"],
        "normalises": "as BatchNorm, then corrects the batch statistics towards the "
        "running ones (factors r, d, clipped, without gradient), so that training "
        "computes what eval will compute.",
        "use": "batch norm with small (about 4) or non-i.i.d. batches, where the gap "
        "between training and eval statistics hurts; a drop-in for BatchNorm "
        "(same state_dict).",
        "avoid": "large i.i.d. batches (plain BatchNorm is as good and simpler), and "
        "very short trainings: the running statistics must be meaningful before the "
        "correction helps, hence the paper's warm-up (plain BN for 5k steps).",
        "costs": "BatchNorm's, plus a few per-channel operations; two hyper-parameters "
        "(r_max, d_max) and their schedule.",
        "portability": "compiles without graph break with `warmup=None` (the "
        "default). With a warm-up schedule the limits depend on the step counter: a "
        "graph break per call, and the changing limits recompile. torch 2.13's "
        "AOTAutograd could recompute r and d in the backward from the already "
        "updated running statistics (wrong gradients); normlab reads them through a "
        "copy the partitioner always saves (pytorch PR #197039).",
        "claims": [],
        "bench": ["BatchRenorm"],
    },
    "sync_batch": {
        "title": "SyncBatchNorm (any backend, CPU included)",
        "paper": "Ioffe & Szegedy, 2015; cross-device statistics as in Peng et al., 2018",
        "build": '`create_norm("syncbn", C)`, `normlab.nn.to_sync_batchnorm(model)`',
        "norms": ["sync_batch"],
        "normalises": "as BatchNorm, with the statistics taken over the batches of "
        "every rank of a process group (gloo on the CPU works, unlike torch.nn's).",
        "use": "data-parallel training where each rank's batch is too small for "
        "BatchNorm but the global batch is not (detection, segmentation).",
        "avoid": "single-process training (it is exactly BatchNorm there), and slow "
        "interconnects: every training forward waits for an all_gather.",
        "costs": "BatchNorm's plus one all_gather of 3 x C numbers forward and one "
        "all_reduce of 2 x C backward per layer; every rank must call every "
        "synchronised layer in the same order.",
        "portability": "outside a process group: BatchNorm's. Inside one, not tested "
        "under torch.compile or export (collectives).",
        "claims": [],
        "bench": [],
    },
    "mc_batchnorm": {
        "title": "Monte Carlo Batch Normalization (uncertainty)",
        "paper": "Teye, Azizpour & Smith, 2018",
        "build": "`normlab.uncertainty.mc_batchnorm(model, train_data, x)`",
        "norms": [],
        "normalises": "nothing new: at inference, each BatchNorm layer takes the "
        "statistics of a random training batch instead of its running averages, T "
        "times; the spread of the T predictions estimates the model's uncertainty.",
        "use": "a network already trained with BatchNorm that needs predictive "
        "uncertainty without retraining (no dropout, no ensemble).",
        "avoid": "latency-bound inference (T forward passes, plus the training batch "
        "for each), and networks without batch norm.",
        "costs": "T times the inference cost (plus T training-batch forwards); no "
        "change to training.",
        "portability": "an inference procedure over a model, not a layer: nothing to "
        "compile or export on its own.",
        "claims": ["mcbn_uncertainty"],
        "bench": [],
    },
    "layer": {
        "title": "Layer Normalization",
        "paper": "Ba, Kiros & Hinton, 2016",
        "build": '`create_norm("ln", C)`, `normlab.nn.LayerNorm(C)`',
        "norms": ["layer"],
        "normalises": "each sample over all of its channels and trailing dimensions "
        "(C x H x W), with a per-channel scale and shift; the same in training and "
        "eval. (GroupNorm with one group.)",
        "use": "any batch size, batch size 1 included; sequence models and "
        "transformers (for the channels-only variant of ConvNeXt and ViTs see "
        "ChannelLayerNorm); when train and eval must compute the same function.",
        "avoid": "convolutional networks where channels carry very different "
        "statistics: normalising them together usually trains worse than BN or GN at "
        "normal batch sizes.",
        "costs": "two reductions per sample; 2C parameters, no running statistics.",
        "portability": "compiles without graph break, exports, keeps channels_last "
        "(torch.nn.LayerNorm over (C, H, W) returns a contiguous output).",
        "claims": ["ln_tiny_batch"],
        "bench": ["LayerNorm"],
    },
    "layer_channels": {
        "title": "Channel Layer Normalization (LayerNorm2d)",
        "paper": "Ba et al., 2016, as applied by ConvNeXt (Liu et al., 2022)",
        "build": '`create_norm("ln2d", C)`, `normlab.nn.ChannelLayerNorm(C)`',
        "norms": ["layer_channels"],
        "normalises": "each position of each sample over its C channels only: what "
        "torch.nn.LayerNorm(C) does to channels-last input, on (N, C, *) tensors "
        "without permuting them (timm's LayerNorm2d).",
        "use": "ConvNeXt-style and transformer-style convolutional blocks; any batch "
        "size.",
        "avoid": "classic ResNets (BN or GN are the studied choices there).",
        "costs": "a reduction over C at every position; 2C parameters.",
        "portability": "compiles without graph break, exports, keeps channels_last.",
        "claims": [],
        "bench": ["ChannelLayerNorm"],
    },
    "rms": {
        "title": "RMS Normalization",
        "paper": "Zhang & Sennrich, 2019",
        "build": '`create_norm("rms", C)`, `normlab.nn.RMSNorm(C)`',
        "norms": ["rms"],
        "normalises": "each sample by the root mean square of its C x H x W values, "
        "without centring and without shift.",
        "use": "where LayerNorm works and its centring is not needed (large "
        "language models): one reduction instead of two.",
        "avoid": "inputs with a large common offset, which RMSNorm keeps (it does not "
        "subtract the mean).",
        "costs": "one reduction per sample; C parameters.",
        "portability": "compiles without graph break, exports, keeps channels_last. "
        "Its default eps is the machine epsilon of the input dtype (torch.nn.RMSNorm's "
        "convention), so bfloat16 input uses a larger eps than float32.",
        "claims": [],
        "bench": ["RMSNorm"],
    },
    "instance": {
        "title": "Instance Normalization",
        "paper": "Ulyanov, Vedaldi & Lempitsky, 2016",
        "build": '`create_norm("in", C)`, `normlab.nn.InstanceNorm(C)`',
        "norms": ["instance"],
        "normalises": "each channel of each sample over its trailing dimensions "
        "(H x W): per-image contrast normalization. No affine and no running "
        "statistics by default, as torch.nn.",
        "use": "style transfer and image generation, where each image's contrast "
        "should be removed.",
        "avoid": "classification: it removes information the classifier needs (GN "
        "with more channels per group keeps it).",
        "costs": "two reductions per (sample, channel); none or 2C parameters.",
        "portability": "compiles without graph break, exports, keeps channels_last "
        "(torch.nn.InstanceNorm2d returns a contiguous output).",
        "claims": [],
        "bench": ["InstanceNorm"],
    },
    "group": {
        "title": "Group Normalization",
        "paper": "Wu & He, 2018",
        "build": '`create_norm("gn", C)` (32 groups at most), '
        "`normlab.nn.GroupNorm(C, num_groups=32)`",
        "norms": ["group"],
        "normalises": "each sample over groups of C/G consecutive channels and the "
        "trailing dimensions; G = 1 is LayerNorm, G = C InstanceNorm.",
        "use": "convolutional networks trained with small batches per device "
        "(detection, segmentation, video, high-resolution inputs): its accuracy does "
        "not depend on the batch size; train and eval compute the same function.",
        "avoid": "large-batch image classification, where BN is usually slightly "
        "better; channel counts with no good divisor (use `choose_num_groups`).",
        "costs": "two reductions per (sample, group); 2C parameters, no running "
        "statistics; cannot be folded into the convolution for inference.",
        "portability": "compiles without graph break, exports, keeps channels_last.",
        "claims": ["gn_batch_stable"],
        "bench": ["GroupNorm"],
    },
    "switchable": {
        "title": "Switchable Normalization",
        "paper": "Luo, Ren, Peng, Zhang & Li, 2019",
        "build": '`create_norm("sn", C)`, `normlab.nn.SwitchableNorm(C)`',
        "norms": ["switchable"],
        "normalises": "with a learned softmax mixture of the instance, layer and "
        "batch statistics (separate weights for the means and the variances).",
        "use": "when the right normalizer is not known in advance, or differs between "
        "layers; its learned weights show which statistics each layer prefers.",
        "avoid": "the smallest budgets (the mixture weights need training), and "
        "batch size 1 unless `using_bn=False`.",
        "costs": "the three sets of statistics from one pass of instance moments; 6 "
        "extra parameters per layer and BatchNorm's running statistics.",
        "portability": "compiles without graph break (normlab checks its flags on the "
        "host rather than a tensor), exports in eval mode.",
        "claims": ["sn_matches_best"],
        "bench": ["SwitchableNorm"],
    },
    "attentive": {
        "title": "Attentive Normalization",
        "paper": "Li, Sun & Wu, 2020",
        "build": '`create_norm("an", C)`, `normlab.nn.AttentiveNorm(C, num_components=10)`',
        "norms": ["attentive"],
        "normalises": "as BatchNorm (or GroupNorm) without affine, followed by a "
        "per-sample mixture of K learned affine transforms weighted by an attention "
        "on the input's channel statistics.",
        "use": "where BN works and a small gain is worth extra parameters (the paper "
        "reports ImageNet gains of ResNets and MobileNets over BN).",
        "avoid": "tight parameter budgets or tiny networks; batch size 1 with "
        "`norm=\"batch\"` (the attention's batch norm needs 2 samples).",
        "costs": "3KC + 2K - 2C parameters more than BatchNorm; a C x K matmul per "
        "sample for the attention.",
        "portability": "compiles without graph break, exports. Under autocast the "
        "attention matmul runs in bfloat16 (autocast's policy), so its output is "
        "within two bfloat16 roundings of float32's.",
        "claims": ["an_beats_bn"],
        "bench": ["AttentiveNorm"],
    },
    "online": {
        "title": "Online Normalization",
        "paper": "Chiley et al., 2019",
        "build": '`create_norm("on", C)`, `normlab.nn.OnlineNorm(C)`',
        "norms": ["online"],
        "normalises": "each sample with exponentially decaying averages of the "
        "statistics of the samples before it (streaming, batch size 1 allowed); its "
        "backward is the paper's controlled gradient, not the gradient of the forward.",
        "use": "training at batch size 1 or with streaming data where BN's batch "
        "statistics do not exist, and memory-bound training (no batch needed).",
        "avoid": "when a standard, well-studied layer will do; when double backward "
        "or the exact gradient of the forward is needed.",
        "costs": "per-channel state (running mean and variance, and the backward's "
        "controllers u, v, which backward updates); scans over the batch (log2 N "
        "vectorised steps) rather than a loop over samples.",
        "portability": "compiles without graph break in training and eval, with the "
        "same controllers u, v after backward as eager; exports in eval mode. "
        "Backward mutates u and v: a second backward through the same graph is not "
        "idempotent.",
        "claims": ["online_batch1"],
        "bench": ["OnlineNorm"],
    },
    "weight_norm": {
        "title": "Weight Normalization",
        "paper": "Salimans & Kingma, 2016; initialisation by Arpit, Campos & Bengio, 2019",
        "build": "`normlab.nn.weight_norm(layer)`, then `normlab.init.arpit_init_` or "
        "`normlab.init.data_dependent_init_`",
        "norms": [],
        "normalises": "weights, not activations: each output unit's weight vector is "
        "g v / ||v||, decoupling its length g from its direction v.",
        "use": "networks where batch statistics are unwanted (reinforcement learning, "
        "generative models, tiny batches), with a proper initialisation.",
        "avoid": "deep networks with the default initialisation: without a "
        "data-dependent or Arpit et al. init they train badly.",
        "costs": "one norm per output unit per forward (on the weights, cheap); no "
        "dependence on the batch.",
        "portability": "a torch parametrization: compiles without graph break, "
        "exports, pickles, deep-copies; `reset_parameters()` (after `to_empty()` from "
        "the meta device) reaches g and v.",
        "claims": ["weightnorm_arpit_init"],
        "bench": [],
    },
    "enorm": {
        "title": "Equi-normalization (ENorm)",
        "paper": "Stock, Graham, Gribonval & Jegou, 2019",
        "build": "`normlab.nn.ENorm(model)`, `.step()` after each optimizer step",
        "norms": [],
        "normalises": "weights: after each optimizer step, rescales consecutive "
        "layers of a ReLU network so that each hidden unit's incoming and outgoing "
        "weight norms are balanced, without changing the network's function.",
        "use": "plain ReLU networks without batch norm, notably at small batch sizes.",
        "avoid": "networks with BatchNorm (it changes their function) or with "
        "non-homogeneous activations.",
        "costs": "one balancing pass over the weights per step; no activation cost.",
        "portability": "an operation on the weights between steps, not a layer: "
        "nothing to compile or export.",
        "claims": ["enorm_small_batch"],
        "bench": [],
    },
    "selu": {
        "title": "Self-normalizing networks (SELU, Alpha Dropout)",
        "paper": "Klambauer, Unterthiner, Mayr & Hochreiter, 2017",
        "build": "`normlab.nn.SELU()`, `normlab.nn.AlphaDropout(p)`, "
        "`normlab.init.lecun_normal_`, `normlab.models.self_normalizing_mlp`",
        "norms": [],
        "normalises": "nothing explicitly: with LeCun-normal weights, SELU keeps "
        "activations near mean 0 and variance 1 through depth (an attracting fixed "
        "point); Alpha Dropout keeps that fixed point.",
        "use": "deep fully connected networks on tabular data, without any "
        "normalization layer.",
        "avoid": "convolutional networks and models that need ordinary dropout or "
        "other initialisations (they break the fixed point).",
        "costs": "an activation function: no parameters, no statistics.",
        "portability": "compiles without graph break, exports, keeps channels_last. "
        "AlphaDropout's masks under torch.compile come from inductor's own random "
        "generator (equal to eager only with `fallback_random`).",
        "claims": ["selu_self_normalizes", "selu_deep_mlp"],
        "bench": ["SELU"],
    },
    "fixup": {
        "title": "Fixup initialization",
        "paper": "Zhang, Dauphin & Ma, 2019",
        "build": "`normlab.models.fixup_resnet`, `normlab.init.fixup_param_groups`",
        "norms": [],
        "normalises": "nothing: residual branches start at zero (last layer zero, "
        "others rescaled by L^(-1/(2m-2))) with scalar biases and multipliers, so a "
        "deep residual network trains without normalization.",
        "use": "residual networks where normalization layers are unwanted (batch "
        "dependence, inference cost).",
        "avoid": "networks without residual connections.",
        "costs": "none at run time beyond a few scalars per block.",
        "portability": "plain layers: nothing specific.",
        "claims": ["fixup_no_norm"],
        "bench": [],
    },
    "ghn": {
        "title": "Generalized Hamming Networks",
        "paper": "Fan, 2017",
        "build": "`normlab.nn.GHNLinear`, `normlab.nn.GHNConv2d`, "
        "`normlab.nn.DoubleThreshold`",
        "norms": [],
        "normalises": "nothing: each neuron's bias is computed from its weights and "
        "inputs (the generalized Hamming distance), which the paper argues is what "
        "batch norm learns to approximate.",
        "use": "experiments on networks without BN and without learned biases.",
        "avoid": "production models: evidence beyond the original paper is thin.",
        "costs": "one extra reduction of the input per layer (a convolution with "
        "ones for GHNConv2d).",
        "portability": "compiles without graph break, exports, keeps channels_last.",
        "claims": ["ghn_fast_learning"],
        "bench": [],
    },
    "bnlstm": {
        "title": "BN-LSTM (recurrent batch normalization)",
        "paper": "Cooijmans, Ballas, Laurent, Gulcehre & Courville, 2017",
        "build": "`normlab.nn.BNLSTM(input_size, hidden_size)`",
        "norms": [],
        "normalises": "the input-to-hidden and hidden-to-hidden terms and the cell "
        "output of an LSTM, over the batch, with statistics of each time step.",
        "use": "LSTMs trained with batches of normal size on sequences of bounded "
        "length (faster convergence, e.g. sequential MNIST).",
        "avoid": "tiny batches, and sequences longer at test than in training "
        "(steps past the last trained one reuse its statistics).",
        "costs": "three batch norms per step, running statistics per step "
        "(max_steps x 4H); a Python loop over time steps, several times slower "
        "than torch.nn.LSTM's fused kernel.",
        "portability": "torch.compile unrolls the time loop: no graph break, but "
        "compile time grows with the sequence length and each new length compiles "
        "again; `lengths`/`mask` add host-side checks (graph breaks). Exports (ONNX "
        "included) for a fixed length.",
        "claims": ["bnlstm_per_step"],
        "bench": [],
    },
    "input_bnlstm": {
        "title": "LSTM with batch-normalized inputs",
        "paper": "Laurent, Pereyra, Brakel, Zhang & Bengio, 2016",
        "build": '`normlab.nn.InputBNLSTM(input_size, hidden_size, statistics="sequence")`',
        "norms": [],
        "normalises": "only the input-to-hidden term, over the batch and all time "
        "steps (sequence-wise) or per step (frame-wise).",
        "use": "speech-like, variable-length sequences where faster training of the "
        "criterion is the goal.",
        "avoid": "expecting better generalisation: the paper found more overfitting.",
        "costs": "one batch norm over all steps at once; the recurrence as an LSTM "
        "in Python (slower than torch.nn.LSTM).",
        "portability": "as BN-LSTM.",
        "claims": ["input_bn_lstm"],
        "bench": [],
    },
    "lnlstm": {
        "title": "LN-LSTM",
        "paper": "Ba, Kiros & Hinton, 2016",
        "build": "`normlab.nn.LNLSTM(input_size, hidden_size)`",
        "norms": [],
        "normalises": "the gate pre-activations and the cell output of each sample "
        "at each step (no batch statistics).",
        "use": "recurrent networks at any batch size, batch size 1 included.",
        "avoid": "bfloat16 autocast where accuracy matters: layer norm of the "
        "bfloat16 gate matmuls amplifies their rounding (measured up to about 14 "
        "bfloat16 roundings from float32 on a 4-step test, against 2 for "
        "torch.nn.LSTM).",
        "costs": "three layer norms per step; the recurrence in Python.",
        "portability": "as BN-LSTM.",
        "claims": [],
        "bench": [],
    },
    "none": {
        "title": "No normalization",
        "paper": "",
        "build": '`create_norm("none", C)` (an identity that takes the channel count)',
        "norms": ["none"],
        "normalises": "nothing.",
        "use": "baselines, and networks made trainable otherwise (Fixup, SELU, "
        "weight normalization, careful initialisation).",
        "avoid": "deep networks with a plain initialisation.",
        "costs": "none.",
        "portability": "nothing to say.",
        "claims": [],
        "bench": [],
    },
}

_FIELDS = ("title", "paper", "build", "norms", "normalises", "use", "avoid", "costs",
           "portability", "claims", "bench")


# ------------------------------------------------------------------------ loading the JSON


def _read_json(path: Path, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"normlab docs: {what} file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"normlab docs: {what} file {path} is not valid JSON ({e})") from None


def load_claims(path: str | os.PathLike) -> list[dict]:
    """The claim records of a study: ``path`` is the study's output folder (holding
    ``claims.json``) or the JSON file itself, a list of objects with at least ``id``
    and ``verdict`` (and usually ``number``, ``title``, ``reason``).

    Raises:
        FileNotFoundError, ValueError: no such file, or not a list of claim objects.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "claims.json"
    data = _read_json(path, "claims")
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and {"id", "verdict"} <= set(r) for r in data
    ):
        raise ValueError(f"normlab docs: {path} must hold a list of claim objects with at "
                         "least 'id' and 'verdict' (a study's claims.json)")
    return data


def load_bench(path: str | os.PathLike) -> list[dict]:
    """The records of a benchmark JSON (``normlab bench --json PATH``): a list of objects
    with at least ``layer``, ``impl``, ``shape``, ``dtype``, ``layout``, ``mode``,
    ``pass``, ``median_ms`` and ``ratio_to_torch`` (torch.nn's time over this
    implementation's: above 1 is faster than torch.nn). A dict holding the list under
    ``"records"`` is accepted too.

    Raises:
        FileNotFoundError, ValueError: no such file, or records without those keys.
    """
    path = Path(path)
    data = _read_json(path, "benchmark")
    if isinstance(data, dict) and "records" in data:
        data = data["records"]
    need = {"layer", "impl", "median_ms"}
    if not isinstance(data, list) or not all(isinstance(r, dict) and need <= set(r)
                                             for r in data):
        raise ValueError(f"normlab docs: {path} must hold a list of benchmark records with "
                         f"at least {sorted(need)} (the JSON of `normlab bench`)")
    return data


# ------------------------------------------------------------------------ summarising


def _cell_key(r: dict) -> tuple:
    return (str(r.get("shape")), r.get("dtype"), r.get("layout"), r.get("mode"),
            r.get("pass"))


def _describe_cell(r: dict) -> str:
    shape = "x".join(str(s) for s in r.get("shape") or [])
    parts = [shape, r.get("dtype"), r.get("layout"), r.get("mode"), r.get("pass")]
    return " ".join(str(p) for p in parts if p)


def _stats(values: Sequence[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values)}


def bench_summary(records: Iterable[dict], layer: str, impl: str = "normlab") -> dict | None:
    """Speed of ``impl`` of ``layer`` relative to its peers, over all benchmark cells.

    Returns None if the records hold no timing of it, else a dict with ``cells`` (how
    many cells timed it), ``vs_torch`` (statistics ``n, median, min, max`` of
    ``ratio_to_torch``, and ``worst``: the slowest cell's description and ratio) or
    None where torch.nn has no such layer, and ``vs_peers``: for every other
    implementation timed in the same cells (``composite``, ``loop``, ...), the same
    statistics of its time over this one's (above 1: ``impl`` is faster).
    """
    records = [r for r in records if r.get("layer") == layer]
    mine = {_cell_key(r): r for r in records
            if r.get("impl") == impl and isinstance(r.get("median_ms"), (int, float))}
    if not mine:
        return None
    ratios = [(r["ratio_to_torch"], r) for r in mine.values()
              if isinstance(r.get("ratio_to_torch"), (int, float))]
    vs_torch = None
    if ratios:
        worst_ratio, worst = min(ratios, key=lambda p: p[0])
        vs_torch = dict(_stats([v for v, _ in ratios]), worst=_describe_cell(worst),
                        worst_ratio=worst_ratio)
    peers: dict[str, list[float]] = {}
    for r in records:
        other = r.get("impl")
        ms = r.get("median_ms")
        if other in (impl, "torch", "copy") or not isinstance(ms, (int, float)):
            continue
        own = mine.get(_cell_key(r))
        if own is not None and own["median_ms"] > 0:
            peers.setdefault(other, []).append(ms / own["median_ms"])
    return {"cells": len(mine), "vs_torch": vs_torch,
            "vs_peers": {k: _stats(v) for k, v in sorted(peers.items())}}


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def _bench_lines(records: list[dict] | None, layers: list[str]) -> list[str]:
    if not layers:
        return ["- Speed: not benchmarked (not a layer `normlab bench` times)."]
    if records is None:
        return [f"- Speed ({', '.join(layers)}): {NOT_MEASURED}."]
    lines = []
    for layer in layers:
        s = bench_summary(records, layer)
        if s is None:
            lines.append(f"- Speed ({layer}): {NOT_MEASURED} (no record in the benchmark).")
            continue
        t = s["vs_torch"]
        if t is None:
            head = f"- Speed ({layer}, {s['cells']} cells): torch.nn has no such layer"
        else:
            head = (f"- Speed ({layer}): torch.nn's time / normlab's = {_fmt(t['median'])} "
                    f"median over {t['n']} cells (range {_fmt(t['min'])} to "
                    f"{_fmt(t['max'])}; slowest: {t['worst']}, {_fmt(t['worst_ratio'])})")
        peers = "; ".join(f"{name}'s time / normlab's = {_fmt(p['median'])} median "
                          f"(range {_fmt(p['min'])} to {_fmt(p['max'])})"
                          for name, p in s["vs_peers"].items())
        lines.append(head + (f"; {peers}." if peers else "."))
    return lines


def _one_line(text) -> str:
    return " ".join(str(text or "").split())


def _claim_lines(claims: list[dict] | None, ids: list[str]) -> list[str]:
    if not ids:
        return ["- Claims: the lab has no claim about it yet."]
    if claims is None:
        return [f"- Claims ({', '.join(ids)}): {NOT_MEASURED}."]
    by_id = {c["id"]: c for c in claims}
    lines = []
    for cid in ids:
        c = by_id.get(cid)
        if c is None:
            lines.append(f"- Claim `{cid}`: {NOT_MEASURED} (not in this study).")
            continue
        number = f"{c['number']}. " if c.get("number") is not None else ""
        title = _one_line(c.get("title") or c.get("statement") or cid)
        reason = _one_line(c.get("reason"))
        lines.append(f"- Claim {number}{title} (`{cid}`): **{c['verdict']}**"
                     + (f": {reason}" if reason else "."))
    return lines


# ------------------------------------------------------------------------ the page


def _aliases_table() -> list[str]:
    from normlab.registry import list_norms

    rows = ["| `create_norm` name | also accepted (case-insensitive, `-` = `_`) |",
            "|---|---|"]
    for name, aliases in list_norms(with_aliases=True).items():
        rows.append(f"| `{name}` | {', '.join(f'`{a}`' for a in aliases) or '-'} |")
    return rows


_RECIPES = """\
## Putting a normlab layer into someone else's model

Every normlab layer takes the channel count first, so any factory with a `norm_layer`
argument called as `norm_layer(num_channels)` accepts it (tested against local replicas
of timm's and torchvision's call patterns, and against the real libraries where
installed: `tests/test_interop.py`).

- torchvision ResNet (it calls `norm_layer(num_channels)`; the group count goes by
  keyword):

  ```python
  import functools, torchvision, normlab
  model = torchvision.models.resnet50(
      norm_layer=functools.partial(normlab.nn.GroupNorm, num_groups=32))
  ```

- timm: pass a class (`norm_layer=normlab.nn.BatchNorm`), a partial of a class with
  keywords only (`functools.partial(normlab.nn.GroupNorm, num_groups=32)`), or a function
  (`norm_layer=lambda c, **kw: normlab.create_norm("gn", c, **kw)`). Not
  `functools.partial(normlab.create_norm, "gn")`: timm's `get_norm_layer` keeps a
  partial's keywords and drops its positional arguments.
- Any existing model: `model, replaced = normlab.convert.swap_norm(model, "gn")` replaces
  every norm layer in place and says what it did.
"""


def _method_section(key: str, m: dict, claims, records) -> list[str]:
    lines = [f"### {m['title']}", ""]
    meta = [m["build"]] + ([m["paper"]] if m["paper"] else [])
    lines += [" · ".join(meta), ""]
    lines += [f"- **Normalises:** {m['normalises']}",
              f"- **Use it for:** {m['use']}",
              f"- **Avoid it for:** {m['avoid']}",
              f"- **Costs:** {m['costs']}",
              f"- **torch.compile, export, autocast:** {m['portability']}",
              "", "Evidence:", ""]
    lines += _claim_lines(claims, m["claims"])
    lines += _bench_lines(records, m["bench"])
    return lines + [""]


def _summary_row(key: str, m: dict, claims, records) -> str:
    if not m["claims"]:
        verdicts = "-"
    elif claims is None:
        verdicts = NOT_MEASURED
    else:
        by_id = {c["id"]: c for c in claims}
        verdicts = ", ".join(
            f"{by_id[c].get('number', c)}: {by_id[c]['verdict']}" if c in by_id
            else f"{c}: {NOT_MEASURED}" for c in m["claims"])
    if not m["bench"]:
        speed = "-"
    elif records is None:
        speed = NOT_MEASURED
    else:
        parts = []
        for layer in m["bench"]:
            s = bench_summary(records, layer)
            if s is None:
                parts.append(f"{layer}: {NOT_MEASURED}")
            elif s["vs_torch"] is not None:
                parts.append(f"{layer}: {_fmt(s['vs_torch']['median'])}")
            else:
                parts.append(f"{layer}: no torch.nn peer")
        speed = "; ".join(parts)
    return f"| [{m['title']}](#{_anchor(m['title'])}) | {verdicts} | {speed} |"


def _anchor(title: str) -> str:
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -")
    return keep.replace(" ", "-")


def generate(claims: list[dict] | None = None, bench: list[dict] | None = None,
             study_label: str | None = None, bench_label: str | None = None) -> str:
    """The Markdown of docs/choosing.md.

    Args:
        claims: the study's claim records (:func:`load_claims`), or None: the claim
            evidence then reads "not measured yet".
        bench: the benchmark's records (:func:`load_bench`), or None: the speed
            evidence reads "not measured yet".
        study_label, bench_label: how to name the sources on the page (their paths).

    Claims of the study that no method lists appear at the end, so that none is lost.
    """
    for key, m in METHODS.items():
        missing = [f for f in _FIELDS if f not in m]
        if missing:
            raise ValueError(f"normlab.docs.METHODS[{key!r}] lacks {missing}")
    src_claims = (f"`{study_label or 'claims.json'}` ({len(claims)} claims)"
                  if claims is not None else NOT_MEASURED)
    src_bench = (f"`{bench_label or 'bench JSON'}` ({len(bench)} records)"
                 if bench is not None else NOT_MEASURED)
    cmd = "normlab docs" + (f" --study {study_label}" if study_label else "") + (
        f" --bench {bench_label}" if bench_label else "") + " --out docs/choosing.md"
    out = [
        "# Choosing a normalization layer",
        "",
        "<!-- Generated by `normlab docs`: edit src/normlab/docs.py, not this file. -->",
        "",
        "Per method: what it normalises, when to use it and when not, what it costs, "
        "and the evidence: the verdicts of the lab's claims (`normlab study`) and the "
        "speed measured by `normlab bench`. The evidence is filled in from their JSON; "
        "where none was given it reads \"not measured yet\".",
        "",
        f"- Claim verdicts: {src_claims}.",
        f"- Speed: {src_bench}. A ratio is the peer's time over normlab's time in the "
        "same cell (shape, dtype, layout, mode, pass): above 1, normlab is faster.",
        f"- Regenerate: `{cmd}`.",
        "",
        "## At a glance",
        "",
        "| method | lab claims (number: verdict) | speed: torch.nn's time / normlab's, "
        "median |",
        "|---|---|---|",
    ]
    out += [_summary_row(k, m, claims, bench) for k, m in METHODS.items()]
    out += ["", "Rules of thumb: batch statistics (BatchNorm, Batch Renorm, SyncBatchNorm) "
            "at 16 or more samples per device; per-sample statistics (GroupNorm, "
            "LayerNorm) below that or when train and eval must agree; no activation "
            "normalization at all with Fixup, SELU or weight normalization when batch "
            "dependence must go.", "", "## Methods", ""]
    for key, m in METHODS.items():
        out += _method_section(key, m, claims, bench)
    if claims is not None:
        listed = {c for m in METHODS.values() for c in m["claims"]}
        others = [c for c in claims if c["id"] not in listed]
        if others:
            out += ["## Other claims of the study", ""]
            out += _claim_lines(others, [c["id"] for c in others]) + [""]
    out += [_RECIPES, "## Names other libraries use", ""]
    out += ["`normlab.create_norm` accepts the names timm, mmcv, detectron2, Keras, Flax "
            "and torch.nn give the same layers. Two differ in meaning: timm's and mmcv's "
            "`layernorm`/`LN` normalise the last dimension of channels-last tensors, and "
            "detectron2's `LN` the channels of (N, C, H, W); normlab's `ln` is over "
            "C x H x W, its `ln2d` over the channels only. timm's `rmsnorm2d` (RMS over "
            "the channels) and `frozenbatchnorm2d` have no normlab layer "
            "(`normlab.convert.freeze_batchnorm` freezes a BatchNorm).", ""]
    out += _aliases_table() + [""]
    return "\n".join(out)


def write(out: str | os.PathLike | None = "docs/choosing.md",
          study: str | os.PathLike | None = None,
          bench: str | os.PathLike | None = None) -> str:
    """Load the evidence, :func:`generate` the page and write it to ``out`` (a path;
    ``None`` or ``"-"``: write nothing). Returns the Markdown."""
    claims = None if study is None else load_claims(study)
    records = None if bench is None else load_bench(bench)
    text = generate(claims, records, None if study is None else str(study),
                    None if bench is None else str(bench))
    if out not in (None, "-"):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text
