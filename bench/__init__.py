"""charlm benchmarks: `make bench` (bench.run) and `make bench-quality` (bench.quality)."""
