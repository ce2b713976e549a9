"""charlm: reproducible character-level RNN language models on DVC."""
