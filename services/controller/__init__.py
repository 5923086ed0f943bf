"""The control plane: model registry, placement on Triton replicas, loading and autoscaling."""
