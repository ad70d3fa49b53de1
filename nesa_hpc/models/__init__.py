"""Model families: naming a model's parts and running them through its own transformers code (adapter),
building a rank's skeleton and loading only its tensors (weights), LoRA adapters (lora)."""
