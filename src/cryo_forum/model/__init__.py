"""The network: layers, rotation heads, encoders, losses and the orientation estimator."""
