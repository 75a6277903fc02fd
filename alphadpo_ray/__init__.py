"""alphadpo-ray: preference-optimization studies (AlphaDPO and its baselines) with Ray, DeepSpeed, Optuna and MLflow."""

import os as _os

# OpenMP's idle threads sleep instead of spinning (alphadpo_ray/ml/threads.py): read once, when torch loads its
# OpenMP runtime, so it is set here, before any module of the package imports torch.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
