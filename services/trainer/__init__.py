"""The trainer process: runs tenants' training jobs for the scheduler (aimass.v1.TrainerService)."""
