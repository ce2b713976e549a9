"""One module per params.yaml section, each declaring its keys and their rules once (the values and their
documentation live in params.yaml). Only the stages that read a section import its module, so dvc.yaml lists it
as a dependency of those stages alone: adding or changing a `generate` key reruns generate and nothing else."""
