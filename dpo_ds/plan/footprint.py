"""What a phase holds in memory per rank, term by term, from the model's config and the DeepSpeed config alone
(no weights: the model is built on the meta device for its exact parameter counts). `dpo_ds.plan` prints it.

Per rank, N parameters, W ranks (ZeRO partitions over all of them), p bytes per parameter (2 bf16, 4 fp32):

    parameters      N·p (stage < 3), N·p/W + the persistent small ones + the gathered working set (stage 3:
                    the largest layer twice, for the prefetch, plus the prefetch bucket, at most N·p)
    gradients       N·p (stage < 2; + N·4 fp32 accumulation under bf16), N·p/W + the reduce bucket (stage 2, 3)
    optimizer       AdamW: m and v in fp32 (8 B) + an fp32 master copy under bf16 (4 B), per parameter,
                    /W from stage 1; with offload_optimizer on the host (+ the fp32 gradient partition there)
    adapters        with LoRA (--use_peft) N includes the adapters' parameters, and gradients and optimizer
                    count theirs alone (their activations, [tokens, r] per targeted layer, are not counted)
    activations     with gradient checkpointing: every layer's input [tokens, H] + one layer recomputed and its
                    backward; without: every layer's. tokens = micro-batch x 2 x max_length / K (chosen and
                    rejected padded to the longest row: the upper bound; shared prompt and packing use less)
    output head     the chunked log-probs: a few [chunk, V] fp32 tensors (dpo_ds.model.logps), never [B, T, V]
    runtime         what the process holds besides the above: on CUDA the context (outside max_memory_allocated,
                    inside the device's total: not counted); on the CPU (device = host) measured by dpo_ds.plan
                    (dpo_ds/plan/probe.py: the model cut to one layer, the real batch) less that job's terms
    excess          CPU only: what each further layer costs beyond its terms (the allocator's slack), as a factor
                    measured at one and three layers, applied to the terms' growth beyond the first layer

Precompute and evaluate: the parameters alone (sharded by zero3_inference: N·p/W + the working set) and one
forward's transient activations without gradient. The same job in a two-model trainer adds the reference's
parameters (sharded alike) and its forward: that difference is the cache's saving.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from dpo_ds.engine.ds_config import offloaded, read_ds_config
from dpo_ds.errors import UserError

GiB = 2 ** 30
ADAM_STATE = 8          # m and v, fp32
FP32 = 4
# the layer's tensors kept for backward, in [tokens, H]-sized units besides the MLP's [tokens, I] ones: norms (2),
# q/k/v/o projections (4, GQA's smaller k/v counted whole), residuals (2); the MLP keeps gate, up, act (3 x I)
LAYER_H_UNITS, LAYER_I_UNITS = 8, 3
HEAD_CHUNK_COPIES = 4   # logits, their softmax or exp, log-softmax and the gradient: [chunk, V] fp32 each


@dataclass
class Shape:
    """What the terms need from a model: counts from the meta-device model, sizes from its config."""
    params: int           # every parameter (tied embeddings once)
    largest_layer: int    # the largest top-level block's (a decoder layer or the embedding)
    small: int            # parameters in tensors of under `threshold` elements (ZeRO-3 keeps them whole)
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    layer_params: int = 0  # one decoder layer's parameters, and those of them under the threshold
    layer_small: int = 0

    def cut(self, layers: int) -> "Shape":
        """The same model with `layers` decoder layers."""
        drop = self.layers - layers
        return dataclasses.replace(self, params=self.params - drop * self.layer_params,
                                   small=self.small - drop * self.layer_small, layers=layers)

    @classmethod
    def of(cls, model: str, threshold: float = 1e5, layers: int | None = None, trust_remote_code: bool = False
           ) -> "Shape":
        """`model`: a checkpoint directory or its config.json; `layers`: cut to that many (the probe's)."""
        from transformers import AutoModelForCausalLM

        config = config_of(model, layers, trust_remote_code)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        params = {id(p): p for p in lm.parameters()}.values()
        blocks = [m for m in lm.modules() if isinstance(m, torch.nn.ModuleList)]
        first = list(blocks[0][0].parameters()) if blocks and len(blocks[0]) else []
        layer = max((sum(p.numel() for p in b.parameters()) for b in blocks[0]), default=0) if blocks else 0
        embed = lm.get_input_embeddings().weight.numel()
        text = text_config(config)
        return cls(sum(p.numel() for p in params), max(layer, embed),
                   sum(p.numel() for p in params if p.numel() < threshold), text.num_hidden_layers,
                   text.hidden_size, getattr(text, "intermediate_size", 4 * text.hidden_size), text.vocab_size,
                   sum(p.numel() for p in first), sum(p.numel() for p in first if p.numel() < threshold))


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_of(model: str, layers: int | None = None, trust_remote_code: bool = False):
    """The model's config (from a checkpoint directory or its config.json), cut to `layers` when given."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.path.dirname(model) if os.path.isfile(model) else model,
                                        trust_remote_code=trust_remote_code)
    if layers is not None:
        text = text_config(config)
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):  # cut, or extended in its own pattern (the probe's 3 of a 2-layer)
            text.layer_types = [text.layer_types[i % len(text.layer_types)] for i in range(layers)]
    return config


@dataclass
class Job:
    """The settings the terms depend on."""
    ds: dict                  # the DeepSpeed config (training or zero3_inference), {} for none
    world: int                # ranks
    micro_batch: int          # pairs per forward
    max_length: int           # tokens per sequence (prompt + response)
    sp: int = 1               # sequence-parallel size K
    tiled_mlp: bool = False
    checkpointing: bool = True
    chunk: int = 256          # --logp_chunk_size
    device: str = "cuda"      # cuda | cpu
    runtime: int = 0          # bytes the process holds before the model (see the module docstring)
    excess: float = 0.0       # CPU: what a layer really costs per modelled byte beyond 1 (dpo_ds.plan measures it)
    adapter: int = 0          # LoRA's parameters (adapter_params): only they get gradients and optimizer state;
    #                           0 = every parameter trains

    def zero(self, key: str, default=None):
        return self.ds.get("zero_optimization", {}).get(key, default)

    @property
    def stage(self) -> int:
        return int(self.zero("stage", 0))

    @property
    def param_bytes(self) -> int:
        return 2 if self.ds.get("bf16", {}).get("enabled") or self.ds.get("fp16", {}).get("enabled") else FP32

    def offloads(self, what: str) -> bool:
        return what in offloaded(self.ds)

    @property
    def tokens(self) -> int:
        """Token positions per rank in one forward: chosen and rejected rows, split K ways."""
        return math.ceil(2 * self.micro_batch * self.max_length / self.sp)


def parameters(s: Shape, j: Job) -> dict:
    p, n = j.param_bytes, s.params + j.adapter
    if j.stage < 3:
        return {"parameters": n * p}
    live = min(n, 2 * s.largest_layer + int(float(j.zero("stage3_prefetch_bucket_size", 5e7))))
    sharded = 0 if j.offloads("param") else math.ceil(n / j.world) * p
    return {"parameters": sharded + s.small * p + live * p,
            "parameters (host, offloaded)": math.ceil(n / j.world) * p if j.offloads("param") else 0}


def gradients_and_optimizer(s: Shape, j: Job) -> dict:
    """Of the trained parameters: every one, or the adapter's (j.adapter)."""
    p, n = j.param_bytes, j.adapter or s.params
    part = math.ceil(n / j.world)
    bucket = min(n, int(float(j.zero("reduce_bucket_size", 5e8)))) * p
    grads = n * p + (n * FP32 if p < FP32 else 0) if j.stage < 2 else part * p + bucket
    state = (ADAM_STATE + (FP32 if p < FP32 else 0)) * (n if j.stage == 0 else part)
    if j.offloads("optimizer"):  # moments, master copy and an fp32 gradient partition move to the host
        return {"gradients": grads, "optimizer states": 0,
                "optimizer states (host, offloaded)": state + part * FP32 + (part * FP32 if p == FP32 else 0)}
    return {"gradients": grads, "optimizer states": state}


def activations(s: Shape, j: Job, training: bool) -> dict:
    """Per-rank activation memory of one micro-batch (training) or one forward (inference)."""
    a, t, h = j.param_bytes, j.tokens, s.hidden
    mlp = t * s.intermediate * a * LAYER_I_UNITS
    if j.tiled_mlp:  # DeepSpeed's TiledMLP: ceil(tokens / H) tiles, one at a time
        mlp = math.ceil(mlp / max(1, math.ceil(t / h)))
    layer = t * h * a * LAYER_H_UNITS + mlp
    head = j.chunk * s.vocab * FP32 * HEAD_CHUNK_COPIES + t * h * a
    if not training:
        return {"activations": t * h * a * 2 + layer // 2, "output head": head}
    if j.checkpointing:
        return {"activations": s.layers * t * h * a + 2 * layer, "output head": head}
    return {"activations": s.layers * layer + layer, "output head": head}


def phase(s: Shape, j: Job, name: str) -> dict:
    """{term: bytes} of one phase (train, precompute, evaluate) per rank; `total` is their sum on the device (the
    host's offloaded terms too on the CPU, where the host is the device)."""
    training = name == "train"
    terms = {**parameters(s, j)}
    if training:
        terms.update(gradients_and_optimizer(s, j))
    terms.update(activations(s, j, training))
    if j.excess and s.layers > 1:  # what a layer really costs beyond its terms, measured: on every layer but one
        on_device = lambda t: sum(v for k, v in t.items() if j.device == "cpu" or "host" not in k)  # noqa: E731
        one = phase(s.cut(1), dataclasses.replace(j, excess=0.0, runtime=0), name)
        terms["measured excess over the terms"] = int(j.excess * max(0, on_device(terms) - one["total"]))
    terms["runtime"] = j.runtime
    counted = [v for k, v in terms.items() if j.device == "cpu" or "host" not in k]
    return {**terms, "total": sum(counted)}


def checkpoint(s: Shape, j: Job) -> dict:
    """What one training checkpoint writes: the trained parameters' fp32 weights (the master copy under bf16) and
    Adam's two moments, 12 B each, partitioned across the ranks under ZeRO (stage 0: rank 0 writes them all), plus
    the bf16 module copy rank 0 writes beside them where the weights train in bf16 outside ZeRO-3. -> {bytes in
    all, bytes of the busiest rank}: what a stop at a signal must write before the scheduler's SIGKILL."""
    n = j.adapter or s.params
    state = n * (FP32 + ADAM_STATE)
    module = s.params * j.param_bytes if j.param_bytes < FP32 and j.stage < 3 and not j.adapter else 0
    busiest = state if j.stage == 0 else math.ceil(state / j.world)
    return {"bytes": state + module, "busiest_rank_bytes": busiest + module}


def two_model(s: Shape, j: Job) -> dict:
    """The training phase with the reference resident too, sharded as the policy (no gradients, no optimizer):
    what a two-model trainer holds."""
    train = phase(s, j, "train")
    ref = {k: v for k, v in parameters(s, j).items() if j.device == "cpu" or "host" not in k}
    if j.adapter:  # TRL's reference for adapters is the same model with them disabled: a forward, no weights
        ref = {}
    forward = activations(s, j, training=False)["activations"]
    return {**train, "reference parameters": sum(ref.values()), "reference forward": forward,
            "total": train["total"] + sum(ref.values()) + forward}


def adapter_params(model: str, r: int, targets=None, modules_to_save=None, trust_remote_code: bool = False) -> int:
    """LoRA's parameters on `model`: r·(in + out) per targeted linear layer (default and all-linear: those
    inside the decoder layers, as pretrained.adapters chooses), plus the modules trained in full."""
    from transformers import AutoModelForCausalLM

    from dpo_ds.pretrained.adapters import default_targets

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config_of(model, None, trust_remote_code),
                                              trust_remote_code=trust_remote_code)
    default = not targets or list(targets) == ["all-linear"]
    names = set(default_targets(lm) if default else targets)
    total = 0
    for name, module in lm.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and leaf in names and (".layers." in name or not default):
            total += r * (module.in_features + module.out_features)
        if modules_to_save and leaf in modules_to_save:
            total += sum(p.numel() for p in module.parameters())
    if not total:
        raise UserError(f"--lora_target_modules {' '.join(names)}: no linear layer of {model} has that name")
    return total


def adapter_of(cfg) -> int:
    """adapter_params for a phase's settings (train's or plan's): 0 without --use_peft."""
    if not getattr(cfg, "use_peft", False):
        return 0
    return adapter_params(cfg.model, cfg.lora_r, cfg.lora_target_modules, cfg.lora_modules_to_save,
                          getattr(cfg, "trust_remote_code", False))


def read_ds(path: str | dict | None) -> dict:
    """A DeepSpeed config: its file, or the config itself ({} for none)."""
    return dict(path or {}) if isinstance(path, dict) or not path else read_ds_config(path)
