"""alphadpo-ray: preference-optimization studies (AlphaDPO and its baselines) with Ray, DeepSpeed, Optuna and MLflow."""

__version__ = "0.1.0"
