"""A simulated hv_netvsc driver and Hyper-V host that exercise the pool.

- `client`: the seam between the driver and the pool (PoolClient; InProcessClient over a
  strategy, RemoteClient over the daemon's API); one exception, PoolError.
- `host`: the simulated Hyper-V host: GPADLs (refused when a page is not shared), channels,
  NVSP answers, traffic into the receive buffer with a use-after-free detector.
- `device`: the netvsc device life cycle: probe, traffic, remove, ring resize, MTU and
  channel changes (detach + attach), VF failover; leaks counted when re-encryption fails.
- `scenario`: a seeded event engine with a virtual clock: N vNICs, M cycles of hot
  remove/add plus mixed events, the guest's churn and the strategy's maintenance between
  events.
- `compare`: every strategy on the same seed, aged guest and events (`compare --json`,
  DESIGN.md section 4); `report`: tables, progress, the plot; `cli`: `hv-netvsc-sim`.
"""
