"""MemoryLlamaCache: transformers' DynamicCache plus the state Engram needs during incremental decoding.

During `generate` only new tokens reach `forward`, but Engram's n-grams need the previous tokens and
its short convolution needs the previous conv inputs. Both are kept here for the whole sequence, so
that beam search (reorder), assisted decoding (crop) and batch expansion treat them exactly like the
key/value states.
"""

import torch
from transformers.cache_utils import DynamicCache


class MemoryLlamaCache(DynamicCache):
    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.engram_token_ids: torch.Tensor | None = None  # (B, seen) raw ids
        self.engram_boundaries: torch.Tensor | None = None  # (B, seen) bool: EOS or padding
        self.engram_conv_inputs: dict[int, torch.Tensor] = {}  # layer -> (B, seen, d)

    # --- Engram state -------------------------------------------------------------------------
    def engram_history(self, batch_size: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `length` tokens and boundary flags seen, left-filled with boundaries."""
        ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        boundaries = torch.ones(batch_size, length, dtype=torch.bool, device=device)
        seen = 0 if self.engram_token_ids is None else min(length, self.engram_token_ids.shape[1])
        if seen > 0:
            ids[:, length - seen :] = self.engram_token_ids[:, -seen:]
            boundaries[:, length - seen :] = self.engram_boundaries[:, -seen:]
        return ids, boundaries

    def append_engram_tokens(self, token_ids: torch.Tensor, boundaries: torch.Tensor) -> None:
        if self.engram_token_ids is None:
            self.engram_token_ids, self.engram_boundaries = token_ids, boundaries
        else:
            self.engram_token_ids = torch.cat([self.engram_token_ids, token_ids], dim=1)
            self.engram_boundaries = torch.cat([self.engram_boundaries, boundaries], dim=1)

    def engram_conv_history(self, layer_idx: int, length: int) -> torch.Tensor | None:
        """(B, length, d) conv inputs before the current chunk, left-filled with zeros; None if nothing seen."""
        seen = self.engram_conv_inputs.get(layer_idx)
        if seen is None:
            return None
        kept = seen[:, seen.shape[1] - min(length, seen.shape[1]) :]
        return torch.nn.functional.pad(kept, (0, 0, length - kept.shape[1], 0))

    def append_engram_conv_inputs(self, layer_idx: int, conv_inputs: torch.Tensor) -> None:
        seen = self.engram_conv_inputs.get(layer_idx)
        self.engram_conv_inputs[layer_idx] = conv_inputs if seen is None else torch.cat([seen, conv_inputs], dim=1)

    def _map_engram_state(self, fn) -> None:
        if self.engram_token_ids is not None:
            self.engram_token_ids = fn(self.engram_token_ids)
            self.engram_boundaries = fn(self.engram_boundaries)
        self.engram_conv_inputs = {layer: fn(state) for layer, state in self.engram_conv_inputs.items()}

    # --- Cache operations used by generate: applied to the Engram state as to the key/values ----
    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_engram_state(lambda state: state.index_select(0, beam_idx.to(state.device)))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove > 0:
            raise ValueError("`crop` takes a negative number: minus the number of tokens to remove.")
        if tokens_to_remove < 0:
            self._map_engram_state(lambda state: state[:, :tokens_to_remove])

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_engram_state(lambda state: state.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_engram_state(lambda state: state[indices])

    def reset(self):
        super().reset()
        self.engram_token_ids = self.engram_boundaries = None
        self.engram_conv_inputs = {}
