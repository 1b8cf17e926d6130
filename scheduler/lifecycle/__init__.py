"""The model lifecycle on the control plane: datasets, training jobs, model versions, deployments and blobs."""
