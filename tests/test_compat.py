"""Files written before the layered layout still work: a model file and a training checkpoint saved by the code
at d4e4736 (tests/fixtures/*-before-layers.pt, a tiny LSTM) load, generate, resume and fine-tune."""
from __future__ import annotations

from pathlib import Path

import torch

from charlm.core.model import CharRNN
from charlm.core.sampling import generate
from charlm.core.training import Optimisation, Trainer
from charlm.pipeline import artifact
from charlm.pipeline.run import load_initial_weights

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD_MODEL, OLD_CHECKPOINT = FIXTURES / "model-before-layers.pt", FIXTURES / "checkpoint-before-layers.pt"
SHAPE = dict(cell="lstm", hidden=8, layers=1, embedding=4)
OPTIMISATION = Optimisation(lr=1e-3, beta2=0.99, weight_decay=0.0, warmup_steps=0, schedule="constant",
                            min_lr_ratio=0.0, grad_clip=1.0, amp="none")


def test_an_old_model_file_loads_and_generates():
    model, vocab, _ = artifact.load_model(OLD_MODEL)
    assert model.config == {"vocab_size": len(vocab), "dropout": 0.0, **SHAPE}
    records = generate(model, vocab, ["The "], [0.0, 1.0], 20, seed=0)
    for record in records:
        assert record["text"].startswith("The ")
        assert record["stopped_at_eos"] or len(record["text"]) == len("The ") + 20


def test_an_old_checkpoint_samples_and_resumes_into_todays_trainer():
    model, vocab, info = artifact.load_model(OLD_CHECKPOINT)  # `charlm generate --checkpoint` reads it so
    assert info["checkpoint"] and info["steps"] == 1
    saved = artifact.load(OLD_CHECKPOINT, "")
    fresh = CharRNN(len(vocab), **SHAPE)
    trainer = Trainer(fresh, OPTIMISATION, 2, torch.device("cpu"))
    trainer.load_state_dict(saved)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor)
    assert trainer.optimizer.state_dict()["state"], "Adam's moments came back"


def test_an_old_model_file_starts_a_fine_tuning_run():
    _, vocab, _ = artifact.load_model(OLD_MODEL)
    model = CharRNN(len(vocab), **SHAPE)
    sha = load_initial_weights(model, str(OLD_MODEL), vocab)
    assert len(sha) == 64
    old, _, _ = artifact.load_model(OLD_MODEL)
    for name, tensor in old.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
