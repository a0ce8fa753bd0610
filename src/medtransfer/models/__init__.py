"""Backbones, weight converters, pretraining sources and model packaging."""
