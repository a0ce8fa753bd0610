"""Optuna searches whose trials are nested MLflow runs, and the registration of their winners."""
