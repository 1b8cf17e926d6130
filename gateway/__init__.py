"""The front door: forwards every aimass.v1 method to a healthy replica as raw bytes."""
