"""A simulated hv_netvsc driver and Hyper-V host that exercise the pool."""
