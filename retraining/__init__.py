"""tellerloop retraining: dataset building, training, evaluation, registry, experiments (later issues)."""
