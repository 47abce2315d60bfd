"""The stream-knn benchmark harness: ``python -m benchmarks.run --full|--quick``."""
