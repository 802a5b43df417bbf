"""Training: MemoryTrainer, the table optimizers, training modes and PEFT adapters, sparse memory fine-tuning."""
