"""Training with memory tables on disk: every training mode (PEFT's included) trains them as it trains tables on the
device; a run killed with SIGKILL in the middle of a checkpoint leaves every earlier checkpoint whole (the working
copy is never the checkpoint), and resuming from it gives bit for bit the weights of a run that never stopped."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_config, wake_memory
from modeling_memory import MemoryLlamaForCausalLM, prepare_model_for_mode
from modeling_memory.choices import TRAINING_MODES
from modeling_memory.training.trainer import MemoryTrainer
from training_helpers import tiny_dataset, tiny_training_args, train_with_placement

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Trains as `train_with_placement` does, and stops for good inside the save of checkpoint-4, just before its first
# table file is streamed, after writing a marker file.
_KILLED_RUN = r"""
import os, sys, time
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]
import modeling_memory.memory_llama.modeling_memory_llama as modeling
from training_helpers import train_with_placement

write = modeling.write_safetensors_streaming
def blocked(path, *args, **kwargs):
    if "checkpoint-4" in path:
        open(sys.argv[4], "w").close()
        time.sleep(600)
    return write(path, *args, **kwargs)
modeling.write_safetensors_streaming = blocked
train_with_placement(sys.argv[2], sys.argv[3], max_steps=6)
"""


@pytest.mark.parametrize("mode", TRAINING_MODES)
def test_every_training_mode_trains_disk_tables_as_it_trains_device_tables(mode, tmp_path):
    """Three MemoryTrainer steps in each mode (LoRA ones through PEFT): every parameter ends as it does with the
    tables on the device, and the tables the mode trains did change."""
    config = tiny_config(vocab_size=97, pkm_layers=[1], pkm_num_keys=8, pkm_top_k=4, pkm_heads=2, pkm_key_dim=16)
    slots = {"model.pkm_values.weight": torch.arange(0, 64, 3)} if mode == "sparse_memory" else None
    trained = []
    for placement in ("device", "disk"):
        torch.manual_seed(0)
        model = wake_memory(MemoryLlamaForCausalLM(config))
        if placement == "disk":
            model.set_memory_placement("disk", str(tmp_path / "offload"))
        before = {name: module.weight.detach().clone() for name, module in model.memory_tables().items()}
        model = prepare_model_for_mode(model, mode, sparse_memory_slots=slots)
        args = tiny_training_args(tmp_path / placement, max_steps=3, per_device_train_batch_size=4)
        MemoryTrainer(model=model, args=args, train_dataset=tiny_dataset(rows=12)).train()
        trained.append({name: param.detach().clone() for name, param in model.named_parameters()})
    device, disk = trained
    assert device.keys() == disk.keys()
    for name, param in device.items():
        torch.testing.assert_close(disk[name], param, rtol=1e-5, atol=1e-6, msg=name)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert base.memory_placement == "disk"
    assert any(not torch.equal(module.weight, before[name]) for name, module in base.memory_tables().items())


@pytest.mark.slow
def test_sigkill_mid_checkpoint_corrupts_nothing_and_resume_is_exact(tmp_path):
    killed_out, killed_offload, marker = tmp_path / "killed", tmp_path / "killed-offload", tmp_path / "blocked"
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, TESTS, str(killed_out), str(killed_offload), str(marker)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before checkpoint-4: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    # The checkpoint written before the kill is whole and loads with plain from_pretrained.
    checkpoint = killed_out / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists()
    saved = MemoryLlamaForCausalLM.from_pretrained(checkpoint)
    assert set(saved.memory_tables()) == {
        "model.layers.0.engram.table.weight", "model.chapter_bank.weight", "model.pkm_values.weight"
    }

    resumed = train_with_placement(killed_out, killed_offload, max_steps=6, resume=True)
    uninterrupted = train_with_placement(tmp_path / "whole", tmp_path / "whole-offload", max_steps=6)
    for name, param in uninterrupted.named_parameters():
        assert torch.equal(resumed.get_parameter(name), param), name
    assert resumed.memory_placement == "disk"
