"""sharedpoold: the daemon serving a SharedPool."""
