"""Distributed FSPO training: Ray Data pipeline → Ray Train TorchTrainer running DeepSpeed."""
