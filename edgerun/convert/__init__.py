"""Conversion of checkpoints (Hugging Face safetensors directories, GGUF files) into .ebin."""
