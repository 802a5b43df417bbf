"""Memory health in the training logs, read from what the model's forward recorded.

`MemoryTrainer` asks the training forward for the memory internals (`MemoryHealth.OUTPUT_FLAGS`: the
chapter layers' router outputs and the Engram gates, recorded by transformers' output recorder) and
hands each forward's outputs to `MemoryHealth.record`; nothing is recomputed and no hook is registered.
At every logging step `flush` returns, averaged over memory layers and summed over processes:

- `chapter_usage_entropy`: entropy of the routed-chapter counts over real tokens divided by its maximum
  (1 = uniform),
- `chapters_used_fraction`: chapters picked at least once since the last log,
- `engram_gate_mean`: mean Engram gate over real tokens,
- `aux_loss`: mean weighted router loss per forward.

Counts stay on the model's device and are summed across processes only when read, so logging costs one
small all-reduce per logging step.
"""

import math

import torch


class MemoryHealth:
    """Chapter usage, Engram gates and the router aux loss of the training forwards since the last log.

    Args:
        config: the model's `MemoryLlamaConfig` (its chapter layers name the usage counts); the config of a model
            without memory (a plain Llama that MemoryTrainer evaluates) records nothing.
    """

    # The flags a forward must be called with for `record` to see everything it logs.
    OUTPUT_FLAGS = {"output_router_logits": True, "output_engram_gates": True}

    def __init__(self, config):
        self.chapter_layers = sorted(getattr(config, "chapter_layers", None) or [])
        self.num_routed = config.chapter_num_routed if self.chapter_layers else 0
        self.total_chapter_counts: dict[int, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Start the statistics of the next logging step (the run's chapter usage is kept)."""
        self.chapter_counts: dict[int, torch.Tensor] = {}
        self.gate_sum = 0.0
        self.gate_tokens = 0.0
        self.aux_sum = 0.0
        self.aux_count = 0

    def record(self, outputs, attention_mask: torch.Tensor | None = None) -> None:
        """Add one forward's recorded memory outputs.

        Args:
            outputs: the model's output (a `MemoryLlamaCausalLMOutputWithPast` or a dict) of a forward called
                with `OUTPUT_FLAGS`: its `router_indices` (per chapter layer, (B * S, k)), `engram_gates` (per Engram
                layer, (B * S,)) and `aux_loss` are read when present.
            attention_mask: (B, S) the forward's mask (padding not counted), or None when every token is real.
        """
        router_indices = outputs.get("router_indices") or ()
        engram_gates = outputs.get("engram_gates") or ()
        aux_loss = outputs.get("aux_loss")
        with torch.no_grad():
            for layer, chosen in zip(self.chapter_layers, router_indices):
                weights = self._token_weights(attention_mask, chosen).unsqueeze(1).expand(chosen.shape)
                # scatter_add rather than bincount: no device-to-host sync per step
                counts = weights.new_zeros(self.num_routed).scatter_add_(0, chosen.reshape(-1), weights.reshape(-1))
                self.chapter_counts[layer] = self.chapter_counts.get(layer, 0) + counts
                self.total_chapter_counts[layer] = self.total_chapter_counts.get(layer, 0) + counts
            for gate in engram_gates:
                weights = self._token_weights(attention_mask, gate)
                self.gate_sum = self.gate_sum + (gate.double() * weights).sum()
                self.gate_tokens = self.gate_tokens + weights.sum()
            if aux_loss is not None:
                self.aux_sum = self.aux_sum + aux_loss.detach().double()
                self.aux_count += 1

    @staticmethod
    def _token_weights(attention_mask: torch.Tensor | None, per_token: torch.Tensor) -> torch.Tensor:
        """(B * S,) float64: 1 at real tokens, 0 at padding, for a recorded (B * S, ...) tensor."""
        weights = torch.ones(per_token.shape[0], dtype=torch.float64, device=per_token.device)
        if torch.is_tensor(attention_mask) and attention_mask.dim() == 2 and attention_mask.numel() == per_token.shape[0]:
            weights = weights * attention_mask.reshape(-1).to(device=per_token.device, dtype=torch.float64)
        return weights

    def flush(self, accelerator) -> dict[str, float]:
        """The statistics since the last flush, summed over processes; then start over. Every process must call it
        at the same step (it all-reduces)."""
        device = accelerator.device
        logs = {}
        if self.chapter_counts:
            layers = sorted(self.chapter_counts)
            counts = torch.stack([self.chapter_counts[layer].to(device) for layer in layers])
            counts = accelerator.reduce(counts, reduction="sum")
            entropy, used = _usage_statistics(counts)
            logs["chapter_usage_entropy"] = entropy
            logs["chapters_used_fraction"] = used
        if torch.is_tensor(self.gate_tokens):
            gate = torch.stack([self.gate_sum, self.gate_tokens]).to(device)
            gate = accelerator.reduce(gate, reduction="sum")
            logs["engram_gate_mean"] = float(gate[0] / gate[1].clamp_min(1))
        if self.aux_count:
            aux = torch.stack([self.aux_sum.to(device), torch.tensor(float(self.aux_count), dtype=torch.float64, device=device)])
            aux = accelerator.reduce(aux, reduction="sum")
            logs["aux_loss"] = float(aux[0] / aux[1])
        self.reset()
        return logs

    def chapter_usage(self, accelerator=None) -> dict[int, list[float]]:
        """Routed-chapter counts of the whole run per chapter layer (summed over processes when an
        accelerator is given; call it on every process then)."""
        usage = {}
        for layer in sorted(self.total_chapter_counts):
            counts = self.total_chapter_counts[layer]
            if accelerator is not None:
                counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum")
            usage[layer] = counts.cpu().tolist()
        return usage


def _usage_statistics(counts: torch.Tensor) -> tuple[float, float]:
    """(normalised entropy, fraction of chapters used) of (layers, routed) counts, averaged over layers."""
    probs = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=1)
    num_routed = counts.shape[1]
    normalised = entropy / math.log(num_routed) if num_routed > 1 else torch.zeros_like(entropy)
    used = (counts > 0).double().mean(dim=1)
    return float(normalised.mean()), float(used.mean())


__all__ = ["MemoryHealth"]
