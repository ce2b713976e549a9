"""Core: text, vocabulary, packed data, the model, sampling, scoring and training. Knows nothing of DVC."""
