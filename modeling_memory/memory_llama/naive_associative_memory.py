"""Naive reference of the associative memory (Memory Mosaics v2), written from the equations token by token, pair
by pair, in float64: what the tests compare `MemoryLlamaAssociativeMemory` against (which reads its pairs through
the attention interface with masks, and its keys through a log-space scan)."""

import math

import torch


@torch.no_grad()
def naive_level_read(level, hidden: torch.Tensor, real: list[bool], first_lag: int, last_lag: int | None) -> torch.Tensor:
    """One memory's output for one sequence.

    Args:
        level: a `MemoryLlamaAssociativeMemoryLevel` (its parameters are read, in float64).
        hidden: (S, d) the layer's normed input.
        real: per position, False at padding (padding neither changes the key state nor is read).
        first_lag, last_lag: token T reads the pairs t with first_lag <= T - t <= last_lag (None: no bound).
    Returns:
        (S, H * D) float64.
    """
    x = hidden.double()
    heads, dim = level.num_heads, level.head_dim
    linear = lambda layer: (x @ layer.weight.double().T)  # noqa: E731
    projected = linear(level.mosaic_key).view(-1, heads, dim)
    gates = linear(level.mosaic_key_gate).exp()
    decays = (-linear(level.mosaic_key_decay).abs()).exp()
    lookahead = linear(level.mosaic_value).view(-1, heads, dim)
    mix = level.value_mix.double()
    value_scale = level.value_log_scale.double().abs().clamp(max=15).exp()
    base = level.bandwidth_log_base.double().clamp(max=10).exp()
    slope = level.bandwidth_log_slope.double().clamp(max=10).exp()
    exponent = level.bandwidth_exponent.double().abs().clamp(max=1)

    length = x.shape[0]
    output = torch.zeros(length, heads, dim, dtype=torch.float64)
    for head in range(heads):
        state = torch.zeros(dim, dtype=torch.float64)
        keys = []
        for t in range(length):
            if real[t]:
                state = gates[t, head] * projected[t, head] + decays[t, head] * state
            norm = state.norm()
            keys.append(state / norm if norm > 0 else torch.zeros(dim, dtype=torch.float64))
        values = []
        for t in range(length - 1):
            blend = mix[head] * lookahead[t, head] + (1 - mix[head]) * lookahead[t + 1, head]
            values.append(value_scale[head] * blend / blend.norm())
        for query in range(length):
            readable = [
                t for t in range(query)
                if real[t] and query - t >= first_lag and (last_lag is None or query - t <= last_lag)
            ]
            if not readable:
                continue
            beta = slope[head] * len(readable) ** exponent[head] + base[head]
            scores = [beta * float(keys[query] @ keys[t]) for t in readable]
            top = max(scores)
            weights = [math.exp(score - top) for score in scores]
            total = sum(weights)
            output[query, head] = sum(w / total * values[t] for w, t in zip(weights, readable))
    return output.reshape(length, heads * dim)


@torch.no_grad()
def naive_associative_memory(memory, hidden: torch.Tensor, token_mask: torch.Tensor, delays: list[int]) -> torch.Tensor:
    """`MemoryLlamaAssociativeMemory.forward` without a cache, sequence by sequence: (B, S, d) float64.

    `delays`: the long-term delay m of each sequence (`memory.min_delay` at inference)."""
    outputs = []
    for row in range(hidden.shape[0]):
        real = token_mask[row].tolist()
        parts = []
        if memory.short_term is not None:
            parts.append(naive_level_read(memory.short_term, hidden[row], real, 1, memory.short_window - 1))
        parts.append(naive_level_read(memory.long_term, hidden[row], real, delays[row], None))
        outputs.append(torch.cat(parts, dim=-1) @ memory.mosaic_output.weight.double().T)
    return torch.stack(outputs)
