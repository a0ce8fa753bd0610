"""Fine-tuning and pretraining: the training loop, augmentation, metrics, presets."""
