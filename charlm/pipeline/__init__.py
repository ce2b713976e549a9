"""Pipeline plumbing: params, artifact files and paths, DVCLive, checkpoints, processes: what ties the core to
DVC stages."""
