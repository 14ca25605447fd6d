"""Remote devices reached over SSH: a registry, the ssh client wrapper, and the runner sent to the device."""
