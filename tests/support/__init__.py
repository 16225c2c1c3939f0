"""Harnesses the tests (and bench/load.py, bench/soak.py) share; no tests here.

- `daemons`: small daemon configurations, the app in process on a real loopback socket,
  a spawned sharedpoold, a JSON-schema checker for the OpenAPI document (`Checked`);
- `harness`: the reliability tests' spawned daemon with extra settings, a client worker
  that records what the daemon acknowledged, the restart check, /proc sampling;
- `deploy_paths`, `metrics_contract`, `prom_server`, `sharedpoold_proc`: the deploy/
  tests' paths, DESIGN.md section 4's metric contract written out, a real Prometheus,
  and the console-script sharedpoold they scrape.

Imported as ``support.<module>``: tests/conftest.py puts tests/ on sys.path.
"""
