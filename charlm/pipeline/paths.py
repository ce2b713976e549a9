"""Where the pipeline's files live, relative to the repository root: the one spelling in the code of the paths
that dvc.yaml declares. The stages, the CLI and the server use these names (tests/test_paths.py holds them and
dvc.yaml together), so renaming an output is one edit here and one in dvc.yaml."""

from pathlib import Path

RAW = Path("data/raw")  # download: train.csv, test.csv
PREPARED = Path("data/prepared")  # prepare: train.txt, test.txt
VOCAB = Path("data/vocab.json")
PACKED = Path("data/packed")  # pack: train.npy, val.npy, test.npy, meta.json
MODEL = Path("models/model.pt")
LIVE = Path("dvclive")  # train's DVCLive folder: metrics.json and plots/
TRAIN_SAMPLES = Path("reports/train_samples.md")
EVAL_METRICS = Path("metrics/eval.json")
SAMPLES_MD, SAMPLES_JSON = Path("reports/samples.md"), Path("reports/samples.json")
GENERATE_METRICS = Path("metrics/generate.json")
INIT = Path("init")  # starting models for fine-tuning; a dependency of vocab and train

# Not DVC outputs: DVC deletes a stage's outputs before it reruns it, and a checkpoint must outlive a killed run.
CHECKPOINT = Path("checkpoints/train.pt")
# A queued or --temp experiment's checkpoint, in the repository it was queued from (see pipeline/checkpoints.py).
KEYED_CHECKPOINTS = Path(".dvc/tmp/charlm-checkpoints")
